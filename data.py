"""Preference pairs for Diffusion-DPO (PAPER.md §1): Pick-a-Pic rows → batches of [winners; losers].

A Pick-a-Pic v2 row holds `caption, jpg_0, jpg_1, label_0, label_1` (jpg_* are encoded image bytes).
§1: a row with label_0 == 0.5 is a tie and is dropped; label_0 == 0 means the second image won. Every
pair is put winner first, and a batch is `pixel_values = [x_w(1..B); x_l(1..B)]` so the trainer can run
policy and reference on one 2B batch and split the per-sample errors in halves.

    pairs  = load_pairs(DEFAULT_DATASET, streaming=True)        # or a local parquet file / folder
    loader = PairLoader(pairs, PairTransform(512), batch_size=1, rank=r, world_size=w, num_workers=4)
    for batch in loader: ...                                     # forever; loader.state_dict() to resume

Fatal problems (missing columns, no pairs left, an unreachable hub) raise `DataError` with a one-line
message; a bad row (undecodable image, label outside {0, 0.5, 1}) is skipped, counted and logged, so a run
neither crashes on one bad row nor trains silently on wrong data. This module does not import diffusers.
"""
from __future__ import annotations

import inspect
import io
import logging
import os
from typing import Any, Iterator

import datasets
import datasets.distributed
import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Pick-a-Pic v2 was published as `yuvalkirstain/pickapic_v2`; that hub repository was removed in 2025 (it
# answers 404/401: PickScore issue #36, SalesforceAIResearch/DiffusionDPO issue #22). `liuhuohuo2/pick-a-pic-v2`
# is a public full copy in the same parquet row format (caption, jpg_0, jpg_1, label_0, label_1, ...; ~335 GB,
# 1,001,352 rows over train / validation / test) that follow-up works load by this id.
DEFAULT_DATASET = "liuhuohuo2/pick-a-pic-v2"
ORIGINAL_DATASET = "yuvalkirstain/pickapic_v2"
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
_LABELS = ("label_0", "label_1")


class DataError(Exception):
    """A fatal data problem; the message is one line. Trainers print `error: <message>` and exit with code 2."""


class Interrupted(Exception):
    """A stop was requested (a signal) while the loader was still looking for a decodable pair."""


# A bad row is reported this many times one by one, then once every WARN_EVERY rows: a dataset of bad
# images must not fill the disk with warnings.
WARN_FIRST, WARN_EVERY = 5, 1000
_warned: dict[str, int] = {}


def _warn(kind: str, message: str, *args) -> None:
    count = _warned[kind] = _warned.get(kind, 0) + 1
    if count <= WARN_FIRST or count % WARN_EVERY == 0:
        more = f" ({count} so far; further ones are counted, one warning every {WARN_EVERY})" if count >= WARN_FIRST else ""
        logger.warning(message + more, *args)


# Loading


def load_pairs(source: Any = DEFAULT_DATASET, split: str = "train", streaming: bool = False,
               max_samples: int | None = None, cache_dir: str | None = None) -> "PairDataset | PairStream":
    """Open Pick-a-Pic-format preference rows and return a `PairDataset` (map-style) or a `PairStream`.

    source: a hub dataset id, a local parquet file, a local folder (parquet files, split inferred from the file
    names as on the hub, or a `save_to_disk` folder), or a `datasets.Dataset` / `IterableDataset` object. A
    string is a local path if it exists. streaming=True reads rows lazily (hub or local parquet), so training
    starts without the full ~335 GB download. max_samples keeps only the first N rows of the split (before
    ties are dropped). Columns are checked at once; in map-style mode the label columns (only those: no image
    is decoded) are checked too: ties dropped, bad labels skipped and counted.
    """
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"max_samples must be positive, got {max_samples}")
    name = source if isinstance(source, str) else type(source).__name__
    hf = _open(source, split, streaming, cache_dir)
    streaming = isinstance(hf, datasets.IterableDataset)
    hf = _check_columns(hf, f"{name} [{split}]")
    if max_samples is not None:
        hf = hf.take(max_samples) if streaming else hf.select(range(min(max_samples, len(hf))))
    if streaming:
        return PairStream(hf, name=f"{name} [{split}]")
    return PairDataset(hf, name=f"{name} [{split}]")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _open(source, split, streaming, cache_dir):
    """Source → a `datasets.Dataset` or `datasets.IterableDataset` for `split`."""
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise DataError(f"split '{split}' not found; splits: {', '.join(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, datasets.IterableDataset):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"unsupported data source of type {type(source).__name__}")
    source = os.path.expanduser(os.fspath(source))
    if not os.path.exists(source) and (source.startswith((".", "/", "~")) or source.endswith(".parquet")):
        raise DataError(f"no such file or folder: {source}")  # a path, not a hub id: don't ask the hub
    try:
        if os.path.isfile(source):
            return datasets.load_dataset("parquet", data_files={split: source}, split=split,
                                         streaming=streaming, cache_dir=cache_dir)
        if os.path.isdir(source):
            if os.path.exists(os.path.join(source, "dataset_dict.json")) or \
                    os.path.exists(os.path.join(source, "state.json")):
                ds = datasets.load_from_disk(source)
                return _open(ds, split, streaming, cache_dir)
            return datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:  # one line, never a traceback, for a bad local source (PAPER.md: fail clearly)
        raise DataError(f"cannot read local dataset '{source}' (split '{split}'): {_first_line(err)}") from err
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as err:
        raise DataError(
            f"cannot load dataset '{source}' (split '{split}'): it is not a local file or folder and the hub "
            f"failed ({_first_line(err)}); download it (e.g. `hf download {source} --repo-type dataset`) and "
            f"pass the local folder, or use the built-in pairs offline (offline/tiny.py, builtin_pairs)") from err


def _check_columns(hf, name):
    """Fail at load time on missing columns; keep only the five needed ones; leave images undecoded."""
    cols = hf.column_names
    if cols is None:  # a stream whose features are unknown: peek at one row
        first = next(iter(hf), None)
        cols = list(first) if first is not None else []
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise DataError(f"{name} is missing column(s) {', '.join(missing)}; columns found: "
                        f"{', '.join(map(str, cols)) or '(none)'}")
    hf = hf.select_columns(list(REQUIRED_COLUMNS))
    features = hf.features or {}
    for col in ("jpg_0", "jpg_1"):
        if isinstance(features.get(col), datasets.Image):  # some copies store an Image feature: keep the bytes
            hf = hf.cast_column(col, datasets.Image(decode=False))
    return hf


def _label_values(values) -> np.ndarray:
    """Labels as float64; None or non-numbers become NaN (and so count as bad labels)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                pass
        return out


def _classify_labels(l0: np.ndarray, l1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid, tie) masks: valid iff both labels are in {0, 0.5, 1} and sum to 1; tie iff valid and label_0 == 0.5."""
    def allowed(x):
        return np.isclose(x, 0.0) | np.isclose(x, 0.5) | np.isclose(x, 1.0)
    valid = allowed(l0) & allowed(l1) & np.isclose(l0 + l1, 1.0)
    return valid, valid & np.isclose(l0, 0.5)


def _raw_pair(row: dict, winner_col: int, index: int) -> dict:
    """A row → {caption, jpg_w, jpg_l, winner_col, row}: winner first, images still encoded."""
    caption = row["caption"]
    return {"caption": "" if caption is None else str(caption),
            "jpg_w": row[f"jpg_{winner_col}"], "jpg_l": row[f"jpg_{1 - winner_col}"],
            "winner_col": winner_col, "row": index}


class PairDataset:
    """Map-style preference pairs: index i → the raw (still encoded) pair, winner first.

    Built from the label columns alone: ties are dropped (§1) and rows with labels outside {0, 0.5, 1} (or
    label_0 + label_1 != 1) are skipped and counted in `num_bad_labels`; `rows[i]` is pair i's row in the split.
    """

    def __init__(self, hf: datasets.Dataset, name: str = "dataset"):
        self.hf, self.name = hf, name
        labels = hf.select_columns(list(_LABELS)).with_format("arrow")[:]  # the label columns only
        l0, l1 = (_label_values(labels.column(c).to_numpy(zero_copy_only=False)) for c in _LABELS)
        valid, tie = _classify_labels(l0, l1)
        keep = valid & ~tie
        self.rows = np.nonzero(keep)[0].astype(np.int64)
        self.winner_is_0 = l0[self.rows] > 0.75
        self.num_rows, self.num_ties, self.num_bad_labels = len(l0), int(tie.sum()), int((~valid).sum())
        if self.num_bad_labels:
            bad = np.nonzero(~valid)[0]
            logger.warning("%s: skipped %d row(s) with labels outside {0, 0.5, 1} or not summing to 1 "
                           "(rows %s%s)", name, self.num_bad_labels, ", ".join(map(str, bad[:10])),
                           ", ..." if len(bad) > 10 else "")
        if len(self.rows) == 0:
            raise DataError(f"no preference pairs in {name}: {self.num_rows} row(s), {self.num_ties} tie(s) "
                            f"dropped, {self.num_bad_labels} with bad labels")
        logger.info("%s: %d rows -> %d pairs (%d ties dropped, %d bad labels skipped)", name, self.num_rows,
                    len(self.rows), self.num_ties, self.num_bad_labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        return _raw_pair(self.hf[row], 0 if self.winner_is_0[i] else 1, row)


class PairStream:
    """Streamed preference rows (a `datasets.IterableDataset`): read lazily, labels checked as rows arrive."""

    def __init__(self, hf: datasets.IterableDataset, name: str = "stream"):
        self.hf, self.name = hf, name

    def iter_rows(self, epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  buffer_size: int = 1000) -> Iterator[tuple[str, int, dict | None]]:
        """Yield (kind, position, pair) for this rank's rows of `epoch`: kind is "pair", "tie" or "bad".

        Shuffled with a seeded buffer (plus shard order; `set_epoch` varies both per epoch) and split across
        ranks with `datasets.distributed.split_dataset_by_node`. position counts this rank's rows in the epoch.
        """
        kwargs = {}
        if "max_buffer_input_shards" in inspect.signature(self.hf.shuffle).parameters:
            # datasets >= 5 feeds the buffer from up to 10 shards through threads and then sleeps 5 s at the end
            # of every pass (an Arrow shutdown workaround): pointless, and slow, for a single-file dataset
            kwargs["max_buffer_input_shards"] = max(1, min(10, self.hf.num_shards))
        hf = self.hf.shuffle(seed=seed, buffer_size=buffer_size, **kwargs)
        if world_size > 1:
            hf = datasets.distributed.split_dataset_by_node(hf, rank=rank, world_size=world_size)
        hf.set_epoch(epoch)
        for pos, row in enumerate(hf):
            l0, l1 = _label_values([row["label_0"]]), _label_values([row["label_1"]])
            valid, tie = _classify_labels(l0, l1)
            if not valid[0]:
                _warn("label", "%s: skipping row %d of epoch %d on rank %d: bad labels (%r, %r)", self.name,
                      pos, epoch, rank, row["label_0"], row["label_1"])
                yield "bad", pos, None
            elif tie[0]:
                yield "tie", pos, None
            else:
                yield "pair", pos, _raw_pair(row, 0 if l0[0] > 0.75 else 1, pos)


# Transforms


def decode_image(value: Any) -> Image.Image:
    """Encoded bytes (or an `Image` feature dict / PIL image) → an RGB PIL image; raises on corrupt data."""
    if isinstance(value, dict):  # datasets.Image(decode=False) gives {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise ValueError(f"no image data ({type(value).__name__})")
    image.load()  # decode now, inside the caller's try: truncated files fail here, not later
    return image.convert("RGB")


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative ints (NumPy SeedSequence), the same on every machine."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & ((1 << 63) - 1)


class PairTransform:
    """Decode a raw pair and apply the training transforms, identically to both images.

    Resize the shortest side to `resolution` (bilinear, as the Diffusion-DPO scripts), crop a
    resolution×resolution square (random or center), optionally flip horizontally, map to [-1, 1]; replace
    the caption by "" with probability `caption_dropout` (0.2 is the official Diffusion-DPO default,
    PAPER.md §5). Randomness comes from (seed, epoch, key) only — not from worker RNG — so an item is the
    same for any num_workers and after a resume. The two images share the crop and the flip: with equal
    sizes (the Pick-a-Pic case) the crop offsets are identical; with different sizes the crop sits at the
    same relative position. Each image reports its true original size (h, w) and crop top-left (top, left)
    in the resized (and, if flipped, flipped-then-cropped, as diffusers' SDXL script) image: the SDXL
    micro-conditioning.
    """

    def __init__(self, resolution: int, random_crop: bool = False, random_flip: bool = False,
                 caption_dropout: float = 0.2, seed: int = 0):
        if resolution <= 0 or not 0.0 <= caption_dropout <= 1.0 or seed < 0:
            raise ValueError("need resolution > 0, 0 <= caption_dropout <= 1 and seed >= 0")
        self.resolution, self.random_crop, self.random_flip = int(resolution), random_crop, random_flip
        self.caption_dropout, self.seed = float(caption_dropout), int(seed)

    def draws(self, epoch: int, key: int) -> dict:
        """The per-item random choices for (epoch, key): crop position in [0, 1)², flip, caption drop."""
        u = np.random.default_rng(_seed(self.seed, epoch, key)).random(4)  # always 4 draws: fixed stream
        return {"u_top": float(u[0]), "u_left": float(u[1]),
                "flip": bool(self.random_flip and u[2] < 0.5), "drop_caption": bool(u[3] < self.caption_dropout)}

    def _offset(self, size: int, u: float) -> int:
        room = size - self.resolution
        if not self.random_crop:
            return max(0, int(round(room / 2.0)))  # center crop, rounded as torchvision / diffusers
        return min(int(u * (room + 1)), room)       # uniform over 0..room, like RandomCrop

    def _image(self, image: Image.Image, d: dict) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        w, h = image.size
        res = self.resolution
        scale = res / min(h, w)
        nh, nw = max(res, round(h * scale)), max(res, round(w * scale))
        if (nh, nw) != (h, w):
            image = image.resize((nw, nh), Image.BILINEAR)
        if d["flip"]:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        top, left = self._offset(nh, d["u_top"]), self._offset(nw, d["u_left"])
        image = image.crop((left, top, left + res, top + res))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div_(127.5).sub_(1.0), (h, w), (top, left)

    def __call__(self, pair: dict, epoch: int, key: int) -> dict | None:
        """Raw pair → item {pixels (w, l), caption, original_sizes, crop_top_lefts, row}, or None if undecodable."""
        images = []
        for field, col in (("jpg_w", pair.get("winner_col", 0)), ("jpg_l", 1 - pair.get("winner_col", 0))):
            try:
                images.append(decode_image(pair[field]))
            except Exception as err:  # a corrupt image skips the pair (counted by the collate), never a crash
                _warn("decode", "skipping pair at row %s: cannot decode jpg_%d: %s", pair.get("row"), col,
                      _first_line(err))
                return None
        d = self.draws(epoch, key)
        (pw, sw, cw), (pl, sl, cl) = (self._image(im, d) for im in images)
        return {"pixels": (pw, pl), "caption": "" if d["drop_caption"] else pair["caption"],
                "original_sizes": (sw, sl), "crop_top_lefts": (cw, cl), "row": pair.get("row", -1)}


def collate_pairs(items: list[dict | None]) -> dict:
    """Items (None = skipped) → {pixel_values [2B,3,H,W] in [-1, 1] = winners then losers, captions [B],
    original_sizes [2B,2] and crop_top_lefts [2B,2] (long, (h, w) and (top, left), same order as pixel_values),
    rows [B] (each pair's row in the split; for streams its position in the rank's epoch), num_skipped}."""
    ok = [it for it in items if it is not None]
    batch = {"num_skipped": len(items) - len(ok), "captions": [it["caption"] for it in ok],
             "rows": torch.tensor([int(it["row"]) for it in ok], dtype=torch.long)}
    if not ok:
        empty = torch.empty(0, 2, dtype=torch.long)
        return {**batch, "pixel_values": torch.empty(0, 3, 0, 0), "original_sizes": empty, "crop_top_lefts": empty}
    halves = [[it[k][j] for j in (0, 1) for it in ok] for k in ("pixels", "original_sizes", "crop_top_lefts")]
    batch["pixel_values"] = torch.stack(halves[0])
    batch["original_sizes"] = torch.tensor(halves[1], dtype=torch.long)
    batch["crop_top_lefts"] = torch.tensor(halves[2], dtype=torch.long)
    return batch


# Loading loop


class _Keyed(torch.utils.data.Dataset):
    """Worker side: a key (epoch, batch, extra_skipped, what) → ((epoch, batch, extra_skipped), item).

    `what` is a pair index (map-style: the worker reads the row) or the raw pair itself (streams: the main
    process reads the stream in order, the workers only decode), so the order never depends on num_workers.
    """

    def __init__(self, pairs, transform):
        self.pairs, self.transform = pairs, transform

    def __getitem__(self, key):
        epoch, batch, extra, what = key
        pair = self.pairs[what] if isinstance(what, int) else what
        return (epoch, batch, extra), self.transform(pair, epoch, pair["row"])


def _collate_keyed(samples):
    (epoch, batch_in_epoch, _), _ = samples[0]
    batch = collate_pairs([item for _, item in samples])
    batch["num_skipped"] += sum(extra for (_, _, extra), _ in samples)
    return epoch, batch_in_epoch, batch


class _Plan:
    """A re-iterable batch sampler over a generator function (DataLoader iterates it in the main process)."""

    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self.fn()


class PairLoader:
    """Micro-batches of `batch_size` pairs for one rank, forever (epoch after epoch), resumable.

    Map-style data: each epoch a permutation from a torch.Generator seeded with (seed, epoch); the rank's
    shard is permutation[:n // world_size * world_size][rank::world_size] — equal length on every rank (the
    remainder, different each epoch, is dropped) so DDP ranks stay in step; a final partial batch is dropped
    if drop_last. Streams: `split_dataset_by_node` shards, a seeded shuffle buffer, per-rank lengths may differ
    (the loader never ends, so ranks still take the same number of batches). A torch DataLoader with
    `num_workers` workers decodes; per-item randomness is keyed by (epoch, row) (streams: (epoch, position
    in the rank's stream)), so batches are identical for any num_workers. A batch whose pairs were all skipped
    is not yielded; its count is added to the next batch's `num_skipped`, as are (on rank 0, once per epoch)
    the rows a map-style dataset dropped for bad labels. Data that cannot yield a batch fails fast: after
    `max_bad_in_a_row` pairs in a row that did not decode (default: a whole epoch of this rank, at most 1000)
    iteration raises DataError; `stop_requested()`, when given, is polled meanwhile and raises Interrupted.

    `state_dict()` = {"epoch", "batch_in_epoch"} of the batches yielded so far; after `load_state_dict()` the
    next batch is exactly the one an uninterrupted loader would give. Map-style resume jumps there without
    decoding; stream resume re-reads the epoch's consumed rows (labels only, no decoding, but they are
    downloaded again when streaming from the hub).
    """

    def __init__(self, dataset, transform: PairTransform, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = True, shuffle_buffer: int = 1000,
                 max_bad_in_a_row: int | None = None, stop_requested=None):
        if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            dataset = load_pairs(dataset)
        if not isinstance(dataset, (PairDataset, PairStream)):
            raise TypeError("dataset must come from load_pairs (PairDataset or PairStream)")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or seed < 0:
            raise ValueError("need batch_size > 0, 0 <= rank < world_size and seed >= 0")
        self.dataset, self.transform, self.batch_size = dataset, transform, int(batch_size)
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, int(seed)
        self.drop_last, self.shuffle_buffer = drop_last, shuffle_buffer
        self.stop_requested = stop_requested
        self.streaming = isinstance(dataset, PairStream)
        self.max_bad_in_a_row = max_bad_in_a_row or (1000 if self.streaming else
                                                     max(1, min(1000, len(dataset) // world_size)))
        self.epoch, self.batch_in_epoch = 0, 0
        self.batches_per_epoch = None  # unknown for streams
        if not self.streaming:
            per_rank = len(dataset) // world_size
            self.batches_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
            if self.batches_per_epoch == 0:
                raise DataError(f"{dataset.name}: {len(dataset)} pair(s) give no full batch of {batch_size} "
                                f"on each of {world_size} rank(s)")

    # -- state
    def state_dict(self) -> dict:
        """{"epoch", "batch_in_epoch"}: where the next batch comes from."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at exactly the batch after the one `state` was taken at."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or batch < 0:
            raise DataError(f"bad loader state {state}")
        if self.batches_per_epoch is not None:
            if batch > self.batches_per_epoch:
                raise DataError(f"loader state {state} does not fit {self.batches_per_epoch} batches per epoch "
                                f"(was the dataset, batch size or world size changed?)")
            if batch == self.batches_per_epoch:
                epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, batch

    # -- order
    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's pair indices for `epoch`, in order (map-style data only)."""
        n = len(self.dataset)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch))
        perm = torch.randperm(n, generator=g)[: n // self.world_size * self.world_size]
        return perm[self.rank::self.world_size].tolist()

    def _map_plan(self, epoch, start):
        b = self.batch_size
        while True:
            shard = self.epoch_indices(epoch)
            for bi in range(start, self.batches_per_epoch):
                yield [(epoch, bi, 0, i) for i in shard[bi * b:(bi + 1) * b]]
            epoch, start = epoch + 1, 0

    def _stream_plan(self, epoch, start):
        b = self.batch_size
        while True:
            to_skip, bi, keys, bad, pairs = start * b, start, [], 0, 0
            for kind, _, pair in self.dataset.iter_rows(epoch, self.rank, self.world_size, self.seed,
                                                        self.shuffle_buffer):
                if kind == "tie":
                    continue
                if kind == "bad":
                    bad += 0 if to_skip else 1  # counted where the rows are first read, not on resume
                    continue
                pairs += 1
                if to_skip:  # resume: rows already consumed are re-read, never decoded
                    to_skip -= 1
                    continue
                keys.append((epoch, bi, bad, pair))
                bad = 0
                if len(keys) == b:
                    yield keys
                    keys, bi = [], bi + 1
            if keys and not self.drop_last:
                yield keys
                bi += 1
            if pairs == 0:
                raise DataError(f"{self.dataset.name}: no preference pairs on rank {self.rank} in epoch {epoch} "
                                f"(all rows are ties or have bad labels, or the stream is empty)")
            if bi == 0:
                raise DataError(f"{self.dataset.name}: {pairs} pair(s) on rank {self.rank} give no full batch "
                                f"of {b}")
            epoch, start = epoch + 1, 0

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        plan = self._stream_plan if self.streaming else self._map_plan
        start_epoch, start_batch = self.epoch, self.batch_in_epoch
        loader = torch.utils.data.DataLoader(
            _Keyed(self.dataset, self.transform), batch_sampler=_Plan(lambda: plan(start_epoch, start_batch)),
            num_workers=self.num_workers, collate_fn=_collate_keyed)
        yield from self._trainable(loader)

    def _trainable(self, batches) -> Iterator[dict]:
        """(epoch, batch_in_epoch, batch) → the batches that hold a pair, with the loader's position updated,
        the skipped pairs carried into the next batch's count, and the fail-fast and stop checks."""
        carried, bad_in_a_row = 0, 0
        bad_labels = getattr(self.dataset, "num_bad_labels", 0) if self.rank == 0 else 0
        for epoch, batch_in_epoch, batch in batches:
            if batch_in_epoch == 0:
                carried += bad_labels  # the epoch passes over its bad-label rows again
            self.epoch, self.batch_in_epoch = epoch, batch_in_epoch + 1
            if self.batches_per_epoch is not None and self.batch_in_epoch == self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = epoch + 1, 0
            if not batch["captions"]:  # every pair skipped: nothing to train on, carry the count
                carried += batch["num_skipped"]
                bad_in_a_row += batch["num_skipped"]
                if bad_in_a_row >= self.max_bad_in_a_row:
                    raise DataError(f"{self.dataset.name}: no pair could be decoded in {bad_in_a_row} pairs in a row "
                                    f"(rank {self.rank}, epoch {epoch}); the images are corrupt or not images")
                if self.stop_requested is not None and self.stop_requested():
                    raise Interrupted
                continue
            bad_in_a_row = 0
            batch["num_skipped"] += carried
            carried = 0
            yield batch
