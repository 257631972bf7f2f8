"""The paper in miniature as an experiment: the design is pre-registered in miniature/README.md, a positive control
gates the claims, the configurations of claims 1 and 4 are trained with 32 seeds (80 % power at the SESOI), the others with 13, and each claim ends with its interval and a verdict.

    python -m miniature.reproduce                                        # the study (README: its wall time)
    python -m miniature.reproduce --quick                                # 3 seeds, the main rows
    python -m miniature.reproduce --quick --eval_split calibration --seeds 4   # the pilot (README)
    python -m miniature.reproduce --smoke --output_dir out/repro-smoke   # the mechanics only (~1 min; the tests)

Stages (each with its progress bar; a rerun in the same --output_dir reuses finished runs and images):
  0. pairs        training pairs on toy.PAIR_PROMPTS and diagnostic pairs on the held-out prompts, sampled from
                  the toy base model (DDIM, trailing spacing: its first step is t = 999) and labelled by toy_label
  1a. tuning      Diffusion-DPO's learning rate and β from a grid, scored on toy.CALIBRATION_PROMPTS (never
                  evaluated on), with as many runs as 1b: a baseline that loses to the base model is a mis-tuned one
  1b. calibration τ from a grid scaled to the run length as the paper's {16, 32, 64} is to its 2000 steps, and δ
                  by Fig. 1c's principle: runs with reference updates and no monitor, checkpointed; each checkpoint
                  scored on the calibration prompts against its D(p_θ, p_init). The rule picks the best checkpoint
                  inside the freeze window (30–50 % of the run): δ = its D, τ = its run's τ
  2. training     every configuration × its seeds, `--jobs` processes at once, train_sd15.main in-process;
                  Diffusion-DPO first, for
  3. the gate     the positive control: Diffusion-DPO against the base model; if it fails, no claim is tested.
     evaluation   eval.py on toy.EVAL_PROMPTS (--eval_split calibration: the pilot's prompts), every image with
                  its own seed (distinct_seeds)
  4. diagnostics  per t-bin implicit accuracy, reward magnitude and D of final models against p_init on held-out
                  pairs with uniform t (Fig. 2's protocol, Fig. 5)
  5. results      the claims with paired 95 % t-intervals over training seeds and a verdict each, the tables, the
                  figures; OUTPUT_DIR/results.md and results.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import resource
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mechanics import errors, runtime
from mechanics.errors import UsageError
from mechanics.trainlog import NUM_LOG_BINS as NUM_BINS  # the paper's 10 equal t-bins, bin 0 the cleanest
from offline import toy

DEFAULT_MODEL = toy.TOY_MODEL
REWARDS = ("toy_fidelity", "toy_aesthetic", "toy_label")
PRIMARY = "toy_label"
CALIBRATION_SEED = 1000  # the calibration runs' training seed, apart from the study's 0, 1, …

# The recipe, fixed before the final run (README, pre-registration). Every value is a flag of this script.
RECIPE = dict(
    steps=100,            # optimizer steps per run (L): the powered design's 189 runs fit the 90-minute budget
    batch=8,              # pairs per step: 800 of the 1000 training pairs per run, each about once
    warmup=5,
    # Diffusion-DPO's grid, tuned on the calibration split (stage 1a) with as many runs as the method's τ grid
    # (stage 1b): every configuration then trains with the tuned learning rate (AdamW, constant after warm-up) and β.
    learning_rates=(6e-5, 1.2e-4),
    betas=(500.0, 5000.0),  # Diffusion-DPO's SD1.5 β = 5000 (PAPER.md §5), and a tenth of it
    taus=(1, 2, 3, 6),    # the paper's {16, 32, 64} of 2000 steps, scaled to L = 100: {0.8, 1.6, 3.2}, and 2× that
    freeze_window=(0.3, 0.5),  # the calibration's δ must freeze the reference inside this share of the run
    calibration_every=10,  # checkpoint (and Fig. 1c point) every N steps of a calibration run
    calibration_seeds=4,  # images per calibration prompt (27 prompts), each with its own seed
    eval_seeds=4,         # images per held-out prompt (54 prompts), each with its own seed
    # Training seeds (0 … N−1), from the 2026-12-02 study's held-out paired SDs (README, the powered design): 32 give
    # 80 % power at the SESOI for claims 1 and 4 (SD 0.0113–0.0114), so their configurations take 32; claim 3b needs
    # 13 (SD 0.0068); claim 3a (38) stays underpowered at 13, as do the descriptive rows.
    powered_seeds=32,     # Diffusion-DPO, exploration only, the full method (50 and 10 bins): claims 1, 4, the gate
    seeds=13,             # every other main configuration
    cheap_seeds=3,        # SFT and Re-Init
    long_seeds=3,         # the long run without the monitor (claim 2)
    long_factor=4,        # … of long_factor × L steps
    diagnostic_seeds=3,   # final models per configuration that the held-out-pair diagnostics measure
    diagnostic_pairs=96,  # held-out pairs of those diagnostics (on the evaluation prompts; nothing is tuned there)
    num_pairs=1000,       # training pairs sampled from the base model
    # The monitor's probe. 64 (train_sd15.py's default) made a τ = 1 run twice as slow as a Diffusion-DPO run and
    # the study overrun its 90 minutes; 32 (std/D ≈ 0.06 by monitor_noise.py's measurement) keeps it inside.
    monitor_samples=32,
    sesoi=0.0058,         # smallest effect of interest in held-out toy_label: 20 % of Diffusion-DPO's pilot gain (README)
)
QUICK = dict(powered_seeds=3, seeds=3, cheap_seeds=0, long_seeds=0, diagnostic_seeds=2)
SMOKE = dict(steps=4, batch=2, warmup=0, learning_rates=(6e-5,), betas=(5000.0,), taus=(1,), calibration_every=2, calibration_seeds=1, eval_seeds=1,
             powered_seeds=2, seeds=2, cheap_seeds=0, long_seeds=1, long_factor=2, diagnostic_seeds=1, diagnostic_pairs=4,
             num_pairs=16, monitor_samples=4)
SMOKE_PROMPTS = 2

# (key, label, flags from the calibration, which seeds: powered / main / cheap / long)
CONFIGS = (
    ("sft", "SFT", lambda c: ["--loss", "sft", "--tau", "0", "--gamma", "1", "--no_reward_scale"], "cheap"),
    ("dpo", "Diffusion-DPO", lambda c: ["--tau", "0", "--gamma", "1", "--no_reward_scale"], "powered"),
    ("explore", "exploration only (τ + monitor)",
     lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]), "--gamma", "1", "--no_reward_scale"], "powered"),
    ("nomonitor", "the same τ without the monitor",
     lambda c: ["--tau", str(c["tau"]), "--on_diverge", "ignore", "--gamma", "1", "--no_reward_scale"], "main"),
    ("nomonitor_long", "… and 4× longer",
     lambda c: ["--tau", str(c["tau"]), "--on_diverge", "ignore", "--gamma", "1", "--no_reward_scale"], "long"),
    ("reinit", "Re-Init instead of freeze",
     lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]), "--on_diverge", "reinit", "--gamma", "1",
                "--no_reward_scale"], "cheap"),
    ("timestep50", "timestep strategy only, 50 bins", lambda c: ["--tau", "0", "--gamma", "0.9", "--num_bins", "50"],
     "main"),
    ("timestep10", "timestep strategy only, 10 bins", lambda c: ["--tau", "0", "--gamma", "0.9", "--num_bins", "10"],
     "main"),
    ("full50", "full method, 50 bins",
     lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]), "--gamma", "0.9", "--num_bins", "50"], "powered"),
    ("full10", "full method, 10 bins",
     lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]), "--gamma", "0.9", "--num_bins", "10"], "powered"),
    ("fullnorm", "full method, 50 bins, mean λ = 1",
     lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]), "--gamma", "0.9", "--num_bins", "50",
                "--reward_scale_norm"], "main"),
)
QUICK_CONFIGS = ("dpo", "explore", "nomonitor", "timestep50", "full50")
SMOKE_CONFIGS = ("dpo", "explore", "nomonitor_long", "nomonitor", "full50")
LABELS = {key: label for key, label, _, _ in CONFIGS} | {"base": "base (toy_model)"}

# The pre-registered claims (README): (claim, A, B, kind). A − B in held-out toy_label, paired by training seed.
#   beats:       reproduced if the interval lies above 0, refuted if it lies below the SESOI, else inconclusive
#   degrades:    reproduced if it lies below 0, refuted if it lies above −SESOI
#   not_better:  reproduced if it lies below the SESOI, refuted if it lies above 0
CLAIMS = (
    ("1. exploration with the monitor beats Diffusion-DPO", "explore", "dpo", "beats"),
    ("2. without the monitor the same τ degrades with training (4× longer vs 1×)", "nomonitor_long", "nomonitor",
     "degrades"),
    ("3a. the timestep strategy alone does not beat Diffusion-DPO (50 bins)", "timestep50", "dpo", "not_better"),
    ("3b. the timestep strategy alone does not beat Diffusion-DPO (10 bins)", "timestep10", "dpo", "not_better"),
    ("4a. the full method beats exploration only (50 bins)", "full50", "explore", "beats"),
    ("4b. the full method beats exploration only (10 bins)", "full10", "explore", "beats"),
)
SECONDARY = (("Diffusion-DPO vs the base model", "dpo", "base"), ("SFT vs the base model", "sft", "base"),
             ("full method vs Diffusion-DPO (50 bins)", "full50", "dpo"),
             ("mean λ = 1 vs the full method (λ's effective-β raise)", "fullnorm", "full50"),
             ("Re-Init vs freeze", "reinit", "explore"))
# t_{0.975, df}: the paired t-interval's quantile, df = seeds − 1.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    """The quantile above; past df = 30, Cornish–Fisher's first term (within 0.003 of the exact value there)."""
    return T975.get(df, 1.96 + 2.37 / df)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="out/repro", help="runs, images, figures and results go here")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the toy base model (pipeline folder, hub layout)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['seeds']} seeds of {', '.join(QUICK_CONFIGS)} only")
    p.add_argument("--smoke", action="store_true", help="the mechanics only: tiny runs, every table and figure made")
    p.add_argument("--eval_split", choices=["eval", "calibration"], default="eval",
                   help="prompts the final models are compared on: the held-out evaluation prompts (the study), or "
                        "the calibration prompts (the pilot that sets the SESOI and the number of seeds, README)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once, each in its own process with one torch thread (default: min(2, CPUs); "
                        "1 with --smoke: trains in this process)")
    g = p.add_argument_group("the pre-registered recipe (defaults: this file's RECIPE; --quick, --smoke change some)")
    for name, value in RECIPE.items():
        kind = type(value[0]) if isinstance(value, tuple) else type(value)
        g.add_argument(f"--{name}", type=kind, nargs="+" if isinstance(value, tuple) else None,
                       default=argparse.SUPPRESS, help=f"default {value}".replace("%", "%%"))
    args = p.parse_args(argv)
    defaults = {**RECIPE, **(QUICK if args.quick else {}), **(SMOKE if args.smoke else {})}
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    for name in ("steps", "batch", "calibration_every", "calibration_seeds", "eval_seeds", "powered_seeds", "seeds", "long_factor",
                 "num_pairs", "monitor_samples", "diagnostic_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if min(args.learning_rates) <= 0 or min(args.betas) <= 0 or min(args.taus) < 1:
        p.error("--learning_rates, --betas and --taus must be positive, every value")
    if not 0 < args.freeze_window[0] < args.freeze_window[1] <= 1:
        p.error("--freeze_window takes two shares of the run, 0 < a < b <= 1")
    if args.jobs is None:  # a smoke run's few steps cost less than starting a worker process
        args.jobs = 1 if args.smoke else max(1, min(2, os.cpu_count() or 1))
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args



def check_inputs(args) -> None:
    """Before any work: --model is an SD1.5 pipeline folder (what train_sd15.py trains) whose model_index.json
    reads, and --output_dir is, or can be made, a writable folder."""
    model = Path(args.model)
    hint = "build it with offline/toy_pretrain.py"
    if not model.is_dir():
        raise UsageError(f"--model {args.model} is not a pipeline folder ({'no such folder' if not model.exists() else 'a file'}; "
               f"{hint})")
    index = model / "model_index.json"
    if not index.is_file():
        raise UsageError(f"--model {args.model} is not a pipeline folder (no model_index.json; {hint})")
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise UsageError(f"--model {args.model}: model_index.json is not readable JSON ({error})")
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "StableDiffusionPipeline":
        raise UsageError(f"--model {args.model} is a {kind or 'pipeline of no known class'}, not an SD1.5 "
               f"StableDiffusionPipeline: the study trains with train_sd15.py")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {out} cannot be written: {error.strerror or error}")


def read_state(path: Path):
    """A JSON file this script wrote into --output_dir, or None when it is missing or unreadable (cut short by
    a kill while written, or damaged): what it records is then made again."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def configs(args) -> list[tuple[str, list[int]]]:
    """(key, training seeds) of every configuration this invocation trains."""
    chosen = SMOKE_CONFIGS if args.smoke else QUICK_CONFIGS if args.quick else [k for k, *_ in CONFIGS]
    count = {"powered": args.powered_seeds, "main": args.seeds, "cheap": args.cheap_seeds, "long": args.long_seeds}
    return [(key, list(range(count[kind]))) for key, _, _, kind in CONFIGS if key in chosen and count[kind]]


# Running train_sd15.main, in this process or in a worker


def train_argv(args, run_dir: Path, seed: int, flags: list[str], steps: int | None = None,
               learning_rate: float | None = None, beta: float | None = None) -> list[str]:
    """The flags every run shares, then the configuration's own (PAPER.md §5's recipe, scaled to the toy);
    learning rate and β: the tuned ones (stage 1a) unless given."""
    return ["--pretrained_model", args.model, "--dataset", args.pairs, "--resolution", "32",
            "--output_dir", str(run_dir), "--seed", str(seed), "--max_steps", str(steps or args.steps),
            "--train_batch_size", str(args.batch), "--effective_batch_size", str(args.batch),
            "--learning_rate", str(learning_rate or args.learning_rate), "--no-scale_lr",
            "--warmup_steps", str(args.warmup), "--beta", str(beta or args.beta), "--divergence_every", str(args.calibration_every),
            "--monitor_samples", str(args.monitor_samples), "--bin_stats_every", str(args.calibration_every),
            "--device", "cpu", "--dataloader_workers", "0", "--checkpoint_every", str(10**9), "--no-plot",
            "--validation_every", "0",  # the study evaluates the final models itself (stage 3)
            # The VAE and text encoder run once per image for all runs, not once per step.
            "--cache_latents", "--cache_dir", str(Path(args.output_dir) / "cache"),
            "--overwrite", *flags]  # a run cut short is trained again from the start


def run_done(run_dir: Path, argv: list[str]) -> bool:
    """A finished run with exactly these flags is reused (a rerun resumes the study, not each run)."""
    info = read_state(run_dir / "reproduce.json")
    return isinstance(info, dict) and (run_dir / "final" / "model_index.json").is_file() and info.get("argv") == argv


def train_one(run_dir: str, argv: list[str]) -> dict:
    """train_sd15.main(argv) with its output in RUN_DIR/train.log; returns the run's wall and CPU seconds."""
    import train_sd15

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "reproduce.json").unlink(missing_ok=True)
    start, cpu = time.time(), time.process_time()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root_level = logging.getLogger().level  # runtime.start sets INFO logging for its own run only
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(run_dir / "train.log", "w") as log:  # file-descriptor level: tqdm, logging and print alike
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            logging.getLogger().setLevel(logging.INFO)
            try:
                code = train_sd15.main(argv)
                if code:
                    raise RuntimeError(f"training in {run_dir} failed (exit {code}); see {run_dir}/train.log")
            finally:
                sys.stdout.flush(), sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])
        for s, h in handlers.items():  # the trainer's SIGINT/SIGTERM handlers must not outlive the run
            signal.signal(s, h)
        logging.getLogger().setLevel(root_level)
    info = {"argv": argv, "wall_s": round(time.time() - start, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    (run_dir / "reproduce.json").write_text(json.dumps(info, indent=1))
    return info


def quiet_libraries() -> None:
    """The trainers' quieting (no loading bars), and no library warnings either: the study prints its stages."""
    import diffusers.utils.logging
    import transformers.utils.logging

    runtime.quiet_libraries()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def _worker_init():
    # One torch thread per process: two single-thread runs beat one two-thread run on tiny models (conftest.py).
    torch.set_num_threads(1)
    quiet_libraries()


def run_tasks(tasks: list[tuple], jobs: int, desc: str) -> list:
    """Run (fn, *args) tasks, `jobs` processes at once (or here, in order, with jobs = 1); results in order."""
    results = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit="task", dynamic_ncols=True) as bar:
        if jobs <= 1 or len(tasks) <= 1:
            for i, (fn, *fn_args) in enumerate(tasks):
                results[i] = fn(*fn_args)
                bar.update(1)
            return results
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(fn, *fn_args): i for i, (fn, *fn_args) in enumerate(tasks)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    return results


# Stage 0: pairs


def ensure_pairs(args) -> dict:
    """The training pairs (toy.PAIR_PROMPTS) and the diagnostics' held-out pairs (toy.EVAL_PROMPTS), made once
    per base model and cached."""
    print("[0/5] pairs")
    args.pairs = str(toy.cached_pairs(args.model, args.num_pairs, seed=0))
    args.held_out_pairs = str(toy.cached_pairs(args.model, args.diagnostic_pairs, seed=1, split="eval"))
    stats = read_state(Path(args.pairs).with_suffix(".json"))  # a damaged one only leaves the numbers out
    return {"pairs": args.pairs, "held_out_pairs": args.held_out_pairs, **(stats if isinstance(stats, dict) else {})}


def warm_cache(args, out: Path) -> None:
    """Encode the pairs into the shared latent cache with a one-step run, before runs start in parallel: two
    processes building the same cache folder at once would collide."""
    run_dir = out / "cache" / "warmup"
    argv = train_argv(args, run_dir, 0, ["--tau", "0"], steps=1, learning_rate=args.learning_rates[0],
                      beta=args.betas[0])
    if not run_done(run_dir, argv):
        train_one(str(run_dir), argv)


# Stage 1: tuning Diffusion-DPO (1a), then calibrating τ and δ (1b, Fig. 1c)


def calibration_keys(args) -> tuple[list[str], list[int]]:
    """toy.CALIBRATION_PROMPTS, each with `calibration_seeds` images of their own seeds (10⁶ + …)."""
    prompts = toy.CALIBRATION_PROMPTS[:SMOKE_PROMPTS] if args.smoke else toy.CALIBRATION_PROMPTS
    keys = [(p, 10**6 + i * args.calibration_seeds + s) for i, p in enumerate(prompts)
            for s in range(args.calibration_seeds)]
    return [p for p, _ in keys], [s for _, s in keys]


def calibrate_run(run_dir: str, argv: list[str], model: str, prompts: list[str], seeds: list[int],
                  every: int) -> dict:
    """A calibration run (reference updates without the monitor): train with checkpoints, then each checkpoint's
    mean toy_label on the calibration prompts against its D(p_θ, p_init) (the monitor's probe, from the log)."""
    cached = Path(run_dir) / "calibration.json"
    key = {"argv": argv, "prompts": prompts, "seeds": seeds,
           "sampler": [toy.SAMPLER, toy.TIMESTEP_SPACING, toy.NUM_INFERENCE_STEPS, toy.GUIDANCE_SCALE]}
    saved = read_state(cached)
    if run_done(Path(run_dir), argv) and isinstance(saved, dict) and saved.get("key") == key and "result" in saved:
        return saved["result"]
    if not run_done(Path(run_dir), argv):
        train_one(run_dir, argv)
    import plot

    divergence = dict(zip(*plot.series(plot.read_log(run_dir), "policy_divergence")))
    pipe = toy.load_pipeline(model)
    points = []
    for step in [0] + sorted(int(p.name.split("-")[1]) for p in Path(run_dir).glob("checkpoint-*")):
        if step:
            state = torch.load(Path(run_dir) / f"checkpoint-{step}" / "state.pt", map_location="cpu", weights_only=True)
            pipe.unet.load_state_dict(state["policy"])
        images = toy.sample(pipe, prompts, seeds)
        points.append({"step": step, "divergence": float(divergence.get(step, 0.0)),
                       "score": float(np.mean(toy.label_reward(images, prompts)))})
    result = {"run_dir": run_dir, "points": points}
    cached.write_text(json.dumps({"key": key, "result": result}))
    return result


DPO_FLAGS = ["--tau", "0", "--gamma", "1", "--no_reward_scale"]


def tune_dpo(args, out: Path) -> dict:
    """Diffusion-DPO's learning rate and β, by the pre-registered rule: of the grid's runs (training seed
    CALIBRATION_SEED, checkpoints scored on the calibration prompts), the one whose final model scores best.
    A baseline that loses to the base model is a mis-tuned baseline; this gives it the method's tuning budget."""
    prompts, seeds = calibration_keys(args)
    grid = [(lr, beta) for lr in args.learning_rates for beta in args.betas]
    tasks = []
    for lr, beta in grid:
        run_dir = out / "tuning" / f"lr{lr:g}-beta{beta:g}"
        flags = [*DPO_FLAGS, "--checkpoint_every", str(args.calibration_every), "--keep_checkpoints", "1000"]
        tasks.append((calibrate_run, str(run_dir), train_argv(args, run_dir, CALIBRATION_SEED, flags, learning_rate=lr,
                                                              beta=beta), args.model, prompts, seeds,
                      args.calibration_every))
    curves = [r["points"] for r in run_tasks(tasks, args.jobs, "[1a/5] tuning Diffusion-DPO")]
    best = max(range(len(grid)), key=lambda i: curves[i][-1]["score"])
    args.learning_rate, args.beta = grid[best]
    rule = (f"best final calibration toy_label {curves[best][-1]['score']:.4f} (base {curves[best][0]['score']:.4f}) at "
            f"lr = {args.learning_rate:g}, β = {args.beta:g}; the grid: "
            + ", ".join(f"{lr:g}/{beta:g} → {c[-1]['score']:.4f}" for (lr, beta), c in zip(grid, curves)))
    return {"learning_rate": args.learning_rate, "beta": args.beta, "rule": rule, "base_score": curves[best][0]["score"],
            "curves": {f"lr {lr:g}, β {beta:g}": c for (lr, beta), c in zip(grid, curves)}}


def calibrate(args, out: Path) -> dict:
    """Fig. 1c's principle with the pre-registered rule: among the checkpoints inside the freeze window, the one
    with the best calibration score; δ = its D, τ = its run's τ."""
    prompts, seeds = calibration_keys(args)
    tasks = []
    for tau in args.taus:
        run_dir = out / "calibration" / f"tau{tau}"
        flags = ["--tau", str(tau), "--on_diverge", "ignore", "--gamma", "1", "--no_reward_scale",
                 "--checkpoint_every", str(args.calibration_every), "--keep_checkpoints", "1000"]
        tasks.append((calibrate_run, str(run_dir), train_argv(args, run_dir, CALIBRATION_SEED, flags), args.model,
                      prompts, seeds, args.calibration_every))
    curves = dict(zip(args.taus, (r["points"] for r in run_tasks(tasks, args.jobs, "[1b/5] calibrating τ, δ"))))
    low, high = (round(f * args.steps) for f in args.freeze_window)
    candidates = [(tau, p) for tau, pts in curves.items() for p in pts if low <= p["step"] <= high]
    if not candidates:  # a smoke run's few steps: the window holds no checkpoint
        candidates = [(tau, p) for tau, pts in curves.items() for p in pts if p["step"] > 0]
    tau, best = max(candidates, key=lambda tp: tp[1]["score"])
    overall_tau, overall = max(((t, p) for t, pts in curves.items() for p in pts if p["step"] > 0),
                               key=lambda tp: tp[1]["score"])
    delta = best["divergence"]
    positive = sorted(p["divergence"] for _, p in candidates if p["divergence"] > 0)
    if delta <= 0:  # D ≤ 0 would freeze at the first update
        delta = positive[0] if positive else 1e-4
    interior = low <= overall["step"] <= high and overall_tau == tau
    rule = (f"best calibration toy_label in steps {low}–{high}: {best['score']:.4f} at step {best['step']} of τ = {tau} "
            f"(D = {best['divergence']:.4g}); over all checkpoints the best is {overall['score']:.4f} at step "
            f"{overall['step']} of τ = {overall_tau}: the optimum is {'' if interior else 'not '}inside the window")
    return {"tau": tau, "delta": float(f"{delta:.3g}"), "rule": rule, "interior_optimum": interior,
            "window": [low, high], "curves": {str(t): c for t, c in curves.items()}, "base_score": curves[tau][0]["score"],
            "prompts": len(set(prompts)), "images": len(prompts)}


# Stage 3: evaluation


def _evaluate(specs: list[str], prompt_file: str, output_dir: str, settings: dict) -> dict:
    """eval.evaluate on a group of models; returns {label: {reward: {(prompt, seed): score}}}."""
    import eval as ev

    result = ev.evaluate(specs[0], specs[1:], prompt_file, list(REWARDS), output_dir, progress=False,
                         log=lambda m: None, **settings)
    return {label: {c: result.scores[c][label] for c in result.scores} for label in result.scores[REWARDS[0]]}


def eval_prompts(args) -> list[str]:
    """The prompts final models are compared on: toy.EVAL_PROMPTS, or with --eval_split calibration (the pilot)
    toy.CALIBRATION_PROMPTS."""
    prompts = toy.CALIBRATION_PROMPTS if args.eval_split == "calibration" else toy.EVAL_PROMPTS
    return prompts[:SMOKE_PROMPTS] if args.smoke else prompts


def evaluate(args, out: Path, runs: dict, stage: str, desc: str) -> dict:
    """Every final model of `runs` and the base model on eval_prompts, each image with its own seed, into
    OUTPUT_DIR/eval/STAGE; the models are split in `jobs` groups sampled in parallel (each group samples the base
    model too, in its own folder)."""
    prompts = eval_prompts(args)
    prompt_file = out / "eval_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    specs = {(key, seed): f"{key}-s{seed}={run_dir / 'final'}" for (key, seed), run_dir in runs.items()}
    settings = dict(num_seeds=args.eval_seeds, distinct_seeds=True, steps=toy.NUM_INFERENCE_STEPS,
                    guidance_scale=toy.GUIDANCE_SCALE, resolution=32, batch_size=64, reward_batch_size=256,
                    device="cpu", dtype="float32")
    groups = [list(specs.values())[i::args.jobs] for i in range(args.jobs)]
    folder = out / "eval" / stage
    tasks = [(_evaluate, [f"base={args.model}", *g], str(prompt_file), str(folder / f"group{i}"), settings)
             for i, g in enumerate(groups) if g]
    scores = {}
    for group in run_tasks(tasks, args.jobs, desc):
        scores.update(group)
    images = {k: str(folder / f"group{list(specs).index(k) % args.jobs}" / "images") for k in specs}
    return {"scores": {"base": scores["base"], **{k: scores[s.split("=")[0]] for k, s in specs.items()}},
            "prompts": len(prompts), "images_per_model": len(prompts) * args.eval_seeds,
            "images": {"base": str(folder / "group0" / "images"), **images}}


# The positive control (README, pre-registered): Diffusion-DPO against the base model, paired by training seed. It
# gates the claims: a testbed in which the baseline cannot improve its base model cannot tell a working method
# from a broken one, and no verdict on the method would mean anything.
GATE_SEEDS = 10         # training seeds at least
GATE_MIN_GAIN = 0.02    # the gain's 95 % interval must lie above this (toy_label), and the gain be at least …
GATE_SD_FACTOR = 3.0    # … this many seed-to-seed standard deviations of Diffusion-DPO's mean
GATE_WIN_RATE = 0.65    # the same-seed win rate over the base, the mean over training seeds, at least


def attainable(args) -> float:
    """The reward's attainable level on the comparison prompts: the renderer's own clean pictures, as many per
    prompt as the evaluation samples, scored like the models' images."""
    rng = np.random.default_rng(0)
    prompts = [p for p in eval_prompts(args) for _ in range(args.eval_seeds)]
    return float(np.mean(toy.TOY_REWARDS[PRIMARY]([toy.render(toy.sample_spec(rng, p)) for p in prompts], prompts)))


def positive_control(args, means: dict, evaluation: dict, seeds: list[int]) -> dict:
    """The gate: the gain of Diffusion-DPO over the base model with its interval, the seed-to-seed SD, the
    same-seed win rate, each check and the verdict."""
    import eval as ev

    dpo = [means[("dpo", s)][PRIMARY] for s in seeds]
    interval = paired_interval(dpo, [means["base"][PRIMARY]] * len(seeds))
    sd = float(np.std(dpo, ddof=1)) if len(dpo) > 1 else math.nan
    scores = evaluation["scores"]
    wins = [ev.win_rate(scores[("dpo", s)][PRIMARY], scores["base"][PRIMARY]) for s in seeds]
    checks = {f"95 % interval above +{GATE_MIN_GAIN}": interval["low"] is not None and interval["low"] > GATE_MIN_GAIN,
              f"gain ≥ {GATE_SD_FACTOR:g} × SD = {GATE_SD_FACTOR * sd:.4f}": not math.isnan(sd)
              and interval["mean"] >= GATE_SD_FACTOR * sd,
              f"same-seed win rate ≥ {GATE_WIN_RATE:.0%}": float(np.mean(wins)) >= GATE_WIN_RATE,
              f"≥ {GATE_SEEDS} training seeds": len(seeds) >= GATE_SEEDS}
    return {**interval, "seed_sd": sd, "split": args.eval_split, "win_rate": float(np.mean(wins)), "win_rates": wins,
            "win_rate_range": [float(min(wins)), float(max(wins))], "base": means["base"][PRIMARY],
            "dpo": float(np.mean(dpo)), "attainable": attainable(args), "checks": checks,
            "passed": all(checks.values())}


def gate_lines(gate: dict) -> list[str]:
    verdict = ("PASSED" if gate["passed"] else "FAILED" if gate["n"] >= GATE_SEEDS
               else f"not decided ({gate['n']} seeds, the gate needs {GATE_SEEDS})")
    interval = "–" if gate["low"] is None else f"[{gate['low']:+.4f}, {gate['high']:+.4f}]"
    split = "calibration-prompt" if gate["split"] == "calibration" else "held-out"
    return [f"**Positive control: {verdict}.** Diffusion-DPO − base, {split} toy_label over {gate['n']} training seeds: "
            f"{gate['mean']:+.4f}, 95 % interval {interval}; seed-to-seed SD of Diffusion-DPO's mean {gate['seed_sd']:.4f}; "
            f"same-seed win rate over the base {gate['win_rate']:.1%} (per seed {gate['win_rate_range'][0]:.1%}–"
            f"{gate['win_rate_range'][1]:.1%}); base {gate['base']:.4f} → Diffusion-DPO {gate['dpo']:.4f}, attainable "
            f"{gate['attainable']:.4f} (the renderer's own pictures).",
            "", *(f"- {'✓' if ok else '✗'} {check}" for check, ok in gate["checks"].items())]


# Stage 4: diagnostics (Fig. 2's protocol, Fig. 5)


class HeldOutProbe:
    """Held-out pairs, each noised at one uniform t inside every one of the 10 t-bins with one ε shared by its
    winner and loser; p_init's errors on them computed once. For a final model: per bin, the implicit accuracy
    and reward magnitude of −Δ against p_init (Fig. 2's panels, the same protocol for every model) and D, the
    winners' mean e_θ − e_init (Fig. 5)."""

    def __init__(self, model: str, pairs: str, seed: int = 0):
        import data
        import train_sd15

        self.models = train_sd15.load_models(model, torch.device("cpu"), torch.float32)
        dataset = data.load_pairs(pairs)
        transform = data.PairTransform(32, caption_dropout=0.0)
        batch = data.collate_pairs([transform(dataset[i], 0, i) for i in range(len(dataset))])
        generator = torch.Generator().manual_seed(seed)
        latents, self.cond = train_sd15.encode(self.models, batch, generator)
        self.n, width = latents.shape[0] // 2, 1000 // NUM_BINS
        self.inputs = []
        for k in range(NUM_BINS):
            t = (k * width + torch.randint(0, width, (self.n,), generator=generator)).repeat(2)
            noise = torch.randn(latents[:self.n].shape, generator=generator).repeat(2, 1, 1, 1)
            self.inputs.append((*train_sd15.add_noise(self.models, latents, noise, t), t))
        self.err_init = self.errors(self.models.unet)

    @torch.no_grad()
    def errors(self, unet) -> torch.Tensor:
        """Per-sample errors, [bins, 2n] (winners then losers)."""
        import losses
        import train_sd15

        return torch.stack([losses.per_sample_error(train_sd15.predict(unet, noisy, t, self.cond), target)
                            for noisy, target, t in self.inputs])

    def measure(self, pipeline_dir: str) -> dict:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
        gap = self.errors(unet) - self.err_init  # e_θ − e_init
        margin = gap[:, self.n:] - gap[:, :self.n]  # −Δ = (e_init(w) − e_θ(w)) − (e_init(l) − e_θ(l))
        accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(1)
        return {"accuracy": accuracy.tolist(), "magnitude": margin.abs().mean(1).tolist(),
                "divergence": gap[:, :self.n].mean(1).tolist()}


def _diagnose(model: str, pairs: str, runs: dict[str, str]) -> dict:
    probe = HeldOutProbe(model, pairs)
    return {name: probe.measure(path) for name, path in runs.items()}


def diagnose(args, runs: dict) -> dict:
    chosen = {f"{key}-s{seed}": str(run_dir / "final") for (key, seed), run_dir in runs.items()
              if seed < args.diagnostic_seeds}
    names = list(chosen)
    groups = [names[i::args.jobs] for i in range(args.jobs)]
    tasks = [(_diagnose, args.model, args.held_out_pairs, {n: chosen[n] for n in g}) for g in groups if g]
    result = {}
    for part in run_tasks(tasks, args.jobs, "[4/5] diagnostics"):
        result.update(part)
    return result


# Stage 5: analysis


def model_means(evaluation: dict) -> dict:
    """Mean of every reward over a model's held-out images: {(key, seed) or "base": {reward: mean}}."""
    return {k: {c: float(np.mean(list(v.values()))) for c, v in scores.items()} for k, scores in evaluation["scores"].items()}


def paired_interval(values_a: list[float], values_b: list[float]) -> dict:
    """The mean of A − B over paired training seeds and its 95 % t-interval (None for one seed)."""
    d = np.asarray(values_a) - np.asarray(values_b)
    n = len(d)
    if n < 2:
        return {"n": n, "mean": float(d.mean()), "low": None, "high": None, "sd": None}
    half = t975(n - 1) * d.std(ddof=1) / math.sqrt(n)
    return {"n": n, "mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half),
            "sd": float(d.std(ddof=1))}


def seeds_for_power(sd: float, effect: float, z_power: float = 0.8416) -> int:
    """Training seeds for the paired t-interval to exclude 0 with 80 % power when the true difference is
    `effect` and paired differences have standard deviation `sd` (the pilot's): the smallest n ≥ 2 with
    (t_{0.975, n−1} + z_{0.80}) · sd / √n ≤ effect (the normal approximation of the power term)."""
    for n in range(2, 1000):
        if (t975(n - 1) + z_power) * sd / math.sqrt(n) <= effect:
            return n
    return 1000


def verdict(interval: dict, kind: str, sesoi: float) -> str:
    low, high = interval["low"], interval["high"]
    if low is None:
        return "inconclusive (one seed: no interval)"
    if kind == "beats":
        return "reproduced" if low > 0 else "refuted" if high < sesoi else "inconclusive"
    if kind == "degrades":
        return "reproduced" if high < 0 else "refuted" if low > -sesoi else "inconclusive"
    return "reproduced" if high < sesoi else "refuted" if low > 0 else "inconclusive"  # not_better


def claims(args, means: dict, seeds_of: dict) -> list[dict]:
    rows = []
    for text, a, b, kind in [*CLAIMS, *((t, a, b, "secondary") for t, a, b in SECONDARY)]:
        if a not in seeds_of or (b != "base" and b not in seeds_of):
            continue
        seeds = [s for s in seeds_of[a] if b == "base" or s in seeds_of[b]]
        values_b = [means["base"][PRIMARY]] * len(seeds) if b == "base" else [means[(b, s)][PRIMARY] for s in seeds]
        interval = paired_interval([means[(a, s)][PRIMARY] for s in seeds], values_b)
        rows.append({"claim": text, "a": a, "b": b, "kind": kind, **interval,
                     "verdict": verdict(interval, kind, args.sesoi) if kind != "secondary" else "(descriptive)"})
    return rows


def training_summary(runs: dict, seeds_of: dict) -> dict:
    """Per configuration, mean over seeds: implicit accuracy and margin over the last 20 % of steps, reference
    updates, the freeze step (over the runs that froze), the last D(policy, p_init) logged, CPU seconds."""
    import plot

    summary = {}
    for key, seeds in seeds_of.items():
        rows = []
        for s in seeds:
            log = plot.read_log(runs[(key, s)])
            tail = log[-max(1, len(log) // 5):]
            divergence = plot.series(log, "policy_divergence")[1]
            frozen = next((r["step"] for r in log if r.get("ref_frozen")), None)
            rows.append({"accuracy": np.mean([r.get("accuracy", math.nan) for r in tail]),
                         "margin": np.mean([r.get("reward_margin", math.nan) for r in tail]),
                         "updates": sum(bool(r.get("ref_updated")) for r in log), "frozen_at": frozen,
                         "divergence": float(divergence[-1]) if len(divergence) else math.nan,
                         "cpu_s": json.loads((runs[(key, s)] / "reproduce.json").read_text())["cpu_s"]})
        frozen = [r["frozen_at"] for r in rows if r["frozen_at"] is not None]
        summary[key] = {name: float(np.mean([r[name] for r in rows])) for name in ("accuracy", "margin", "updates",
                                                                                   "divergence", "cpu_s")}
        summary[key].update(frozen_at=float(np.mean(frozen)) if frozen else None, frozen_runs=len(frozen),
                            runs=len(rows))
    return summary


# Figures


def draw_figures(args, out: Path, runs: dict, seeds_of: dict, tuning: dict, calibration: dict, diagnostics: dict,
                 evaluation: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import plot
    import schedule

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    paths = {}

    def save(fig, name):
        fig.tight_layout()
        paths[name] = str(figures / f"{name}.png")
        fig.savefig(paths[name], dpi=90)
        plt.close(fig)

    # Fig. 1c: the calibration; beside it, the calibration score over steps of every tuning and calibration run.
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in [*tuning["curves"].items(), *((f"τ = {t}", c) for t, c in calibration["curves"].items())]:
        ax_steps.plot([p["step"] for p in points], [p["score"] for p in points], marker="o", ms=3,
                      ls="-" if name.startswith("lr") else "--", label=f"Diffusion-DPO, {name}" if name.startswith("lr")
                      else f"{name}, no monitor")
    ax_steps.set(xlabel="step", ylabel="calibration-split toy_label",
                 title=f"Tuning (lr {tuning['learning_rate']:g}, β {tuning['beta']:g} chosen) and calibration runs")
    ax_steps.legend(fontsize=6)
    for tau, points in calibration["curves"].items():
        ax.plot([p["divergence"] for p in points], [p["score"] for p in points], "o-", ms=3, label=f"τ = {tau}, no monitor")
        for p in points:
            ax.annotate(str(p["step"]), (p["divergence"], p["score"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(calibration["delta"], color="k", ls=":", label=f"δ = {calibration['delta']:.3g} (τ = {calibration['tau']})")
    ax.set(xlabel="D(p_θ, p_init) (the monitor's probe)", ylabel="calibration-split toy_label",
           title="Calibration (Fig. 1c's principle); labels: step")
    ax.legend(fontsize=7)
    save(fig, "fig1c_calibration")

    # Fig. 1b and Fig. 2 from the training logs: plot.py's panels, seeds averaged.
    shown = [k for k in ("dpo", "explore", "nomonitor", "nomonitor_long", "full50") if k in seeds_of]
    paths["fig1b_training"] = plot.draw({LABELS[k]: [str(runs[(k, s)]) for s in seeds_of[k]] for k in shown},
                                        str(figures / "fig1b_training.png"),
                                        "Fig. 1b (toy): training curves, mean and min–max over seeds")

    # Fig. 2's protocol on held-out pairs, and Fig. 5.
    centres = (np.arange(NUM_BINS) + 0.5) * 1000 / NUM_BINS
    from diffusers import DDPMScheduler
    lam = schedule.reward_scale(DDPMScheduler.from_pretrained(args.model, subfolder="scheduler").alphas_cumprod).numpy()
    by_config = {}
    for name, values in diagnostics.items():
        by_config.setdefault(name.rsplit("-s", 1)[0], []).append(values)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for key in [k for k in ("dpo", "explore", "timestep50", "full50", "full10") if k in by_config]:
        for ax, metric in zip(axes, ("accuracy", "magnitude", "divergence")):
            ax.plot(centres, np.mean([v[metric] for v in by_config[key]], 0), "o-", ms=3, label=LABELS[key])
    for ax, title in zip(axes, ("implicit accuracy vs p_init", "reward magnitude |r(w) − r(l)| vs p_init",
                                "D per bin (Fig. 5): winners' e_θ − e_init")):
        ax.set(xlabel="t (bin centre)", title=title)
        ax.legend(fontsize=6)
    axes[0].axhline(0.5, color="k", lw=0.5, ls=":")
    axes[3].plot(np.arange(len(lam)), lam, color="k")
    axes[3].set(xlabel="t", title="λ(t) = 1 + norm(1/√SNR(t))")
    fig.suptitle(f"Fig. 2 / Fig. 5 (toy): final models on {args.diagnostic_pairs} held-out pairs, uniform t per bin "
                 f"(mean over {args.diagnostic_seeds} seeds)")
    save(fig, "fig2_fig5_timestep_bins")

    # Same-seed samples: base, Diffusion-DPO, exploration, the full method (training seed 0).
    from PIL import Image

    shown = ["base"] + [k for k in ("dpo", "explore", "full50") if (k, 0) in runs]
    prompts = eval_prompts(args)
    rows = sorted(set(np.linspace(0, len(prompts) - 1, min(8, len(prompts))).round().astype(int).tolist()))
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(1.7 * len(shown) + 1.8, 1.6 * len(rows)), squeeze=False)
    for i, idx in enumerate(rows):
        for j, key in enumerate(shown):
            folder = Path(evaluation["images"][(key, 0) if key != "base" else "base"])
            tag = next(p for p in folder.iterdir() if p.name.startswith(f"{key}-s0-" if key != "base" else "base-"))
            axes[i][j].imshow(Image.open(tag / f"{idx:05d}_{idx * args.eval_seeds}.png"), interpolation="nearest")
            axes[i][j].set_xticks([]), axes[i][j].set_yticks([])
            if i == 0:
                axes[i][j].set_title(LABELS[key].split(" (")[0], fontsize=7)
            if j == 0:
                axes[i][j].set_ylabel(prompts[idx], fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("Same-seed samples on held-out prompts (training seed 0)", fontsize=9)
    save(fig, "samples_grid")
    return paths


# The report


def fmt(value, digits=4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def power_lines(args, rows: list[dict], gate: dict) -> list[str]:
    """The power analysis this run allows: 20 % of its Diffusion-DPO gain as a smallest effect of interest, and per
    claim the training seeds a paired interval needs to detect a true effect of that size with 80 % power, given
    the SD of its paired differences here. Run on the calibration split, this is the pilot (README)."""
    effect = 0.2 * gate["mean"]
    lines = [f"**Power** (from this run's paired SDs): 20 % of Diffusion-DPO's gain = {effect:.4f}; "
             f"the recipe's SESOI = {args.sesoi:g}.", "",
             "| comparison | SD of A − B | seeds for 80 % power at 20 % of the gain | … at the SESOI |", "|---|---|---|---|"]
    for r in rows:
        if r["sd"] is not None and r["b"] != "base":
            n_effect = seeds_for_power(r["sd"], effect) if effect > 0 else "–"
            lines.append(f"| {r['a']} − {r['b']} | {r['sd']:.4f} | {n_effect} | {seeds_for_power(r['sd'], args.sesoi)} |")
    return lines


def render(args, tuning, calibration, gate, means, seeds_of, rows, summary, evaluation) -> str:
    split = "calibration prompts (the pilot)" if args.eval_split == "calibration" else "held-out prompts"
    lines = [f"**Diffusion-DPO's tuning** ({len(tuning['curves'])} runs, training seed {CALIBRATION_SEED}, calibration "
             f"prompts): **lr = {tuning['learning_rate']:g}, β = {tuning['beta']:g}**. {tuning['rule']}.", "",
             *gate_lines(gate), "",
             f"**Calibration** ({calibration['prompts']} calibration prompts × {args.calibration_seeds} images, "
             f"training seed {CALIBRATION_SEED}): **τ = {calibration['tau']}, δ = {calibration['delta']:.3g}**. "
             f"{calibration['rule']}.", "",
             f"**Claims** (toy_label on the {split}, A − B paired by training seed; 95 % t-interval over seeds; "
             f"smallest effect of interest {args.sesoi}):", "",
             "| claim | seeds | A − B | 95 % interval | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        interval = "–" if r["low"] is None else f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(f"| {r['claim']} | {r['n']} | {r['mean']:+.4f} | {interval} | {r['verdict']} |")
    lines += ["", *power_lines(args, rows, gate)]
    lines += ["", f"Mean reward on {evaluation['prompts']} {split} × {args.eval_seeds} images (each its own "
              "seed), mean ± std over training seeds:", "",
              "| configuration | seeds | " + " | ".join(REWARDS) + " |", "|---|---|" + "---|" * len(REWARDS),
              "| base (toy_model) | – | " + " | ".join(fmt(means["base"][c]) for c in REWARDS) + " |"]
    for key, seeds in seeds_of.items():
        cells = []
        for c in REWARDS:
            values = [means[(key, s)][c] for s in seeds]
            cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}")
        lines.append(f"| {LABELS[key]} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", "Training (mean over seeds; accuracy and margin over the last 20 % of steps; D: the last logged "
              "D(policy, p_init)):", "",
              "| configuration | implicit accuracy | reward margin | reference updates | frozen at step | final D | CPU s per run |",
              "|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        frozen = f"{s['frozen_at']:.0f} ({s['frozen_runs']}/{s['runs']})" if s["frozen_runs"] else "never"
        lines.append(f"| {LABELS[key]} | {fmt(s['accuracy'], 3)} | {s['margin']:.2e} | {s['updates']:.1f} | {frozen} | "
                     f"{fmt(s['divergence'])} | {s['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


class Clock:
    """Wall and CPU seconds per stage; CPU counts this process and its finished workers."""

    def __init__(self):
        self.timings, self.start = {}, time.time()

    @staticmethod
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def __call__(self, name, fn, *fn_args):
        wall, cpu = time.time(), self.cpu()
        result = fn(*fn_args)
        spent = self.timings.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})  # a stage may come in two parts
        spent["wall_s"] = round(spent["wall_s"] + time.time() - wall, 1)
        spent["cpu_s"] = round(spent["cpu_s"] + self.cpu() - cpu, 1)
        return result


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def train_all(args, out: Path, calibration: dict, keys) -> tuple[dict, dict]:
    """Every run of the configurations in `keys` (those this invocation trains), `jobs` at a time."""
    runs, tasks, seeds_of = {}, [], {}
    flags_of = {key: flags for key, _, flags, _ in CONFIGS}
    for key, seeds in [(k, s) for k, s in configs(args) if k in keys]:
        seeds_of[key] = seeds
        for seed in seeds:
            run_dir = runs[(key, seed)] = out / "runs" / f"{key}-s{seed}"
            steps = args.steps * args.long_factor if key == "nomonitor_long" else args.steps
            argv = train_argv(args, run_dir, seed, flags_of[key](calibration), steps)
            if not run_done(run_dir, argv):
                tasks.append((train_one, str(run_dir), argv))
    # The long runs first: the two processes then finish at about the same time.
    tasks.sort(key=lambda task: "nomonitor_long" not in task[1])
    print(f"[2/5] training {', '.join(seeds_of)}: {len(runs)} runs ({len(runs) - len(tasks)} already done), "
          f"{args.jobs} at a time; logs in {out / 'runs'}/*/train.log")
    run_tasks(tasks, args.jobs, "[2/5] training")
    return runs, seeds_of


def reproduce(argv=None) -> dict:
    args = parse_args(argv)
    check_inputs(args)
    torch.set_num_threads(1)
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.output_dir)
    args.model = str(Path(args.model).resolve())
    clock = Clock()
    pairs = clock("pairs", ensure_pairs, args)
    tuning = clock("tuning", lambda: (warm_cache(args, out), tune_dpo(args, out))[1])
    print(f"      Diffusion-DPO: lr = {tuning['learning_rate']:g}, β = {tuning['beta']:g}: {tuning['rule']}")
    calibration = clock("calibration", calibrate, args, out)
    print(f"      τ = {calibration['tau']}, δ = {calibration['delta']:.3g}: {calibration['rule']}")
    runs, seeds_of = clock("training", train_all, args, out, calibration, ("dpo",))
    evaluation = clock("evaluation", evaluate, args, out, runs, "gate", "[3/5] positive control")
    gate = positive_control(args, model_means(evaluation), evaluation, seeds_of["dpo"])
    print("\n".join(gate_lines(gate)))
    if not gate["passed"] and not (args.quick or args.smoke):  # with fewer seeds it is reported, not applied
        return stop_at_gate(args, out, argv, clock, pairs, tuning, calibration, gate)
    more_runs, more_seeds = clock("training", train_all, args, out, calibration, [k for k, _ in configs(args) if k != "dpo"])
    more = clock("evaluation", evaluate, args, out, more_runs, "main", "[3/5] evaluation")
    runs, seeds_of = {**runs, **more_runs}, {**seeds_of, **more_seeds}
    evaluation["scores"].update({k: v for k, v in more["scores"].items() if k != "base"})
    evaluation["images"].update({k: v for k, v in more["images"].items() if k != "base"})
    diagnostics = clock("diagnostics", diagnose, args, runs)
    means = model_means(evaluation)
    rows = claims(args, means, seeds_of)
    summary = training_summary(runs, seeds_of)
    figures = clock("figures", draw_figures, args, out, runs, seeds_of, tuning, calibration, diagnostics, evaluation)
    text = render(args, tuning, calibration, gate, means, seeds_of, rows, summary, evaluation)
    payload = {"pairs": pairs, "tuning": tuning, "calibration": calibration, "gate": gate, "claims": rows,
               "training": summary, "figures": figures, "diagnostics": diagnostics,
               "means": {f"{k[0]}-s{k[1]}" if isinstance(k, tuple) else k: v for k, v in means.items()}}
    return write_results(args, out, argv, clock, text, payload)


def stop_at_gate(args, out: Path, argv, clock, pairs, tuning, calibration, gate) -> dict:
    """The study's end when the positive control fails: no claim is tested (README, pre-registration)."""
    text = "\n".join([*gate_lines(gate), "", "The positive control failed: the claims are not tested in this world "
                      "(change the world on the calibration split, not the rule).", ""])
    payload = {"pairs": pairs, "tuning": tuning, "calibration": calibration, "gate": gate, "claims": [], "figures": {}}
    return write_results(args, out, argv, clock, text, payload)


def write_results(args, out: Path, argv, clock, text: str, payload: dict) -> dict:
    clock.timings["total"] = {"wall_s": round(time.time() - clock.start, 1), "cpu_s": round(clock.cpu(), 1)}
    timing = ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in clock.timings.items())
    command = " ".join(["python -m miniature.reproduce", *(argv if argv is not None else sys.argv[1:])])
    figures = payload["figures"]
    (out / "results.md").write_text("\n".join(
        ["# The paper in miniature: results", "", f"`{command}`; wall time: {timing}.", "", text,
         *(["## Figures", ""] if figures else []),
         *(f"![{k}]({os.path.relpath(v, out)})" for k, v in figures.items())]) + "\n")
    payload = {"args": vars(args), "timings": clock.timings, **payload}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
    print("\n" + text + f"\n[5/5] {timing}\nwrote {out / 'results.md'}, {out / 'results.json'}"
          + (f" and {out / 'figures'}/" if figures else ""))
    return {"tables": text, **payload}



def main(argv=None) -> dict:
    """The study, stage by stage. A mistake of the user's ends the process as one `error:` line and exit code 2."""
    try:
        return reproduce(argv)
    except errors.RunError as error:
        raise SystemExit(errors.report(error)) from None

if __name__ == "__main__":
    main()
