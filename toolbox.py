"""The run toolbox: what the three train scripts do the same way around their loops.

A train script is the algorithm (PAPER.md, Algorithm 1 for one model); this module holds the mechanics it
calls, written once. Nothing here calls back into a script.

    parser(), start()            the shared flags, the recipe's defaults, --tiny, device / precision / DDP
    load(), frozen(), ...        loading pipeline components with one-line errors for a wrong folder
    pair_loader()                preference pairs (data.py) or the latent cache (speed/latent_cache.py)
    ddp(), maybe_compile()       the policy wrapped for several processes and torch.compile
    optimizer()                  AdamW / 8-bit AdamW / Adafactor with the recipe's linear warm-up
    micro_generators()           per-position random streams: resume and DDP draw the same numbers
    Checkpoints                  atomic save, pruning and resume of everything a run needs
    TrainLog                     log.jsonl (one line per optimizer step), per-t-bin statistics, progress bar
    StopSignal                   SIGTERM / Ctrl-C: checkpoint and exit after the current step
    atomic_dir()                 a folder that appears complete or not at all

A user mistake ends the run with one line on stderr and exit code 2 (`fail`), never a traceback.
"""
import argparse
import atexit
import errno
import fcntl
import hashlib
import importlib.util
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import data
from losses import LOSSES, reward_margin
from reference import ON_DIVERGE

logger = logging.getLogger("train")

# The paper's figures bin t into 10 equal intervals (PAPER.md §3, Fig. 2).
NUM_LOG_BINS = 10
# Generator stream of the monitor's inputs, apart from every micro-batch's, and the seed offset of its pairs.
MONITOR_STREAM = 1 << 20
PROBE_SEED = 7919
EXIT_USAGE = 2

# --tiny's small-scale recipe. One CPU thread: a 32 px model gains little from a second one, and two
# spinning OpenMP threads on a busy 2-core laptop made the demo ~5× slower (measured).
TINY_RECIPE = dict(resolution=32, train_batch_size=4, effective_batch_size=4, learning_rate=2e-5,
                   scale_lr=False, warmup_steps=0, max_steps=60, checkpoint_every=30, beta=500.0,
                   tau=8, delta=0.05, dataloader_workers=0, divergence_every=5, cpu_threads=1)


def fail(message: str):
    """End the run with `error: message` on one line and exit code 2 (a user mistake, not a bug)."""
    for bar in list(getattr(tqdm, "_instances", ())):  # the error is the last line, under no progress bar
        bar.close()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


# Flags


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, and the script's docstring (its commands) kept as written."""


def parser(doc: str, recipe: dict) -> argparse.ArgumentParser:
    """Every flag the three trainers share. `recipe` holds the script's paper defaults (PAPER.md §5); a
    script adds its own model's flags to the returned parser."""
    p = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model", default=None,
                   help=f"hub id or local folder of the diffusers pipeline to fine-tune (recipe: {recipe['pretrained_model']})")
    g.add_argument("--tiny", action="store_true",
                   help="offline demo. SD1.5: the committed toy base model (miniature/toy_model/) and preference "
                        "pairs sampled from it and labelled by the toy reward (made on first use, then cached); "
                        "SDXL/SD3 (or with --pretrained_model): a tiny random model of the same classes and "
                        f"built-in pairs. Also sets the small-scale defaults {TINY_RECIPE} (with the toy model: "
                        "updated by the script's toy recipe), each of which an explicit flag overrides")
    g.add_argument("--dataset", default=None,
                   help="Pick-a-Pic-format pairs: a hub dataset id, or a local parquet file or folder "
                        f"(default: {data.DEFAULT_DATASET}, a public mirror of Pick-a-Pic v2)")
    g.add_argument("--split", default="train", help="dataset split")
    g.add_argument("--streaming", action="store_true",
                   help="stream the dataset instead of downloading it (Pick-a-Pic v2 is ~335 GB)")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N rows")
    g.add_argument("--resolution", type=int, default=None,
                   help=f"training resolution in pixels (recipe: {recipe['resolution']})")
    g.add_argument("--random_crop", action="store_true", help="random instead of center crop")
    g.add_argument("--no_flip", action="store_true", help="disable random horizontal flips")
    g.add_argument("--caption_dropout", type=float, default=0.2,
                   help="probability of training a pair with the empty prompt (official recipe: 0.2)")
    g.add_argument("--dataloader_workers", type=int, default=None,
                   help=f"DataLoader worker processes for decoding (default: the CPUs this process may use, at most "
                        f"8: {_available_cpus()} here; 0 with --tiny)")

    g = p.add_argument_group("objective (losses.py)")
    g.add_argument("--loss", default="dpo", choices=sorted(LOSSES),
                   help="preference objective; 'sft' trains on the winners only")
    g.add_argument("--beta", type=float, default=None,
                   help="β of the objective; unset: the objective's published value for this model. "
                        + "; ".join(f"{name}: {obj.beta_help}" for name, obj in LOSSES.items() if name != "sft"))

    g = p.add_argument_group("reference update (reference.py, PAPER.md §2)")
    g.add_argument("--tau", type=int, default=None,
                   help="copy the policy into the reference every τ optimizer steps; 0 = plain Diffusion-DPO "
                        f"(recipe: {recipe['tau']})")
    g.add_argument("--delta", type=float, default=None,
                   help=f"divergence threshold δ of the monitor (recipe: {recipe['delta']})")
    g.add_argument("--on_diverge", default="freeze", choices=ON_DIVERGE,
                   help="once D > δ: freeze the reference (paper), reset it to the initial model (Re-Init), "
                        "or ignore the monitor (the unstable variant)")
    g.add_argument("--monitor", default="probe", choices=["probe", "batch"],
                   help="inputs of the divergence estimate D [choice, README]: 'probe' = --monitor_samples winners "
                        "of the data with their t ~ U and ε, drawn once and kept in the checkpoint, the same at "
                        "every check (lower noise); 'batch' = the last micro-batch's winners with fresh draws "
                        "at every check")
    g.add_argument("--monitor_samples", type=int, default=None,
                   help="(winner latent, t, ε) draws of the divergence estimate D, per process (default 64; "
                        "the --tiny demo: 32, as the miniature)")
    g.add_argument("--divergence_every", type=int, default=None,
                   help="also log D(policy, initial) every N steps (Fig. 1b); 0 = off (default 0)")

    g = p.add_argument_group("timestep-aware training (schedule.py, PAPER.md §3)")
    g.add_argument("--gamma", type=float, default=0.9,
                   help="over-sample early (noisy) steps: bin k drawn with probability ∝ γ^k; 1 = uniform t")
    g.add_argument("--num_bins", type=int, default=50, help="K bins of the timestep grid for --gamma")
    g.add_argument("--no_reward_scale", action="store_true", help="λ(t) ≡ 1 instead of the §3 schedule")
    g.add_argument("--reward_scale_norm", action="store_true",
                   help="ablation: λ(t) divided by its mean under the active sampler (--gamma, --num_bins), so that "
                        "it changes the shape of β over t but not its average (under γ = 0.9 the mean λ is ≈ 1.50)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_steps", type=int, default=None, help=f"optimizer steps (recipe: {recipe['max_steps']})")
    g.add_argument("--train_batch_size", type=int, default=None, help="pairs per device per micro-batch (default 1)")
    g.add_argument("--effective_batch_size", type=int, default=None,
                   help="pairs per optimizer step; gradient accumulation = this / (batch × devices) "
                        f"(recipe: {recipe['effective_batch_size']})")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None,
                   help="set accumulation directly instead of through --effective_batch_size")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="learning rate, per pair if --scale_lr (recipe: 1e-8 × effective batch)")
    g.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply the learning rate by the effective batch size (official recipe; default on)")
    g.add_argument("--warmup_steps", type=int, default=None,
                   help=f"linear warm-up, then constant lr (recipe: {recipe['warmup_steps']})")
    g.add_argument("--optimizer", default=recipe.get("optimizer", "adamw"), choices=["adamw", "adamw8bit", "adafactor"],
                   help="adamw8bit needs bitsandbytes; adafactor comes from transformers")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2")
    g.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise, timesteps and augmentation")

    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--cpu_threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default: torch's own; 1 with --tiny)")
    g.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on CUDA, none on CPU (bf16 is slower there)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the policy and reference forward (default: on with CUDA, off on CPU)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode every image (both flips) and caption once, into --cache_dir, and train from there: "
                        "the VAE and text encoders never run again (speed/latent_cache.py; needs center crops and "
                        "a map-style dataset)")
    g.add_argument("--cache_dir", default=None, help="where --cache_latents keeps its files (unset: OUTPUT_DIR/cache)")

    g = p.add_argument_group("LoRA (speed/lora.py)")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="train a LoRA adapter of this rank on the attention projections instead of the full model "
                        "(0 = full fine-tuning); the reference is the adapter-free base model, or with τ > 0 a "
                        "second adapter: about one base model of memory in all")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (unset: the rank, i.e. scale 1)")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=recipe["output_dir"], help="log.jsonl, checkpoints and final/ go here")
    g.add_argument("--checkpoint_every", type=int, default=None, help="save a resumable checkpoint every N steps (default 500)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="keep only the newest N checkpoints")
    g.add_argument("--resume", default=None,
                   help="'latest' (newest readable checkpoint in --output_dir) or a checkpoint folder; a checkpoint of "
                        "a run with other defining flags or another base model is refused (README, checkpoints)")
    g.add_argument("--resume_override", default=None, metavar="FLAG,...",
                   help="with --resume: flags (names without --, comma-separated) that may differ from the run's; "
                        "their new values take effect")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output_dir that holds an earlier run: its log, checkpoints and final "
                        "model are deleted (without it such a folder is refused)")
    g.add_argument("--max_nonfinite_steps", type=int, default=3,
                   help="a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run "
                        "(exit code 3, no final model)")
    g.add_argument("--bin_stats_every", type=int, default=10,
                   help="emit per-t-bin statistics aggregated over this many steps")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the run's curves (plot.py) into OUTPUT_DIR/curves.png at the end")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="also send the log's numbers to an experiment tracker (its package must be installed; "
                        "log.jsonl stays the record)")
    return p


def _available_cpus() -> int:
    """Worker processes to decode with: the CPUs this process may run on, at most 8 (torch warns when a
    DataLoader asks for more workers than the machine has)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def _fill_defaults(args, recipe: dict, family: str, world_size: int, tiny_recipe: dict) -> None:
    """Fill what was left unset: --tiny's small-scale recipe, then the script's paper recipe; derive the
    gradient accumulation and the learning rate; refuse impossible values."""
    recipe = dict(recipe)
    if args.tiny:
        recipe.pop("pretrained_model")  # _prepare_tiny fills in the tiny model and the built-in pairs
    else:
        recipe["dataset"] = data.DEFAULT_DATASET
    generic = dict(train_batch_size=1, scale_lr=True, learning_rate=1e-8, checkpoint_every=500,
                   dataloader_workers=_available_cpus(), divergence_every=0, monitor_samples=64)
    for name, default in {**generic, **recipe, **(tiny_recipe if args.tiny else {})}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    if args.beta is None:
        args.beta = LOSSES[args.loss].default_beta(family)
    positive = ["max_steps", "train_batch_size", "effective_batch_size", "resolution", "checkpoint_every",
                "keep_checkpoints", "bin_stats_every", "monitor_samples", "num_bins", "max_nonfinite_steps"]
    positive += [k for k in ("gradient_accumulation_steps", "max_train_samples", "cpu_threads")
                 if getattr(args, k) is not None]
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("warmup_steps", "divergence_every", "dataloader_workers", "tau", "lora_rank"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.resume_override and not args.resume:
        fail("--resume_override goes with --resume")
    unknown = set(filter(None, (args.resume_override or "").split(","))) - set(vars(args)) - {"world_size"}
    if unknown:
        fail(f"--resume_override: no such flag {', '.join(sorted(unknown))}")
    per_step = args.train_batch_size * world_size
    if args.gradient_accumulation_steps is None:
        if args.effective_batch_size % per_step:
            fail(f"--effective_batch_size {args.effective_batch_size} is not a multiple of "
                 f"batch {args.train_batch_size} × {world_size} devices")
        args.gradient_accumulation_steps = args.effective_batch_size // per_step
    args.effective_batch_size = per_step * args.gradient_accumulation_steps
    if args.scale_lr:
        args.learning_rate *= args.effective_batch_size
    checks = [(0 < args.gamma, "--gamma must be positive"),
              (0 <= args.caption_dropout <= 1, "--caption_dropout must be in [0, 1]"),
              (args.learning_rate > 0, "--learning_rate must be positive"),
              (args.num_bins <= 1000, "--num_bins must be at most the 1000 training timesteps"),
              (not (args.no_reward_scale and args.reward_scale_norm), "--reward_scale_norm needs λ(t): drop --no_reward_scale"),
              (not (args.cache_latents and args.streaming),
               "--cache_latents needs a map-style dataset: drop --streaming (a local parquet copy works)"),
              (not (args.cache_latents and args.random_crop),
               "--cache_latents caches center crops: drop --random_crop")]
    for ok, message in checks:
        if not ok:
            fail(message)


@dataclass
class Run:
    """Where and how this process trains: its device, its rank among the torchrun processes, the autocast
    dtype, and the local folder of the pipeline being fine-tuned."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None
    family: str = ""
    model_path: str | None = None
    signals: "StopSignal | None" = None

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop (every rank agrees: one all-reduce)."""
        return self.signals is not None and self.signals.agreed(self)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen models (encoders, VAE, reference): the training dtype on an accelerator."""
        return self.autocast_dtype or torch.float32

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; with bf16 or fp32 the scaler is disabled and every call passes through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _setup_devices(args) -> Run:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device_type.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.benchmark = True  # every micro-batch has the same shapes: pick the fastest kernels once
    precision = args.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "no"
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if args.compile is None:
        args.compile = device.type == "cuda"
    return Run(device, rank, world_size, local_rank, autocast_dtype)


def start(args, recipe: dict, family: str, toy_recipe: dict | None = None) -> Run:
    """Everything before the models load: defaults from `recipe` (and --tiny's), the device, precision and
    torchrun processes, the --tiny model and pairs, and the hub checks. Returns the Run.

    family: "sd15", "sdxl" or "sd3", the tiny model --tiny builds. toy_recipe: SD1.5's --tiny trains the
    pretrained toy model (miniature/) with this recipe, on preference pairs sampled from the model it trains
    (the toy model, or --pretrained_model), instead of a random model on the built-in pairs.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    run = _setup_devices(args)
    run.family = family
    toy_model = toy_recipe is not None and args.tiny and args.pretrained_model is None
    _fill_defaults(args, recipe, family, run.world_size, {**TINY_RECIPE, **(toy_recipe if toy_model else {})})
    if run.device.type == "cpu" and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    _prepare_output(args, run)
    if args.tiny:
        _prepare_tiny(args, family, run, toy_demo=toy_recipe is not None)
    else:
        _check_dataset_source(args.dataset)
    run.model_path = resolve_model(args.pretrained_model)
    _check_family(run.model_path, family)
    _check_tracker(args.report_to)
    run.signals = StopSignal()
    if run.is_main:  # the flags as the run uses them, for plot.py and for people
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({"family": family, **vars(args)}, f, indent=1)
    if run.is_main:
        logger.info("%s: effective batch %d pairs (%d × %d devices × %d accumulation), lr %.3g, β %s, "
                    "τ %d, δ %g, γ %g, λ(t) %s", family, args.effective_batch_size, args.train_batch_size,
                    run.world_size, args.gradient_accumulation_steps, args.learning_rate, args.beta, args.tau,
                    args.delta, args.gamma, "off" if args.no_reward_scale else "on")
    return run


def _quiet_libraries() -> None:
    """The first screen of a run shows the run: no loading bars of every component, no transformers notice
    that torchvision is missing (it falls back to PIL, which is what the trainers use)."""
    import datasets
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage())


def _check_tracker(report_to: str) -> None:
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        fail(f"--report_to {report_to} needs the {package} package: pip install {package}")


# The hub and the --tiny models


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
    """A local folder as is; a hub id from the local cache or, if the hub answers, downloaded (only the
    files a diffusers pipeline loads, not the repo's single-file checkpoints)."""
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


PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
SCRIPTS = {"sd15": "train_sd15.py", "sdxl": "train_sdxl.py", "sd3": "train_sd3.py"}


def _check_family(path: str, family: str) -> None:
    """The pipeline's model_index.json names its class: an SDXL folder given to train_sd15.py is refused
    before anything loads (a folder without one fails at its first component, with that component's name)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return
    try:
        name = json.load(open(index)).get("_class_name", "")
    except (OSError, ValueError) as error:
        fail(f"{index} cannot be read: {error}")
    other = next((f for f, cls in PIPELINES.items() if cls == name), None)
    if name != PIPELINES[family]:
        hint = f": use {SCRIPTS[other]}" if other else ""
        fail(f"{path} is a {name or 'pipeline of unknown class'}, not a {PIPELINES[family]}{hint}")


def _check_dataset_source(source: str) -> None:
    if not os.path.exists(source) and (os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable()):
        fail(f"cannot reach the Hugging Face hub to load dataset '{source}'; pass --dataset a local "
             "parquet file or folder, or run the offline demo with --tiny")


TOY_DEMO_PAIRS = 256  # toy pairs of the SD1.5 --tiny demo


def builtin_pairs() -> str:
    """The built-in smooth-vs-noise pairs (data.write_tiny_pickapic), written once into the tiny cache."""
    import tiny

    pairs = tiny.default_cache_root() / "tiny-pairs-v1.parquet"
    if not pairs.exists():
        pairs.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{pairs}.tmp-{os.getpid()}"
        data.write_tiny_pickapic(tmp, num_pairs=256, resolution=32, seed=0)
        os.replace(tmp, pairs)
    return str(pairs)


def _prepare_tiny(args, family: str, run: Run, toy_demo: bool) -> None:
    """--tiny: the model and pairs of the offline demo, built once (rank 0 first, then the others find them
    cached) and reused.

    toy_demo (SD1.5): the committed toy base model (miniature/toy_model/) and preference pairs sampled from
    it and labelled by the toy reward, so the demo learns a real preference. Otherwise: the random tiny
    pipeline of `family` (tiny/) and the built-in smooth-vs-noise pairs, which test the mechanics in seconds.
    """
    import tiny
    from miniature import toy

    def build():
        if not toy_demo:
            args.pretrained_model = args.pretrained_model or tiny.tiny_pipeline_dir(family)
            args.dataset = args.dataset or builtin_pairs()
            return
        args.pretrained_model = args.pretrained_model or str(toy.TOY_MODEL)
        if args.dataset is None:
            if not os.path.isfile(os.path.join(args.pretrained_model, "model_index.json")):
                fail(f"--tiny samples its preference pairs from a local pipeline folder, and "
                     f"{args.pretrained_model} is not one: give --dataset, or build it with miniature/toy_pretrain.py")
            args.dataset = str(toy.cached_pairs(args.pretrained_model, TOY_DEMO_PAIRS, seed=0))

    if run.is_main:
        build()
    run.barrier()  # rank 0 has built and cached them; the other ranks now find them in the cache
    if not run.is_main:
        build()


# Models


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


def ddp(module: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel when torchrun started several processes, else the module itself."""
    if run.world_size == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def maybe_compile(module: nn.Module, enabled: bool):
    """torch.compile with fixed shapes (dynamic=False): a rare odd-sized batch (skipped pairs) recompiles
    once, instead of turning every later step into a dynamic-shape graph."""
    return torch.compile(module, dynamic=False) if enabled else module


# Data


class _OneLineDataErrors:
    """A loader whose fatal data problems (data.DataError, raised while iterating too) end the run in one line."""

    def __init__(self, loader, run):
        self.loader, self.run = loader, run

    def __iter__(self):
        try:
            yield from self.loader
        except data.DataError as error:
            fail(str(error))
        except data.Interrupted:
            signum = self.run.signals.signum if self.run.signals else signal.SIGTERM
            print(f"stopped by signal {signum} while no pair of the data would decode; the last checkpoint is kept",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        try:
            self.loader.load_state_dict(state)
        except data.DataError as error:
            fail(str(error))


def pair_loader(args, run: Run, encode_images=None, encode_captions=None, batch_size=None, seed=None,
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
    return _OneLineDataErrors(loader, run)


def probe_batch(args, run: Run, encode_images=None, encode_captions=None) -> dict:
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


class MonitorProbe:
    """The inputs on which reference.py's monitor compares p_init, the reference and the policy (§2): noised
    winner latents, their timesteps and conditioning, and their targets. Called with a model it returns its
    predictions (no autograd, in chunks of `chunk` images, under the run's autocast); kept in the checkpoint,
    so that a resumed run measures on the very same inputs."""

    def __init__(self, predict, noisy, t, cond: dict, target, run: Run, chunk: int):
        self.predict, self.run, self.chunk = predict, run, max(1, chunk)
        self.noisy, self.t, self.cond, self.target = noisy, t, cond, target

    @torch.no_grad()
    def __call__(self, model):
        out = []
        for i in range(0, len(self.noisy), self.chunk):
            part = slice(i, i + self.chunk)
            with self.run.autocast():
                out.append(self.predict(model, self.noisy[part], self.t[part], {k: v[part] for k, v in self.cond.items()}))
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"noisy": self.noisy, "t": self.t, "cond": self.cond, "target": self.target}

    def load_state_dict(self, state: dict) -> None:
        device = self.run.device
        self.noisy, self.t, self.target = (state[k].to(device) for k in ("noisy", "t", "target"))
        self.cond = {k: v.to(device) for k, v in state["cond"].items()}


def reward_scale(values: torch.Tensor, args) -> torch.Tensor:
    """λ as the flags want it: the §3 schedule `values` (Tensor[T]), or 1 with --no_reward_scale, or divided
    by its mean under the sampler with --reward_scale_norm."""
    if args.no_reward_scale:
        return torch.ones_like(values)
    if args.reward_scale_norm:
        from schedule import sampler_mean
        return values / sampler_mean(values, args.gamma, args.num_bins)
    return values


def objective_inputs(objective, family: str, n: int, pred, ref_pred, target, last_record: dict | None) -> dict:
    """What only some objectives take beyond the per-sample errors (losses.py): DSPO the winners' raw
    predictions (and on SDXL the authors' SDXL branch); KTO its reference point, [choice] the mean implicit
    reward of the previous optimizer step's pairs over all ranks (0 at step 1, where policy = reference): the
    official code takes each micro-batch's, which at 1 pair per device is the pair itself."""
    extra = {}
    if objective.needs_predictions:
        extra = dict(model_pred_w=pred[:n], ref_pred_w=ref_pred[:n], target_w=target[:n], sdxl=family == "sdxl")
    if objective.needs_reference_point:
        extra["reference_point"] = (last_record or {}).get("kto_mean_reward", 0.0)
    return extra


def micro_generators(seed: int, step: int, micro: int, device) -> tuple[torch.Generator, torch.Generator]:
    """Timesteps (CPU) and noise / VAE sampling (device) of one micro-batch come from generators seeded
    by its position (step, global micro-batch index), so a resumed run — or the same pairs split over
    more processes — draws exactly the same numbers, with no RNG state to checkpoint."""
    position = (seed * 1_000_003 + step) * 65_537 + micro
    cpu = torch.Generator().manual_seed(position)
    on_device = torch.Generator(device).manual_seed(position + 1)
    return cpu, on_device


# Optimizer


def optimizer(args, params):
    """The optimizer of --optimizer and the recipe's schedule: linear warm-up over --warmup_steps, then a
    constant learning rate (PAPER.md §5)."""
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
        opt = bnb.optim.AdamW8bit(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon)
    elif args.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        opt = Adafactor(params, lr=args.learning_rate, relative_step=False, scale_parameter=False,
                        warmup_init=False, weight_decay=args.weight_decay)
    else:
        # The fused kernel (one launch for all tensors) exists for CUDA and, since torch 2.4, for CPU, where it
        # is ~5x faster than the default per-tensor loop on a UNet's many small tensors.
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.weight_decay, eps=args.adam_epsilon, fused=fused or None)
    warmup = max(args.warmup_steps, 1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


# Files: the output folder, checkpoints, the log. A run owns its folder (a lock), every file appears complete
# or not at all (written aside, fsync'ed, renamed), and a resume continues only the run that wrote the folder.

EXIT_DIVERGED = 3  # exit codes: 0 finished, 2 a user or data error, 3 diverged, 128 + N stopped by signal N
RUN_FILES = ("log.jsonl", "final", "final_lora")
# Flags that may change on --resume: how long, how often to save and log, and how fast; every other flag
# defines the run (its model, data, objective, schedule, batch geometry, precision) and must stay the same.
SAFE_TO_CHANGE = {"max_steps", "checkpoint_every", "keep_checkpoints", "bin_stats_every", "divergence_every",
                  "dataloader_workers", "cpu_threads", "device", "compile", "allow_tf32", "gradient_checkpointing",
                  "cache_latents", "cache_dir", "output_dir", "resume", "resume_override", "overwrite", "tiny",
                  "max_nonfinite_steps", "report_to", "plot"}
_locks: dict[str, object] = {}  # output folder → the open lock file this process holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(folder, name))


@contextmanager
def atomic_dir(final_dir: str):
    """Yield a temporary sibling folder to write into, then fsync it and rename it to `final_dir`: a crash,
    even of the machine, never leaves a folder that looks done. A full disk ends the run in one line."""
    tmp = final_dir + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        _fsync_tree(tmp)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            fail(f"no space left on the device writing {final_dir} "
                 f"({shutil.disk_usage(os.path.dirname(final_dir) or '.').free / 2**20:.0f} MB free)")
        raise
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    _fsync(os.path.dirname(os.path.abspath(final_dir)))


def _prepare_output(args, run: Run) -> None:
    """Before any model loads: the output folder exists and is writable, no other process uses it (a lock
    that dies with its process), the temporary files of dead processes are gone, and a fresh run does not
    mix with an earlier run's log and checkpoints."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--output_dir {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        fail(f"--output_dir {out} cannot be written: {error.strerror or error}")
    if not run.is_main:
        return
    key = os.path.realpath(out)
    if key not in _locks:
        lock = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            fail(f"--output_dir {out} is in use by another run ({owner}); wait for it, or choose another folder")
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        _locks[key] = lock
    for stale in glob.glob(os.path.join(out, "*.tmp-*")):
        pid = stale.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by a process that died while writing it", stale)
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    earlier += [os.path.basename(d) for d in checkpoint_dirs(out)]
    if earlier and args.overwrite:
        logger.info("--overwrite: removing the earlier run in %s (%s)", out, ", ".join(earlier))
        for name in earlier:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif earlier and args.resume is None:
        fail(f"--output_dir {out} holds an earlier run ({', '.join(earlier[:4])}); continue it with --resume "
             "latest, start over with --overwrite, or choose another folder")


def release_output(args) -> None:
    """Give the output folder's lock back (it also goes when the process ends, however it ends)."""
    lock = _locks.pop(os.path.realpath(args.output_dir), None)
    if lock is not None:
        lock.close()


def model_fingerprint(folder: str) -> str:
    """A short hash of a pipeline folder: every file's path and size, the full text of the small ones (configs,
    tokenizers) and the first and last 64 KB of the weights. Another model of the same shape gets another one."""
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if not os.path.isfile(path) or os.path.basename(path).startswith("."):
            continue
        size = os.path.getsize(path)
        digest.update(f"{os.path.relpath(path, folder)}:{size}".encode())
        with open(path, "rb") as f:
            if size <= 2**20:
                digest.update(f.read())
            else:
                digest.update(f.read(2**16))
                f.seek(-2**16, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def save_final(args, run: Run, **denoiser) -> str:
    """The trained model in OUTPUT_DIR/final/: the base pipeline with the trained denoiser (`unet=` or
    `transformer=`) in its place, which the pipeline class's from_pretrained loads. With LoRA the adapter
    alone in OUTPUT_DIR/final_lora/, for `pipe.load_lora_weights(final_lora)` on the base pipeline, with
    base_model.json naming that base (eval.py reads it)."""
    import diffusers

    pipeline_class = getattr(diffusers, PIPELINES[run.family])
    (name, module), = denoiser.items()
    final_dir = os.path.join(args.output_dir, "final_lora" if args.lora_rank else "final")
    if run.is_main:
        with atomic_dir(final_dir) as tmp:
            if args.lora_rank:
                from speed import lora
                pipeline_class.save_lora_weights(tmp, **{f"{name}_lora_layers": lora.adapter_state_dict(module),
                                                         f"{name}_lora_adapter_metadata": lora.adapter_metadata(module)})
                base = os.path.abspath(run.model_path) if os.path.isdir(args.pretrained_model) else args.pretrained_model
                with open(os.path.join(tmp, "base_model.json"), "w") as f:
                    json.dump({"base_model": base, "pipeline": PIPELINES[run.family]}, f, indent=1)
            else:
                pipeline_class.from_pretrained(run.model_path, **denoiser).save_pretrained(tmp)
    run.barrier()
    return final_dir


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a checkpoint folder only exists once fully written)."""
    found = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    found = [d for d in found if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(found, key=lambda d: int(d.rsplit("-", 1)[1]))


def _tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class Checkpoints:
    """OUTPUT_DIR/checkpoint-STEP/state.pt: everything a bit-exact resume needs — the trained weights, the
    reference and its monitor's state and probe, the optimizer, the lr schedule, the loader's position, the
    fp16 loss scale, the log's pending t-bin statistics — and the run's identity: its flags and a fingerprint
    of the base model. Written atomically; only the newest --keep_checkpoints are kept. A checkpoint holds
    tensors and plain values only and is read with torch.load(weights_only=True): one received from someone
    else is data, not a program."""

    def __init__(self, args, run: Run, **state):
        self.args, self.run, self.state = args, run, state
        self.identity = {"flags": {k: v for k, v in sorted(vars(args).items()) if k not in SAFE_TO_CHANGE
                                   and k != "pretrained_model"},
                         "pretrained_model": model_fingerprint(run.model_path), "world_size": run.world_size}

    def save(self, step: int) -> str | None:
        path = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if self.run.is_main:
            scaler = self.state["scaler"]
            state = {"step": step, **{name: obj.state_dict() for name, obj in self.state.items() if name != "scaler"},
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "identity": self.identity, "args": vars(self.args)}
            needed, free = _tensor_bytes(state), shutil.disk_usage(self.args.output_dir).free
            if needed > free:
                fail(f"no space left for checkpoint-{step}: it needs about {needed / 2**20:.0f} MB and "
                     f"{free / 2**20:.0f} MB are free in {self.args.output_dir}")
            with atomic_dir(path) as tmp:
                torch.save(state, os.path.join(tmp, "state.pt"))
            for old in checkpoint_dirs(self.args.output_dir)[:-self.args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.run.barrier()
        return path

    def _load(self) -> tuple[str, dict] | None:
        """The checkpoint --resume names, read; for "latest" the newest that reads, with a warning for each
        newer one that does not (a disk error, a copy cut short)."""
        resume = self.args.resume
        if resume is None:
            return None
        if resume == "latest":
            candidates = checkpoint_dirs(self.args.output_dir)[::-1]
            if not candidates:
                logger.info("no checkpoint in %s: starting from scratch", self.args.output_dir)
                return None
        elif os.path.isfile(os.path.join(resume, "state.pt")):
            candidates = [resume]
        else:
            fail(f"--resume {resume}: no checkpoint there (expected {resume}/state.pt)")
        for folder in candidates:
            try:
                return folder, torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
            except Exception as error:  # a truncated zip, a pickle with code in it, an empty file: not usable
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                if resume != "latest":
                    fail(f"--resume {resume}: its state.pt cannot be read ({reason})")
                logger.warning("%s cannot be read (%s); trying the one before", folder, reason)
        fail(f"no checkpoint in {self.args.output_dir} can be read; start over with --overwrite")

    def _check_identity(self, saved: dict, folder: str) -> None:
        """Refuse to continue another run: every defining flag and the base model must be as they were, unless
        named in --resume_override (then the new value takes effect)."""
        old, new = saved.get("identity") or {}, self.identity
        changed = {}
        for key in sorted(set(old.get("flags", {})) | set(new["flags"])):
            a, b = old.get("flags", {}).get(key, "(unset)"), new["flags"].get(key, "(unset)")
            if a != b:
                changed[key] = (a, b)
        if old.get("pretrained_model") != new["pretrained_model"]:
            changed["pretrained_model"] = ("the model it was started from", f"another model ({self.args.pretrained_model})")
        if old.get("world_size") != new["world_size"]:
            changed["world_size"] = (old.get("world_size"), new["world_size"])
        override = set(filter(None, (self.args.resume_override or "").split(",")))
        refused = {k: v for k, v in changed.items() if k not in override}
        if refused:
            listed = "; ".join(f"--{k} {a} → {b}" for k, (a, b) in refused.items())
            fail(f"--resume {folder} belongs to another run: {listed}. Resume with the run's own flags, pass "
                 f"--resume_override {','.join(refused)} to change them anyway, or start a new --output_dir")
        for k, (a, b) in changed.items():
            logger.warning("--resume_override: --%s %s → %s", k, a, b)

    def resume(self) -> int:
        """Load the checkpoint --resume names into the state objects; returns its step (0: a fresh run)."""
        loaded = self._load()
        if loaded is None:
            return 0
        folder, saved = loaded
        self._check_identity(saved, folder)
        try:
            for name, obj in self.state.items():
                if name != "scaler":
                    obj.load_state_dict(saved[name])
        except (RuntimeError, KeyError, ValueError) as error:
            fail(f"--resume {folder} does not fit this run's {name}: {str(error).splitlines()[0][:300]}")
        if saved["scaler"] and self.state["scaler"].is_enabled():
            self.state["scaler"].load_state_dict(saved["scaler"])
        self._apply_optimizer_flags()
        if self.run.is_main:
            logger.info("resumed from %s at step %d", folder, saved["step"])
        return saved["step"]

    def _apply_optimizer_flags(self) -> None:
        """The optimizer's state_dict carries its hyperparameters: set them from the flags again, so that an
        overridden --learning_rate (or β, weight decay, ε) takes effect."""
        optimizer, schedule = self.state.get("optimizer"), self.state.get("lr_schedule")
        if optimizer is None:
            return
        flags = {"betas": (self.args.adam_beta1, self.args.adam_beta2), "weight_decay": self.args.weight_decay,
                 "eps": self.args.adam_epsilon}
        for group in optimizer.param_groups:
            group.update({k: v for k, v in flags.items() if k in group and not (k == "eps" and isinstance(group[k], tuple))})
        if schedule is not None:
            schedule.base_lrs = [self.args.learning_rate] * len(optimizer.param_groups)
            factor = schedule.lr_lambdas[0](schedule.last_epoch)
            for group in optimizer.param_groups:
                group["lr"] = self.args.learning_rate * factor


# The log


@dataclass
class _BinStats:
    """Per-pair values accumulated on the device between logs (one host sync per log, not per step)."""
    timesteps: list = field(default_factory=list)
    margins: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    model_errors: list = field(default_factory=list)

    def add(self, t, margin, scale, model_err):
        self.timesteps.append(t.detach())
        self.margins.append(margin.detach())
        self.scales.append(scale.detach().expand_as(margin))
        self.model_errors.append(model_err.detach())

    def summary(self, num_train_timesteps: int, world_size: int) -> dict:
        """Per t-bin (10 equal intervals, bin 0 = cleanest): pair count, implicit accuracy, mean |margin|
        (implicit-reward magnitude), mean λ(t) and mean policy error — Fig. 2's panels."""
        if not self.timesteps:
            return {}
        columns = [torch.cat(c).float() for c in (self.timesteps, self.margins, self.scales, self.model_errors)]
        t, margin, scale, model_err = columns
        bins = (t * NUM_LOG_BINS // num_train_timesteps).long().clamp(max=NUM_LOG_BINS - 1)
        one_hot = torch.nn.functional.one_hot(bins, NUM_LOG_BINS).float()
        correct = (margin > 0).float() + 0.5 * (margin == 0).float()
        sums = torch.stack([one_hot.sum(0), one_hot.T @ correct, one_hot.T @ margin.abs(),
                            one_hot.T @ scale, one_hot.T @ model_err])
        if world_size > 1:
            dist.all_reduce(sums)
        count, correct, magnitude, scale, model_err = sums.cpu().tolist()
        per = lambda xs: [round(x / n, 6) if n else None for x, n in zip(xs, count)]
        self.__init__()
        return {"bin_count": [int(n) for n in count], "bin_accuracy": per(correct),
                "bin_reward_magnitude": per(magnitude), "bin_reward_scale": per(scale),
                "bin_model_err": per(model_err)}


def _over_ranks(values: dict, world_size: int, mean: bool = True) -> dict:
    names = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[n]).detach().float().reshape(()) for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)
        if mean:
            stacked /= world_size
    return dict(zip(names, stacked.cpu().tolist()))


class TrainLog:
    """OUTPUT_DIR/log.jsonl, one JSON line per optimizer step: the means over the step's micro-batches (and
    ranks) of the loss and the objective's metrics, and what the caller adds (gradient norm, lr, the
    reference's state); every --bin_stats_every steps the per-t-bin statistics of Fig. 2. Also the progress
    bar, and the guard against divergence: a step with a non-finite loss or gradient norm is skipped and
    counted, and --max_nonfinite_steps of them in a row end the run (exit code 3, no final model)."""

    def __init__(self, args, run: Run, num_train_timesteps: int, desc: str):
        self.args, self.run, self.num_train_timesteps, self.desc = args, run, num_train_timesteps, desc
        self.path = os.path.join(args.output_dir, "log.jsonl")
        self.sums, self.skipped, self.bins, self.last, self.progress, self.tracker = {}, 0, _BinStats(), None, None, None
        self.nonfinite_in_a_row = self.nonfinite_steps = 0
        self.step_start = time.perf_counter()

    def begin(self, step: int) -> None:
        """A fresh run starts a new log; a resumed one drops the lines past its step (they are run again) and
        a line cut short by a kill."""
        if self.run.is_main:
            if step:
                self._truncate(step)
            elif os.path.exists(self.path):
                os.remove(self.path)
        self.progress = tqdm(total=self.args.max_steps, initial=step, disable=not self.run.is_main,
                             desc=self.desc, dynamic_ncols=True)
        self.tracker = _Tracker(self.args) if self.run.is_main and self.args.report_to != "none" else None
        self.step_start = time.perf_counter()

    def _truncate(self, last_step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= last_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s: dropping a line cut short (%d characters)", self.path, len(line))
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def state_dict(self) -> dict:
        columns = ("timesteps", "margins", "scales", "model_errors")
        return {"bins": {c: torch.cat(getattr(self.bins, c)).cpu() if getattr(self.bins, c) else torch.empty(0)
                         for c in columns}, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.bins = _BinStats(**{c: [v.to(self.run.device)] if v.numel() else [] for c, v in state["bins"].items()})
        self.nonfinite_in_a_row, self.nonfinite_steps = state["nonfinite_in_a_row"], state["nonfinite_steps"]

    def add(self, loss, metrics: dict, num_skipped: int, t, scale, model_err, ref_err) -> None:
        """One micro-batch: its loss and metrics (weighted 1/accumulation), and per pair its t, λ(t), reward
        margin and mean policy error for the t-bin statistics (paired objectives only)."""
        accumulation = self.args.gradient_accumulation_steps
        for name, value in {**metrics, "loss": loss}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach() / accumulation
        self.skipped += num_skipped
        n = len(t)
        if len(model_err) == 2 * n:
            margin = reward_margin(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:])
            self.bins.add(t, margin, scale, (model_err[:n] + model_err[n:]).detach() / 2)

    def finite(self, grad_norm, scaler) -> bool:
        """Whether this step's loss and gradient norm are finite on every rank, i.e. whether to take the
        optimizer step. With fp16 loss scaling an overflowing gradient is the scaler's to skip, not a divergence."""
        values = [self.sums["loss"]] + ([] if scaler.is_enabled() else [grad_norm])
        bad = torch.stack([~torch.isfinite(torch.as_tensor(v, device=self.run.device).float()) for v in values]).any()
        bad = bad.float().reshape(1)
        if self.run.world_size > 1:
            dist.all_reduce(bad)
        ok = bad.item() == 0
        self.nonfinite_in_a_row = 0 if ok else self.nonfinite_in_a_row + 1
        self.nonfinite_steps += 0 if ok else 1
        return ok

    def write(self, step: int, **fields) -> dict:
        """Close optimizer step `step`: one JSON line with the accumulated means and `fields`."""
        record = {"step": step, **_over_ranks(self.sums, self.run.world_size),
                  **{k: v.item() if torch.is_tensor(v) else v for k, v in fields.items()},
                  "skipped_rows": int(_over_ranks({"n": self.skipped}, self.run.world_size, mean=False)["n"]),
                  "nonfinite_steps": self.nonfinite_steps,
                  "step_seconds": round(time.perf_counter() - self.step_start, 4)}
        if self.nonfinite_in_a_row:
            record["skipped_step"] = True
        if step % self.args.bin_stats_every == 0 or step == self.args.max_steps:
            record.update(self.bins.summary(self.num_train_timesteps, self.run.world_size))
        self.sums, self.skipped, self.step_start, self.last = {}, 0, time.perf_counter(), record
        if self.run.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('accuracy', float('nan')):.2f}",
                                      ref="frozen" if record.get("ref_frozen") else "live")
        if self.nonfinite_in_a_row:
            self.note(f"step {step}: non-finite loss {record['loss']} or gradient norm {record.get('grad_norm')}: "
                      "step skipped")
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            self.close()
            kept = checkpoint_dirs(self.args.output_dir)
            print(f"error: the run diverged: {self.nonfinite_in_a_row} steps in a row (to step {step}) had a non-finite "
                  f"loss or gradient norm; no final model was written; the last checkpoint is "
                  f"{kept[-1] if kept else 'none'}; try a lower --learning_rate or --beta", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_DIVERGED)
        return record

    def note(self, message: str) -> None:
        """A line above the progress bar, from the main process only."""
        if self.run.is_main:
            (self.progress.write if self.progress is not None else print)(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class _Tracker:
    """--report_to: the log's numbers also to TensorBoard (OUTPUT_DIR/tensorboard) or Weights & Biases."""

    def __init__(self, args):
        self.kind = args.report_to
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        else:
            import wandb
            self.writer = wandb
            wandb.init(project="rethinking-dpo", dir=args.output_dir, config=vars(args),
                       name=os.path.basename(os.path.normpath(args.output_dir)))

    def log(self, record: dict) -> None:
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, record["step"])
        else:
            self.writer.log(scalars, step=record["step"])

    def close(self) -> None:
        (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()


class StopSignal:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit after the current step (or, while the loader
    finds no decodable pair, at once); a second signal exits at once, without a checkpoint or a traceback.
    Every rank stops at the same step. A stopped run exits with 128 + the signal's number (143, 130)."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            tqdm.write(f"signal {signum} again: exiting now, without a checkpoint", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = signum
        tqdm.write(f"signal {signum}: stopping after this step with a checkpoint (again to exit at once)",
                   file=sys.stderr)

    def agreed(self, run: Run) -> bool:
        flag = torch.tensor([float(self.signum)], device=run.device)
        if run.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag.item())
        return flag.item() > 0


def summary_lines(args, log: list[dict]) -> list[str]:
    """What the run did, in a few lines: implicit accuracy and margin at the start and the end, the
    reference's updates and freeze, the last D, what was skipped."""
    if not log:
        return []
    k = max(1, len(log) // 10)
    mean = lambda rows, name: sum(r.get(name, math.nan) for r in rows) / len(rows)
    lines = []
    if "accuracy" in log[0]:
        lines.append(f"  implicit accuracy {mean(log[:k], 'accuracy'):.3f} (first {k} steps) → "
                     f"{mean(log[-k:], 'accuracy'):.3f} (last {k})")
    if "reward_margin" in log[0]:
        lines.append(f"  reward margin     {mean(log[:k], 'reward_margin'):.2e} → {mean(log[-k:], 'reward_margin'):.2e}")
    updates = [r for r in log if r.get("ref_updated")]
    frozen = next((r for r in updates if r.get("ref_frozen")), None)
    if not args.tau:
        lines.append("  reference         the initial model throughout (τ = 0: Diffusion-DPO)")
    else:
        state = (f"frozen at step {frozen['step']} (D = {frozen['divergence']:.4g} > δ = {args.delta:g})" if frozen
                 else f"never frozen; last D = {updates[-1]['divergence']:.4g} (δ = {args.delta:g})" if updates
                 else "no update yet")
        lines.append(f"  reference         {len(updates)} update(s) every τ = {args.tau}, {state}"
                     + (f", {sum(bool(r.get('ref_reinit')) for r in updates)} Re-Init reset(s)" if args.on_diverge == "reinit" else ""))
    lines.append(f"  skipped           {sum(r.get('skipped_rows', 0) for r in log)} row(s), "
                 f"{log[-1].get('nonfinite_steps', 0)} non-finite step(s)")
    return lines


def report(args, run: Run, final_dir: str | None, step: int) -> None:
    """The run's last lines: what it did, where its curves, model and log are, and the command that evaluates
    it; or, for a run a signal stopped after its checkpoint, how to resume it, and the exit code 128 + the
    signal's number."""
    release_output(args)
    if final_dir is None:
        if run.is_main:
            print(f"stopped at step {step}; resume with --resume latest --output_dir {args.output_dir}")
        raise SystemExit(128 + run.signals.signum)
    if not run.is_main:
        return
    log_path = os.path.join(args.output_dir, "log.jsonl")
    import plot

    log = plot.read_log(args.output_dir)
    print(f"\n{run.family} {args.loss}, {step} steps of {args.effective_batch_size} pairs:")
    print("\n".join(summary_lines(args, log)))
    if args.plot:
        print(f"curves: {plot.draw({os.path.basename(os.path.normpath(args.output_dir)): [args.output_dir]}, os.path.join(args.output_dir, 'curves.png'))}")
    print(f"model: {final_dir}\nlog:   {log_path}")
    tiny = "--tiny " if args.tiny else ""
    baseline = "" if args.tiny and args.pretrained_model == _toy_model_path() else f" --baseline base={args.pretrained_model}"
    print(f"next:  python eval.py {tiny}--model {final_dir}{baseline}   # same-seed win rates (PAPER.md §6)")


def _toy_model_path() -> str:
    from miniature import toy
    return str(toy.TOY_MODEL)
