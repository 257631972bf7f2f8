"""How noisy is the monitor's divergence estimate D(p, p_init) (PAPER.md §2)? Its spread when only the random
draws change, at a fixed pair of models, for the estimators of --monitor.

    python -m miniature.monitor_noise --policy out/tiny/final        # the demo's model against the toy base

Each estimator draws its winners (pairs of the toy data) and their (t, ε) with a fresh seed, `--repeats` times,
and D = mean over its images of e_policy − e_init is measured each time on the same two models:
  batch B×n   --monitor batch: the last micro-batch's B winners cycled to n = --monitor_samples draws, drawn
              afresh at every check. B = 1 is the paper's SD1.5 recipe (1 pair per device), B = 8 the miniature's.
  probe K     --monitor probe: K winners with one draw each, drawn once per run and kept: its spread over runs
              is this spread, and from check to check within a run it does not move at all.
The freeze is one-shot (D > δ once freezes the reference for good), so the check-to-check spread of an
estimator is what decides how early a noisy D freezes at random. Prints a table (and --json).
"""
import argparse
import json
import math

import numpy as np
import torch
from diffusers import UNet2DConditionModel

import data
import train_sd15
from mechanics import runtime
from offline import toy
ESTIMATORS = (("batch", 1, 8), ("batch", 8, 8), ("probe", 8, 8), ("probe", 64, 64), ("probe", 256, 256))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="pipeline folder of the trained model (its unet/ is used)")
    p.add_argument("--base", default=str(toy.TOY_MODEL), help="p_init: the pipeline it was trained from")
    p.add_argument("--pairs", default=None, help="Pick-a-Pic parquet of winners to draw from (default: the demo's)")
    p.add_argument("--repeats", type=int, default=200, help="estimates per estimator")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = runtime.Run(torch.device("cpu"))
    models = train_sd15.load_models(args.base, run.device, torch.float32)
    init = models.unet.eval()
    policy = UNet2DConditionModel.from_pretrained(args.policy, subfolder="unet").eval()
    pairs = data.load_pairs(args.pairs or str(toy.cached_pairs(args.base, train_sd15.TOY_DEMO_PAIRS, seed=0)))
    transform = data.PairTransform(32, caption_dropout=0.0)
    rows = []
    for kind, pairs_drawn, samples in ESTIMATORS:
        estimates = []
        for r in range(args.repeats):
            rng = np.random.default_rng([r, pairs_drawn, samples])
            picked = rng.choice(len(pairs), size=pairs_drawn, replace=False)
            batch = data.collate_pairs([transform(pairs[int(i)], 0, int(i)) for i in picked])
            probe = train_sd15.monitor_probe(models, batch, samples, runtime.micro_generators(r, samples, 0, run.device),
                                             run, chunk=64)
            gap = (torch.stack([((probe(m) - probe.target) ** 2).flatten(1).mean(1) for m in (policy, init)]))
            estimates.append((gap[0] - gap[1]).mean().item())
        est = np.asarray(estimates)
        rows.append({"estimator": f"{kind} {pairs_drawn}×{samples // pairs_drawn}" if kind == "batch" else f"probe {pairs_drawn}",
                     "images": pairs_drawn, "draws": samples, "mean": float(est.mean()), "std": float(est.std(ddof=1)),
                     "check_to_check_std": float(est.std(ddof=1)) if kind == "batch" else 0.0})
    ref = rows[-1]["mean"]
    print(f"D(policy, p_init), {args.repeats} estimates each; policy {args.policy}, p_init {args.base}")
    print("| estimator | winners | (t, ε) draws | mean D | std over draws | std / D | check-to-check std |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['estimator']} | {row['images']} | {row['draws']} | {row['mean']:.5f} | {row['std']:.5f} | "
              f"{row['std'] / abs(ref):.2f} | {row['check_to_check_std']:.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"policy": args.policy, "base": args.base, "repeats": args.repeats, "rows": rows}, f, indent=1)
    assert all(math.isfinite(row["mean"]) for row in rows)
    return rows


if __name__ == "__main__":
    main()
