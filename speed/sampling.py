"""What watching a run costs: a validation grid (--validation_every) and a held-out evaluation (--eval_every).

    python -m speed.sampling                       # the toy demo (train_sd15.py --tiny): grid and held-out
    python -m speed.sampling --trainer sdxl        # tiny SDXL: the grid only (its --tiny has no held-out reward)

It runs the train script's own `main` with a grid every --validation_every steps and a held-out evaluation every
--eval_every steps (chosen so that most steps do neither, some one of them, a few both), then reads `log.jsonl`:
a step's `step_seconds` includes the sampling done after it, so the cost of a grid is the median seconds of the
steps that drew one less the median of the steps that did nothing else, measured in one run. Printed, never
asserted; on a shared CPU compare the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import train_flux
import train_sd3
import train_sd15
import train_sdxl

TRAINERS = {"sd15": train_sd15, "sdxl": train_sdxl, "sd3": train_sd3, "flux": train_flux}


def measure(opts) -> dict:
    trainer = TRAINERS[opts.trainer]
    with tempfile.TemporaryDirectory() as out:
        argv = ["--tiny", "--max_steps", str(opts.steps), "--validation_every", str(opts.validation_every),
                "--checkpoint_every", str(10**9), "--no-plot", "--output_dir", out]
        if opts.eval_every:
            argv += ["--eval_every", str(opts.eval_every)]
        code = trainer.main(argv)
        if code:
            raise SystemExit(f"error: train_{opts.trainer}.py exited with {code}")
        log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
        args = json.loads(Path(out, "run.json").read_text())  # the resolved flags
    steps = {r["step"]: r["step_seconds"] for r in log if "loss" in r and r["step"] > 1}  # step 1: warm-up
    last = max(steps)

    def kind(step):
        grid = step % opts.validation_every == 0 or step == last
        heldout = bool(opts.eval_every) and (step % opts.eval_every == 0 or step == last)
        return {(False, False): "plain", (True, False): "grid", (False, True): "heldout"}.get((grid, heldout), "both")

    groups: dict[str, list[float]] = {}
    for step, seconds in steps.items():
        groups.setdefault(kind(step), []).append(seconds)
    plain = statistics.median(groups["plain"])
    result = {"trainer": opts.trainer, "step_s": plain, "counts": {k: len(v) for k, v in groups.items()},
              "sample_steps": args["sample_steps"], "validation_images": args["validation_images"]}
    if "grid" in groups:
        result["grid_s"] = statistics.median(groups["grid"]) - plain
    if "heldout" in groups:
        result["heldout_s"] = statistics.median(groups["heldout"]) - plain
        result["eval_limit"] = args["eval_limit"]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=tuple(TRAINERS), default="sd15",
                        help="which train script's --tiny run to measure (default: %(default)s, the toy demo)")
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--validation_every", type=int, default=6, help="a grid every N steps (default: %(default)s)")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="a held-out evaluation every N steps (default: 9 for sd15, 0 for the others: their "
                             "--tiny has no held-out reward)")
    opts = parser.parse_args(argv)
    if opts.eval_every is None:
        opts.eval_every = 9 if opts.trainer == "sd15" else 0
    r = measure(opts)
    print(f"train_{r['trainer']}.py --tiny: a training step {r['step_s']:.3f} s (median of {r['counts']['plain']})")
    if "grid_s" in r:
        print(f"  validation grid ({r['validation_images']} image(s) a prompt, {r['sample_steps']} sampler steps): "
              f"+{r['grid_s']:.3f} s = {r['grid_s'] / r['step_s']:.1f} training steps "
              f"(median of {r['counts']['grid']})")
    if "heldout_s" in r:
        print(f"  held-out evaluation ({r['eval_limit']} prompts): +{r['heldout_s']:.3f} s = "
              f"{r['heldout_s'] / r['step_s']:.1f} training steps (median of {r['counts']['heldout']})")


if __name__ == "__main__":
    main()
