"""Speed and memory of a trainer: pairs/s, peak memory, and where the time of a step goes.

    python -m speed.bench --trainer sd15                        # tiny SD1.5 on this machine
    python -m speed.bench --trainer sd15 --cache_latents        # ... reading cached latents and prompt embeddings
    python -m speed.bench --trainer sd15 --lora_rank 8          # ... LoRA (reference = second adapter, τ > 0)
    python -m speed.bench --trainer sdxl                        # tiny SDXL (sd3 and flux likewise)
    python -m speed.bench --trainer sd15 --real_size --batch 4  # real SD1.5 UNet / VAE / CLIP-L configs, random
                                                                # weights (nothing downloaded), 512 px: for a GPU
    python -m speed.bench --trainer sd15 --json out.json -- --gradient_checkpointing   # trainer flags after --

It runs the train script's own `main` — the loop a user runs, not a copy of it — for --warmup then --steps
optimizer steps, and times it from the outside: the loop holds no timer. The components the script calls are
wrapped for the run: the loader's batches (data loading), the VAE's encode and the text encoders' forward
(encoding), the policy's forward under autograd and every backward (policy forward+backward), the
reference's forward without autograd (reference forward), the objective (loss), gradient clipping and the
optimizer step (optimizer), and reference.Reference's step and divergence (reference update: the τ-step
copy and its monitor, averaged over the timed steps; a window that is a multiple of τ averages it over τ).
The rest of a step (noise, metrics, the log) is "other". On CUDA every boundary synchronizes, so a section's
time is its kernels' time. Overhead = step − (policy forward+backward + reference forward), the part of a step
that is not the two models' work. Peak memory is the accelerator's (max allocated and reserved) or, on CPU,
the process's peak RSS. The numbers are printed (and written as JSON with --json), never asserted. Wall and
CPU time are both kept: on a shared CPU the CPU time is the steadier. The run stops before its final save.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import losses
import reference
import train_flux
import train_sd3
import train_sd15
import train_sdxl
from mechanics import checkpoints, errors, flags, loading, runtime, trainlog
from mechanics.errors import UsageError
from offline import cache, tiny

TRAINERS = {"sd15": train_sd15, "sdxl": train_sdxl, "sd3": train_sd3, "flux": train_flux}
SECTIONS = ("data", "encode", "policy_forward_backward", "reference_forward", "loss", "optimizer", "reference_update")
LABELS = {"data": "data loading", "encode": "encode (VAE + text)", "encode:vae": "  VAE",
          "encode:text": "  text encoders", "policy_forward_backward": "policy forward+backward",
          "reference_forward": "reference forward", "loss": "loss", "optimizer": "optimizer step",
          "reference_update": "reference update (τ copy + monitor)", "other": "other (noise, metrics, log)"}


class SectionTimer:
    """Wall and CPU seconds per section, over the steps after `warmup`.

    A step ends when reference.Reference.step returns (the loop's last call of a step). A section entered
    while another runs counts for the outer one only ("encode:vae" and "encode:text" also count as "encode").
    On CUDA every boundary synchronizes.
    """

    def __init__(self, warmup: int):
        if warmup < 1:
            raise ValueError("need at least one warm-up step")
        self.warmup, self.cuda = warmup, torch.cuda.is_available()
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        self.steps_ended, self.open = 0, []
        self.window = self.window_end = None

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def begin(self, name: str) -> None:
        self.open.append((name, self._now() if not self.open else None))

    def end(self) -> None:
        name, start = self.open.pop()
        if start is None or self.steps_ended < self.warmup:
            return
        end = self._now()
        for key in (name, "encode") if name.startswith("encode:") else (name,):
            self.wall[key] += end[0] - start[0]
            self.cpu[key] += end[1] - start[1]

    @contextmanager
    def section(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def step_ended(self) -> None:
        self.steps_ended += 1
        if self.steps_ended == self.warmup:
            self.window = self._now()
            if self.cuda:  # the timed steps' own peak, apart from setup's (model load, monitor probe) and warm-up's
                self.setup_peak_mb = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
        elif self.steps_ended > self.warmup:
            self.window_end = self._now()

    @property
    def timed_steps(self) -> int:
        return self.steps_ended - self.warmup

    def totals(self) -> tuple[float, float]:
        return self.window_end[0] - self.window[0], self.window_end[1] - self.window[1]


class _FinalSave(Exception):
    """Raised where the script would write its final pipeline: the benchmark ends there."""


def _timed(timer, name, fn):
    def run(*args, **kwargs):
        with timer.section(name):
            return fn(*args, **kwargs)
    return run


class _TimedLoader:
    """The loader the script asked for; each batch it yields is timed as data loading."""

    def __init__(self, timer, loader):
        self.timer, self.loader = timer, loader

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            with self.timer.section("data"):
                batch = next(batches)
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _timed_forward(timer, forward):
    """The policy's forward (autograd on) or the reference's (off), as the loop calls them."""
    def run(*args, **kwargs):
        with timer.section("policy_forward_backward" if torch.is_grad_enabled() else "reference_forward"):
            return forward(*args, **kwargs)
    return run


def _quiet_tqdm(*args, **kwargs):
    from tqdm import tqdm
    return tqdm(*args, **{**kwargs, "disable": True})  # no progress bar inside the table


def instrument(timer: SectionTimer, stack: ExitStack) -> dict:
    """Wrap, until `stack` closes, every component whose time the table reports. Returns a dict that
    receives the script's (args, run) once runtime.start has them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    def patch(owner, name, wrap):
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, wrap(original))
        stack.callback(setattr, owner, name, original)

    def reference_step(step):
        def run(self, *args, **kwargs):
            with timer.section("reference_update"):
                result = step(self, *args, **kwargs)
            timer.step_ended()
            return result
        return run

    @contextmanager
    def no_final_save(*_, **__):
        raise _FinalSave
        yield

    started = {}

    def capture(start):
        def run(args, *rest, **kwargs):
            started["args"], started["run"] = args, start(args, *rest, **kwargs)
            return started["run"]
        return run

    patch(runtime, "start", capture)
    patch(loading, "pair_loader", lambda fn: lambda *a, **k: _TimedLoader(timer, fn(*a, **k)))
    patch(runtime, "maybe_compile", lambda fn: lambda *a, **k: _timed_forward(timer, fn(*a, **k)))
    patch(checkpoints, "atomic_dir", lambda fn: no_final_save)
    patch(trainlog, "tqdm", lambda fn: _quiet_tqdm)
    patch(torch.Tensor, "backward", lambda fn: _timed(timer, "policy_forward_backward", fn))
    patch(torch.nn.utils, "clip_grad_norm_", lambda fn: _timed(timer, "optimizer", fn))
    patch(reference.Reference, "step", reference_step)
    patch(reference.Reference, "divergence", lambda fn: _timed(timer, "reference_update", fn))
    patch(AutoencoderKL, "encode", lambda fn: _timed(timer, "encode:vae", fn))
    for encoder in (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel):
        patch(encoder, "forward", lambda fn: _timed(timer, "encode:text", fn))
    patch(losses, "LOSSES", lambda table: {name: dataclasses.replace(obj, fn=_timed(timer, "loss", obj.fn))
                                           for name, obj in table.items()})
    for handle in (register_optimizer_step_pre_hook(lambda *_: timer.begin("optimizer")),
                   register_optimizer_step_post_hook(lambda *_: timer.end())):
        stack.callback(handle.remove)
    return started


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
    p.add_argument("--trainer", default="sd15", choices=TRAINERS, help="which train_*.py to run")
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


def real_pairs(resolution: int) -> str:
    """64 built-in pairs at the real resolution, written once into the tiny cache."""
    path = cache.root() / f"bench-pairs-{resolution}-v1.parquet"
    return str(cache.build_aside(path, lambda tmp: tiny.write_tiny_pickapic(str(tmp), num_pairs=64,
                                                                           resolution=resolution, seed=0), folder=False))


def trainer_argv(opts, output_dir: str) -> list[str]:
    argv = ["--output_dir", output_dir, "--max_steps", str(opts.warmup + opts.steps),
            "--train_batch_size", str(opts.batch), "--effective_batch_size", str(opts.batch),
            "--checkpoint_every", str(10**9), "--divergence_every", "0", "--tau", str(opts.tau),
            # δ = ∞: every τ-th step updates (a frozen reference would cost nothing and hide the update's cost)
            "--delta", "1e9", "--lora_rank", str(opts.lora_rank),
            # the training step alone: no validation grid or held-out sampling inside the timed steps
            "--validation_every", "0", "--eval_every", "0"]
    if opts.cache_latents:
        argv.append("--cache_latents")
    if opts.threads:
        argv += ["--cpu_threads", str(opts.threads)]
    if opts.real_size:
        resolution = opts.resolution or 512
        argv += ["--pretrained_model", tiny.real_sd15_pipeline_dir(), "--dataset", real_pairs(resolution),
                 "--resolution", str(resolution), "--no-scale_lr", "--learning_rate", "1e-6", "--warmup_steps", "0"]
    else:
        # The random tiny model of the trainer's family and the built-in pairs (not the SD1.5 toy demo).
        argv += ["--tiny", "--pretrained_model", tiny.tiny_pipeline_dir(opts.trainer),
                 "--dataset", tiny.builtin_pairs()]
        argv += ["--resolution", str(opts.resolution)] if opts.resolution else []
    flags = list(opts.trainer_flags)
    if flags[:1] == ["--"]:
        flags = flags[1:]
    return argv + flags


def run(opts) -> dict:
    if opts.real_size and opts.trainer != "sd15":
        raise UsageError("--real_size builds the SD1.5 architecture only: use --trainer sd15")
    if opts.steps < 1 or opts.warmup < 1:
        raise UsageError("need --steps >= 1 and --warmup >= 1")
    if opts.json:  # refused now, not after the run
        folder = os.path.dirname(os.path.abspath(opts.json))
        if os.path.isdir(opts.json) or (os.path.exists(folder) and not os.access(folder, os.W_OK)):
            raise UsageError(f"--json {opts.json} cannot be written (a folder, or in a read-only one)")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    script = TRAINERS[opts.trainer]
    own_dir = opts.output_dir is None
    output_dir = opts.output_dir or tempfile.mkdtemp(prefix=f"bench-{opts.trainer}-")
    timer = SectionTimer(opts.warmup)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run_start = time.perf_counter()
        with ExitStack() as stack:
            started = instrument(timer, stack)
            try:
                script.main(trainer_argv(opts, output_dir))
            except _FinalSave:
                pass
        run_seconds = time.perf_counter() - run_start
        with open(os.path.join(output_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        log = [r for r in log if "loss" in r]  # the optimizer steps' lines (step 0's held-out line has no loss)
    finally:
        if own_dir:
            shutil.rmtree(output_dir, ignore_errors=True)
    return report(opts, started["args"], started["run"], timer, log, run_seconds)


def report(opts, args, run, timer, log, run_seconds) -> dict:
    n = timer.timed_steps
    wall, cpu = timer.totals()
    per_step = lambda totals: {k: 1000 * totals.get(k, 0.0) / n for k in (*SECTIONS, "encode:vae", "encode:text")}
    wall_ms, cpu_ms = per_step(timer.wall), per_step(timer.cpu)
    step_ms, step_cpu_ms = 1000 * wall / n, 1000 * cpu / n
    wall_ms["other"] = step_ms - sum(wall_ms[k] for k in SECTIONS)
    cpu_ms["other"] = step_cpu_ms - sum(cpu_ms[k] for k in SECTIONS)
    models_ms = wall_ms["policy_forward_backward"] + wall_ms["reference_forward"]
    if run.device.type == "cuda":
        steps_mb, setup_mb = torch.cuda.max_memory_allocated() / 2**20, getattr(timer, "setup_peak_mb", 0.0)
        memory = {"kind": "cuda", "peak_allocated_mb": max(steps_mb, setup_mb), "steps_peak_allocated_mb": steps_mb,
                  "setup_peak_allocated_mb": setup_mb, "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    else:
        memory = {"kind": "cpu_rss", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    timed = log[opts.warmup:]
    return {
        "trainer": opts.trainer, "size": "real" if opts.real_size else "tiny", "machine": machine(),
        "config": {"device": str(run.device), "pairs_per_step": args.effective_batch_size,
                   "resolution": args.resolution, "precision": str(run.autocast_dtype or "fp32"),
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
        "peak_memory": memory, "run_s": run_seconds,
        "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
        "all_finite": all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log),
        "graph_breaks": _graph_breaks() if args.compile else None,
    }


def _graph_breaks() -> int:
    """torch.compile's graph breaks in this process so far (each splits the hot path into more graphs)."""
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


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
        print(f"  peak memory: {mem['peak_allocated_mb']:.0f} MB allocated ({mem['steps_peak_allocated_mb']:.0f} MB in "
              f"the timed steps, {mem['setup_peak_allocated_mb']:.0f} MB before), "
              f"{mem['peak_reserved_mb']:.0f} MB reserved")
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
    print(f"  loss {r['loss_first']:.4f} → {r['loss_last']:.4f}; run {r['run_s']:.1f} s")


def measure(argv=None) -> dict | None:
    opts = build_parser().parse_args(argv)
    result = run(opts)
    print_table(result)
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return result



def main(argv=None) -> dict | None:
    """Measure a trainer's step. A mistake of the user's ends the process as one `error:` line and exit code 2."""
    try:
        return measure(argv)
    except errors.RunError as error:
        raise SystemExit(errors.report(error)) from None

if __name__ == "__main__":
    main()
