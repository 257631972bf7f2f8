"""What several test files share: in-process runs of the trainers on the tiny models, and one micro-batch of
train_sd15.py's loop written out from the script's own functions (encode, add_noise, predict)."""
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

import losses
import reference
import schedule
from offline import tiny
import train_sd15
from mechanics import flags, loading, runtime

ROOT = Path(__file__).resolve().parent.parent  # where the train scripts are


def read_log(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# The small scale of the other trainers' TINY_RECIPE (train_sdxl.py), for the random tiny SD1.5: SD1.5's own
# TINY_RECIPE is the toy demo's, whose larger batch and τ would only slow the mechanics' tests down.
SMALL = ["--effective_batch_size", "4", "--learning_rate", "2e-5", "--warmup_steps", "0", "--max_steps", "60",
         "--checkpoint_every", "30", "--beta", "500", "--tau", "8", "--delta", "0.05", "--monitor_samples", "64",
         "--validation_every", "0", "--eval_every", "0"]  # the toy demo's samples are tested in test_samples.py


def sd15_flags() -> list[str]:
    """The random tiny SD1.5 pipeline and the built-in smooth-vs-noise pairs at the small scale: the mechanics in
    seconds (`--tiny` alone trains the toy model on its sampled pairs, tested in test_toy.py)."""
    return ["--tiny", "--pretrained_model", tiny.tiny_pipeline_dir("sd15"), "--dataset", tiny.builtin_pairs(), *SMALL]


def main_or_exit(script, argv) -> None:
    """`script.main(argv)` as `python script.py` runs it: a non-zero exit code raises SystemExit with it."""
    code = script.main(argv)
    if code:
        raise SystemExit(code)


def run_sd15(output_dir, *flags) -> list[dict]:
    """One in-process train_sd15.py run (saves the 5 s import of a subprocess); returns the log lines."""
    main_or_exit(train_sd15, [*sd15_flags(), "--output_dir", str(output_dir), *map(str, flags)])
    return read_log(output_dir)


def setup_sd15(output_dir, *extra):
    """The flags, Run and models train_sd15.train would have with sd15_flags(), without training."""
    args, _ = flags.resolve([*sd15_flags(), "--output_dir", str(output_dir), *map(str, extra)], "test", "sd15",
                            train_sd15.RECIPE, train_sd15.TINY_RECIPE, losses.LOSSES, reference.METHODS)
    run = runtime.start(args, "sd15")
    return args, run, train_sd15.load_models(loading.pipeline_folder(args, "sd15"), run.device, run.weight_dtype)


def unet_weights(folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def sd15_dpo_loss(args, m, batch, generators, policy, reference):
    """The Diffusion-DPO loss of one micro-batch exactly as train_sd15.train computes it (PAPER.md §1, §3)."""
    latents, cond = train_sd15.encode(m, batch, generators[1])
    n = latents.shape[0] // 2
    t = schedule.sample_timesteps(n, 1000, args.gamma, args.num_bins, generator=generators[0])
    scale = schedule.reward_scale(m.scheduler.alphas_cumprod)[t]
    noise = torch.randn(latents[:n].shape, generator=generators[1], dtype=latents.dtype)
    noisy, target = train_sd15.add_noise(m, latents, noise.repeat(2, 1, 1, 1), t.repeat(2))
    model_err = losses.per_sample_error(train_sd15.predict(policy, noisy, t.repeat(2), cond), target)
    with torch.no_grad():
        ref_err = losses.per_sample_error(train_sd15.predict(reference, noisy, t.repeat(2), cond), target)
    return losses.dpo_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], args.beta, scale)


def check_resume_matches_an_uninterrupted_run(run, weights, tmp_path):
    """A run cut at step 3 and resumed ends with the losses and weights of one that was never cut (any trainer:
    run(output_dir, *flags) -> log lines, weights(folder) -> the denoiser's state dict)."""
    flags = ["--max_steps", 6, "--tau", 2, "--checkpoint_every", 3, "--learning_rate", 1e-4]
    full_log = run(tmp_path / "full", *flags)
    run(tmp_path / "split", "--max_steps", 3, "--tau", 2, "--checkpoint_every", 3, "--learning_rate", 1e-4)
    resumed_log = run(tmp_path / "split", *flags, "--resume", "latest")
    assert [r["step"] for r in resumed_log] == list(range(1, 7))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]
    full, resumed = weights(tmp_path / "full" / "final"), weights(tmp_path / "split" / "final")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def check_cached_latents_and_lora(run, pipeline_class, pipeline_dir, tmp_path):
    """--cache_latents gives the losses of encoding every step, and a LoRA run starts at log 2 and writes an
    adapter that the model's diffusers pipeline loads and that changes its samples."""
    flags = ["--max_steps", 2, "--checkpoint_every", 1000, "--max_train_samples", 32]
    plain = [r["loss"] for r in run(tmp_path / "plain", *flags)]
    cached = [r["loss"] for r in run(tmp_path / "cached", *flags, "--cache_latents")]
    assert cached == pytest.approx(plain, rel=1e-4)  # the cache encodes in other batch shapes: float noise
    log = run(tmp_path / "lora", *flags, "--lora_rank", 4, "--learning_rate", 1e-3)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = pipeline_class.from_pretrained(pipeline_dir)

    def sample():
        return pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    before = sample()
    pipe.load_lora_weights(tmp_path / "lora" / "final_lora")
    assert abs(sample() - before).max() > 0


def wait_for_steps(proc, output_dir, steps: int, timeout: float = 240) -> bool:
    """Wait until a running trainer's log holds `steps` lines: True, or False if the process ended first."""
    log, deadline = output_dir / "log.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= steps:
            return True
        time.sleep(0.02)
    return False


def finish(proc, expect_success: bool, timeout: float = 400) -> int:
    """The process's exit code once it ends; a failure it should not have had shows its stderr."""
    _, err = proc.communicate(timeout=timeout)
    assert not expect_success or proc.returncode == 0, err[-3000:]
    return proc.returncode
