"""mechanics/modelcard.py: the model card written into final/ and final_lora/, on the trainers' resolved flags."""
import errno
import os
import shlex
from pathlib import Path

import pytest
import yaml
from PIL import Image

import losses
import reference
import train_flux
import train_sd15
from mechanics import flags, modelcard
from mechanics.errors import DiskFull

ROOT = Path(__file__).resolve().parent.parent


def sd15_args(tmp_path, *extra):
    args, _ = flags.resolve(["--output_dir", str(tmp_path / "out"), "--device", "cpu", *extra], train_sd15.__doc__,
                            "sd15", train_sd15.RECIPE, train_sd15.TINY_RECIPE, losses.LOSSES, reference.METHODS)
    return args


def flux_args(tmp_path, *extra):
    args, _ = flags.resolve(["--output_dir", str(tmp_path / "out"), "--device", "cpu", *extra], train_flux.__doc__,
                            "flux", train_flux.RECIPE, train_flux.TINY_RECIPE, losses.LOSSES, reference.METHODS,
                            resolution_multiple=16, model_flags=train_flux.model_flags)
    return args


def fake_records(steps=10, heldout=True):
    """A small log: loss and accuracy per step, reference updates at 4 and 8 (frozen at 8), held-out numbers at
    step 0 (the base against itself) and at the last step."""
    records = [{"step": 0, "heldout_reward": 0.2, "heldout_base_reward": 0.2, "heldout_win_rate": 0.5,
                "heldout_win_low": 0.4, "heldout_win_high": 0.6, "heldout_reward_name": "pickscore",
                "heldout_prompts": 64}] if heldout else []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 0.7 - 0.01 * step, "accuracy": 0.5 + 0.02 * step, "skipped_rows": 1,
                  "nonfinite_steps": 0}
        if step in (4, 8):
            record.update(ref_updated=True, ref_frozen=step == 8, divergence=0.001 if step == 4 else 0.0071)
        records.append(record)
    if heldout:
        records[-1].update(heldout_reward=0.2234, heldout_base_reward=0.21, heldout_win_rate=0.70,
                           heldout_win_low=0.612, heldout_win_high=0.788, heldout_reward_name="pickscore",
                           heldout_prompts=64)
    return records


def read_card(path):
    text = Path(path).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header_text, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header_text), body


def test_full_sd15_card(tmp_path):
    args = sd15_args(tmp_path)
    final = tmp_path / "out" / "final"
    final.mkdir(parents=True)
    grid = tmp_path / "out" / "samples" / "step-000010.png"
    grid.parent.mkdir()
    Image.new("RGB", (8, 4), (200, 10, 30)).save(grid)
    command = ["python", "train_sd15.py", "--run_name", "a run with spaces", "--tau", "32"]
    path = modelcard.write_card(str(final), args, "sd15", "StableDiffusionPipeline", args.pretrained_model,
                                fake_records(), command, 2, 1000, str(grid))
    assert path == str(final / "README.md")
    header, body = read_card(path)

    assert header["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert header["license"] == "creativeml-openrail-m"
    assert header["base_model_relation"] == "finetune"
    assert header["pipeline_tag"] == "text-to-image" and header["library_name"] == "diffusers"
    assert {"text-to-image", "diffusers", "diffusion-dpo", "dpo", "stable-diffusion",
            "diffusers-training"} <= set(header["tags"])
    assert "lora" not in header["tags"]
    assert header["datasets"] == [args.dataset]  # the recipe's hub dataset

    assert args.beta == 5000 and args.tau == 32 and args.delta == 0.005
    for text in ("β = 5000", "τ = 32", "δ = 0.005", "`--method ours`", "γ = 0.9", "λ(t) on", "--on_diverge freeze",
                 "https://arxiv.org/abs/2505.18736", "StableDiffusionPipeline.from_pretrained(\"path/to/final\"",
                 "torchrun --nproc_per_node=2", f"learning rate {args.learning_rate:g}", "10 optimizer steps of 2048"):
        assert text in body, text
    assert args.learning_rate == pytest.approx(1e-8 * 2048)
    assert f"```bash\n{shlex.join(command)}\n```" in body
    assert "'a run with spaces'" in body  # quoted so that it runs as typed
    # pairs seen = 10 steps × 2048; passes = 20480 / 1000
    assert "1,000 usable pairs" in body and "20,480 pairs seen" in body and "20.48 passes" in body
    # held-out: the last record's numbers by hand: 0.70 → 70.0 %, [0.612, 0.788] → [61.2, 78.8]
    assert ("step 10: win rate over the base 70.0 % [61.2, 78.8] on 64 held-out prompts, "
            "mean pickscore 0.21 → 0.2234") in body
    # training summary: loss 0.69 at step 1 → 0.60 at step 10 (one tenth of 10 steps: the last alone)
    assert "- loss: 0.6900 (step 1) → 0.6000 (step 10)" in body
    assert "- implicit accuracy: 0.520 (step 1) → 0.700 (step 10)" in body
    assert "2 update(s) every τ = 32 steps, frozen at step 8 (D = 0.0071 > δ = 0.005)" in body
    assert "10 data row(s) (undecodable, or bad labels)" in body
    assert "CreativeML OpenRAIL-M" in body

    copied = final / modelcard.GRID
    assert copied.read_bytes() == grid.read_bytes()
    assert f"![validation grid at step 10]({modelcard.GRID})" in body

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())["preferred-citation"]
    assert f"title     = {{{cff['title']}}}" in body
    assert f"pages     = {{{cff['start']}--{cff['end']}}}" in body
    assert f"volume    = {{{cff['volume']}}}" in body and f"number    = {{{cff['issue']}}}" in body
    assert f"year      = {{{cff['year']}}}" in body
    assert " and ".join(a["family-names"] for a in cff["authors"]) in body


def test_flux_lora_card(tmp_path):
    args = flux_args(tmp_path)
    assert args.lora_rank == 8 and args.pretrained_model == "black-forest-labs/FLUX.1-dev"
    final = tmp_path / "out" / "final_lora"
    final.mkdir(parents=True)
    command = ["python", "train_flux.py", "--max_steps", "10"]
    path = modelcard.write_card(str(final), args, "flux", "FluxPipeline", args.pretrained_model,
                                fake_records(heldout=False), command, 1, None, None)
    header, body = read_card(path)

    assert header["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert header["license"] == "other"
    assert header["license_name"] == "flux-1-dev-non-commercial-license"
    assert header["license_link"] == "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
    assert header["base_model_relation"] == "adapter"
    assert {"lora", "flux", "diffusion-dpo"} <= set(header["tags"])

    assert "**Non-commercial use only.**" in body
    assert "A LoRA adapter (rank 8, alpha 8)" in body
    assert ("FluxPipeline.from_pretrained(\"black-forest-labs/FLUX.1-dev\", torch_dtype=torch.bfloat16)" in body
            and 'pipe.load_lora_weights("path/to/final_lora")' in body)
    assert "comfyui_lora.safetensors" in body and "kohya_lora.safetensors" not in body
    assert f"β = {args.beta:g}" in body and "τ = 32" in body and "δ = 0.002" in body
    assert "320 pairs seen" in body  # 10 steps × 32
    assert shlex.join(command) in body and "torchrun" not in body
    assert "win rate" not in body and "![" not in body
    assert not (final / modelcard.GRID).exists()


def test_sd15_lora_names_the_kohya_file(tmp_path):
    args = sd15_args(tmp_path, "--lora_rank", "4", "--lora_alpha", "8")
    path = modelcard.write_card(str(tmp_path), args, "sd15", "StableDiffusionPipeline", args.pretrained_model,
                                fake_records(), ["python", "train_sd15.py"], 1, None, None)
    header, body = read_card(path)
    assert "lora" in header["tags"] and header["license"] == "creativeml-openrail-m"
    assert "kohya_lora.safetensors" in body and "rank 4, alpha 8" in body


def test_local_base_licence(tmp_path):
    args = sd15_args(tmp_path, "--method", "plain")
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# my base\n")
    out = tmp_path / "final"
    out.mkdir()
    header, body = read_card(modelcard.write_card(str(out), args, "sd15", "StableDiffusionPipeline", str(base),
                                                  fake_records(), ["python", "train_sd15.py"], 1, None, None))
    assert header["license"] == "mit" and header["base_model"] == str(base)
    # --method plain: τ 0, γ 1, no λ(t)
    assert "the reference fixed at the initial model (τ = 0)" in body and "timesteps drawn uniformly (γ = 1)" in body
    assert "λ(t) off" in body and "the initial model throughout (τ = 0)" in body

    (base / "README.md").write_text("# no header\n")
    header, body = read_card(modelcard.write_card(str(out), args, "sd15", "StableDiffusionPipeline", str(base),
                                                  [], ["python", "train_sd15.py"], 1, None, None))
    assert header["license"] == "other" and "license_link" not in header  # a local folder has no hub page
    assert "The licence is the base model's" in body and "check it" in body
    assert "no training step was logged" in body


def test_known_licences():
    assert modelcard.base_licence("stabilityai/stable-diffusion-xl-base-1.0") == ({"license": "openrail++"}, True)
    assert modelcard.base_licence("black-forest-labs/FLUX.1-schnell") == ({"license": "apache-2.0"}, True)
    sd3, known = modelcard.base_licence("stabilityai/stable-diffusion-3-medium-diffusers")
    assert known and sd3 == {"license": "other", "license_name": "stabilityai-ai-community"}
    assert modelcard.base_licence("runwayml/stable-diffusion-v1-5")[0]["license"] == "creativeml-openrail-m"
    assert modelcard.base_licence("someone/unknown-model-xyz") == (
        {"license": "other", "license_name": "base-model-license",
         "license_link": "https://huggingface.co/someone/unknown-model-xyz"}, False)


def test_heldout_at_step_zero_only():
    line = modelcard.heldout_line([{"step": 0, "heldout_win_rate": 0.5, "heldout_win_low": 0.4,
                                    "heldout_win_high": 0.6}, {"step": 1, "loss": 0.69}])
    assert line.startswith("step 0 (the base model itself") and "50.0 % [40.0, 60.0]" in line
    assert modelcard.heldout_line([{"step": 1, "loss": 0.69}]) is None


def test_full_disk_is_diskfull(tmp_path, monkeypatch):
    args = sd15_args(tmp_path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFull, match="no space left"):
        modelcard.write_card(str(tmp_path), args, "sd15", "StableDiffusionPipeline", args.pretrained_model,
                             fake_records(), ["python", "train_sd15.py"], 1, None, None)
    assert not (tmp_path / "README.md").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
