"""Every checkpoint is a model (mechanics/pipelines.model_ref, tools/export.py): eval.py samples a full, a LoRA and
an --fsdp (sharded) run's checkpoint-N/ to exactly the numbers of the same weights saved as final/ (final_lora/), and
an earlier checkpoint to other numbers; tools.export writes a checkpoint as final/ would hold it, bit for bit, with
the run's run.json; what is not a checkpoint, is damaged or has lost its base is one `error:` line. Tiny SD1.5,
offline, one run per kind of run."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as ev
from helpers import ROOT, finish, run_sd15, unet_weights
from mechanics import checkpoints, modelcard
from offline import tiny
from tools import export

STEPS = ["--max_steps", 4, "--checkpoint_every", 2, "--keep_checkpoints", 3, "--learning_rate", 1e-3]
REWARDS = ["toy_fidelity", "tiny_clip"]
CARD = {modelcard.CARD, modelcard.GRID}  # the trainer's model card beside final/'s model: not save_final's, no export's  # tiny_clip: a continuous score that any changed pixel moves


def scores(tmp_path, model, *baselines):
    """eval.evaluate's scores (reward -> label -> {(prompt, seed): score}) of `model` and `baselines`, same seeds."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na big blue square on the left\na green triangle\n")
    result = ev.evaluate(model, list(baselines), str(prompts), REWARDS, tmp_path / "eval", limit=2, num_seeds=1,
                         steps=2, resolution=32, device="cpu", progress=False, log=lambda s: None)
    return result.scores


def same_file(a, b) -> bool:
    """The same bytes; a safetensors file: the same tensors and metadata (its writer orders the metadata at random)."""
    if a.suffix != ".safetensors":
        return a.read_bytes() == b.read_bytes()
    from safetensors import safe_open
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return fa.metadata() == fb.metadata() and fa.keys() == fb.keys() and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def check_checkpoint_is_final(out, tmp_path, final):
    """checkpoint-4 scores as final/ (final_lora/) does, to the last bit; checkpoint-2 (other weights) otherwise."""
    got = scores(tmp_path, f"ckpt4={out / 'checkpoint-4'}", f"final={out / final}", f"ckpt2={out / 'checkpoint-2'}")
    for reward in REWARDS:
        assert got[reward]["ckpt4"] == got[reward]["final"], reward
    assert got["tiny_clip"]["ckpt2"] != got["tiny_clip"]["ckpt4"]
    versions = {ev.model_ref(str(out / f"checkpoint-{n}")).weights_version for n in (2, 4)}
    assert len(versions) == 2  # other weights, other image folder


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_cache):
    out = tmp_path_factory.mktemp("full")
    run_sd15(out, *STEPS)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_cache):
    out = tmp_path_factory.mktemp("lora")
    run_sd15(out, *STEPS, "--lora_rank", 4)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_cache):
    """Two CPU processes (gloo) under --fsdp, as tests/test_fsdp.py launches them (about 20 s)."""
    out = tmp_path_factory.mktemp("fsdp")
    argv = ["--tiny", "--pretrained_model", tiny.tiny_pipeline_dir("sd15"), "--dataset", tiny.builtin_pairs(), *STEPS,
            "--tau", 2, "--train_batch_size", 1, "--effective_batch_size", 4, "--validation_every", 0,
            "--eval_every", 0, "--no-plot", "--fsdp", "--output_dir", out]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29741", "train_sd15.py", *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finish(proc, expect_success=True)
    return out


def test_a_full_checkpoint_is_evaluated_as_its_final_model(full_run, tmp_path):
    ref = ev.model_ref(str(full_run / "checkpoint-4"))
    assert ref.checkpoint and not ref.lora and ref.source == tiny.tiny_pipeline_dir("sd15")
    record = json.loads((full_run / "checkpoint-4" / "base_model.json").read_text())
    assert record == {"base_model": tiny.tiny_pipeline_dir("sd15"), "pipeline": "StableDiffusionPipeline",
                      "denoiser": "unet"}  # the base as the run was given it
    assert json.loads((full_run / "final" / "run.json").read_text()) == json.loads((full_run / "run.json").read_text())
    check_checkpoint_is_final(full_run, tmp_path, "final")


def test_a_lora_checkpoint_holds_its_adapter_as_final_lora_does(lora_run, tmp_path):
    checkpoint, final = lora_run / "checkpoint-4", lora_run / "final_lora"
    for name in ("pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "base_model.json"):
        assert same_file(checkpoint / name, final / name), name
    assert checkpoints.verify(str(checkpoint)) is None  # the adapter files are in its manifest
    assert (final / "run.json").is_file()
    assert ev.model_ref(str(checkpoint)).lora == str(checkpoint)  # pipe.load_lora_weights(checkpoint-4)
    check_checkpoint_is_final(lora_run, tmp_path, "final_lora")
    exported = export.export(str(checkpoint), str(tmp_path / "exported"))  # what final_lora/ holds, bit for bit
    assert sorted(os.listdir(exported)) == sorted(set(os.listdir(final)) - CARD)
    for name in os.listdir(exported):
        assert same_file(tmp_path / "exported" / name, final / name), name
    # A LoRA checkpoint written before checkpoints held their adapter (state.pt alone): its adapter and base are
    # read from state.pt, to the same numbers.
    old = tmp_path / "old" / "checkpoint-4"
    old.mkdir(parents=True)
    shutil.copy(checkpoint / "state.pt", old / "state.pt")
    got = scores(tmp_path / "old", f"old={old}", f"final={final}")
    assert all(got[r]["old"] == got[r]["final"] for r in REWARDS)


def test_a_sharded_checkpoint_is_read_in_one_process_and_evaluated_as_its_final_model(fsdp_run, tmp_path):
    assert (fsdp_run / "checkpoint-4" / "sharded").is_dir()
    weights, final = checkpoints.policy_weights(str(fsdp_run / "checkpoint-4")), unet_weights(fsdp_run / "final")
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)
    check_checkpoint_is_final(fsdp_run, tmp_path, "final")


def test_export_writes_the_checkpoint_as_final_would_with_its_run_json(full_run, tmp_path, capsys):
    assert export.main([str(full_run / "checkpoint-2")]) == 0
    exported = full_run / "export-2"
    assert f"wrote {exported}" in capsys.readouterr().out
    policy = torch.load(full_run / "checkpoint-2" / "state.pt", weights_only=True)["policy"]
    unet = unet_weights(exported)
    assert unet.keys() == policy.keys() and all(torch.equal(unet[k], policy[k]) for k in policy)
    assert sorted(os.listdir(exported)) == sorted(set(os.listdir(full_run / "final")) - CARD)
    assert json.loads((exported / "run.json").read_text()) == json.loads((full_run / "run.json").read_text())
    got = scores(tmp_path, f"ckpt2={full_run / 'checkpoint-2'}", f"export={exported}")
    assert all(got[r]["ckpt2"] == got[r]["export"] for r in REWARDS)
    assert export.main([str(full_run / "checkpoint-2")]) == 2  # never replaced
    assert capsys.readouterr().err.strip() == f"error: {exported} exists: remove it or give another --out"


def test_export_mistakes_are_one_error_line(full_run, tmp_path, capsys):
    def error(*argv):
        assert export.main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "is not a checkpoint (it holds no state.pt)" in error(full_run / "final")
    assert "no such folder" in error(tmp_path / "nowhere")
    damaged = tmp_path / "damaged"
    shutil.copytree(full_run / "checkpoint-2", damaged)
    with open(damaged / "state.pt", "r+b") as f:
        f.truncate(1000)
    assert error(damaged).startswith(f"error: {damaged} is damaged: state.pt has 1000 bytes")
    assert ev.main(["--model", str(damaged), "--prompts", "p.txt", "--rewards", "toy_fidelity", "--output_dir",
                    str(tmp_path / "eval")]) == 2  # eval.py too: one line, before anything is sampled
    assert capsys.readouterr().err.strip().startswith(f"error: {damaged} is damaged: state.pt has 1000 bytes")
    moved = tmp_path / "moved"  # its base is gone (base_model.json names a folder that no longer exists)
    shutil.copytree(full_run / "checkpoint-2", moved)
    (moved / "base_model.json").write_text(json.dumps({"base_model": str(tmp_path / "gone")}))
    checkpoints.write_manifest(str(moved))
    assert error(moved) == (f"error: cannot export {moved}: model folder not found: {tmp_path / 'gone'} (the base "
                            f"pipeline of {moved}; give it as {moved}@PIPELINE)")
    assert export.main([f"{moved}@{tiny.tiny_pipeline_dir('sd15')}", "--out", str(tmp_path / "elsewhere")]) == 0
    assert not any(p.name.startswith(("export", "damaged.", "moved.")) for p in tmp_path.iterdir())  # nothing left
