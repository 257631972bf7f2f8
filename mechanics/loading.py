"""What a run loads: the pipeline folder (local, cached or from the hub), its components with one-line errors
for a wrong folder, and the preference pairs (data.py, or the latent cache of speed/latent_cache.py)."""
import argparse
import json
import logging
import os
import socket
import sys
import threading
from urllib.parse import urlparse

import torch
from torch import nn

import data
from mechanics.flags import fail

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
SCRIPTS = {family: f"train_{family}.py" for family in PIPELINES}


def hub_reachable(timeout: float = 5.0) -> bool:
    """One bounded connection attempt to the Hugging Face hub: without it, an offline hub lookup retries DNS
    for minutes before failing (ENVIRONMENT.md); with it, an offline run fails at once with one line."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    result = []

    def connect():  # getaddrinfo has no timeout of its own, hence the thread
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(result)


def resolve_model(name_or_path: str, flag: str = "--pretrained_model") -> str:
    """The local folder of a model: a folder as is; a hub id from the local cache or, if the hub answers,
    downloaded (only the files a diffusers pipeline loads, not the repo's single-file checkpoints)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        fail(f"{flag} {name_or_path} is a file, expected a diffusers folder or hub id")
    if os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1:
        fail(f"{flag} {name_or_path}: no such folder")
    from diffusers import DiffusionPipeline
    try:
        return DiffusionPipeline.download(name_or_path, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        fail(f"cannot reach the Hugging Face hub to download '{name_or_path}' and it is not cached; "
             f"run the offline demo with --tiny, or pass {flag} a local folder")
    return DiffusionPipeline.download(name_or_path)


def pipeline_folder(args, family: str) -> str:
    """The local folder of --pretrained_model, checked to hold this script's pipeline class (an SDXL folder
    given to train_sd15.py is refused before anything loads), after checking that --dataset can be read."""
    if not os.path.exists(args.dataset) and (os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable()):
        fail(f"cannot reach the Hugging Face hub to load dataset '{args.dataset}'; pass --dataset a local "
             "parquet file or folder, or run the offline demo with --tiny")
    path = resolve_model(args.pretrained_model)
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):  # a folder without one fails at its first component, with that component's name
        return path
    try:
        name = json.load(open(index)).get("_class_name", "")
    except (OSError, ValueError) as error:
        fail(f"{index} cannot be read: {error}")
    other = next((f for f, cls in PIPELINES.items() if cls == name), None)
    if name != PIPELINES[family]:
        hint = f": use {SCRIPTS[other]}" if other else ""
        fail(f"{path} is a {name or 'pipeline of unknown class'}, not a {PIPELINES[family]}{hint}")
    return path


def load(cls, path: str, subfolder: str | None = None):
    """`cls.from_pretrained(path, subfolder=...)`, with one line instead of a traceback for a folder that
    is not the expected pipeline."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        where = f"{subfolder}/ of {path}" if subfolder else path
        fail(f"cannot load {where} as {cls.__name__}: {str(error).splitlines()[0]}")


def frozen(module: nn.Module, device, dtype) -> nn.Module:
    """A model that is only run, never trained: eval mode (no dropout), no grad, in `dtype` (also fp32:
    transformers 5 loads a checkpoint in its stored dtype, which may be fp16)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module.eval().requires_grad_(False)


def check_tokenizer(tokenizer, text_encoder, name: str) -> None:
    """transformers 5 silently returns a 2- or 104-token tokenizer for an unreachable hub id
    (ENVIRONMENT.md); training on such prompts would be garbage, so refuse."""
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) < vocab // 2:
        fail(f"{name} has {len(tokenizer)} tokens but its text encoder expects {vocab}: the tokenizer "
             "files are missing or were not downloaded")


def to_cpu(*modules, device=None) -> None:
    """Once everything is cached, the VAE and the text encoders never run again: give their memory back."""
    for module in modules:
        if module is not None:
            module.to("cpu")
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class _OneLineDataErrors:
    """A loader whose fatal data problems (data.DataError, raised while iterating too) end the run in one
    line. A signal that stops the loader while no pair would decode ends the iteration (the loop stops)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        try:
            yield from self.loader
        except data.DataError as error:
            fail(str(error))
        except data.Interrupted:
            print("stopped by a signal while no pair of the data would decode; the last checkpoint is kept",
                  file=sys.stderr, flush=True)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        try:
            self.loader.load_state_dict(state)
        except data.DataError as error:
            fail(str(error))


def pair_loader(args, run, encode_images=None, encode_captions=None, batch_size=None, seed=None,
                num_workers=None):
    """Micro-batches of preference pairs for this rank, forever and resumable (data.py): pixels [2B]
    winners then losers and B captions. With --cache_latents, the VAE posteriors and prompt embeddings
    instead, from a cache built on first use with `encode_images` and `encode_captions`. batch_size, seed
    and num_workers default to the flags'."""
    batch_size = batch_size or args.train_batch_size
    seed = args.seed if seed is None else seed
    num_workers = args.dataloader_workers if num_workers is None else num_workers
    stop = (lambda: bool(run.signals.signum)) if run.signals is not None else None
    try:
        dataset = data.load_pairs(args.dataset, split=args.split, streaming=args.streaming,
                                  max_samples=args.max_train_samples)
        if not args.streaming:  # a small dataset still gives one full batch (the monitor's probe)
            batch_size = max(1, min(batch_size, len(dataset) // run.world_size))
        transform = data.PairTransform(resolution=args.resolution, random_crop=args.random_crop,
                                       random_flip=not args.no_flip, caption_dropout=args.caption_dropout,
                                       seed=seed)
        if args.cache_latents:
            from speed import latent_cache  # first pass: VAE and text encoders run once per image and caption
            loader = latent_cache.cached_loader(args, run, dataset, transform, encode_images, encode_captions,
                                                batch_size, seed, stop_requested=stop)
        else:
            loader = data.PairLoader(dataset, transform, batch_size=batch_size, rank=run.rank,
                                     world_size=run.world_size, num_workers=num_workers, seed=seed,
                                     stop_requested=stop)
    except data.DataError as error:
        fail(str(error))
    return _OneLineDataErrors(loader)


PROBE_SEED = 7919  # the seed offset of the probe's order of pairs, apart from the training order's


def probe_pairs(args, run, encode_images=None, encode_captions=None) -> dict:
    """The pairs of the monitor's probe (--monitor probe): --monitor_samples pairs of the training data for
    this rank, drawn once in an order of their own (seed apart from the training order's), without caption
    dropout: the monitor compares models on the prompts the images belong to."""
    quiet = logging.getLogger("data")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the training loader has just reported the same dataset
    try:
        loader = pair_loader(argparse.Namespace(**{**vars(args), "caption_dropout": 0.0}), run, encode_images,
                             encode_captions, batch_size=args.monitor_samples, seed=args.seed + PROBE_SEED,
                             num_workers=0)
        return next(iter(loader))
    finally:
        quiet.setLevel(level)
