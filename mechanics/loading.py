"""What a run loads: the pipeline folder (local, cached or from the hub), its components with one-line errors
for a wrong folder, and the preference pairs (data.py, or the latent cache of mechanics/latent_cache.py)."""
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
from mechanics import latent_cache
from mechanics.errors import DataError, UsageError
from offline import tiny

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
SCRIPTS = {family: f"train_{family}.py" for family in PIPELINES}
# Each family's denoiser: the pipeline's component and its diffusers class (what a checkpoint's weights load into).
DENOISERS = {"sd15": ("unet", "UNet2DConditionModel"), "sdxl": ("unet", "UNet2DConditionModel"),
             "sd3": ("transformer", "SD3Transformer2DModel"), "flux": ("transformer", "FluxTransformer2DModel")}


def hub_reachable(timeout: float = 5.0) -> bool:
    """One bounded connection attempt to the Hugging Face hub: without it, an offline hub lookup retries DNS
    for minutes (23–233 s measured) before failing; with it, an offline run fails at once with one line."""
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
        raise UsageError(f"{flag} {name_or_path} is a file, expected a diffusers folder or hub id")
    if os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1:
        raise UsageError(f"{flag} {name_or_path}: no such folder")
    from diffusers import DiffusionPipeline
    try:
        return DiffusionPipeline.download(name_or_path, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise UsageError(f"cannot reach the Hugging Face hub to download '{name_or_path}' and it is not cached; "
                         f"run the offline demo with --tiny, or pass {flag} a local folder")
    return DiffusionPipeline.download(name_or_path)


def pipeline_folder(args, family: str) -> str:
    """The local folder of --pretrained_model, checked to hold this script's pipeline class (an SDXL folder
    given to train_sd15.py is refused before anything loads), after checking that --dataset can be read."""
    if not os.path.exists(args.dataset) and (os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable()):
        raise UsageError(f"cannot reach the Hugging Face hub to load dataset '{args.dataset}'; pass --dataset a local "
                         "parquet file or folder, or run the offline demo with --tiny")
    path = resolve_model(args.pretrained_model)
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):  # a folder without one fails at its first component, with that component's name
        return path
    try:
        name = json.load(open(index)).get("_class_name", "")
    except (OSError, ValueError) as error:
        raise UsageError(f"{index} cannot be read: {error}")
    other = next((f for f, cls in PIPELINES.items() if cls == name), None)
    if name != PIPELINES[family]:
        hint = f": use {SCRIPTS[other]}" if other else ""
        raise UsageError(f"{path} is a {name or 'pipeline of unknown class'}, not a {PIPELINES[family]}{hint}")
    return path


def ensure_tiny(args, run, toy_pairs: int = 0) -> None:
    """--tiny: the demo's model and pairs that the script's TINY_RECIPE names, made once and cached (rank 0
    first, the others then find them): offline/tiny.py's `ensure`, with a one-line error for a folder that
    cannot be sampled from."""
    with run.main_first():
        try:
            tiny.ensure(args.pretrained_model, args.dataset, toy_pairs=toy_pairs)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None


def load(cls, path: str, subfolder: str | None = None):
    """`cls.from_pretrained(path, subfolder=...)`, with one line instead of a traceback for a folder that
    is not the expected pipeline."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        where = f"{subfolder}/ of {path}" if subfolder else path
        raise UsageError(f"cannot load {where} as {cls.__name__}: {str(error).splitlines()[0]}")


def frozen(module: nn.Module, device, dtype) -> nn.Module:
    """A model that is only run, never trained: eval mode (no dropout), no grad, in `dtype` (also fp32:
    transformers 5 loads a checkpoint in its stored dtype, which may be fp16)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module.eval().requires_grad_(False)


# Images per VAE call when encoding: the monitor's probe encodes --monitor_samples pairs at once, and 128 images at
# 512 px in one call peaked at 37 GB on an H200 (speed/README.md) before a LoRA run that then trained in 11 GB.
VAE_CHUNK = 8


@torch.no_grad()
def vae_moments(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    """Pixels [N, 3, H, W] → the VAE posterior's parameters (mean, log-variance) [N, 2C, h, w], VAE_CHUNK images a
    call (the same numbers as one call: each image is encoded on its own)."""
    return torch.cat([vae.encode(chunk.to(device, vae.dtype)).latent_dist.parameters
                      for chunk in pixels.split(VAE_CHUNK)])


def check_tokenizer(tokenizer, text_encoder, name: str) -> None:
    """transformers 5 silently returns a 2- or 104-token tokenizer for an unreachable hub id
    instead of raising; training on such prompts would be garbage, so refuse."""
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) < vocab // 2:
        raise UsageError(f"{name} has {len(tokenizer)} tokens but its text encoder expects {vocab}: the tokenizer "
                         "files are missing or were not downloaded")


def to_cpu(*modules, device=None) -> None:
    """Once everything is cached, the VAE and the text encoders never run again: give their memory back."""
    for module in modules:
        if module is not None:
            module.to("cpu")
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class _DataErrors:
    """A loader whose fatal data problems (data.DataError, raised while iterating too) become errors.DataError,
    which the entry point reports in one line. A signal that stops the loader while no pair would decode ends
    the iteration (the loop then stops)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        try:
            yield from self.loader
        except data.DataError as error:
            raise DataError(str(error)) from None
        except data.Interrupted:
            print("stopped by a signal while no pair of the data would decode; the last checkpoint is kept",
                  file=sys.stderr, flush=True)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        try:
            self.loader.load_state_dict(state)
        except data.DataError as error:
            raise DataError(str(error)) from None


def pair_loader(args, run, encode_images=None, encode_captions=None, batch_size=None, seed=None,
                num_workers=None, caption_dropout=None, announce=True):
    """Micro-batches of preference pairs for this rank, forever and resumable (data.py): pixels [2B]
    winners then losers and B captions. With --cache_latents, the VAE posteriors and prompt embeddings
    instead, from a cache built on first use with `encode_images` and `encode_captions`. batch_size, seed,
    num_workers and caption_dropout default to the flags'; announce=False: data.py does not log the dataset
    again (a second loader of the same data, such as the monitor's probe)."""
    batch_size = batch_size or args.train_batch_size
    seed = args.seed if seed is None else seed
    num_workers = args.dataloader_workers if num_workers is None else num_workers
    caption_dropout = args.caption_dropout if caption_dropout is None else caption_dropout
    stop = (lambda: bool(run.signals.signum)) if run.signals is not None else None
    data_log = logging.getLogger("data")
    level = data_log.level
    if not announce:
        data_log.setLevel(logging.WARNING)
    try:
        dataset = data.load_pairs(args.dataset, split=args.split, streaming=args.streaming,
                                  max_samples=args.max_train_samples, caption_column=args.caption_column,
                                  chosen_column=args.chosen_column, rejected_column=args.rejected_column,
                                  label_column=args.label_column, tie_margin=args.tie_margin)
        if not args.streaming:  # a small dataset still gives one full batch (the monitor's probe)
            batch_size = max(1, min(batch_size, len(dataset) // run.world_size))
        transform = data.PairTransform(resolution=args.resolution, random_crop=args.random_crop,
                                       random_flip=not args.no_flip, caption_dropout=caption_dropout, seed=seed)
        if args.cache_latents:  # first pass: VAE and text encoders run once per image and caption
            loader = latent_cache.cached_loader(args, run, dataset, transform, encode_images, encode_captions,
                                                batch_size, seed, stop_requested=stop)
        else:
            loader = data.PairLoader(dataset, transform, batch_size=batch_size, rank=run.rank,
                                     world_size=run.world_size, num_workers=num_workers, seed=seed,
                                     stop_requested=stop)
    except data.DataError as error:
        raise DataError(str(error)) from None
    finally:
        data_log.setLevel(level)
    wrapped = _DataErrors(loader)
    wrapped.num_pairs = None if args.streaming else len(dataset)  # for the model card; a stream's is unknown
    return wrapped


_hub_online: bool | None = None  # go_offline_unless_reachable's answer, asked once per process


def go_offline_unless_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached: False at once under HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE),
    else one hub_reachable attempt, once per process. Without network every hub lookup retries DNS for minutes
    before failing; so when the attempt fails, huggingface_hub, transformers, diffusers and datasets (imported or
    not yet) switch to offline mode: what the local cache holds still loads, and the rest fails at once."""
    global _hub_online
    if _hub_online is None:
        flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        if any(flag in ("1", "true", "yes", "on") for flag in flags):
            _hub_online = False
        else:
            _hub_online = hub_reachable(timeout)
            if not _hub_online:
                print("note: the Hugging Face hub is unreachable; using the local cache only", file=sys.stderr)
                os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
                if "huggingface_hub" in sys.modules:
                    import huggingface_hub.constants
                    huggingface_hub.constants.HF_HUB_OFFLINE = True
                if "datasets" in sys.modules:
                    import datasets.config
                    datasets.config.HF_HUB_OFFLINE = True
    return _hub_online


def read_json(path, what: str) -> dict:
    """A JSON object from `path`, or one UsageError line saying why it cannot be read and what it should be."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text (byte {error.start}): it should be {what}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}): it should be {what}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}: it should be {what}")
    return data


OFFLINE_HINT = "for an offline evaluation use tiny models and offline rewards: python eval.py --tiny"
