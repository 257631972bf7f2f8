"""One prepared check of the GPU paths at real size, for a machine with an accelerator and no network.

    python -m speed.gpu_check --out $OUT                     # real-size SD1.5, 512 px, on the GPU (H200: 8 min)
    python -m speed.gpu_check --out $OUT --diffusers_dpo_script path/to/train_diffusion_dpo.py   # + diffusers' row
    python -m speed.gpu_check --tiny --out /tmp/check        # the same plumbing on the tiny model, on a CPU

It builds the SD1.5 architecture with random weights in the hub layout (tiny.real_sd15_pipeline_dir) and 64
Pick-a-Pic-format pairs at 512 px, then, each in a fresh process (so that peak memory and compile state are
the configuration's own), runs speed/bench.py on the same pairs per step and reports pairs/s (warm-up
excluded) and peak accelerator memory for, most wanted first: the full fine-tune in bf16, eager (30 steps in
all: the finiteness check); LoRA rank 8 with plain Diffusion-DPO; given its path, diffusers'
train_diffusion_dpo.py (LoRA rank 8, its own bf16 mixed precision) on the same folder and pairs, timed between
its optimizer steps by torch's global step hook with its peak memory from torch at exit: the measures
bench.py takes of ours (nvidia-smi's peak is given for every row too); LoRA rank 8 with the full method
(τ = 8, so that an update falls inside the 3 + 10 steps); the full fine-tune compiled; the full method, eager;
gradient checkpointing; --cache_latents. It checks the step-1 loss against log 2 under bf16, every step
finite, the graph breaks of the compiled hot path (TORCH_LOGS=graph_breaks names them in gpu_check.log),
the memory gradient checkpointing saves, and that the reference update and its monitor add no accelerator
memory beyond the reference itself (peak at τ = 8 against τ = 0). It writes gpu_check.json, gpu_check.md and
gpu_check.log (each process's last lines) to --out after every row; --budget_s stops a configuration still
running when the time is up and skips the rest, so that a leased machine's time limit keeps what was measured.

On the device tool's machine: `bash speed/gpu_wheels.sh` here (the wheels it lacks, into .whl/), copy
diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py into the ignored .carry/, then one
call with carry [".whl", ".carry"] and the command
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site && python3 -m speed.gpu_check --out $OUT --budget_s 480 \
        --diffusers_dpo_script .carry/train_diffusion_dpo.py
(gpu_wheels.sh prints the exact command, with pyarrow installed only where that machine's is older than 24.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mechanics import errors
from mechanics.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
DPO_FLAGS = ["--tau", "0", "--gamma", "1", "--no_reward_scale"]  # plain Diffusion-DPO


def configurations(tiny: bool) -> list[tuple[str, list[str]]]:
    """(name, bench flags) of every measured configuration, most wanted first (a --budget_s that runs out skips
    the last). "full, eager" runs 30 steps (the finiteness check); diffusers' row, given its script, runs after
    the LoRA rows. τ = 8 puts a reference update (step 8) inside the window of 3 + 10 steps."""
    compiled = [] if tiny else [("full, compiled", ["--", *DPO_FLAGS, "--compile"])]
    return [("full, eager", ["--", *DPO_FLAGS, "--no-compile"]),
            ("LoRA r8, Diffusion-DPO", ["--lora_rank", "8", "--", *DPO_FLAGS, "--no-compile"]),
            ("LoRA r8, full method (τ = 8)", ["--lora_rank", "8", "--tau", "8", "--", "--no-compile"]),
            *compiled,
            ("full method (τ = 8), eager", ["--tau", "8", "--", "--no-compile"]),
            ("full, eager, gradient checkpointing", ["--", *DPO_FLAGS, "--no-compile", "--gradient_checkpointing"]),
            ("full, eager, --cache_latents", ["--cache_latents", "--", *DPO_FLAGS, "--no-compile"])]


FINITE_STEPS = 30  # "full, eager" runs this many steps in all: every loss and gradient norm finite


def remaining(opts) -> float | None:
    """Seconds left of --budget_s (None: no budget)."""
    return None if opts.deadline is None else opts.deadline - time.time()


def tail(text: str, lines: int = 40) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def run_process(cmd: list[str], cwd, env: dict, timeout: float | None) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of `cmd`; the status is None where it outran `timeout`: then its whole
    process group (torch.compile's workers too, which would hold its pipes open) is killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr


def bench(name: str, flags: list[str], opts, work: Path, log: Path, steps: int | None = None) -> dict:
    """speed/bench.py in a fresh process; its JSON, or the error (the process's output goes to `log`)."""
    path = work / f"bench-{len(list(work.glob('bench-*.json')))}.json"
    size = ["--batch", "1", "--resolution", "32"] if opts.tiny else ["--real_size", "--batch", str(opts.batch)]
    steps = ["--steps", str(steps or opts.steps), "--warmup", str(opts.warmup)]
    tau = [] if "--tau" in flags[:flags.index("--")] else ["--tau", "0"]
    flags = [*flags[:flags.index("--") + 1], *(["--mixed_precision", "bf16"] if not opts.tiny else []),
             *flags[flags.index("--") + 1:]]
    cmd = [sys.executable, "-m", "speed.bench", "--trainer", "sd15", *size, *steps, *tau, "--json", str(path), *flags]
    # The compiled run names each graph break and its reason (TORCH_LOGS) in its output, kept in the log.
    env = {**os.environ, **({"TORCH_LOGS": "graph_breaks"} if "--compile" in flags else {})}
    left = remaining(opts)
    if left is not None and left < 20:
        return {"name": name, "error": [f"skipped: --budget_s {opts.budget_s:.0f} ran out"], "command": " ".join(cmd)}
    started, poll = time.time(), GpuMemoryPoll()
    status, stdout, stderr = run_process(cmd, ROOT, env, left)
    output, failed = stdout + stderr, status != 0 or not path.is_file()
    error = ([f"stopped after {time.time() - started:.0f} s: --budget_s {opts.budget_s:.0f} ran out"] if status is None
             else tail(stderr or stdout, 1) or [f"exit status {status}"])
    device_mb = poll.stop()
    wall_s = round(time.time() - started, 1)
    with open(log, "a") as f:
        f.write(f"\n===== {name} ({wall_s} s): {' '.join(cmd)}\n" + "\n".join(tail(output, 60)) + "\n")
    breaks = [line for line in output.splitlines() if "Graph break" in line or "graph break" in line][:20]
    if failed:
        return {"name": name, "error": error, "command": " ".join(cmd), "wall_s": wall_s,
                **({"graph_break_lines": breaks} if breaks else {})}
    result = json.loads(path.read_text())
    return {"name": name, "command": " ".join(cmd), "wall_s": wall_s, "nvidia_smi_peak_mb": device_mb, **result,
            **({"graph_break_lines": breaks} if breaks else {})}


class GpuMemoryPoll:
    """Peak memory nvidia-smi reports for the GPU while a process runs (a process we cannot instrument)."""

    def __init__(self):
        self.peak_mb, self.running = 0.0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while self.running:
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      check=False, capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mb = max(self.peak_mb, max(float(u) for u in used))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)

    def stop(self) -> float | None:
        """The peak in MB, or None where nvidia-smi never answered (a CPU machine)."""
        self.running = False
        self.thread.join(timeout=2)
        return self.peak_mb or None


# Runs a script with a timestamp after every optimizer step (torch's global step hook) and its peak CUDA memory
# at exit: the same per-step time and the same memory measure as bench.py's, without touching the script.
STEP_CLOCK = """import atexit, json, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps = []
def stamp(optimizer, args, kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
register_optimizer_step_post_hook(stamp)
def write():
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    json.dump({"stamps": stamps, "peak_allocated_mb": peak}, open(output, "w"))
atexit.register(write)
output, sys.argv = sys.argv[1], sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def diffusers_dpo(opts, model: str, pairs: str, work: Path, log: Path | None = None) -> dict:
    """diffusers' train_diffusion_dpo.py, LoRA rank 8, on the same folder and pairs for warmup + steps steps;
    the time per step between its optimizer steps after the warm-up, as bench.py times ours."""
    name = "diffusers train_diffusion_dpo.py, LoRA r8"
    dataset = work / "pairs"  # a folder of its own: load_dataset(folder) reads every parquet file in it
    dataset.mkdir(parents=True)
    os.symlink(pairs, dataset / "train.parquet")
    # The script imports wandb unconditionally but uses it only with --report_to wandb; the GPU machine has
    # no wandb, so an empty module stands in for it (and tensorboard, which it has, takes the logs).
    shim = work / "shim"
    shim.mkdir()
    (shim / "wandb.py").write_text('"""Stand-in: train_diffusion_dpo.py imports wandb; --report_to tensorboard."""\n')
    (shim / "step_clock.py").write_text(STEP_CLOCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    clock = work / "steps.json"
    cmd = [sys.executable, str(shim / "step_clock.py"), str(clock), str(Path(opts.diffusers_dpo_script).resolve()),
           "--pretrained_model_name_or_path", model, "--dataset_name", str(dataset), "--dataset_split_name", "train",
           "--output_dir", str(work / "diffusers"), "--report_to", "tensorboard",
           "--resolution", "32" if opts.tiny else "512", "--train_batch_size", str(1 if opts.tiny else opts.batch),
           "--gradient_accumulation_steps", "1", "--rank", "8", "--learning_rate", "1e-5",
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(opts.warmup + opts.steps),
           "--checkpointing_steps", str(10**6), "--seed", "0", "--dataloader_num_workers", "0",
           *([] if opts.tiny else ["--mixed_precision", "bf16"])]
    left = remaining(opts) if hasattr(opts, "deadline") else None
    if left is not None and left < 20:
        return {"name": name, "error": [f"skipped: --budget_s {opts.budget_s:.0f} ran out"], "command": " ".join(cmd)}
    started, poll = time.time(), GpuMemoryPoll()
    status, stdout, stderr = run_process(cmd, work, env, left)
    output = stdout + stderr
    error = ([f"stopped after {time.time() - started:.0f} s: --budget_s {opts.budget_s:.0f} ran out"] if status is None
             else tail(stderr or stdout, 1) or [f"exit status {status}"])
    device_mb = poll.stop()
    if log is not None:
        with open(log, "a") as f:
            f.write(f"\n===== {name} ({time.time() - started:.1f} s): {' '.join(cmd)}\n"
                    + "\n".join(tail(output, 60)) + "\n")
    if status != 0 or not clock.is_file():
        return {"name": name, "error": error, "command": " ".join(cmd)}
    measured = json.loads(clock.read_text())
    stamps = measured["stamps"]
    if len(stamps) != opts.warmup + opts.steps:
        return {"name": name, "error": [f"{len(stamps)} optimizer steps, expected {opts.warmup + opts.steps}"]}
    step_s = (stamps[-1] - stamps[opts.warmup - 1]) / opts.steps
    memory = {"kind": "cuda", "peak_allocated_mb": measured["peak_allocated_mb"]} if measured["peak_allocated_mb"] else {}
    return {"name": name, "command": " ".join(cmd), "wall_s": round(time.time() - started, 1),
            "step_ms": 1000 * step_s, "pairs_per_s": (1 if opts.tiny else opts.batch) / step_s,
            "peak_memory": memory, "nvidia_smi_peak_mb": device_mb}


def peak_mb(result: dict) -> float | None:
    """The peak of the timed steps where bench.py gives it (CUDA), else of the whole run (diffusers' row, a CPU)."""
    memory = result.get("peak_memory") or {}
    return memory.get("steps_peak_allocated_mb", memory.get("peak_allocated_mb", memory.get("peak_rss_mb")))


DIFFUSERS = "diffusers train_diffusion_dpo.py, LoRA r8"


def checks(results: list[dict], reference_mb: float | None) -> list[dict]:
    """The GPU paths' checks, from the measurements."""
    by_name = {r["name"]: r for r in results if "error" not in r}
    found = []
    eager = by_name.get("full, eager")
    if eager:
        deviation = abs(eager["loss_first"] - math.log(2))
        found.append({"check": "step-1 loss against log 2 (policy = reference)", "value": f"{eager['loss_first']:.6f}",
                      "deviation": deviation, "ok": deviation < 1e-3,
                      "note": "the reference runs in the training dtype; add an fp32 reference if this is large"})
        steps = eager["config"]["warmup_steps"] + eager["config"]["timed_steps"]
        found.append({"check": f"{steps} steps, every loss and gradient norm finite", "value": str(eager["all_finite"]),
                      "ok": bool(eager["all_finite"])})
    compiled = by_name.get("full, compiled")
    if compiled:
        found.append({"check": "graph breaks on the compiled hot path", "value": str(compiled["graph_breaks"]),
                      "ok": compiled["graph_breaks"] == 0})
        if eager:
            found.append({"check": "compile speed-up (pairs/s, compiled / eager)",
                          "value": f"{compiled['pairs_per_s'] / eager['pairs_per_s']:.2f}×", "ok": True})
    ours, theirs = by_name.get("LoRA r8, Diffusion-DPO"), by_name.get(DIFFUSERS)
    if ours and theirs:
        memory = (f", peak memory {peak_mb(ours) / peak_mb(theirs):.2f}×" if peak_mb(ours) and peak_mb(theirs) else "")
        found.append({"check": "ours / diffusers' script (LoRA r8, Diffusion-DPO, same pairs per step)",
                      "value": f"pairs/s {ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}×{memory}", "ok": True})
    if not eager or eager["peak_memory"].get("kind") != "cuda":
        return found  # the memory checks are of accelerator memory; a CPU's RSS (the --tiny mode) says nothing
    checkpointed = by_name.get("full, eager, gradient checkpointing")
    if checkpointed:
        saved = peak_mb(eager) - peak_mb(checkpointed)
        found.append({"check": "gradient checkpointing saves memory (MB)", "value": f"{saved:.0f}", "ok": saved > 0})
    limit = max(0.05 * reference_mb if reference_mb else 0.0, 1.0)
    for method, plain in (("full method (τ = 8), eager", eager),
                          ("LoRA r8, full method (τ = 8)", by_name.get("LoRA r8, Diffusion-DPO"))):
        method = by_name.get(method)
        if method and plain:
            extra = peak_mb(method) - peak_mb(plain)
            found.append({"check": f"{method['name']}: reference update + monitor, peak memory beyond τ = 0 (MB)",
                          "value": f"{extra:.0f} ({method['reference_updates']} updates timed)",
                          "ok": extra <= limit and method["reference_updates"] > 0,
                          "note": f"limit 5 % of the reference, {reference_mb:.0f} MB" if reference_mb else ""})
    return found


def markdown(report: dict) -> str:
    lines = [f"GPU check, {report['machine']}, {report['date']}; SD1.5 "
             f"{'tiny' if report['tiny'] else 'real size (860M-parameter UNet, random weights), 512 px'}, "
             f"{report['pairs_per_step']} pairs per step, {report['steps']} timed steps after {report['warmup']}; "
             + ", ".join(f"{k} {v}" for k, v in report["packages"].items()) + ".", "",
             "| configuration | pairs/s | × eager | step ms | timed steps | peak MB, timed steps (CUDA allocated; "
             "RSS on a CPU) | peak MB, whole run | nvidia-smi peak MB | precision | process s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eager = next((r for r in report["results"] if r["name"] == "full, eager" and "error" not in r), None)
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {' | '.join('–' * 7)} | failed: {' '.join(r['error'])[:160]} "
                         f"| {r.get('wall_s', '–')} |")
            continue
        ratio = f"{r['pairs_per_s'] / eager['pairs_per_s']:.2f}" if eager else "–"
        memory, device = peak_mb(r), r.get("nvidia_smi_peak_mb")
        whole = (r.get("peak_memory") or {}).get("peak_allocated_mb")
        timed = r.get("config", {}).get("timed_steps", report["steps"])
        lines.append(f"| {r['name']} | {r['pairs_per_s']:.2f} | {ratio} | {r['step_ms']:.0f} | {timed} | "
                     f"{'–' if memory is None else f'{memory:.0f}'} | {'–' if whole is None else f'{whole:.0f}'} | "
                     f"{'–' if device is None else f'{device:.0f}'} | "
                     f"{r.get('config', {}).get('precision', 'its own (bf16 on a GPU)')} | {r.get('wall_s', '–')} |")
    lines += ["", "| check | value | ok |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {'yes' if c['ok'] else 'NO'} |" for c in report["checks"]]
    return "\n".join(lines) + "\n"



def preflight() -> dict[str, str]:
    """The versions of what the check imports, or one line naming the wheel to carry."""
    import importlib
    versions = {}
    for name in ["torch", "diffusers", "transformers", "datasets", "peft", "accelerate", "pyarrow"]:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError as error:
            raise UsageError(f"{name} does not import ({error}): carry its wheel, e.g. "
                             f"bash speed/gpu_wheels.sh {name}==VERSION (see that file)")
    return versions


def write(report: dict, out: Path) -> str:
    """gpu_check.json and gpu_check.md under `out` (after every row: a run stopped early keeps what it measured)."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    return table


def check(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out/gpu-check"), help="where the JSON and table go")
    p.add_argument("--tiny", action="store_true", help="the tiny SD1.5 model on this machine (the plumbing only)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step at real size")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN, compile)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds for the whole check: a configuration still running then is stopped and the rest "
                        "skipped (reported as such); unset: no limit")
    p.add_argument("--configs", default=None,
                   help="only these configurations: names separated by ';' (unset: all; diffusers' row comes with "
                        "'LoRA r8, Diffusion-DPO')")
    p.add_argument("--finite_steps", type=int, default=FINITE_STEPS,
                   help="steps in all of 'full, eager', whose losses and gradient norms must all be finite")
    p.add_argument("--diffusers_dpo_script", default=None,
                   help="path of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py")
    opts = p.parse_args(argv)
    unknown = set(opts.configs.split(";") if opts.configs else ()) - {n for n, _ in configurations(opts.tiny)}
    if unknown:
        raise UsageError(f"--configs: no configuration {sorted(unknown)}; the names: "
                         + "; ".join(n for n, _ in configurations(opts.tiny)))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started, packages = time.time(), preflight()
    opts.deadline = started + opts.budget_s if opts.budget_s else None
    import torch

    from offline import tiny
    if not opts.tiny and not torch.cuda.is_available():
        raise UsageError("no CUDA device: run with --tiny for the plumbing on a CPU")
    model = tiny.tiny_pipeline_dir("sd15") if opts.tiny else tiny.real_sd15_pipeline_dir()
    from speed.bench import real_pairs

    pairs = real_pairs(32 if opts.tiny else 512)
    unet = Path(model) / "unet" / "diffusion_pytorch_model.safetensors"
    reference_mb = unet.stat().st_size / 2**20 / 2 if unet.is_file() else None  # fp32 on disk, bf16 as a reference
    log = out / "gpu_check.log"
    log.write_text(f"setup (model, pairs): {time.time() - started:.0f} s\n")
    report = {"machine": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU",
              "date": time.strftime("%Y-%m-%d"), "packages": packages, "tiny": opts.tiny,
              "pairs_per_step": 1 if opts.tiny else opts.batch, "steps": opts.steps, "warmup": opts.warmup,
              "results": [], "checks": [], "setup_s": round(time.time() - started, 1)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        work = Path(work)
        wanted = opts.configs.split(";") if opts.configs else None
        for name, flags in configurations(opts.tiny):
            if wanted is not None and name not in wanted:
                continue
            steps = max(opts.steps, opts.finite_steps - opts.warmup) if name == "full, eager" else None
            report["results"].append(bench(name, flags, opts, work, log, steps))
            if name == "LoRA r8, Diffusion-DPO" and opts.diffusers_dpo_script:
                (work / "diffusers").mkdir()
                report["results"].append(diffusers_dpo(opts, model, pairs, work / "diffusers", log))
            report["checks"] = checks(report["results"], reference_mb)
            report["wall_s"] = round(time.time() - started, 1)
            write(report, out)
    table = write(report, out)
    print(table + f"\n{report['wall_s']:.0f} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return report



def main(argv=None) -> dict:
    """The prepared GPU check. A mistake of the user's ends the process as one `error:` line and exit code 2."""
    try:
        return check(argv)
    except errors.RunError as error:
        raise SystemExit(errors.report(error)) from None

if __name__ == "__main__":
    main()
