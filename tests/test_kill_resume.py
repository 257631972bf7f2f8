"""The kill/resume property, for every trainer: a run killed with SIGKILL at a random step after its first
checkpoint, then continued with --resume latest, ends with the per-step losses and the weights of a run that
was never killed, bit for bit."""
import json
import random
import signal
import subprocess
import sys

import pytest
import torch

from offline import tiny
from helpers import ROOT, finish, read_log, wait_for_steps

STEPS, EVERY = 8, 2
FLAGS = ["--max_steps", STEPS, "--checkpoint_every", EVERY, "--tau", 2, "--learning_rate", 1e-4, "--no-plot",
         "--eval_every", 0]  # SD1.5's --tiny recipe (the toy demo's) evaluates held-out prompts: tested in test_samples
DENOISER = {"sd15": ("UNet2DConditionModel", "unet"), "sdxl": ("UNet2DConditionModel", "unet"),
            "sd3": ("SD3Transformer2DModel", "transformer"), "flux": ("FluxTransformer2DModel", "transformer")}


def argv(name, output_dir, *extra):
    model = ["--pretrained_model", tiny.tiny_pipeline_dir(name), "--dataset", tiny.builtin_pairs()]
    model += ["--lora_rank", "0"] if name == "flux" else []  # the full fine-tune: LoRA is FLUX's default
    return ["--tiny", *model, "--output_dir", str(output_dir), *map(str, FLAGS), *map(str, extra)]


def train(name, output_dir, *extra, kill_after: int | None = None) -> int:
    """train_NAME.py in a subprocess; with kill_after, SIGKILLed once its log holds that many steps."""
    proc = subprocess.Popen([sys.executable, f"train_{name}.py", *argv(name, output_dir, *extra)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None and wait_for_steps(proc, output_dir, kill_after, timeout=180):
        proc.send_signal(signal.SIGKILL)
    return finish(proc, expect_success=kill_after is None, timeout=300)


def weights(name, folder):
    import diffusers
    cls, sub = DENOISER[name]
    return getattr(diffusers, cls).from_pretrained(folder / "final", subfolder=sub).state_dict()


@pytest.mark.parametrize("name", sorted(DENOISER))
def test_a_run_killed_after_its_first_checkpoint_resumes_bit_for_bit(name, tmp_path):
    train(name, tmp_path / "whole")
    kill_after = random.randint(EVERY + 1, STEPS - 1)  # any step past the first checkpoint must do
    code = train(name, tmp_path / "killed", kill_after=kill_after)
    if code == 0:
        pytest.fail(f"the run finished before the kill at step {kill_after}: make it longer")
    assert code == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()
    train(name, tmp_path / "killed", "--resume", "latest")
    whole, resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), f"killed after step {kill_after}"
    for a, b in zip(whole, resumed):
        a.pop("step_seconds"), b.pop("step_seconds")
        assert a == b, (f"killed after step {kill_after}", json.dumps(a)[:300], json.dumps(b)[:300])
    w, r = weights(name, tmp_path / "whole"), weights(name, tmp_path / "killed")
    assert all(torch.equal(w[k], r[k]) for k in w), f"killed after step {kill_after}"
