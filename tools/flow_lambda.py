"""How strongly λ(t) acts on each model under the recipe's sampler: the mean λ and the share of pairs at λ = 2.

    python -m tools.flow_lambda                       # SD1.5 / SDXL, SD3 (shift 3) and FLUX (1024 px, and 512 px)

λ multiplies β (PAPER.md §3), so a mean λ of 1.8 against SD1.5's 1.5 makes the same --beta act 20 % stronger.
Each figure is exact: every timestep's probability under Cat(γ^k) over K bins (schedule.sampler_mean), with the
schedulers' own configs (the published ones; nothing is downloaded). --flow_lambda compares the two flow λ's.
"""
import argparse

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import schedule
import train_flux
import train_sd3
from offline import tiny  # the published scheduler configs



def figures(scale: torch.Tensor, sigmas: torch.Tensor | None, gamma: float, num_bins: int) -> dict:
    at_two = (scale >= 2 - 1e-6).double()
    out = {"mean λ": schedule.sampler_mean(scale, gamma, num_bins), "λ = 2": schedule.sampler_mean(at_two, gamma, num_bins)}
    if sigmas is not None:
        out["σ > 0.99"] = schedule.sampler_mean((sigmas > 0.99).double(), gamma, num_bins)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gamma", type=float, default=0.9, help="the sampler's γ (1: uniform t)")
    p.add_argument("--num_bins", type=int, default=50, help="the sampler's K")
    args = p.parse_args(argv)
    rows = {"SD1.5 / SDXL": (schedule.reward_scale(DDPMScheduler.from_config(tiny.SD_SCHEDULER_CONFIG).alphas_cumprod), None)}
    sd3 = train_sd3.sigma_grid(FlowMatchEulerDiscreteScheduler(**tiny.SD3_SCHEDULER_CONFIG))
    rows["SD3 (shift 3)"] = (schedule.reward_scale_flow(sd3), sd3)
    flux = FlowMatchEulerDiscreteScheduler(**tiny.FLUX_SCHEDULER_CONFIG)
    for px in (1024, 512):
        grid = train_flux.sigma_grid(flux, (px // 16) ** 2)
        rows[f"FLUX {px} px"] = (schedule.reward_scale_flow(grid), grid)
    rows["flow, by step"] = (schedule.reward_scale_by_step(1000), None)  # --flow_lambda step, any flow grid
    print(f"γ = {args.gamma}, {args.num_bins} bins; uniform t in brackets")
    for name, (scale, sigmas) in rows.items():
        a, u = figures(scale, sigmas, args.gamma, args.num_bins), figures(scale, sigmas, 1.0, args.num_bins)
        print(f"  {name:14s} " + "   ".join(f"{k} {a[k]:.3f} [{u[k]:.3f}]" for k in a))


if __name__ == "__main__":
    main()
