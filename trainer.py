"""The training mechanics shared by train_sd15.py, train_sdxl.py and train_sd3.py.

What is the same for every model lives here once: the command-line flags, device / precision / DDP
set-up, the hub checks, the optimizer and lr schedule, the loop of DESIGN.md ("The loop"), the
reference update hook, logging, checkpoints and resume. What differs per model — how it is loaded, how
prompts and images are encoded, how a batch is noised and predicted — is a small `Model` class in each
train_*.py, passed to `main`.

The loop, per optimizer step (PAPER.md §1–§3):
    for each micro-batch of B pairs:   pixels [2B] (winners first) → latents, prompt embeddings
        one t and one ε per pair (Cat(γ^k) sampler), λ(t), noised latents for both halves
        policy forward on 2B (grad), reference forward (no grad) → per-sample errors → loss(λ(t))
    clip, optimizer step, lr schedule; reference.step (τ/δ rule); log one JSON line; checkpoint.
"""
import argparse
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
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import data
from losses import LOSSES, per_sample_error, reward_margin
from reference import ON_DIVERGE, Reference

logger = logging.getLogger("train")

# The paper's figures bin t into 10 equal intervals (PAPER.md §3, Fig. 2).
NUM_LOG_BINS = 10
# Generator stream of the monitor's inputs, apart from every micro-batch's.
MONITOR_STREAM = 1 << 20


class UsageError(Exception):
    """A user mistake or an impossible run: printed as one line, exit code 2, no traceback."""


def fail(message: str) -> None:
    raise UsageError(message)


# --tiny's small-scale recipe. One CPU thread: a 32 px model gains little from a second one, and two
# spinning OpenMP threads on a busy 2-core laptop made the demo ~5× slower (measured).
TINY_RECIPE = dict(resolution=32, train_batch_size=4, effective_batch_size=4, learning_rate=2e-5,
                   scale_lr=False, warmup_steps=0, max_steps=60, checkpoint_every=30, beta=500.0,
                   tau=8, delta=0.05, dataloader_workers=0, divergence_every=5, cpu_threads=1)


def build_parser(description: str, recipe: dict) -> argparse.ArgumentParser:
    """Every flag of the three trainers. `recipe` holds the script's paper defaults (PAPER.md §5)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model", default=None,
                   help=f"hub id or local folder of the diffusers pipeline to fine-tune (recipe: {recipe['pretrained_model']})")
    g.add_argument("--tiny", action="store_true",
                   help="offline demo. SD1.5: the committed toy base model (toy_model/) and preference pairs "
                        "sampled from it and labelled by the toy reward (made on first use, then cached); "
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
                   help="DataLoader worker processes for decoding (default 4; 0 with --tiny)")

    g = p.add_argument_group("objective (losses.py)")
    g.add_argument("--loss", default="dpo", choices=sorted(LOSSES),
                   help="preference objective; 'sft' trains on the winners only")
    g.add_argument("--beta", type=float, default=None,
                   help="β of the objective (default: the objective's own, 5000 for dpo, PAPER.md §5)")

    g = p.add_argument_group("reference update (reference.py, PAPER.md §2)")
    g.add_argument("--tau", type=int, default=None,
                   help="copy the policy into the reference every τ optimizer steps; 0 = plain Diffusion-DPO "
                        f"(recipe: {recipe['tau']})")
    g.add_argument("--delta", type=float, default=None,
                   help=f"divergence threshold δ of the monitor (recipe: {recipe['delta']})")
    g.add_argument("--on_diverge", default="freeze", choices=ON_DIVERGE,
                   help="once D > δ: freeze the reference (paper), reset it to the initial model (Re-Init), "
                        "or ignore the monitor (the unstable variant)")
    g.add_argument("--monitor_samples", type=int, default=8,
                   help="(winner latent, t, ε) draws used to estimate the divergence D")
    g.add_argument("--divergence_every", type=int, default=None,
                   help="also log D(policy, initial) every N steps (Fig. 1b); 0 = off (default 0)")

    g = p.add_argument_group("timestep-aware training (schedule.py, PAPER.md §3)")
    g.add_argument("--gamma", type=float, default=0.9,
                   help="over-sample early (noisy) steps: bin k drawn with probability ∝ γ^k; 1 = uniform t")
    g.add_argument("--num_bins", type=int, default=50, help="K bins of the timestep grid for --gamma")
    g.add_argument("--no_reward_scale", action="store_true", help="λ(t) ≡ 1 instead of the §3 schedule")

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
                        "the VAE and text encoders never run again (latent_cache.py; needs center crops and a "
                        "map-style dataset)")
    g.add_argument("--cache_dir", default=None, help="where --cache_latents keeps its files (unset: OUTPUT_DIR/cache)")

    g = p.add_argument_group("LoRA (lora.py)")
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
                   help="'latest' (newest checkpoint in --output_dir) or a checkpoint folder")
    g.add_argument("--bin_stats_every", type=int, default=10,
                   help="emit per-t-bin statistics aggregated over this many steps")
    return p


def finalize_args(args, recipe: dict, world_size: int, tiny_recipe: dict = TINY_RECIPE):
    """Fill what was left unset: --tiny's small-scale recipe, then the script's paper recipe."""
    recipe = dict(recipe)
    if args.tiny:
        recipe.pop("pretrained_model")  # prepare_tiny fills in the tiny model and the built-in pairs
    else:
        recipe["dataset"] = data.DEFAULT_DATASET
    generic = dict(train_batch_size=1, scale_lr=True, learning_rate=1e-8, checkpoint_every=500,
                   dataloader_workers=4, divergence_every=0)
    for name, default in {**generic, **recipe, **(tiny_recipe if args.tiny else {})}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    objective = LOSSES[args.loss]
    if args.beta is None:
        args.beta = objective.default_beta
    per_step = args.train_batch_size * world_size
    if args.gradient_accumulation_steps is None:
        if args.effective_batch_size % per_step:
            fail(f"--effective_batch_size {args.effective_batch_size} is not a multiple of "
                 f"batch {args.train_batch_size} × {world_size} devices")
        args.gradient_accumulation_steps = args.effective_batch_size // per_step
    args.effective_batch_size = per_step * args.gradient_accumulation_steps
    if args.scale_lr:
        args.learning_rate *= args.effective_batch_size
    checks = [(args.max_steps > 0, "--max_steps must be positive"),
              (args.gradient_accumulation_steps > 0, "gradient accumulation must be positive"),
              (args.tau >= 0, "--tau must be >= 0"),
              (0 < args.gamma, "--gamma must be positive"),
              (0 <= args.caption_dropout <= 1, "--caption_dropout must be in [0, 1]"),
              (args.monitor_samples > 0, "--monitor_samples must be positive"),
              (args.lora_rank >= 0, "--lora_rank must be >= 0"),
              (not (args.cache_latents and args.streaming),
               "--cache_latents needs a map-style dataset: drop --streaming (a local parquet copy works)"),
              (not (args.cache_latents and args.random_crop),
               "--cache_latents caches center crops: drop --random_crop")]
    for ok, message in checks:
        if not ok:
            fail(message)
    return args


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One bounded connection attempt: without it, an offline hub lookup retries DNS for minutes
    before failing (ENVIRONMENT.md); with it, an offline run fails at once with one line."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(result and result[0])


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
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        fail(f"cannot reach the Hugging Face hub to download '{name_or_path}' and it is not cached; "
             f"run the offline demo with --tiny, or pass {flag} a local folder")
    return DiffusionPipeline.download(name_or_path)


def check_dataset_source(source: str) -> None:
    if not os.path.exists(source) and (os.environ.get("HF_DATASETS_OFFLINE") == "1" or not _hub_reachable()):
        fail(f"cannot reach the Hugging Face hub to load dataset '{source}'; pass --dataset a local "
             "parquet file or folder, or run the offline demo with --tiny")


def load_component(cls, path: str, subfolder: str | None = None):
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


class VAEImages:
    """The image half of a model's `encode`, the same for SD1.5, SDXL and SD3 (all encode with `self.vae`);
    --cache_latents stores what it returns."""

    @torch.no_grad()
    def encode_images(self, pixels):
        """Pixels → the VAE posterior's parameters (mean, log-variance)."""
        return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters


def encoder_outputs(model, batch):
    """The VAE posterior parameters of a batch's images and its prompt embeddings: from the batch itself
    when --cache_latents filled them in (latent_cache.py), else by running the model's encoders."""
    moments = batch.get("latent_moments")
    if moments is None:
        moments = model.encode_images(batch["pixel_values"])
    prompts = batch.get("prompt_embeds") or model.encode_captions(batch["captions"])
    return moments.to(model.device, non_blocking=True), {k: v.to(model.device, non_blocking=True)
                                                         for k, v in prompts.items()}


def check_tokenizer(tokenizer, text_encoder, name: str) -> None:
    """transformers 5 silently returns a 2- or 104-token tokenizer for an unreachable hub id
    (ENVIRONMENT.md); training on such prompts would be garbage, so refuse."""
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) < vocab // 2:
        fail(f"{name} has {len(tokenizer)} tokens but its text encoder expects {vocab}: the tokenizer "
             "files are missing or were not downloaded")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen models (encoders, VAE, reference): the training dtype on an accelerator."""
        return self.autocast_dtype or torch.float32


def setup_runtime(args) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device_type.startswith("cuda") else "gloo")
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
    return Runtime(device, rank, world_size, local_rank, autocast_dtype)


def micro_generators(seed: int, step: int, micro: int, device) -> tuple[torch.Generator, torch.Generator]:
    """Timesteps (CPU) and noise / VAE sampling (device) of one micro-batch come from generators seeded
    by its position (step, global micro-batch index), so a resumed run — or the same pairs split over
    more processes — draws exactly the same numbers, with no RNG state to checkpoint."""
    position = (seed * 1_000_003 + step) * 65_537 + micro
    cpu = torch.Generator().manual_seed(position)
    on_device = torch.Generator(device).manual_seed(position + 1)
    return cpu, on_device


def monitor_err_fn(model, latents_w, cond_w, num_samples, generators, runtime):
    """err_fn of reference.py: per-sample errors of a few winner latents of the batch at t ~ U and shared
    ε, fixed once so that p_init, the new reference and the policy see the same inputs (PAPER.md §2)."""
    cpu_generator, device_generator = generators
    index = torch.arange(num_samples, device=latents_w.device) % latents_w.shape[0]
    latents = latents_w[index]
    cond = {k: v[index] for k, v in cond_w.items()}
    timesteps, _ = model.sample_noise_level(num_samples, cpu_generator, gamma=None, num_bins=1)
    noise = torch.randn(latents.shape, generator=device_generator, device=latents.device, dtype=latents.dtype)
    noisy, target = model.add_noise(latents, noise, timesteps)

    @torch.no_grad()
    def err_fn(module):
        with runtime.autocast():
            return per_sample_error(model.predict(module, noisy, timesteps, cond), target)
    return err_fn


def make_optimizer(args, params):
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
        return bnb.optim.AdamW8bit(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                   weight_decay=args.weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=args.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=args.weight_decay)
    # The fused kernel (one launch for all tensors) exists for CUDA and, since torch 2.4, for CPU, where it
    # is ~5x faster than the default per-tensor loop on a UNet's many small tensors.
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.weight_decay, eps=args.adam_epsilon, fused=fused or None)


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a checkpoint folder only exists once fully written)."""
    found = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    found = [d for d in found if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(found, key=lambda d: int(d.rsplit("-", 1)[1]))


def atomic_save_dir(final_dir: str, write) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves a folder that looks done."""
    tmp = final_dir + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def save_checkpoint(args, step, policy, reference, optimizer, lr_schedule, loader, scaler):
    state = {"step": step, "policy": policy.state_dict(), "reference": reference.state_dict(),
             "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
             "loader": loader.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "args": vars(args)}
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    atomic_save_dir(path, lambda tmp: torch.save(state, os.path.join(tmp, "state.pt")))
    for old in checkpoint_dirs(args.output_dir)[:-args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def find_resume(args) -> str | None:
    if args.resume is None:
        return None
    if args.resume == "latest":
        found = checkpoint_dirs(args.output_dir)
        if not found:
            logger.info("no checkpoint in %s: starting from scratch", args.output_dir)
            return None
        return found[-1]
    if not os.path.isfile(os.path.join(args.resume, "state.pt")):
        fail(f"--resume {args.resume}: no checkpoint there (expected {args.resume}/state.pt)")
    return args.resume


def truncate_log(path: str, last_step: int) -> None:
    """Drop log lines past the resumed step: those steps will be run again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


@dataclass
class BinStats:
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


def mean_over_ranks(values: dict, world_size: int) -> dict:
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(names, stacked.cpu().tolist()))


class StopRequested:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit after the current step; a second
    SIGINT exits at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, runtime: Runtime) -> bool:
        flag = torch.tensor([float(self.requested)], device=runtime.device)
        if runtime.world_size > 1:
            dist.all_reduce(flag)
        return flag.item() > 0


class NoTimer:
    """Phase timing hook for bench.py; the training run itself times nothing."""

    def section(self, name):
        return nullcontext()


def micro_batch_loss(args, model, objective, batch, generators, runtime, timer):
    """Loss of one micro-batch of B pairs (PAPER.md §1, §3). Returns the loss, its metrics, the per-pair
    values for the t-bin statistics, and the winners kept for the divergence monitor."""
    cpu_generator, device_generator = generators
    with timer.section("encode"):
        latents, cond = model.encode(batch, device_generator)
    num_pairs = latents.shape[0] // 2
    timesteps, scale = model.sample_noise_level(num_pairs, cpu_generator, args.gamma, args.num_bins)
    if args.no_reward_scale:
        scale = torch.ones_like(scale)
    noise = torch.randn(latents[:num_pairs].shape, generator=device_generator, device=latents.device,
                        dtype=latents.dtype)
    # One t and one ε per pair, shared by its winner and loser (§1); SFT needs the winners only.
    halves = 2 if objective.needs_loser else 1
    inputs = latents[:halves * num_pairs]
    cond_in = {k: v[:halves * num_pairs] for k, v in cond.items()}
    timesteps_in = timesteps.repeat(halves)
    noisy, target = model.add_noise(inputs, noise.repeat(halves, 1, 1, 1), timesteps_in)

    with timer.section("policy_forward_backward"), runtime.autocast():
        pred = model.predict(model.policy_forward, noisy, timesteps_in, cond_in)
    model_err = per_sample_error(pred, target)
    ref_pred, ref_err = None, torch.zeros_like(model_err)
    if objective.needs_reference:
        with timer.section("reference_forward"), torch.no_grad(), runtime.autocast():
            ref_pred = model.predict(model.reference_forward, noisy, timesteps_in, cond_in)
            ref_err = per_sample_error(ref_pred, target)

    with timer.section("loss"):
        errors = (model_err[:num_pairs], model_err[num_pairs:], ref_err[:num_pairs], ref_err[num_pairs:])
        if not objective.needs_loser:
            errors = (model_err, None, None, None)
        extra = {}
        if objective.needs_predictions:
            extra = dict(model_pred_w=pred[:num_pairs], ref_pred_w=ref_pred[:num_pairs], target_w=target[:num_pairs])
        loss, metrics = objective.fn(*errors, args.beta, scale, **extra)
    per_pair = None
    if objective.needs_loser:
        margin = reward_margin(*errors) if objective.needs_reference else errors[1] - errors[0]
        per_pair = (timesteps, margin.detach(), scale, (errors[0] + errors[1]).detach() / 2)
    winners = (latents[:num_pairs], {k: v[:num_pairs] for k, v in cond.items()})
    return loss, metrics, per_pair, winners


def train(args, model, runtime: Runtime, timer=NoTimer()) -> str | None:
    """Run the loop for `model` (a train_*.py Model). Returns the folder of the final pipeline, or None
    if a signal stopped the run (after a checkpoint)."""
    objective = LOSSES[args.loss]
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "log.jsonl")

    dataset = data.load_pairs(args.dataset, split=args.split, streaming=args.streaming,
                              max_samples=args.max_train_samples)
    transform = data.PairTransform(resolution=args.resolution, random_crop=args.random_crop,
                                   random_flip=not args.no_flip, caption_dropout=args.caption_dropout,
                                   seed=args.seed)
    for flag, hook in (("cache_latents", "encode_images"), ("lora_rank", "save_lora")):
        if getattr(args, flag) and not hasattr(model, hook):
            fail(f"--{flag} is not supported by the {model.name} trainer yet")
    if args.cache_latents:
        import latent_cache  # first pass over the data: VAE and text encoders run once per image and caption
        loader = latent_cache.cached_loader(args, model, dataset, transform, runtime)
    else:
        loader = data.PairLoader(dataset, transform, batch_size=args.train_batch_size, rank=runtime.rank,
                                 world_size=runtime.world_size, num_workers=args.dataloader_workers,
                                 seed=args.seed)

    policy = model.policy
    policy.to(runtime.device).train()
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    # The reference is built from the pretrained weights, before any step: they are also p_init (§2).
    ref_policy = policy  # what the reference copies: the policy, or with LoRA a view of its adapter
    if args.lora_rank:
        import lora
        lora.add_lora(policy, args.lora_rank, args.lora_alpha, getattr(model, "lora_target_modules", lora.DEFAULT_TARGETS),
                      reference_adapter=args.tau > 0, base_dtype=runtime.weight_dtype, seed=args.seed)
        reference, ref_policy = lora.make_reference(policy, args.tau, args.delta, args.on_diverge)
    else:
        reference = Reference(policy, tau=args.tau, delta=args.delta, on_diverge=args.on_diverge,
                              dtype=runtime.autocast_dtype)
        # Same module mode as the policy, so both take the same code path (diffusers' ResnetBlock2D lays
        # memory out differently in train mode): loss exactly log 2 at init. SD models have no dropout.
        reference.model.train(policy.training)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params)
    warmup = max(args.warmup_steps, 1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.autocast_dtype == torch.float16 else None

    step = 0
    resume_dir = find_resume(args)
    if resume_dir:
        state = torch.load(os.path.join(resume_dir, "state.pt"), map_location="cpu", weights_only=False)
        policy.load_state_dict(state["policy"])
        reference.load_state_dict(state["reference"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        loader.load_state_dict(state["loader"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step = state["step"]
        if runtime.is_main:
            truncate_log(log_path, step)
            logger.info("resumed from %s at step %d", resume_dir, step)
    elif runtime.is_main and os.path.exists(log_path):
        os.remove(log_path)

    ddp_policy = policy
    if runtime.world_size > 1:
        ddp_policy = nn.parallel.DistributedDataParallel(
            policy, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    # Fixed shapes (dynamic=False): a rare odd-sized batch (skipped pairs) recompiles once, instead of
    # turning every later step into a dynamic-shape graph.
    model.policy_forward = torch.compile(ddp_policy, dynamic=False) if args.compile else ddp_policy
    # A LoRA reference switches adapters around the shared model's call: it runs eagerly.
    model.reference_forward = (torch.compile(reference.model, dynamic=False) if args.compile and not args.lora_rank
                               else reference.model)

    batches = iter(loader)
    stop = StopRequested()
    bin_stats = BinStats()
    accumulation = args.gradient_accumulation_steps
    progress = tqdm(total=args.max_steps, initial=step, disable=not runtime.is_main,
                    desc=f"{model.name} {args.loss}", dynamic_ncols=True)
    while step < args.max_steps:
        step_start = time.perf_counter()
        sums, skipped = {}, 0
        for micro in range(accumulation):
            with timer.section("data"):
                batch = next(batches)
            skipped += batch["num_skipped"]
            generators = micro_generators(args.seed, step, micro * runtime.world_size + runtime.rank,
                                          runtime.device)
            # DDP averages gradients only on the last micro-batch of the step.
            last = micro == accumulation - 1 or runtime.world_size == 1
            with nullcontext() if last else ddp_policy.no_sync():
                loss, metrics, per_pair, winners = micro_batch_loss(args, model, objective, batch, generators,
                                                                    runtime, timer)
                with timer.section("policy_forward_backward"):
                    (scaler.scale(loss / accumulation) if scaler else loss / accumulation).backward()
            for name, value in {**metrics, "loss": loss}.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / accumulation
            if per_pair:
                bin_stats.add(*per_pair)

        with timer.section("optimizer"):
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1

        # The reference update and its monitor (§2), on a fixed draw over the last micro-batch's winners.
        with timer.section("reference_update"):
            err_fn = monitor_err_fn(model, *winners, args.monitor_samples,
                                    micro_generators(args.seed, step, MONITOR_STREAM, runtime.device), runtime)
            ref_info = reference.step(step, ref_policy, err_fn)
            if args.divergence_every and step % args.divergence_every == 0:
                ref_info["policy_divergence"] = reference.divergence(ref_policy, err_fn)

        record = {"step": step, **mean_over_ranks(sums, runtime.world_size), "grad_norm": grad_norm.item(),
                  "lr": lr_schedule.get_last_lr()[0], **ref_info, "skipped_rows": skipped,
                  "step_seconds": round(time.perf_counter() - step_start, 4)}
        if step % args.bin_stats_every == 0 or step == args.max_steps:
            record.update(bin_stats.summary(model.num_train_timesteps, runtime.world_size))
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            logger.warning("step %d: non-finite loss %s or gradient norm %s", step, record["loss"],
                           record["grad_norm"])
        if runtime.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('accuracy', float('nan')):.2f}",
                                 ref="frozen" if reference.frozen else "live")

        stopping = stop.agreed(runtime)
        if step % args.checkpoint_every == 0 or (stopping and step < args.max_steps):
            if runtime.is_main:
                path = save_checkpoint(args, step, policy, reference, optimizer, lr_schedule, loader, scaler)
                progress.write(f"saved {path}")
            if runtime.world_size > 1:
                dist.barrier()
        if stopping:
            progress.close()
            if runtime.is_main:
                print(f"stopped at step {step}; resume with --resume latest --output_dir {args.output_dir}")
            return None
    progress.close()

    # LoRA: the adapter alone, for `pipe.load_lora_weights(final_lora)` on the base pipeline.
    final_dir = os.path.join(args.output_dir, "final_lora" if args.lora_rank else "final")
    save = model.save_lora if args.lora_rank else model.save_pipeline
    if runtime.is_main:
        atomic_save_dir(final_dir, lambda tmp: save(policy, tmp))
    if runtime.world_size > 1:
        dist.barrier()
    return final_dir


def main(description: str, recipe: dict, model_class, argv=None) -> None:
    """Parse flags, set up the runtime, load `model_class`, train, and report where things are."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser(description, recipe)
    if hasattr(model_class, "add_flags"):
        model_class.add_flags(parser.add_argument_group(f"{model_class.name} only"))
    args = parser.parse_args(argv)
    runtime = None
    try:
        runtime = setup_runtime(args)
        tiny_recipe = TINY_RECIPE
        if args.tiny and getattr(model_class, "toy_demo", False) and args.pretrained_model is None:
            tiny_recipe = {**TINY_RECIPE, **model_class.toy_recipe}  # the toy model's own, calibrated recipe
        args = finalize_args(args, recipe, runtime.world_size, tiny_recipe)
        if runtime.device.type == "cpu" and args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)
        if args.tiny:
            prepare_tiny(args, model_class.tiny_kind, runtime, getattr(model_class, "toy_demo", False))
        else:
            check_dataset_source(args.dataset)
        if runtime.is_main:
            logger.info("%s: effective batch %d pairs (%d × %d devices × %d accumulation), lr %.3g, β %s, "
                        "τ %d, δ %g, γ %g, λ(t) %s", model_class.name, args.effective_batch_size,
                        args.train_batch_size, runtime.world_size, args.gradient_accumulation_steps,
                        args.learning_rate, args.beta, args.tau, args.delta, args.gamma,
                        "off" if args.no_reward_scale else "on")
        model = model_class(args, runtime)
        final_dir = train(args, model, runtime)
        if final_dir and runtime.is_main:
            print(f"model: {final_dir}\nlog:   {os.path.join(args.output_dir, 'log.jsonl')}")
    except (UsageError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if runtime and runtime.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


TOY_DEMO_PAIRS = 256  # toy pairs of the SD1.5 --tiny demo: 60 steps × 4 pairs see each about once


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


def prepare_tiny(args, kind: str, runtime: Runtime, toy_demo: bool = False) -> None:
    """--tiny: the model and pairs of the offline demo, built once (rank 0 first) and cached.

    toy_demo (SD1.5): the committed toy base model (toy_model/, toy_pretrain.py) and preference pairs
    sampled from it and labelled by the toy reward (toy.cached_pairs), so the demo learns a real preference.
    Otherwise: the random tiny `kind` pipeline (tiny.py) and the built-in smooth-vs-noise pairs, which test
    the mechanics in seconds (bench.py and the tests use these)."""
    import tiny
    import toy

    def build():
        if not toy_demo:
            args.pretrained_model = args.pretrained_model or tiny.tiny_pipeline_dir(kind)
            args.dataset = args.dataset or builtin_pairs()
            return
        args.pretrained_model = args.pretrained_model or str(toy.TOY_MODEL)
        if args.dataset is None:
            if not os.path.isfile(os.path.join(args.pretrained_model, "model_index.json")):
                fail(f"--tiny samples its preference pairs from a local pipeline folder, and "
                     f"{args.pretrained_model} is not one: give --dataset, or build it with toy_pretrain.py")
            args.dataset = str(toy.cached_pairs(args.pretrained_model, TOY_DEMO_PAIRS, seed=0))
    chosen = (args.pretrained_model, args.dataset)
    if runtime.is_main:
        build()
    if runtime.world_size > 1:
        dist.barrier()
        args.pretrained_model, args.dataset = chosen
        build()
    if runtime.world_size > 1:
        dist.barrier()
        args.pretrained_model, args.dataset = chosen
        build()
    if runtime.world_size > 1:
        dist.barrier()
        args.pretrained_model, args.dataset = chosen
        build()
