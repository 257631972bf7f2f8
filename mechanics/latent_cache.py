"""Cached VAE latents and prompt embeddings (--cache_latents): the encoders run once, then never again.

A first pass encodes every image of the dataset (both horizontal flips when flips are on) and every unique
caption, plus the empty prompt that caption dropout trains on, with the model's own frozen encoders, into numpy
files under OUTPUT_DIR/cache (or --cache_dir). Training then reads those instead of decoding images and running
the VAE and the text encoders, which can then leave the accelerator.

What is stored per image is the VAE posterior's parameters (mean and log-variance), not a sampled latent: every
epoch still draws a fresh latent z = mean + std·ε from the micro-batch's own generator, exactly as the uncached
path does, so the cache changes no number beyond float rounding (test_cache.py checks the loss). A sampled
latent would halve the storage but freeze one posterior sample per image for the whole run.

Augmentation: crops must be center crops (a random crop would need every offset cached; the trainer refuses
--random_crop with the cache). Flips are cached both ways, and each item picks its flip, and whether its caption
is dropped, by the same (seed, epoch, row) draw as data.PairTransform, so the cached and the uncached run see the
same augmented pairs in the same order. --no_flip halves the cache and the first pass.

Layout, <cache_dir>/<model>-<cache_key>/: meta.json (written last: a folder without it is incomplete and is
rebuilt), captions.json (the unique captions, "" first), caption_ids.npy [pairs], and for each rank r of the run
that built it (pair i is on rank i % W at row i // W, caption j on rank j % W at row j // W):
    moments-r.npy   [n_r, flips, 2 (winner, loser), 2·C, h, w]   the VAE posterior parameters
    sizes-r.npy     [n_r, flips, 2, 4]    original (h, w) and crop (top, left), SDXL's micro-conditioning
    valid-r.npy     [n_r]                 False for a pair whose image did not decode (skipped, as uncached)
    prompt-NAME-r.npy [m_r, ...]          each tensor of the model's `encode_captions`, one row per caption
numpy .npy files, opened as memory maps: a batch reads its rows, nothing is loaded whole, so the cache streams
from disk (about 64 KB per SD1.5 image at 512 px in bf16, ×2 for the flips, and 77×768 values per caption).
bf16 has no numpy dtype: its bits are stored as uint16 and viewed back.

The train script passes the two halves of its encoding, `encode_images(pixels) -> moments` and
`encode_captions(captions) -> {name: Tensor[n, ...]}`; its loop then takes `latent_moments` and `prompt_embeds`
from a batch in place of `pixel_values` and `captions` (train_sd15.py, `encode`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from offline import cache

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
IMAGES_PER_VAE_CALL = 8     # bounds the first pass's activation memory at 1024 px
CAPTIONS_PER_CALL = 64

_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
_FROM_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().view(_TO_NUMPY[t.dtype])


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a copy: the memory map stays read-only
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _FixedDraws(data.PairTransform):
    """data.PairTransform with the flip fixed and no caption dropout: one cached variant of a pair."""

    def __init__(self, base: data.PairTransform, flip: bool):
        super().__init__(base.resolution, random_crop=False, random_flip=flip, caption_dropout=0.0, seed=base.seed)
        self.flip = flip

    def draws(self, epoch: int, key: int) -> dict:
        return {"u_top": 0.0, "u_left": 0.0, "flip": self.flip, "drop_caption": False}


class _Variants(torch.utils.data.Dataset):
    """Local index → (local index, the pair's cached variants as data.PairTransform items, or None each if
    undecodable), for DataLoader workers to decode in parallel during the first pass."""

    def __init__(self, dataset, indices, variants):
        self.dataset, self.indices, self.variants = dataset, indices, variants

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, local):
        pair = self.dataset[self.indices[local]]
        return local, [variant(pair, 0, pair["row"]) for variant in self.variants]


def pair_captions(dataset: data.PairDataset) -> list[str]:
    """Each pair's caption (None → ""), read from the caption column alone (no image is decoded)."""
    column = dataset.hf.select_columns(["caption"]).with_format("arrow")[:].column("caption").to_pylist()
    return ["" if column[row] is None else str(column[row]) for row in dataset.rows]


def cache_key(run, args, dataset: data.PairDataset, transform: data.PairTransform, captions: list[str]) -> str:
    """What the cached numbers depend on; a change of any of it means another cache folder."""
    digest = hashlib.sha256()
    digest.update(np.asarray(dataset.rows, np.int64).tobytes())
    digest.update(np.asarray(dataset.winner_is_0, np.bool_).tobytes())
    digest.update("\0".join(captions).encode())
    key = {"version": CACHE_VERSION, "model": run.family, "pretrained_model": (os.path.abspath(args.pretrained_model)
                                                                    if os.path.isdir(args.pretrained_model)
                                                                    else args.pretrained_model),
           "model_options": {k: getattr(args, k, None) for k in ("vae", "drop_t5", "t5_max_length")},
           "dataset": str(args.dataset), "split": args.split,
           "columns": {k: getattr(args, k, None) for k in ("caption_column", "chosen_column", "rejected_column",
                                                          "label_column")}, "pairs": len(dataset), "content": digest.hexdigest(),
           "resolution": transform.resolution, "flips": bool(transform.random_flip),
           "dtype": _dtype_name(run.weight_dtype)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _barrier(runtime):
    if runtime.world_size > 1:
        dist.barrier()


def build(folder: str, encode_images, encode_captions, dataset: data.PairDataset, transform: data.PairTransform,
          captions: list[str], runtime, num_workers: int = 0) -> None:
    """The first pass: this rank encodes pairs i ≡ rank and captions j ≡ rank (mod world size) with the train
    script's `encode_images` and `encode_captions`; images are decoded by `num_workers` DataLoader workers."""
    rank, world = runtime.rank, runtime.world_size
    building = folder + ".building"
    if runtime.is_main:
        shutil.rmtree(building, ignore_errors=True)
        os.makedirs(building)
    _barrier(runtime)
    path = lambda name: os.path.join(building, f"{name}-{rank}.npy")
    flips = (False, True) if transform.random_flip else (False,)
    variants = [_FixedDraws(transform, flip) for flip in flips]
    mine = list(range(rank, len(dataset), world))
    valid = np.zeros(len(mine), np.bool_)
    sizes = np.zeros((len(mine), len(flips), 2, 4), np.int64)
    layout = {"moments": None, "prompts": {}}
    moments_file = None
    per_call = max(1, IMAGES_PER_VAE_CALL // (2 * len(flips)))
    progress = tqdm(total=len(mine), desc="caching latents", disable=not runtime.is_main, dynamic_ncols=True)
    decoded = torch.utils.data.DataLoader(_Variants(dataset, mine, variants), batch_size=per_call,
                                          num_workers=num_workers, collate_fn=list)
    for chunk in decoded:
        rows, pixels = [], []
        for local, items in chunk:
            if any(item is None for item in items):
                continue  # undecodable: stays invalid, and is skipped at training time as without the cache
            valid[local] = True
            rows.append(local)
            for f, item in enumerate(items):
                pixels.extend(item["pixels"])
                for side in (0, 1):
                    sizes[local, f, side] = [*item["original_sizes"][side], *item["crop_top_lefts"][side]]
        progress.update(len(chunk))
        if not rows:
            continue
        moments = encode_images(torch.stack(pixels))
        if moments_file is None:
            layout["moments"] = [list(moments.shape[1:]), _dtype_name(moments.dtype)]
            moments_file = np.lib.format.open_memmap(path("moments"), mode="w+", dtype=_TO_NUMPY[moments.dtype],
                                                     shape=(len(mine), len(flips), 2, *moments.shape[1:]))
        moments = _to_numpy(moments).reshape(len(rows), len(flips), 2, *moments.shape[1:])
        moments_file[rows] = moments
    progress.close()
    if moments_file is not None:
        moments_file.flush()
        del moments_file
    np.save(path("valid"), valid)
    np.save(path("sizes"), sizes)

    unique = [""] + sorted(set(captions) - {""})
    my_captions = unique[rank::world]
    files = {}
    for start in range(0, len(my_captions), CAPTIONS_PER_CALL):
        out = encode_captions(my_captions[start:start + CAPTIONS_PER_CALL])
        for name, tensor in out.items():
            if name not in files:
                layout["prompts"][name] = [list(tensor.shape[1:]), _dtype_name(tensor.dtype)]
                files[name] = np.lib.format.open_memmap(path(f"prompt-{name}"), mode="w+",
                                                        dtype=_TO_NUMPY[tensor.dtype],
                                                        shape=(len(my_captions), *tensor.shape[1:]))
            files[name][start:start + len(tensor)] = _to_numpy(tensor)
    for file in files.values():
        file.flush()
    files.clear()
    with open(os.path.join(building, f"layout-{rank}.json"), "w") as f:
        json.dump(layout, f)
    _barrier(runtime)
    if runtime.is_main:
        layouts = [json.load(open(os.path.join(building, f"layout-{r}.json"))) for r in range(world)]
        moments_layout = next((l["moments"] for l in layouts if l["moments"]), None)
        index = {c: j for j, c in enumerate(unique)}
        np.save(os.path.join(building, "caption_ids.npy"), np.asarray([index[c] for c in captions], np.int64))
        with open(os.path.join(building, "captions.json"), "w") as f:
            json.dump(unique, f)
        meta = {"version": CACHE_VERSION, "world_size": world, "flips": len(flips), "pairs": len(dataset),
                "captions": len(unique), "moments": moments_layout, "prompts": layouts[0]["prompts"],
                "ranks_with_moments": [r for r, l in enumerate(layouts) if l["moments"]]}
        with open(os.path.join(building, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        cache.fsync_tree(building)  # complete on the disk before it takes the final name
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
    _barrier(runtime)


class LatentCache:
    """Read access to a built cache folder (memory-mapped; nothing is loaded whole)."""

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = meta = json.load(f)
        self.world = meta["world_size"]
        self.num_flips = meta["flips"]
        with open(os.path.join(folder, "captions.json")) as f:
            self.captions = json.load(f)
        self.caption_ids = np.load(os.path.join(folder, "caption_ids.npy"))
        load = lambda name, r: np.load(os.path.join(folder, f"{name}-{r}.npy"), mmap_mode="r")
        self.valid = [load("valid", r) for r in range(self.world)]
        self.sizes = [load("sizes", r) for r in range(self.world)]
        self.moments = [load("moments", r) if r in meta["ranks_with_moments"] else None for r in range(self.world)]
        self.moments_dtype = _FROM_NAME[meta["moments"][1]] if meta["moments"] else torch.float32
        self.prompt_files = {name: [load(f"prompt-{name}", r) if r < len(self.captions) else None
                                    for r in range(self.world)] for name in meta["prompts"]}
        self.prompt_dtypes = {name: _FROM_NAME[dtype] for name, (_, dtype) in meta["prompts"].items()}

    def pair(self, i: int, flip: bool):
        """(moments [2, 2C, h, w] winner then loser, sizes [2, 4]) of pair i, or None if it did not decode."""
        rank, row = i % self.world, i // self.world
        if not self.valid[rank][row]:
            return None
        f = int(flip) if self.num_flips == 2 else 0
        return (_to_torch(self.moments[rank][row, f], self.moments_dtype),
                torch.from_numpy(np.array(self.sizes[rank][row, f])))

    def prompts(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """The cached prompt tensors of caption ids, stacked: {name: Tensor[len(ids), ...]}."""
        return {name: torch.stack([_to_torch(files[j % self.world][j // self.world], self.prompt_dtypes[name])
                                   for j in ids]) for name, files in self.prompt_files.items()}


class CachedPairLoader(data.PairLoader):
    """data.PairLoader's batches, order, augmentation draws, skip counting and resume state, read from the
    cache: pixel_values and captions' encodings are replaced by `latent_moments` [2B, 2C, h, w] (winners then
    losers) and `prompt_embeds` {name: [B, ...]}. No DataLoader workers: a batch is a few memory-map reads."""

    def __init__(self, cache: LatentCache, dataset, transform, batch_size, rank=0, world_size=1, seed=0,
                 stop_requested=None):
        super().__init__(dataset, transform, batch_size, rank=rank, world_size=world_size, num_workers=0, seed=seed,
                         stop_requested=stop_requested)
        self.cache = cache

    def _batch(self, epoch: int, indices: list[int]) -> dict:
        moments, sizes, caption_ids, rows, skipped = [], [], [], [], 0
        for i in indices:
            row = int(self.dataset.rows[i])
            draw = self.transform.draws(epoch, row)  # the same draw data.PairTransform makes for this item
            got = self.cache.pair(i, draw["flip"])
            if got is None:
                skipped += 1
                continue
            moments.append(got[0])
            sizes.append(got[1])
            caption_ids.append(0 if draw["drop_caption"] else int(self.cache.caption_ids[i]))
            rows.append(row)
        batch = {"num_skipped": skipped, "captions": [self.cache.captions[j] for j in caption_ids],
                 "rows": torch.tensor(rows, dtype=torch.long)}
        if not rows:
            return batch
        halves = lambda xs: torch.stack([x[0] for x in xs] + [x[1] for x in xs])
        batch["latent_moments"] = halves(moments)
        batch["original_sizes"] = halves(sizes)[:, :2].long()
        batch["crop_top_lefts"] = halves(sizes)[:, 2:].long()
        batch["prompt_embeds"] = self.cache.prompts(caption_ids)
        return batch

    def __iter__(self):
        yield from self._trainable(self._batches(self.epoch, self.batch_in_epoch))

    def _batches(self, epoch, start):
        b = self.batch_size
        while True:
            shard = self.epoch_indices(epoch)
            for bi in range(start, self.batches_per_epoch):
                yield epoch, bi, self._batch(epoch, shard[bi * b:(bi + 1) * b])
            epoch, start = epoch + 1, 0


def cached_loader(args, runtime, dataset, transform, encode_images, encode_captions, batch_size=None,
                  seed=None, stop_requested=None) -> CachedPairLoader:
    """Build the cache for this run's data and model if it is not on disk yet, then a loader that reads it."""
    captions = pair_captions(dataset)
    root = args.cache_dir or os.path.join(args.output_dir, "cache")
    folder = os.path.join(root, f"{runtime.family}-{cache_key(runtime, args, dataset, transform, captions)}")
    if not os.path.exists(os.path.join(folder, "meta.json")):
        if runtime.is_main:
            logger.info("caching VAE latents and prompt embeddings of %d pairs in %s", len(dataset), folder)
        build(folder, encode_images, encode_captions, dataset, transform, captions, runtime,
              num_workers=args.dataloader_workers)
    elif runtime.is_main:
        logger.info("reading cached latents and prompt embeddings from %s", folder)
    return CachedPairLoader(LatentCache(folder), dataset, transform, batch_size or args.train_batch_size,
                            rank=runtime.rank, world_size=runtime.world_size, seed=args.seed if seed is None else seed,
                            stop_requested=stop_requested)
