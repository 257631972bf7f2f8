"""What several test files share: in-process runs of the trainers on the tiny models, and one micro-batch of
train_sd15.py's loop written out from the script's own functions (encode, add_noise, predict)."""
import json
import os
from pathlib import Path

import torch

import losses
import schedule
import tiny
import toolbox
import train_sd15

ROOT = Path(__file__).resolve().parent.parent  # where the train scripts are


def read_log(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def sd15_flags() -> list[str]:
    """The random tiny SD1.5 pipeline and the built-in smooth-vs-noise pairs: the mechanics in seconds
    (`--tiny` alone trains the toy model on its sampled pairs, tested in test_toy.py)."""
    return ["--tiny", "--pretrained_model", tiny.tiny_pipeline_dir("sd15"), "--dataset", toolbox.builtin_pairs()]


def run_sd15(output_dir, *flags) -> list[dict]:
    """One in-process train_sd15.py run (saves the 5 s import of a subprocess); returns the log lines."""
    train_sd15.main([*sd15_flags(), "--output_dir", str(output_dir), *map(str, flags)])
    return read_log(output_dir)


def setup_sd15(output_dir, *flags):
    """The flags, Run and models train_sd15.main would have, without training."""
    args = toolbox.parser("test", train_sd15.RECIPE).parse_args(["--tiny", "--output_dir", str(output_dir),
                                                                 *map(str, flags)])
    run = toolbox.start(args, train_sd15.RECIPE, "sd15")
    return args, run, train_sd15.load_models(run.model_path, run.device, run.weight_dtype)


def unet_weights(folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def sd15_dpo_loss(args, m, batch, generators, policy, reference):
    """The Diffusion-DPO loss of one micro-batch exactly as train_sd15.main computes it (PAPER.md §1, §3)."""
    latents, cond = train_sd15.encode(m, batch, generators[1])
    n = latents.shape[0] // 2
    t = schedule.sample_timesteps(n, 1000, args.gamma, args.num_bins, generator=generators[0])
    scale = schedule.reward_scale(m.scheduler.alphas_cumprod)[t]
    noise = torch.randn(latents[:n].shape, generator=generators[1], dtype=latents.dtype)
    noisy, target = train_sd15.add_noise(m.scheduler, latents, noise.repeat(2, 1, 1, 1), t.repeat(2))
    model_err = losses.per_sample_error(train_sd15.predict(policy, noisy, t.repeat(2), cond), target)
    with torch.no_grad():
        ref_err = losses.per_sample_error(train_sd15.predict(reference, noisy, t.repeat(2), cond), target)
    return losses.dpo_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], args.beta, scale)
