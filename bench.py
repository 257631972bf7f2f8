"""Speed and memory of a trainer: pairs/s, peak memory, and where the time of a step goes.

    python bench.py --trainer sd15                        # tiny SD1.5 on this machine
    python bench.py --trainer sd15 --cache_latents        # ... reading cached latents and prompt embeddings
    python bench.py --trainer sd15 --lora_rank 8          # ... LoRA (reference = second adapter, τ > 0)
    python bench.py --trainer sdxl                        # tiny SDXL (sd3 likewise)
    python bench.py --trainer sd15 --real_size --batch 4  # real SD1.5 UNet / VAE / CLIP-L configs, random
                                                          # weights (nothing downloaded), 512 px: for a GPU
    python bench.py --trainer sd15 --json out.json -- --gradient_checkpointing   # trainer flags after --

It runs trainer.train, the loop every trainer uses, for --warmup then --steps optimizer steps, and times the
timed ones through the loop's `timer.section(name)` hooks (CUDA is synchronized at every boundary): data
loading, encoding (VAE and text encoders, shown apart), policy forward+backward, reference forward, loss,
optimizer, reference update (the τ-step copy and its monitor, averaged over the timed steps: a window that is
a multiple of τ averages it over τ) and the rest (noise, logging). Overhead = step − (policy forward+backward
+ reference forward), the part of a step that is not the two models' work. Peak memory is the accelerator's
(max allocated and reserved) or, on CPU, the process's peak RSS. The numbers are printed (and written as JSON
with --json), never asserted. Wall and CPU time are both kept: on a shared CPU the CPU time is the steadier.

--real_size builds, once, an SD1.5 pipeline folder in the hub layout from the real UNet, VAE and CLIP-L configs
with random weights (the offline tokenizer of tiny.py, the text encoder's vocabulary sized to match it), so the
very from_pretrained path of a real run is measured; it is cached under $RDPO_CACHE. The final save of the run
is skipped (it is not part of a step).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

import data
import tiny
import trainer

TRAINERS = ("sd15", "sdxl", "sd3")
# The rows of the split, in loop order; the loop's sections are named as in trainer.train.
SECTIONS = ("data", "encode", "policy_forward_backward", "reference_forward", "loss", "optimizer", "reference_update")
LABELS = {"data": "data loading", "encode": "encode (VAE + text)", "encode:vae": "  VAE",
          "encode:text": "  text encoders", "policy_forward_backward": "policy forward+backward",
          "reference_forward": "reference forward", "loss": "loss", "optimizer": "optimizer step",
          "reference_update": "reference update (τ copy + monitor)", "other": "other (noise, metrics, log)"}
REAL_SD15_VERSION = 1


class SectionTimer:
    """trainer.train's timer: wall and CPU seconds per section, over the steps after `warmup`.

    A step ends when its "reference_update" section ends (the loop's last); sections may be entered several
    times per step (gradient accumulation, the backward pass). On CUDA every boundary synchronizes, so a
    section's time is its kernels' time, not their launch time.
    """

    def __init__(self, warmup: int, device: torch.device):
        if warmup < 1:
            raise ValueError("need at least one warm-up step")
        self.warmup, self.cuda = warmup, device.type == "cuda"
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        self.steps_ended = 0
        self.window = None  # (wall, cpu) at the end of the last warm-up step

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    @property
    def timing(self) -> bool:
        return self.steps_ended >= self.warmup

    @contextmanager
    def section(self, name):
        start = self._now()
        try:
            yield
        finally:
            end = self._now()
            if self.timing:
                self.wall[name] += end[0] - start[0]
                self.cpu[name] += end[1] - start[1]
            if name == "reference_update":
                self.steps_ended += 1
                if self.steps_ended == self.warmup:
                    self.window = end
                elif self.timing:
                    self.window_end = end

    @property
    def timed_steps(self) -> int:
        return self.steps_ended - self.warmup

    def totals(self) -> tuple[float, float]:
        return self.window_end[0] - self.window[0], self.window_end[1] - self.window[1]


def instrument_encoders(model, timer: SectionTimer) -> None:
    """Time the VAE's encode and the text encoders' forwards apart, inside the "encode" section."""
    from diffusers import AutoencoderKL
    from torch import nn

    def timed(name, fn):
        def run(*args, **kwargs):
            with timer.section(name):
                return fn(*args, **kwargs)
        return run

    for attribute, value in list(vars(model).items()):
        for module in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(module, AutoencoderKL):
                module.encode = timed("encode:vae", module.encode)
            elif isinstance(module, nn.Module) and "text_encoder" in attribute:
                module.forward = timed("encode:text", module.forward)


# Real-size SD1.5

# The published configs of stable-diffusion-v1-5 (unet/, vae/, text_encoder/ config.json), written out so that
# nothing is downloaded; only the text encoder's vocabulary is sized to the offline tokenizer.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                 "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                 mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)


def real_sd15_dir(root: Path) -> str:
    """An SD1.5 pipeline folder of the real architecture with random weights, built once (atomically)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    final = root / f"bench-sd15-real-v{REAL_SD15_VERSION}"
    if (final / "model_index.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    start = time.perf_counter()
    try:
        tokenizer = tiny.build_clip_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                        eos_token_id=tokenizer.eos_token_id,
                                                        pad_token_id=tokenizer.pad_token_id, **SD15_TEXT))
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDPMScheduler.from_config(tiny.SD_SCHEDULER_CONFIG),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        tiny._save_pipeline(pipe, tmp, {"tokenizer": "<|endoftext|>"})
        del pipe, unet, vae, text_encoder
        tmp.chmod(0o755)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built the real-size SD1.5 pipeline (random weights) in {time.perf_counter() - start:.0f} s: {final}")
    return str(final)


def real_pairs(root: Path, resolution: int) -> str:
    path = root / f"bench-pairs-{resolution}-v1.parquet"
    if not path.exists():
        tmp = f"{path}.tmp-{os.getpid()}"
        data.write_tiny_pickapic(tmp, num_pairs=64, resolution=resolution, seed=0)
        os.replace(tmp, path)
    return str(path)


# The run

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trainer", default="sd15", choices=TRAINERS, help="which train_*.py Model to run")
    p.add_argument("--real_size", action="store_true",
                   help="real SD1.5 architecture with random weights at 512 px instead of the tiny model (sd15 only)")
    p.add_argument("--batch", type=int, default=4, help="pairs per micro-batch (accumulation 1)")
    p.add_argument("--steps", type=int, default=32, help="timed optimizer steps (a multiple of --tau)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cudnn, compile)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (unset: 32 tiny, 512 real size)")
    p.add_argument("--tau", type=int, default=32,
                   help="reference update period τ (the paper's 32); 0 = plain Diffusion-DPO")
    p.add_argument("--cache_latents", action="store_true", help="trainer flag: train from cached latents")
    p.add_argument("--lora_rank", type=int, default=0, help="trainer flag: LoRA of this rank (0 = full)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's own)")
    p.add_argument("--output_dir", default=None, help="the run's folder (unset: a temporary one, removed)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER,
                   help="after --: any flag of the trainer (e.g. -- --gradient_checkpointing --no-compile)")
    return p


def trainer_argv(opts, output_dir: str) -> list[str]:
    argv = ["--output_dir", output_dir, "--max_steps", str(opts.warmup + opts.steps),
            "--train_batch_size", str(opts.batch), "--effective_batch_size", str(opts.batch),
            "--checkpoint_every", str(10**9), "--divergence_every", "0", "--tau", str(opts.tau),
            # δ = ∞: every τ-th step updates (a frozen reference would cost nothing and hide the update's cost)
            "--delta", "1e9", "--lora_rank", str(opts.lora_rank)]
    if opts.cache_latents:
        argv.append("--cache_latents")
    if opts.real_size:
        root = tiny.default_cache_root()
        resolution = opts.resolution or 512
        argv += ["--pretrained_model", real_sd15_dir(root), "--dataset", real_pairs(root, resolution),
                 "--resolution", str(resolution), "--no-scale_lr", "--learning_rate", "1e-6", "--warmup_steps", "0"]
    else:
        argv += ["--tiny"] + (["--resolution", str(opts.resolution)] if opts.resolution else [])
    flags = list(opts.trainer_flags)
    if flags[:1] == ["--"]:
        flags = flags[1:]
    return argv + flags


def run(opts) -> dict:
    if opts.real_size and opts.trainer != "sd15":
        trainer.fail("--real_size builds the SD1.5 architecture only: use --trainer sd15")
    if opts.steps < 1 or opts.warmup < 1:
        trainer.fail("need --steps >= 1 and --warmup >= 1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    module = importlib.import_module(f"train_{opts.trainer}")
    model_class = next(v for v in vars(module).values()
                       if isinstance(v, type) and getattr(v, "name", None) == opts.trainer and hasattr(v, "tiny_kind"))
    parser = trainer.build_parser(f"bench {opts.trainer}", module.RECIPE)
    if hasattr(model_class, "add_flags"):
        try:
            model_class.add_flags(parser)
        except argparse.ArgumentError:
            pass  # trainer.build_parser registered them already
    own_dir = opts.output_dir is None
    output_dir = opts.output_dir or tempfile.mkdtemp(prefix=f"bench-{opts.trainer}-")
    try:
        args = parser.parse_args(trainer_argv(opts, output_dir))
        runtime = trainer.setup_runtime(args)
        args = trainer.finalize_args(args, module.RECIPE, runtime.world_size)
        if args.tiny:
            trainer.prepare_tiny(args, model_class.tiny_kind, runtime)
        load_start = time.perf_counter()
        model = model_class(args, runtime)
        load_seconds = time.perf_counter() - load_start
        model.save_pipeline = model.save_lora = lambda policy, out_dir: None  # not part of a step
        timer = SectionTimer(opts.warmup, runtime.device)
        instrument_encoders(model, timer)
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_start = time.perf_counter()
        progress_bar = trainer.tqdm
        trainer.tqdm = lambda *a, **k: progress_bar(*a, **{**k, "disable": True})  # no bar in the table
        try:
            trainer.train(args, model, runtime, timer)
        finally:
            trainer.tqdm = progress_bar
        run_seconds = time.perf_counter() - run_start
        with open(os.path.join(output_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
    finally:
        if own_dir:
            shutil.rmtree(output_dir, ignore_errors=True)
    return report(opts, args, runtime, timer, log, load_seconds, run_seconds)


def report(opts, args, runtime, timer, log, load_seconds, run_seconds) -> dict:
    n = timer.timed_steps
    wall, cpu = timer.totals()
    per_step = lambda totals: {k: 1000 * totals.get(k, 0.0) / n for k in (*SECTIONS, "encode:vae", "encode:text")}
    wall_ms, cpu_ms = per_step(timer.wall), per_step(timer.cpu)
    step_ms, step_cpu_ms = 1000 * wall / n, 1000 * cpu / n
    wall_ms["other"] = step_ms - sum(wall_ms[k] for k in SECTIONS)
    cpu_ms["other"] = step_cpu_ms - sum(cpu_ms[k] for k in SECTIONS)
    models_ms = wall_ms["policy_forward_backward"] + wall_ms["reference_forward"]
    if runtime.device.type == "cuda":
        memory = {"kind": "cuda", "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                  "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    else:
        memory = {"kind": "cpu_rss", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    timed = log[opts.warmup:]
    result = {
        "trainer": opts.trainer, "size": "real" if opts.real_size else "tiny", "machine": machine(),
        "config": {"device": str(runtime.device), "pairs_per_step": args.effective_batch_size,
                   "resolution": args.resolution, "precision": str(runtime.autocast_dtype or "fp32"),
                   "compile": bool(args.compile), "gradient_checkpointing": args.gradient_checkpointing,
                   "optimizer": args.optimizer, "cache_latents": args.cache_latents, "lora_rank": args.lora_rank,
                   "tau": args.tau, "loss": args.loss, "warmup_steps": opts.warmup, "timed_steps": n},
        "pairs_per_s": args.effective_batch_size * n / wall,
        "step_ms": step_ms, "step_cpu_ms": step_cpu_ms,
        "sections_ms": wall_ms, "sections_cpu_ms": cpu_ms,
        "overhead_ms": step_ms - models_ms, "overhead_pct": 100 * (step_ms - models_ms) / step_ms,
        "overhead_cpu_pct": 100 * (step_cpu_ms - cpu_ms["policy_forward_backward"] - cpu_ms["reference_forward"])
                            / step_cpu_ms,
        "reference_updates": sum(bool(r.get("ref_updated")) for r in timed),
        "reference_update_pct": 100 * wall_ms["reference_update"] / step_ms,
        "peak_memory": memory, "model_load_s": load_seconds, "run_s": run_seconds,
        "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
    }
    return result


def print_table(r: dict) -> None:
    c, m = r["config"], r["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads"
    print(f"\nbench {r['trainer']} ({r['size']}) on {c['device']}: {where}; torch {m['torch']}")
    print(f"  {c['pairs_per_step']} pairs/step at {c['resolution']} px, {c['precision']}, compile {c['compile']}, "
          f"checkpointing {c['gradient_checkpointing']}, {c['optimizer']}, cache {c['cache_latents']}, "
          f"LoRA rank {c['lora_rank']}, τ {c['tau']}, {c['timed_steps']} timed steps after {c['warmup_steps']} warm-up")
    print(f"  pairs/s {r['pairs_per_s']:.2f}   step {r['step_ms']:.1f} ms (CPU {r['step_cpu_ms']:.1f} ms)")
    mem = r["peak_memory"]
    if mem["kind"] == "cuda":
        print(f"  peak memory: {mem['peak_allocated_mb']:.0f} MB allocated, {mem['peak_reserved_mb']:.0f} MB reserved")
    else:
        print(f"  peak memory: {mem['peak_rss_mb']:.0f} MB RSS (CPU process, libraries included)")
    print(f"  {'section':<38}{'ms/step':>10}{'% step':>9}{'CPU ms':>10}")
    for key in (*SECTIONS[:2], "encode:vae", "encode:text", *SECTIONS[2:], "other"):
        wall, cpu = r["sections_ms"][key], r["sections_cpu_ms"][key]
        print(f"  {LABELS[key]:<38}{wall:>10.2f}{100 * wall / r['step_ms']:>8.1f}%{cpu:>10.2f}")
    print(f"  overhead = step − (policy f+b + reference f): {r['overhead_ms']:.1f} ms = {r['overhead_pct']:.1f} % "
          f"(CPU time: {r['overhead_cpu_pct']:.1f} %)")
    print(f"  reference update: {r['reference_update_pct']:.2f} % of a step averaged over the timed steps "
          f"({r['reference_updates']} updates in {c['timed_steps']} steps)")
    print(f"  loss {r['loss_first']:.4f} → {r['loss_last']:.4f}; model load {r['model_load_s']:.1f} s, "
          f"run {r['run_s']:.1f} s")


def main(argv=None) -> dict | None:
    opts = build_parser().parse_args(argv)
    try:
        result = run(opts)
    except (trainer.UsageError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print_table(result)
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
