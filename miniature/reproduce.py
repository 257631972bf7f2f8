"""The paper in miniature: every configuration of PAPER.md §6 trained on the toy preference pairs, evaluated on
held-out prompts, and the paper's figures drawn from the runs (DESIGN.md, "The toy miniature").

    python -m miniature.reproduce                                  # the whole reproduction, 3 seeds: 23 min on a 2-core VM
    python -m miniature.reproduce --smoke --output_dir out/repro-smoke   # the mechanics only, in under a minute
    python -m miniature.reproduce --seeds 0 1 2 3 4 --steps 400    # more seeds, longer runs
    python -m miniature.reproduce --model my_toy_model --pairs my_pairs.parquet --output_dir out/repro2

Stages (each with its own progress bar; a rerun in the same --output_dir skips finished runs and images):
  0. pairs        the toy preference pairs (--pairs, else sampled from --model once and cached: toy.cached_pairs)
  1. calibration  τ and δ by the paper's own principle (Fig. 1c): reference updates *without* the monitor at a few
                  τ on seed 0, checkpoints along the way; each checkpoint's held-out preference score (toy_label)
                  is plotted against its divergence D from the initial model. δ is the D of the best checkpoint
                  (past it the score stops improving) and τ the update period of that run.
  2. training     six configurations × --seeds, in-process through train_sd15.main (--jobs processes at once):
                  SFT; Diffusion-DPO; reference update without the monitor at the smallest τ; update with the
                  monitor ("exploration only"); the timestep strategy only; the full method.
  3. evaluation   eval.evaluate on toy.EVAL_PROMPTS (never used for pairs) with fixed sampling seeds, rewards
                  toy_fidelity, toy_aesthetic, toy_label: mean ± std over training seeds per configuration, and
                  same-seed win rates of the full method over each baseline, paired by training seed.
  4. figures      fig1b (margin and divergence over steps), fig2 (per t-bin loss, reward scale, accuracy, λ(t)),
                  fig5 (per t-bin divergence, timestep-aware vs exploration only), samples (same-seed grid).
  5. results      OUTPUT_DIR/results.md (tables and figures) and results.json; the tables are printed.

Everything is CPU-sized: the toy model is a 32 px SD1.5-layout pipeline, a training step is 8 pairs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "toy_model"
REWARDS = ("toy_fidelity", "toy_aesthetic", "toy_label")
FIGURE_DPI = 100
NUM_BINS = 10  # toolbox.NUM_LOG_BINS: the paper's 10 equal t-bins, bin 0 the cleanest

# The small-scale recipe. Every value is a flag of this script; the comments say why it was chosen.
RECIPE = dict(
    steps=200,            # optimizer steps per run: 18 runs + calibration + evaluation fit the 30-minute budget
    batch=8,              # pairs per step (no accumulation): ~0.35 CPU-s per Diffusion-DPO step on the toy model
    # β and lr: the paper's β = 5000 (§5); with lr 3e-5 Diffusion-DPO ends at D(p_θ, p_init) ≈ 0.003 in 200
    # steps and raises the held-out toy_label by 0.02 (README). On an earlier toy base model, lr 1e-4 drifted
    # to D ≈ 0.03 and ended worse than the base (−0.03 toy_label), 3e-4 to D ≈ 0.15 and −0.075 (Fig. 1c).
    learning_rate=3e-5,   # AdamW, constant after warm-up
    warmup=10,
    beta=5000.0,
    calibration_taus=(2, 8),  # τ grid of the calibration; the smallest is also the "update without monitor" run
    checkpoints=8,        # checkpoints per calibration run, i.e. points of the Fig. 1c curve
    divergence_every=10,  # log D(policy, p_init) for Fig. 1b
    monitor_samples=32,   # (winner, t, ε) draws of the monitor: 8 made its D too noisy for a small δ
    bin_stats_every=20,   # per-t-bin statistics for Fig. 2
    # Sampling seeds per held-out prompt. eval.py gives every prompt the same seeds 0 … N−1, and in the toy world
    # the initial noise largely fixes the layout, so N seeds are N layouts: 2 seeds moved the base model's mean
    # toy_label from 0.50 (seeds 0, 1) to 0.65 (seeds 2, 3). Comparisons stay paired; 4 seeds are 4 layouts.
    eval_seeds=4,
    calibration_seeds=2,  # per held-out prompt for the calibration score; a distinct seed per image, apart from eval's
    probe_images=48,      # winner images of the divergence probe (Fig. 5, calibration)
)
SMOKE = dict(steps=4, batch=2, warmup=0, calibration_taus=(2,), checkpoints=2, divergence_every=2,
             monitor_samples=4, bin_stats_every=2, eval_seeds=1, calibration_seeds=1, probe_images=4)
SMOKE_PROMPTS = 2
SMOKE_PAIRS = 16  # pairs made, or read from --pairs, in a smoke run (the latent cache then holds only these)
CALIBRATION_SEED_OFFSET = 10_000  # calibration samples use seeds 10000+, evaluation seeds 0, 1, ...

# The six configurations of the issue, in table order: (key, label, flags). τ, δ come from the calibration.
CONFIGS = (
    ("sft", "SFT", lambda c: ["--loss", "sft", "--tau", "0", "--gamma", "1", "--no_reward_scale"]),
    ("dpo", "Diffusion-DPO", lambda c: ["--tau", "0", "--gamma", "1", "--no_reward_scale"]),
    ("nomonitor", "update without monitor", lambda c: ["--tau", str(c["tau_small"]), "--on_diverge", "ignore",
                                                        "--gamma", "1", "--no_reward_scale"]),
    ("explore", "update + monitor (exploration only)", lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]),
                                                                  "--gamma", "1", "--no_reward_scale"]),
    ("timestep", "timestep strategy only", lambda c: ["--tau", "0", "--gamma", "0.9"]),
    ("full", "full method (γ = 0.9 + λ(t))", lambda c: ["--tau", str(c["tau"]), "--delta", str(c["delta"]),
                                                         "--gamma", "0.9"]),
)
SMOKE_CONFIGS = ("dpo", "full")
LABELS = {key: label for key, label, _ in CONFIGS}
LABELS["base"] = "base (toy_model)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="out/repro", help="runs, evaluation, figures and results go here")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the toy base model (pipeline folder, hub layout)")
    p.add_argument("--pairs", default=None,
                   help="toy preference pairs (Pick-a-Pic parquet); default: --num_pairs pairs sampled from --model "
                        "and labelled by toy_label (toy.cached_pairs: made once, then reused from the cache)")
    p.add_argument("--num_pairs", type=int, default=1000, help="pairs to sample when --pairs is not given")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every configuration")
    p.add_argument("--smoke", action="store_true",
                   help=f"mechanics only: {', '.join(SMOKE_CONFIGS)} × the first seed, {SMOKE['steps']} steps, "
                        f"{SMOKE_PROMPTS} prompts; every table and figure is still made")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at once, each in its own process with one torch thread "
                        "(default: min(2, CPU count), 1 with --smoke; 1 trains in this process)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process (sampling, probes; also trains with --jobs 1). One: on a shared "
                        "2-core machine, spinning OpenMP threads made tiny-model runs up to 10x slower (conftest.py)")
    p.add_argument("--tau", type=int, default=None, help="skip the calibration's choice of τ and use this")
    p.add_argument("--delta", type=float, default=None, help="skip the calibration's choice of δ and use this")
    g = p.add_argument_group("small-scale recipe (defaults: the RECIPE of this file; --smoke: its SMOKE)")

    def recipe_flag(name, type_, help_, **kwargs):
        smoke = f"; --smoke: {SMOKE[name]}" if name in SMOKE else ""
        # SUPPRESS: unset flags stay absent, so that the recipe (or the smoke recipe) fills them in below.
        g.add_argument(f"--{name}", type=type_, default=argparse.SUPPRESS,
                       help=f"{help_} (default {RECIPE[name]}{smoke})".replace("%", "%%"), **kwargs)

    recipe_flag("steps", int, "optimizer steps of every run")
    recipe_flag("batch", int, "pairs per optimizer step")
    recipe_flag("learning_rate", float, "AdamW learning rate, constant after warm-up")
    recipe_flag("warmup", int, "linear warm-up steps")
    recipe_flag("beta", float, "β of Diffusion-DPO (PAPER.md §1)")
    recipe_flag("calibration_taus", int, "τ of the calibration runs; the smallest is also the 'update without "
                "monitor' run's", nargs="+")
    recipe_flag("checkpoints", int, "checkpoints per calibration run")
    recipe_flag("divergence_every", int, "log D(p_θ, p_init) every N steps (Fig. 1b)")
    recipe_flag("monitor_samples", int, "(winner, t, ε) draws of the divergence monitor")
    recipe_flag("bin_stats_every", int, "log per-t-bin statistics every N steps (Fig. 2)")
    recipe_flag("eval_seeds", int, "sampling seeds per held-out prompt")
    recipe_flag("calibration_seeds", int, "sampling seeds per held-out prompt for the calibration score (apart "
                "from the evaluation's)")
    recipe_flag("probe_images", int, "winner images of the divergence probe")
    args = p.parse_args(argv)
    defaults = {**RECIPE, **(SMOKE if args.smoke else {})}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("steps", "batch", "checkpoints", "monitor_samples", "eval_seeds", "calibration_seeds",
                 "probe_images", "num_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.learning_rate <= 0 or args.beta <= 0 or min(args.calibration_taus) < 1:
        p.error("--learning_rate, --beta and every --calibration_taus must be positive")
    if args.smoke:
        args.seeds = args.seeds[:1]
    if args.jobs is None:  # a smoke run's few steps cost less than starting a worker process
        args.jobs = 1 if args.smoke else max(1, min(2, os.cpu_count() or 1))
    return args


# Running train_sd15.main, in this process or in a worker


def train_argv(args, run_dir: Path, seed: int, flags: list[str]) -> list[str]:
    """The flags every run shares, then the configuration's own (PAPER.md §5 recipe, scaled to the toy)."""
    common = ["--pretrained_model", args.model, "--dataset", args.pairs, "--resolution", "32",
              "--output_dir", str(run_dir), "--seed", str(seed), "--max_steps", str(args.steps),
              "--train_batch_size", str(args.batch), "--effective_batch_size", str(args.batch),
              "--learning_rate", str(args.learning_rate), "--no-scale_lr", "--warmup_steps", str(args.warmup),
              "--beta", str(args.beta), "--divergence_every", str(args.divergence_every),
              "--monitor_samples", str(args.monitor_samples), "--bin_stats_every", str(args.bin_stats_every),
              "--device", "cpu", "--dataloader_workers", "0", "--checkpoint_every", str(args.steps + 1),
              # The VAE and text encoder run once per image for all runs, not once per step.
              "--cache_latents", "--cache_dir", str(Path(args.output_dir) / "cache"),
              "--overwrite"]  # a run cut short is trained again from the start
    if args.smoke:
        common += ["--max_train_samples", str(SMOKE_PAIRS)]
    return common + flags


def run_done(run_dir: Path, argv: list[str]) -> bool:
    """A finished run with exactly these flags is reused (a rerun resumes the reproduction, not each run)."""
    info = run_dir / "run.json"
    if not (info.is_file() and (run_dir / "final" / "model_index.json").is_file()):
        return False
    return json.loads(info.read_text()).get("argv") == argv


def train_one(run_dir: str, argv: list[str]) -> dict:
    """train_sd15.main(argv) with its output in RUN_DIR/train.log; returns the run's wall and CPU seconds."""
    import train_sd15

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").unlink(missing_ok=True)
    start, cpu = time.time(), time.process_time()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root_level = logging.getLogger().level  # toolbox.start sets INFO logging for its own run only
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        # File-descriptor level, so that tqdm, logging and print of the run all land in its train.log.
        with open(run_dir / "train.log", "w") as log:
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            logging.getLogger().setLevel(logging.INFO)
            try:
                train_sd15.main(argv)
            except SystemExit as exit_:
                raise RuntimeError(f"training in {run_dir} failed (exit {exit_.code}); see {run_dir}/train.log")
            finally:
                sys.stdout.flush(), sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])
        for s, h in handlers.items():  # the trainer's SIGINT/SIGTERM handlers must not outlive the run
            signal.signal(s, h)
        logging.getLogger().setLevel(root_level)
    info = {"argv": argv, "wall_s": round(time.time() - start, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    return info


def warm_cache(args, out: Path) -> None:
    """Encode the pairs into the shared latent cache with a one-step run, before runs start in parallel: two
    processes building the same cache folder at once collide (latent_cache.build renames a shared temp folder)."""
    run_dir = out / "cache" / "warmup"
    argv = train_argv(args, run_dir, 0, ["--tau", "0"])
    argv[argv.index("--max_steps") + 1] = "1"
    if not run_done(run_dir, argv):
        train_one(str(run_dir), argv)


def quiet_libraries() -> None:
    """The stage bars are the progress report: no per-component loading bars or torchvision notices."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _worker_init():
    # One torch thread per process: two single-thread runs beat one two-thread run on tiny models (conftest.py).
    torch.set_num_threads(1)
    quiet_libraries()


def run_tasks(tasks: list[tuple], jobs: int, desc: str) -> list:
    """Run (fn, *args) tasks, `jobs` processes at once (or here, in order, with jobs = 1); results in order."""
    results = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit="run", dynamic_ncols=True) as bar:
        if jobs <= 1 or len(tasks) <= 1:
            for i, (fn, *fn_args) in enumerate(tasks):
                results[i] = fn(*fn_args)
                bar.update(1)
            return results
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(fn, *fn_args): i for i, (fn, *fn_args) in enumerate(tasks)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    return results


# The divergence probe: D(p, p_init) of PAPER.md §2, per t-bin, on many fixed draws


class DivergenceProbe:
    """The monitor's estimate of §2, D = mean (e_model(x_t) − e_init(x_t)) over winner images x_w with shared
    ε, but with fixed inputs and many more draws than the monitor's, and split by t-bin: for every one of
    the 10 bins, each of `num_images` winners is noised once at a t drawn inside the bin. D over all bins is
    the monitor's estimate with t ~ U; D per bin is Fig. 5's. The latent is the VAE posterior mean."""

    def __init__(self, model_dir: str, pairs: str, num_images: int, seed: int = 0):
        import data
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.model_dir = model_dir
        self.init = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval().requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        dataset = data.load_pairs(pairs)
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(dataset), size=min(num_images, len(dataset)), replace=False)
        transform = data.PairTransform(32, caption_dropout=0.0)
        items = [transform(dataset[int(i)], 0, int(i)) for i in rows]
        items = [it for it in items if it is not None]
        pixels = torch.stack([it["pixels"][0] for it in items])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
            ids = tokenizer([it["caption"] for it in items], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            self.cond = text_encoder(ids)[0]
        n, T = len(items), scheduler.config.num_train_timesteps
        width = T // NUM_BINS
        self.inputs = []
        for k in range(NUM_BINS):
            t = k * width + torch.randint(0, width, (n,), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            self.inputs.append((scheduler.add_noise(latents, noise, t), t, noise))
        self.err_init = self.errors(self.init)

    @torch.no_grad()
    def errors(self, unet) -> torch.Tensor:
        """Per-sample errors mean_CHW (ε_θ − ε)² (losses.per_sample_error), [bins, images]."""
        from losses import per_sample_error

        return torch.stack([per_sample_error(unet(x, t, encoder_hidden_states=self.cond).sample, noise)
                            for x, t, noise in self.inputs])

    def by_bin(self, unet) -> list[float]:
        return (self.errors(unet) - self.err_init).mean(dim=1).tolist()

    def unet(self, weights: dict):
        """A copy of the initial UNet holding `weights` (a policy state dict)."""
        import copy

        unet = copy.deepcopy(self.init)
        unet.load_state_dict(weights)
        return unet

    def unet_of(self, pipeline_dir: str):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval().requires_grad_(False)


def probe_divergence(model_dir: str, pairs: str, num_images: int, pipelines: dict[str, str]) -> dict:
    """{name: per-bin D} of each trained pipeline (Fig. 5 and the training table)."""
    probe = DivergenceProbe(model_dir, pairs, num_images)
    return {name: probe.by_bin(probe.unet_of(path)) for name, path in pipelines.items()}


# Stage 0: pairs


def ensure_pairs(args) -> dict:
    """The toy pairs: --pairs if given, else toy.cached_pairs of the base model (the pairs `train_sd15.py --tiny`
    reads too, made once per model and cached)."""
    from miniature import toy

    if args.pairs:
        if not os.path.exists(args.pairs):
            sys.exit(f"error: --pairs {args.pairs} does not exist (leave it out to sample pairs from --model)")
        print(f"[0/5] pairs: {args.pairs}")
        return {"pairs": args.pairs, "made": False}
    num = SMOKE_PAIRS if args.smoke else args.num_pairs
    path = toy.cached_pairs(args.model, num, seed=0)
    print(f"[0/5] pairs: {path}")
    args.pairs = str(path)
    stats = path.with_suffix(".json")
    return {"pairs": str(path), "made": True, **(json.loads(stats.read_text()) if stats.is_file() else {})}


# Stage 1: calibration (Fig. 1c)


def calibration_prompts(args) -> tuple[list[str], list[int]]:
    """Held-out prompts (toy.EVAL_PROMPTS), sampled with seeds the evaluation never uses, a different seed for
    every image: in the toy world the initial noise largely fixes the layout, so one seed shared by all
    prompts would score a single layout."""
    from miniature import toy

    prompts = toy.EVAL_PROMPTS[:SMOKE_PROMPTS] if args.smoke else toy.EVAL_PROMPTS
    keys = [(p, CALIBRATION_SEED_OFFSET + i * args.calibration_seeds + s)
            for i, p in enumerate(prompts) for s in range(args.calibration_seeds)]
    return [p for p, _ in keys], [s for _, s in keys]


def calibrate_run(run_dir: str, argv: list[str], model: str, pairs: str, probe_images: int,
                  prompts: list[str], seeds: list[int], smoke: bool) -> dict:
    """One calibration run (updates without the monitor): train with checkpoints, then for each checkpoint
    (and the base model, step 0) the held-out toy_label score of its samples and its divergence D."""
    from miniature import toy

    steps_ = 4 if smoke else toy.NUM_INFERENCE_STEPS
    key = {"argv": argv, "prompts": prompts, "seeds": seeds, "probe_images": probe_images,
           "sampler": [toy.SAMPLER, steps_, toy.GUIDANCE_SCALE]}
    cached = Path(run_dir) / "calibration.json"
    if not run_done(Path(run_dir), argv):
        train_one(run_dir, argv)
    elif cached.is_file() and json.loads(cached.read_text())["key"] == key:
        return json.loads(cached.read_text())["result"]
    pipe = toy.load_pipeline(model)
    probe = DivergenceProbe(model, pairs, probe_images)
    steps = [0] + sorted(int(p.name.split("-")[1]) for p in Path(run_dir).glob("checkpoint-*"))
    points = []
    for step in steps:
        if step:
            state = torch.load(Path(run_dir) / f"checkpoint-{step}" / "state.pt", map_location="cpu",
                               weights_only=False)
            pipe.unet.load_state_dict(state["policy"])
            unet = probe.unet(state["policy"])
        else:
            unet = probe.init
        images = toy.sample(pipe, prompts, seeds, num_inference_steps=steps_)
        by_bin = probe.by_bin(unet)
        points.append({"step": step, "divergence": float(np.mean(by_bin)),
                       "score": float(np.mean(toy.label_reward(images, prompts)))})
    result = {"run_dir": run_dir, "points": points}
    cached.write_text(json.dumps({"key": key, "result": result}))
    return result


def calibrate(args, out: Path) -> dict:
    """Fig. 1c's principle: the preference score against the divergence D(p_θ, p_init) as the policy explores
    with an updated, unmonitored reference. δ = D of the best checkpoint, τ = that run's τ."""
    prompts, seeds = calibration_prompts(args)
    every = max(1, args.steps // args.checkpoints)
    tasks, taus = [], list(args.calibration_taus)
    for tau in taus:
        run_dir = out / "calibration" / f"tau{tau}"
        flags = ["--tau", str(tau), "--on_diverge", "ignore", "--gamma", "1", "--no_reward_scale"]
        argv = train_argv(args, run_dir, args.seeds[0], flags)
        argv[argv.index("--checkpoint_every") + 1] = str(every)
        argv += ["--keep_checkpoints", str(args.checkpoints + 1)]
        tasks.append((calibrate_run, str(run_dir), argv, args.model, args.pairs, args.probe_images, prompts, seeds,
                      args.smoke))
    results = run_tasks(tasks, args.jobs, "[1/5] calibration")
    curves = {tau: r["points"] for tau, r in zip(taus, results)}
    best_tau, best = max(((tau, p) for tau, pts in curves.items() for p in pts if p["step"] > 0),
                         key=lambda tp: tp[1]["score"])
    base_score = curves[taus[0]][0]["score"]
    delta = best["divergence"]
    note = (f"best held-out toy_label {best['score']:.4f} (base {base_score:.4f}) at step {best['step']} of the "
            f"τ = {best_tau} run, D = {delta:.4g}")
    if delta <= 0:
        # D ≤ 0 would freeze the reference at its first update; take the smallest positive D seen instead.
        positive = sorted(p["divergence"] for pts in curves.values() for p in pts if p["divergence"] > 0)
        delta = positive[0] if positive else 1e-4
        note += f"; D ≤ 0 cannot serve as a threshold, δ = the smallest positive D measured, {delta:.4g}"
    chosen = {"tau": args.tau or best_tau, "delta": args.delta if args.delta is not None else float(f"{delta:.3g}"),
              "tau_small": min(taus), "rule": note, "curves": curves, "prompts": len(set(prompts)),
              "checkpoint_every": every}
    if args.tau or args.delta is not None:
        chosen["rule"] += f"; overridden on the command line: τ = {chosen['tau']}, δ = {chosen['delta']}"
    return chosen


# Stage 3: evaluation


def evaluate(args, out: Path, runs: dict) -> dict:
    """eval.py's offline mode on the held-out prompts: one evaluate() over the base model and every run, then
    the tables of PAPER.md §6 over training seeds."""
    import eval as ev
    from miniature import toy

    prompts = toy.EVAL_PROMPTS[:SMOKE_PROMPTS] if args.smoke else toy.EVAL_PROMPTS
    prompt_file = out / "eval_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    # The pipelines sample with the scheduler they were saved with: toy_model's DDIM, which the trained
    # pipelines inherit (train_sd15.py's final save), so the evaluation samples as the pairs were sampled.
    specs = {"base": f"base={args.model}"}
    for (key, seed), run_dir in runs.items():
        specs[(key, seed)] = f"{key}-s{seed}={run_dir / 'final'}"
    for spec in specs.values():  # images of weights that have since been retrained are sampled again
        ref = ev.resolve_model(spec)
        settings = out / "eval" / "images" / ref.tag / "settings.json"
        if settings.is_file() and json.loads(settings.read_text()).get("weights") != ref.fingerprint:
            shutil.rmtree(settings.parent)
    # evaluate() reports win rates of its first model over the others; tables() pairs training seeds itself.
    main_key = next((k for k in specs if k != "base" and k[0] == "full"), next(k for k in specs if k != "base"))
    settings = dict(num_seeds=args.eval_seeds, steps=4 if args.smoke else toy.NUM_INFERENCE_STEPS,
                    guidance_scale=toy.GUIDANCE_SCALE, resolution=32, batch_size=64, reward_batch_size=256,
                    device="cpu", dtype="float32")
    ordered = [specs[main_key]] + [s for k, s in specs.items() if k != main_key]
    if args.jobs > 1:
        # Sampling is most of the evaluation: `jobs` evaluate() calls on disjoint groups of models fill the
        # shared image store in parallel; the call below then only scores (eval.py reuses stored images).
        groups = [ordered[i::args.jobs] for i in range(args.jobs)]
        run_tasks([(_evaluate_group, g, str(prompt_file), str(out / "eval"), settings) for g in groups], args.jobs,
                  "[3/5] sampling (model groups)")
    result = ev.evaluate(ordered[0], ordered[1:], str(prompt_file), list(REWARDS), out / "eval", progress=True,
                         log=lambda m: tqdm.write(f"      {m}"), **settings)
    label_of = {k: ev.resolve_model(s).label for k, s in specs.items()}
    columns = list(result.scores)
    scores = {k: {c: result.scores[c][label_of[k]] for c in columns} for k in specs}
    return {"columns": columns, "scores": scores, "summary": result.summary, "prompts": len(prompts),
            "images": {k: str(out / "eval" / "images" / ev.resolve_model(s).tag) for k, s in specs.items()}}


def _evaluate_group(specs: list[str], prompt_file: str, output_dir: str, settings: dict) -> None:
    import eval as ev

    ev.evaluate(specs[0], specs[1:], prompt_file, list(REWARDS), output_dir, progress=False, log=lambda m: None,
                **settings)


def mean_std(values) -> tuple[float, float]:
    values = np.asarray(list(values), dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def tables(args, evaluation: dict, keys: list[str]) -> dict:
    """Mean reward per configuration (mean ± std over training seeds) and win rates of the full method over
    each baseline, same prompt and sampling seed, full seed s against baseline seed s (base: the one model)."""
    import eval as ev

    columns, scores = evaluation["columns"], evaluation["scores"]
    means = {"base": {c: mean_std([np.mean(list(scores["base"][c].values()))]) for c in columns}}
    for key in keys:
        means[key] = {c: mean_std(np.mean(list(scores[(key, s)][c].values())) for s in args.seeds) for c in columns}
    main = "full" if "full" in keys else keys[-1]
    wins = {}
    for other in ["base"] + [k for k in keys if k != main]:
        per_seed = []
        for s in args.seeds:
            theirs = scores["base"] if other == "base" else scores[(other, s)]
            row = {c: 100.0 * ev.win_rate(scores[(main, s)][c], theirs[c]) for c in columns}
            row["Avg"] = float(np.mean([row[c] for c in columns]))
            per_seed.append(row)
        wins[other] = {c: mean_std(r[c] for r in per_seed) for c in columns + ["Avg"]}
    return {"means": means, "wins": wins, "main": main}


# Logs and figures


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(values, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def bin_profile(log: list[dict], name: str, from_step: int = 0) -> np.ndarray:
    """Count-weighted mean of a per-bin statistic over the records from `from_step` on (None = empty bin)."""
    total, count = np.zeros(NUM_BINS), np.zeros(NUM_BINS)
    for r in log:
        if "bin_count" in r and r["step"] > from_step:
            for k, (n, v) in enumerate(zip(r["bin_count"], r[name])):
                if n and v is not None:
                    total[k] += n * v
                    count[k] += n
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def training_summary(args, runs: dict, keys: list[str], divergence: dict) -> dict:
    """Per configuration, mean ± std over seeds: final implicit accuracy and margin (last 20 % of steps), the
    reference's last update and freeze step, the final D(p_θ, p_init) of the probe, and CPU seconds."""
    summary = {}
    for key in keys:
        rows = []
        for s in args.seeds:
            log = read_log(runs[(key, s)])
            tail = log[-max(1, len(log) // 5):]
            frozen = next((r["step"] for r in log if r.get("ref_frozen")), None)
            info = json.loads((runs[(key, s)] / "run.json").read_text())
            # SFT has no reference and no loser in its loss: no implicit accuracy or margin is logged.
            rows.append({"accuracy": np.mean([r.get("accuracy", math.nan) for r in tail]),
                         "margin": np.mean([r.get("reward_margin", math.nan) for r in tail]),
                         "updates": sum(bool(r.get("ref_updated")) for r in log),
                         "frozen_at": frozen if frozen is not None else math.nan,
                         "divergence": float(np.mean(divergence[(key, s)])),
                         "cpu_s": info["cpu_s"]})
        summary[key] = {name: mean_std(r[name] for r in rows) for name in rows[0]}
        frozen = [r["frozen_at"] for r in rows if not math.isnan(r["frozen_at"])]
        summary[key]["frozen_at"] = mean_std(frozen) if frozen else (math.nan, math.nan)  # over the runs that froze
        summary[key]["frozen_runs"] = len(frozen)
    return summary


def draw_figures(args, out: Path, runs: dict, keys: list[str], calibration: dict, divergence: dict,
                 evaluation: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    paths = {}
    colours = {"sft": "tab:gray", "dpo": "tab:blue", "nomonitor": "tab:red", "explore": "tab:green",
               "timestep": "tab:purple", "full": "tab:orange"}
    steps = tqdm(total=5, desc="[4/5] figures", unit="fig", dynamic_ncols=True)

    def save(fig, key: str, filename: str) -> None:
        fig.tight_layout()
        paths[key] = figures / filename
        fig.savefig(paths[key], dpi=FIGURE_DPI)
        plt.close(fig)
        steps.update(1)

    # Fig. 1c: the calibration.
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for tau, points in calibration["curves"].items():
        d, s = [p["divergence"] for p in points], [p["score"] for p in points]
        ax.plot(d, s, "o-", label=f"τ = {tau}, no monitor")
        for p in points:
            ax.annotate(str(p["step"]), (p["divergence"], p["score"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(calibration["delta"], color="k", ls=":", label=f"δ = {calibration['delta']:.3g}")
    ax.set(xlabel="divergence D(p_θ, p_init)  (§2 estimate)", ylabel="held-out toy_label (mean)",
           title="Calibration (Fig. 1c principle); labels: step")
    ax.legend(fontsize=8)
    save(fig, "fig1c_calibration", "fig1c_calibration.png")

    # Fig. 1b: reward margin and divergence from p_init over steps.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in [k for k in ("dpo", "nomonitor", "explore", "full") if k in keys]:
        logs = [read_log(runs[(key, s)]) for s in args.seeds]
        x = [r["step"] for r in logs[0]]
        margins = np.array([smooth([r["reward_margin"] for r in log], max(1, args.steps // 20)) for log in logs])
        axes[0].plot(x, margins.mean(0), color=colours[key], label=LABELS[key])
        axes[0].fill_between(x, margins.min(0), margins.max(0), color=colours[key], alpha=0.15)
        dx = [r["step"] for r in logs[0] if "policy_divergence" in r]
        div = np.array([[r["policy_divergence"] for r in log if "policy_divergence" in r] for log in logs])
        if div.size:
            axes[1].plot(dx, div.mean(0), "o-", ms=3, color=colours[key], label=LABELS[key])
            axes[1].fill_between(dx, div.min(0), div.max(0), color=colours[key], alpha=0.15)
        for log in logs:
            frozen = next((r["step"] for r in log if r.get("ref_frozen")), None)
            if frozen:
                axes[1].axvline(frozen, color=colours[key], ls=":", lw=0.8)
    if "explore" in keys or "full" in keys:
        axes[1].axhline(calibration["delta"], color="k", ls="--", lw=0.8, label="δ")
    axes[0].set(xlabel="step", ylabel="implicit reward margin r(w) − r(l)",
                title="reward margin (smoothed; band: min–max over seeds)")
    axes[1].set(xlabel="step", ylabel="D(p_θ, p_init)", title="divergence from the initial model (dotted: freeze)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 1b (toy): Diffusion-DPO, reference update without and with the monitor")
    save(fig, "fig1b", "fig1b_margin_divergence.png")

    # Fig. 2: per t-bin statistics of the second half of training.
    import schedule
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler").alphas_cumprod
    lam = schedule.reward_scale(alphas).numpy()
    centres = (np.arange(NUM_BINS) + 0.5) * len(lam) / NUM_BINS
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = [("bin_model_err", "policy loss e_θ (mean of w, l)"), ("bin_reward_magnitude", "implicit reward scale |r(w) − r(l)|"),
              ("bin_accuracy", "implicit preference accuracy")]
    for key in [k for k in ("dpo", "explore", "full") if k in keys]:
        for ax, (name, title) in zip(axes, panels):
            values = np.array([bin_profile(read_log(runs[(key, s)]), name, args.steps // 2) for s in args.seeds])
            with warnings.catch_warnings():  # a bin no seed sampled (a smoke run's few steps) stays empty
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(centres, np.nanmean(values, 0), "o-", color=colours[key], label=LABELS[key])
            ax.set(xlabel="t (bin centre)", title=title)
    axes[2].axhline(0.5, color="k", lw=0.6, ls=":")
    axes[3].plot(np.arange(len(lam)), lam, color="k")
    axes[3].set(xlabel="t", title="λ(t) = 1 + norm(1/√SNR(t))")
    axes[0].legend(fontsize=7)
    fig.suptitle("Fig. 2 (toy): per t-bin statistics over the second half of training (mean over seeds)")
    save(fig, "fig2", "fig2_timestep_bins.png")

    # Fig. 5: per t-bin divergence of the timestep-aware run against the exploration-only run.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pair = [k for k in ("explore", "full") if k in keys] or keys
    for key in pair + [k for k in ("dpo",) if k in keys and k not in pair]:
        d = np.array([divergence[(key, s)] for s in args.seeds])
        axes[0].plot(centres, d.mean(0), "o-", color=colours[key], label=LABELS[key])
        axes[0].fill_between(centres, d.min(0), d.max(0), color=colours[key], alpha=0.15)
    if len(pair) == 2:
        a = np.array([divergence[(pair[0], s)] for s in args.seeds])
        b = np.array([divergence[(pair[1], s)] for s in args.seeds])
        diff = b - a
        axes[1].plot(centres, diff.mean(0), "o-", color=colours[pair[1]])
        axes[1].fill_between(centres, diff.min(0), diff.max(0), color=colours[pair[1]], alpha=0.15)
        axes[1].axhline(0, color="k", lw=0.6)
        axes[1].set(title=f"difference: {pair[1]} − {pair[0]}", ylabel="ΔD in bin")
    axes[0].set(title="per-bin D(p_θ, p_init) of the final models", ylabel="D in bin")
    for ax in axes:
        ax.set(xlabel="t (bin centre)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fig. 5 (toy): per t-bin divergence, timestep-aware vs exploration only (band: min–max over seeds)")
    save(fig, "fig5", "fig5_divergence_by_bin.png")

    # Same-seed samples: base / Diffusion-DPO / the method, seed 0 of training and sampling.
    from PIL import Image

    from miniature import toy

    shown = [k for k in ("base", "dpo", "full") if k == "base" or k in keys]
    prompts = toy.EVAL_PROMPTS[:SMOKE_PROMPTS] if args.smoke else toy.EVAL_PROMPTS
    rows = sorted(set(np.linspace(0, len(prompts) - 1, min(8, len(prompts))).round().astype(int).tolist()))
    sample_seeds = list(range(min(2, args.eval_seeds)))
    fig, axes = plt.subplots(len(rows), len(shown) * len(sample_seeds),
                             figsize=(1.6 * len(shown) * len(sample_seeds) + 1.5, 1.6 * len(rows)), squeeze=False)
    for i, idx in enumerate(rows):
        for j, (seed, key) in enumerate((seed, key) for seed in sample_seeds for key in shown):
            folder = Path(evaluation["images"]["base" if key == "base" else (key, args.seeds[0])])
            ax = axes[i][j]
            ax.imshow(Image.open(folder / f"{idx:05d}_{seed}.png"), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{'base' if key == 'base' else LABELS[key].split(' (')[0]}\nseed {seed}", fontsize=8)
            if j == 0:
                ax.set_ylabel(prompts[idx], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Same-seed samples on held-out prompts (training seed %d)" % args.seeds[0], fontsize=9)
    save(fig, "samples", "samples_grid.png")
    steps.close()
    return {k: str(v) for k, v in paths.items()}


# Stage 5: the report


def fmt(ms: tuple[float, float], digits: int = 3, show_std: bool = True) -> str:
    m, s = ms
    if isinstance(m, float) and math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if show_std else f"{m:.{digits}f}"


def render_tables(args, calibration: dict, table: dict, summary: dict, keys: list[str], columns: list[str],
                  evaluation: dict) -> str:
    n_seeds = len(args.seeds)
    lines = [f"Calibration (seed {args.seeds[0]}, updates without the monitor, {calibration['prompts']} held-out "
             f"prompts × {args.calibration_seeds} seed(s) apart from the evaluation's): "
             f"**τ = {calibration['tau']}, δ = {calibration['delta']:.3g}** — {calibration['rule']}.", "",
             "| τ | step | D(p_θ, p_init) | held-out toy_label |", "|---|---|---|---|"]
    for tau, points in calibration["curves"].items():
        lines += [f"| {tau} | {p['step']} | {p['divergence']:.4g} | {p['score']:.4f} |" for p in points]
    lines += ["", f"Mean toy reward per configuration on {evaluation['prompts']} held-out prompts × {args.eval_seeds} "
              f"sampling seed(s) (mean ± std over {n_seeds} training seed(s)):", "",
              "| config | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key in ["base"] + keys:
        lines.append(f"| {LABELS[key]} | " + " | ".join(fmt(table["means"][key][c]) for c in columns) + " |")
    main = table["main"]
    lines += ["", f"Win rate (%) of {LABELS[main]} against each baseline (same prompt and sampling seed; training "
              f"seed s against seed s; ties count half; mean ± std over {n_seeds} training seed(s)):", "",
              "| vs. | " + " | ".join(columns) + " | Avg |", "|---|" + "---|" * (len(columns) + 1)]
    for other, row in table["wins"].items():
        lines.append(f"| {LABELS[other]} | " + " | ".join(fmt(row[c], 1) for c in columns + ["Avg"]) + " |")
    lines += ["", "Training (mean ± std over seeds; accuracy and margin over the last 20 % of steps; D: the probe's "
              "D(p_θ, p_init) of the final model, all t):", "",
              "| config | implicit accuracy | reward margin | reference updates | frozen at step | final D | CPU s |",
              "|---|---|---|---|---|---|---|"]
    for key in keys:
        s = summary[key]
        frozen = f"{fmt(s['frozen_at'], 0)} ({s['frozen_runs']}/{n_seeds} runs)" if s["frozen_runs"] else "never"
        margin = "–" if math.isnan(s["margin"][0]) else f"{s['margin'][0]:.2e}"
        lines.append(f"| {LABELS[key]} | {fmt(s['accuracy'])} | {margin} | {fmt(s['updates'], 1)} | "
                     f"{frozen} | {s['divergence'][0]:.4g} ± {s['divergence'][1]:.2g} | {s['cpu_s'][0]:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, args, text: str, figures: dict, timings: dict, payload: dict) -> None:
    rel = {k: os.path.relpath(v, out) for k, v in figures.items()}
    command = " ".join(["python -m miniature.reproduce", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("reproduce.py") \
        else "reproduce.main(...)"
    md = ["# Toy reproduction of Rethinking DPO in diffusion models", "", f"Command: `{command}`", "",
          "Timings (s): " + ", ".join(f"{k} {v['wall_s']:.0f} wall / {v['cpu_s']:.0f} CPU" for k, v in timings.items()),
          "", text, "## Figures", ""]
    md += [f"![{k}]({v})" for k, v in rel.items()]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "timings": timings, "figures": rel, **payload},
                                                 indent=1, default=_jsonable))


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")




class Clock:
    """Wall and CPU seconds per stage; CPU counts this process and its finished workers."""

    def __init__(self):
        self.timings = {}

    @staticmethod
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def stage(self, name):
        clock = self

        class _Stage:
            def __enter__(self):
                self.wall, self.cpu = time.time(), clock.cpu()

            def __exit__(self, *exc):
                clock.timings[name] = {"wall_s": round(time.time() - self.wall, 1),
                                       "cpu_s": round(clock.cpu() - self.cpu, 1)}
        return _Stage()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.model = str(Path(args.model).resolve())
    if not (Path(args.model) / "model_index.json").is_file():
        sys.exit(f"error: --model {args.model} is not a pipeline folder (build it with toy_pretrain.py)")
    clock = Clock()
    keys = [k for k, _, _ in CONFIGS if not args.smoke or k in SMOKE_CONFIGS]
    start = time.time()

    with clock.stage("pairs"):
        pairs_info = ensure_pairs(args)
        args.pairs = str(Path(args.pairs).resolve())

    with clock.stage("calibration"):
        warm_cache(args, out)
        calibration = calibrate(args, out)
    print(f"      τ = {calibration['tau']}, δ = {calibration['delta']:.3g} ({calibration['rule']})")

    with clock.stage("training"):
        runs, tasks = {}, []
        for key, _, flags in CONFIGS:
            if key not in keys:
                continue
            for seed in args.seeds:
                run_dir = out / "runs" / f"{key}-s{seed}"
                runs[(key, seed)] = run_dir
                argv_ = train_argv(args, run_dir, seed, flags(calibration))
                if not run_done(run_dir, argv_):
                    tasks.append((train_one, str(run_dir), argv_))
        print(f"[2/5] training: {len(runs)} runs ({len(runs) - len(tasks)} already done), {args.steps} steps each, "
              f"{args.jobs} at a time; logs in {out / 'runs'}/*/train.log")
        run_tasks(tasks, args.jobs, "[2/5] training")

    with clock.stage("evaluation"):
        print("[3/5] evaluation")
        evaluation = evaluate(args, out, runs)
        probes = {k: str(r / "final") for k, r in runs.items()}
        divergence = {k: v for k, v in zip(probes, probe_divergence(args.model, args.pairs, args.probe_images,
                                                                    probes).values())}
        table = tables(args, evaluation, keys)
        summary = training_summary(args, runs, keys, divergence)

    with clock.stage("figures"):
        figures = draw_figures(args, out, runs, keys, calibration, divergence, evaluation)

    text = render_tables(args, calibration, table, summary, keys, evaluation["columns"], evaluation)
    clock.timings["total"] = {"wall_s": round(time.time() - start, 1), "cpu_s": round(clock.cpu(), 1)}
    payload = {"pairs": pairs_info, "calibration": calibration, "means": table["means"], "win_rates": table["wins"],
               "training": summary, "divergence_by_bin": {f"{k}-s{s}": v for (k, s), v in divergence.items()}}
    write_results(out, args, text, figures, clock.timings, payload)
    print("\n" + text)
    print("[5/5] " + ", ".join(f"{k}: {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU" for k, v in clock.timings.items()))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'figures'}/")
    return {"tables": text, "timings": clock.timings, "figures": figures, **payload}


if __name__ == "__main__":
    main()
