"""eval.py and rewards.py, offline: win-rate arithmetic, the PickScore formula on a tiny CLIP, an end-to-end
evaluation of tiny pipelines that reuses its stored images, and clear errors on bad input."""
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import rewards as rw
from mechanics.checkpoints import base_model_identity
from mechanics.errors import UsageError
from offline import tiny


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 32 px models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP workers
    spinning against other jobs made sampling 10x slower; the caller's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Win rate


def test_win_rate_counts_wins_and_half_ties():
    a = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 3.0, (1, 1): 4.0}
    b = {(0, 0): 0.5, (0, 1): 2.0, (1, 0): 5.0, (1, 1): 1.0}
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert ev.win_rate(a, b) == pytest.approx(0.625)
    assert ev.win_rate(b, a) == pytest.approx(1 - 0.625)  # ties split evenly, so A over B + B over A = 1
    assert ev.win_rate(a, a) == 0.5


def test_win_rate_pairs_by_prompt_and_seed_not_by_order():
    a = {(0, 0): 1.0, (0, 1): 0.0}
    b = {(0, 1): 0.5, (0, 0): 0.5}  # same keys, other insertion order
    assert ev.win_rate(a, b) == 0.5
    with pytest.raises(ValueError, match="pairing"):
        ev.win_rate({(0, 0): 1.0, (0, 1): 1.0}, {(0, 0): 0.0, (0, 2): 0.0})  # seed 1 has no partner
    with pytest.raises(ValueError, match="pairing"):
        ev.win_rate({(0, 0): 1.0, (1, 0): 1.0}, {(0, 0): 0.0})  # a missing image is not dropped
    with pytest.raises(TypeError):
        ev.win_rate([1.0, 2.0], [0.0, 3.0])  # bare lists cannot be paired by seed
    with pytest.raises(ValueError, match="NaN"):
        ev.win_rate({(0, 0): math.nan}, {(0, 0): 1.0})


# Rewards


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny.tiny_clip_dir(root=tmp_path_factory.mktemp("clip"))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_pickscore_is_logit_scale_times_cosine_on_a_tiny_clip(tiny_clip):
    from transformers import AutoProcessor, CLIPModel

    images, prompts = _images(3), ["a red circle", "a big blue square on the left", "a small green triangle"]
    pick = rw.PickScoreReward(tiny_clip, tiny_clip, device="cpu", local_files_only=True)
    clip = rw.CLIPScoreReward(tiny_clip, device="cpu", local_files_only=True)
    got_pick, got_clip = pick.score(images, prompts), clip.score(images, prompts)

    # Independently: CLIPModel's own logits_per_image = logit_scale.exp() * cos(image, text) for every pair;
    # PickScore is its diagonal (each image with its own prompt).
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal()
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(100.0, rel=1e-4)  # the tiny CLIP has PickScore's logit scale
    assert got_pick == pytest.approx(logits.tolist(), abs=1e-4)
    assert got_clip == pytest.approx((logits * 100.0 / scale).tolist(), abs=1e-4)
    assert all(abs(v) <= 100.0 + 1e-3 for v in got_clip)  # 100 x a cosine
    assert "logit_scale" in pick.units and "100" in clip.units


def test_reward_registry_errors_are_clear():
    with pytest.raises(rw.RewardError, match="unknown reward 'nope'"):
        rw.check_spec("nope")
    assert {"pickscore", "hpsv2", "clip", "aesthetic", "imagereward", "tiny_clip"} <= set(rw.available_rewards())
    for name, package in (("hpsv2", "hpsv2"), ("imagereward", "image-reward")):
        try:
            rw.check_spec(name)
        except rw.RewardError as exc:  # not installed here: the message names the pip package
            assert f"pip install {package}" in str(exc)


def test_a_pixel_function_reward_is_one_line(monkeypatch):
    """A fork's reward that is a plain function of pixels is one more entry of rewards.REWARDS (made by _pixels)."""
    units = "mean pixel value / 255"
    monkeypatch.setitem(rw.REWARDS, "test_brightness", (rw._pixels("test_brightness", _brightness, units), units))
    reward = rw.build_reward("test_brightness")
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 255, 255))
    assert reward.score([black, white], ["x", "y"]) == [0.0, 1.0]


def _brightness(images, prompts):
    return [float(np.asarray(im).mean() / 255) for im in images]


# End to end, offline


class CountingLoader:
    """Wraps eval.load_pipeline to count pipeline loads and sampling calls."""

    def __init__(self, real):
        self.real, self.loads, self.calls = real, 0, 0

    def __call__(self, model, device, dtype):
        self.loads += 1
        pipe = self.real(model, device, dtype)
        counter = self

        class Counted:
            def __call__(self, *args, **kwargs):
                counter.calls += 1
                return pipe(*args, **kwargs)

        return Counted()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SD1.5 base, a copy of it at another path, and the base trained for 2 steps by
    `train_sd15.py --tiny` (in-process: a subprocess would pay the imports again) as the evaluated model."""
    from offline import tiny
    import train_sd15

    base = tiny.tiny_pipeline_dir("sd15")
    run = tmp_path_factory.mktemp("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread (a function-scoped fixture does not cover module set-up)
    try:
        train_sd15.main(["--tiny", "--max_steps", "2", "--output_dir", str(run), "--pretrained_model", base,
                         "--dataset", tiny.builtin_pairs()])
    finally:
        torch.set_num_threads(threads)
    copy = tmp_path_factory.mktemp("copy") / "base-copy"
    shutil.copytree(base, copy)
    return {"model": str(run / "final"), "base": base, "copy": str(copy)}


def _prompt_file(path):
    path.write_text("a red circle\n\na big blue square on the left\n")  # the blank line is skipped
    return str(path)


def test_end_to_end_offline_evaluation_and_rerun_reuses_images(tmp_path, models, monkeypatch):
    loader = CountingLoader(ev.load_pipeline)
    monkeypatch.setattr(ev, "load_pipeline", loader)
    prompts = _prompt_file(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    kwargs = dict(num_seeds=2, steps=2, resolution=32, batch_size=3, device="cpu", progress=False, log=lambda s: None)
    first = ev.evaluate(f"ours={models['model']}", [f"base={models['base']}", f"copy={models['copy']}"], prompts,
                        ["tiny_pickscore", "toy_fidelity"], out, **kwargs)

    # 3 models x 2 prompts x 2 seeds, in batches of 3: 2 calls per model.
    assert first.generated == {"ours": 4, "base": 4, "copy": 4}
    assert (loader.loads, loader.calls) == (3, 6)
    assert len(list((out / "images").rglob("*.png"))) == 12
    for name in ("scores.csv", "summary.json", "table.md"):
        assert (out / name).is_file()
    table = (out / "table.md").read_text()
    assert "| vs. | tiny_pickscore | toy_fidelity | Avg |" in table and "| base |" in table
    assert len(first.rows) == 12
    wins = first.summary["win_rates_percent"]
    for row in wins.values():
        assert all(0.0 <= v <= 100.0 for v in row.values())
        assert row["Avg"] == pytest.approx((row["tiny_pickscore"] + row["toy_fidelity"]) / 2)

    # Same weights at two paths, sampled separately: same seed -> same image, so every pair ties.
    for key in first.scores["tiny_pickscore"]["base"]:
        a = np.asarray(Image.open(out / "images" / ev.model_ref(f"base={models['base']}").tag / f"{key[0]:05d}_{key[1]}.png"))
        b = np.asarray(Image.open(out / "images" / ev.model_ref(f"copy={models['copy']}").tag / f"{key[0]:05d}_{key[1]}.png"))
        assert np.array_equal(a, b)
    assert wins["base"] == wins["copy"]
    assert ev.win_rate(first.scores["tiny_pickscore"]["base"], first.scores["tiny_pickscore"]["copy"]) == 0.5

    # Rerun with one more reward: nothing is sampled, nothing is even loaded, the files are untouched.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    second = ev.evaluate(f"ours={models['model']}", [f"base={models['base']}", f"copy={models['copy']}"], prompts,
                         ["tiny_pickscore", "toy_fidelity", "tiny_clip"], out, **kwargs)
    assert second.generated == {"ours": 0, "base": 0, "copy": 0}
    assert (loader.loads, loader.calls) == (3, 6)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes
    assert second.scores["tiny_pickscore"] == first.scores["tiny_pickscore"]
    assert "tiny_clip" in second.summary["win_rates_percent"]["base"]

    # An interrupted run resumes: a missing image is the only one sampled again, and comes out the same.
    victim = sorted((out / "images" / ev.model_ref(f"ours={models['model']}").tag).glob("*.png"))[3]
    before = np.asarray(Image.open(victim)).astype(int)
    victim.unlink()
    third = ev.evaluate(f"ours={models['model']}", [f"base={models['base']}"], prompts, ["toy_fidelity"], out, **kwargs)
    assert third.generated == {"ours": 1, "base": 0}
    assert (loader.loads, loader.calls) == (4, 7)
    assert np.abs(np.asarray(Image.open(victim)).astype(int) - before).max() <= 1  # batch of 1 vs 3: same noise

    # Other sampler settings are refused, not mixed into the stored images.
    with pytest.raises(UsageError, match="other settings"):
        ev.evaluate(f"ours={models['model']}", [f"base={models['base']}"], prompts, ["toy_fidelity"], out,
                    **{**kwargs, "steps": 3})


def test_cli_tiny_demo_prints_the_table(tmp_path, capsys):
    rc = ev.main(["--tiny", "--output_dir", str(tmp_path), "--limit", "1", "--num_seeds", "1", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Win rate (%) of tiny-random" in printed and "| toy-base |" in printed
    assert (tmp_path / "tiny_prompts.txt").is_file() and (tmp_path / "table.md").is_file()


# Bad input: one `error:` line and exit code 2


def _cli_error(capsys, argv):
    rc = ev.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_input_gives_one_line_errors(tmp_path, capsys, models):
    prompts = _prompt_file(tmp_path / "p.txt")
    base = models["base"]
    msg = _cli_error(capsys, ["--model", base, "--prompts", prompts, "--rewards", "pickscore,nope"])
    assert "unknown reward 'nope'" in msg
    msg = _cli_error(capsys, ["--model", str(tmp_path / "no-such-run" / "final"), "--prompts", prompts,
                              "--rewards", "toy_fidelity"])
    assert "model folder not found" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    msg = _cli_error(capsys, ["--model", base, "--prompts", str(empty), "--rewards", "toy_fidelity",
                              "--output_dir", str(tmp_path / "o")])
    assert "prompt file is empty" in msg
    msg = _cli_error(capsys, ["--model", base, "--prompts", "drawbench", "--rewards", "toy_fidelity",
                              "--output_dir", str(tmp_path / "o")])
    assert "unknown prompt set 'drawbench'" in msg
    # A hub id that is not cached, with the hub offline (conftest): fails at once and names the offline option.
    msg = _cli_error(capsys, ["--model", "no-such-org/no-such-model", "--prompts", prompts, "--rewards", "toy_fidelity"])
    assert "not in the local cache" in msg and "--tiny" in msg
    # A hub prompt set that is not cached, offline: the same.
    msg = _cli_error(capsys, ["--model", base, "--prompts", "parti", "--rewards", "toy_fidelity",
                              "--output_dir", str(tmp_path / "o2")])
    assert "cannot load prompt set 'parti'" in msg and "offline" in msg
    # A hub reward whose weights are not cached, offline: refused before any image is sampled.
    msg = _cli_error(capsys, ["--model", base, "--prompts", prompts, "--rewards", "toy_fidelity,pickscore",
                              "--output_dir", str(tmp_path / "o3")])
    assert "yuvalkirstain/PickScore_v1" in msg and "not in the local cache" in msg
    assert not (tmp_path / "o3" / "images").exists()
    # A folder that is not a pipeline.
    msg = _cli_error(capsys, ["--model", str(tmp_path), "--prompts", prompts, "--rewards", "toy_fidelity"])
    assert "no model_index.json" in msg


def test_aesthetic_is_the_mlp_on_normalised_clip_image_embeddings(tiny_clip, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    mlp = rw.AestheticMLP(32)  # the tiny CLIP's projection width; the real predictor takes ViT-L/14's 768
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    reward = rw.AestheticReward(str(tmp_path / "mlp.pth"), clip_id=tiny_clip, local_files_only=True)
    images = _images(2, seed=1)
    got = reward.score(images, ["unused", "unused"])
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        emb = model.get_image_features(**processor(images=images, return_tensors="pt"))
        emb = getattr(emb, "pooler_output", emb)
        expected = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(rw.RewardError, match="not found"):
        rw.AestheticReward(str(tmp_path / "missing.pth"), clip_id=tiny_clip, local_files_only=True)


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_sdxl_and_sd3_pipelines_are_detected_and_sampled(kind, tmp_path):
    folder = tiny.tiny_pipeline_dir(kind)
    assert ev.model_ref(folder).family == kind
    result = ev.evaluate(folder, [], _prompt_file(tmp_path / "p.txt"), ["toy_aesthetic"], tmp_path / "out",
                         limit=1, steps=2, resolution=32, device="cpu", progress=False, log=lambda s: None)
    assert result.generated == {folder: 1}
    settings = result.summary["models"][folder]["settings"]
    assert (settings["family"], settings["guidance_scale"]) == (kind, ev.FAMILY_DEFAULTS[kind]["guidance_scale"])
    assert settings.get("max_sequence_length") == {"sdxl": None, "sd3": 256}[kind]  # SD3Pipeline's T5 length
    assert "Mean score per model" in result.table


# FLUX: bf16, and FLUX.1-dev's and FLUX.1-schnell's own sampler settings


def test_flux_samples_in_bfloat16_on_an_accelerator_and_float16_is_refused(tmp_path, capsys):
    """FLUX is a bf16 model (float16 gives black or NaN images with some weights): `auto` is per family. The
    resolution needs no GPU: a pretend CUDA device is only a name to runtime.sampling_dtype."""
    from mechanics import runtime

    flux = ev.model_ref(tiny.tiny_pipeline_dir("flux"))
    sd15 = ev.model_ref(tiny.tiny_pipeline_dir("sd15"))
    assert flux.family == "flux"
    for device in ("cuda", "cuda:1", "mps"):
        assert runtime.sampling_dtype("auto", device, flux.family) == torch.bfloat16
        assert runtime.sampling_dtype(None, device, sd15.family) == torch.float16
    assert runtime.sampling_dtype("auto", "cpu", flux.family) == torch.float32  # half precision is slow on a CPU
    assert runtime.sampling_dtype("bf16", "cuda", "flux") == torch.bfloat16
    assert runtime.sampling_dtype("float32", "cuda", "flux") == torch.float32
    assert runtime.sampling_dtype("float16", "cuda", "sd3") == torch.float16  # the other families may take it
    for fp16 in ("float16", "fp16", torch.float16):
        with pytest.raises(UsageError, match="bfloat16") as refused:
            runtime.sampling_dtype(fp16, "cuda", flux.family)
        assert "\n" not in str(refused.value)
    # the settings stored beside the images name the dtype the pipeline is loaded in
    prompt_set = ev.PromptSet("file:p", "p", ["a red circle"])
    assert ev.sampling_settings(flux, prompt_set, dtype=runtime.sampling_dtype("auto", "cuda", "flux"))["dtype"] \
        == "bfloat16"
    # eval.py refuses an explicit float16 for FLUX in one line, before its output folder is made
    out = tmp_path / "out"
    msg = _cli_error(capsys, ["--model", tiny.tiny_pipeline_dir("flux"), "--prompts", _prompt_file(tmp_path / "p.txt"),
                              "--rewards", "toy_fidelity", "--dtype", "float16", "--device", "cpu",
                              "--output_dir", str(out)])
    assert msg.startswith("error: --dtype float16 for a flux model") and "bfloat16" in msg
    assert not out.exists()


class RecordingLoader:
    """Wraps eval.load_pipeline to record the keyword arguments of every sampling call."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, model, device, dtype):
        pipe, calls = self.real(model, device, dtype), self.calls

        def call(*args, **kwargs):
            calls.append(kwargs)
            return pipe(*args, **kwargs)
        return call


def test_flux_dev_and_schnell_sample_with_their_model_cards_settings(tmp_path, monkeypatch):
    """FLUX.1-dev: 50 steps, guidance 3.5, 512 T5 tokens; FLUX.1-schnell: 4 steps, guidance 0, 256 T5 tokens. A
    FLUX model is schnell by its transformer's config (no guidance embeddings), not by its name; each flag
    overrides."""
    dev_dir = tiny.tiny_pipeline_dir("flux")
    schnell_dir = tiny.build_tiny_flux(tmp_path / "any-name", guidance_embeds=False)
    dev, schnell = ev.model_ref(f"dev={dev_dir}"), ev.model_ref(f"schnell={schnell_dir}")
    prompt_set = ev.PromptSet("file:p", "p", ["a red circle"])

    def picked(settings):
        return (settings["steps"], settings["guidance_scale"], settings["max_sequence_length"], settings["height"])
    assert picked(ev.sampling_settings(dev, prompt_set)) == (50, 3.5, 512, 1024)
    assert picked(ev.sampling_settings(schnell, prompt_set)) == (4, 0.0, 256, 1024)
    # a schnell transformer swapped into the dev pipeline samples as schnell: the transformer decides
    swapped = ev.model_ref(f"swapped={schnell_dir}@{dev_dir}")
    assert swapped.denoiser and picked(ev.sampling_settings(swapped, prompt_set)) == (4, 0.0, 256, 1024)
    assert picked(ev.sampling_settings(schnell, prompt_set, steps=2, guidance_scale=1.0, resolution=32,
                                       max_sequence_length=16)) == (2, 1.0, 16, 32)
    # ... and the pipeline is called with them
    loader = RecordingLoader(ev.load_pipeline)
    monkeypatch.setattr(ev, "load_pipeline", loader)
    prompts = _prompt_file(tmp_path / "p.txt")
    ev.evaluate(f"schnell={schnell_dir}", [], prompts, ["toy_fidelity"], tmp_path / "out", limit=1, num_seeds=1,
                resolution=32, device="cpu", progress=False, log=lambda s: None)
    ev.evaluate(f"dev={dev_dir}", [], prompts, ["toy_fidelity"], tmp_path / "out-dev", limit=1, num_seeds=1,
                steps=1, resolution=32, max_sequence_length=8, device="cpu", progress=False, log=lambda s: None)
    assert [(c["num_inference_steps"], c["guidance_scale"], c["max_sequence_length"]) for c in loader.calls] == \
        [(4, 0.0, 256), (1, 3.5, 8)]
    with pytest.raises(UsageError, match="max_sequence_length 513"):
        ev.evaluate(f"dev={dev_dir}", [], prompts, ["toy_fidelity"], tmp_path / "o", max_sequence_length=513,
                    device="cpu", progress=False, log=lambda s: None)


def test_a_unet_checkpoint_swapped_into_a_pipeline(models):
    """UNET@PIPELINE: how Diffusion-DPO's released UNet-only checkpoints are evaluated."""
    ref = ev.model_ref(f"mixed={models['model']}/unet@{models['base']}")
    assert (ref.family, ref.denoiser[1]) == ("sd15", None)
    assert ev.model_ref(f"mixed={models['model']}@{models['base']}").denoiser[1] == "unet"
    assert ref.tag != ev.model_ref(f"mixed={models['base']}").tag  # its own image folder
    pipe = ev.load_pipeline(ref, "cpu", torch.float32)
    trained = ev.load_pipeline(ev.model_ref(models["model"]), "cpu", torch.float32)
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), trained.unet.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(UsageError, match="not a unet checkpoint"):
        ev.model_ref(f"{models['base']}/scheduler@{models['base']}")


def test_hub_prompt_sets_are_kept_in_the_output_folder_for_offline_reruns(tmp_path, models):
    """A hub set (here hpsv2, as a previous online run would have saved it) reloads from OUT/prompts.json."""
    import json

    out = tmp_path / "out"
    out.mkdir()
    styles = {"anime": ["a red circle", "a blue square"], "photo": ["a green triangle", "a big red circle"]}
    (out / "prompts.json").write_text(json.dumps({
        "name": "hpsv2", "prompts": sum(styles.values(), []), "groups": [s for s in styles for _ in styles[s]]}))
    result = ev.evaluate(models["base"], [], "hpsv2", ["toy_fidelity"], out, limit=1, steps=2, resolution=32,
                         device="cpu", progress=False, log=lambda s: None)
    assert [(r["prompt_idx"], r["group"]) for r in result.rows] == [(0, "anime"), (2, "photo")]  # first of each style
    assert set(result.summary["mean_scores_by_group"]) == {"anime", "photo"}


def sample(pipe):
    return pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_a_lora_trained_here_is_evaluated_on_the_base_its_folder_names(tmp_path):
    from offline import tiny
    import train_sd15

    base = tiny.tiny_pipeline_dir("sd15")
    train_sd15.main(["--tiny", "--pretrained_model", base, "--dataset", tiny.builtin_pairs(), "--max_steps", "2",
                     "--lora_rank", "4", "--learning_rate", "1e-2", "--output_dir", str(tmp_path), "--no-plot"])
    ref = ev.model_ref(f"ours={tmp_path / 'final_lora'}")  # base_model.json names the base: no @ needed
    assert ref.lora and ref.family == "sd15" and ref.source == base
    plain = ev.model_ref(f"base={base}")
    assert ref.tag != plain.tag  # other images, other folder
    assert abs(sample(ev.load_pipeline(ref, "cpu", torch.float32)) -
               sample(ev.load_pipeline(plain, "cpu", torch.float32))).max() > 1e-4


def test_a_lora_saved_as_diffusers_dpo_script_saves_it_is_evaluated_as_lora_at_base(tmp_path):
    """train_diffusion_dpo.py: LoraConfig(r, lora_alpha=r, gaussian init, to_k/q/v/out.0), then
    StableDiffusionPipeline.save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(...))."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = tiny.tiny_pipeline_dir("sd15")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))  # a trained, non-zero adapter
    folder = tmp_path / "diffusion-dpo"
    StableDiffusionPipeline.save_lora_weights(save_directory=str(folder), text_encoder_lora_layers=None,
                                              unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    with pytest.raises(UsageError, match="@PIPELINE"):
        ev.model_ref(str(folder))
    ref = ev.model_ref(f"dpo-lora={folder}@{base}")
    assert ref.lora == str(folder) and ref.family == "sd15"
    expected = StableDiffusionPipeline.from_pretrained(base)
    expected.load_lora_weights(str(folder))
    got = sample(ev.load_pipeline(ref, "cpu", torch.float32))
    assert abs(got - sample(expected)).max() < 1e-5
    assert abs(got - sample(StableDiffusionPipeline.from_pretrained(base))).max() > 1e-4


def test_win_rate_interval_resamples_prompts_and_says_whether_50_is_inside():
    sure = {(p, s): 1.0 for p in range(20) for s in range(2)}
    worse = {k: 0.0 for k in sure}
    assert ev.win_rate_interval(sure, worse) == (1.0, 1.0)
    half = {(p, s): float(p % 2) for p in range(40) for s in range(3)}  # prompt by prompt: win, lose, ...
    zeros = {k: 0.5 for k in half}
    low, high = ev.win_rate_interval(half, zeros)
    assert low < 0.5 < high and high - low < 0.4
    summary = {"model": "ours", "prompt_set": {"num_prompts": 40},
               "win_rates_percent": {"base": {"r": 100.0}, "even": {"r": 50.0}},
               "win_rate_intervals_percent": {"base": {"r": [97.0, 100.0]}, "even": {"r": [35.0, 65.0]}}}
    lines = ev.verdicts(summary)
    assert "ours wins more often" in lines[0] and "not distinguishable from 50 %" in lines[1]


# The image store knows the weights it was made with


def test_images_of_other_weights_are_refused_and_the_store_keeps_its_weights_key(tmp_path):
    """settings.json records weights_version (checkpoints.base_model_identity of the folder) under its old key
    "weights"; overwriting the weights (a new run into the same folder) changes it, and the stored images are then
    refused, not scored as the new model's."""
    import json

    model = tmp_path / "model"
    shutil.copytree(tiny.tiny_pipeline_dir("sd15"), model)
    prompts, out = _prompt_file(tmp_path / "p.txt"), tmp_path / "out"
    kwargs = dict(limit=1, steps=2, resolution=32, device="cpu", progress=False, log=lambda s: None)
    ev.evaluate(f"m={model}", [], prompts, ["toy_fidelity"], out, **kwargs)
    ref = ev.model_ref(f"m={model}")
    assert ref.weights_version == base_model_identity(str(model)) and len(ref.weights_version) == 16
    stored = json.loads((out / "images" / ref.tag / "settings.json").read_text())
    assert stored["weights"] == ref.weights_version and "fingerprint" not in stored
    weights = next((model / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # rewritten: one weight's last bit differs, same size
    weights.write_bytes(bytes(data))
    assert ev.model_ref(f"m={model}").weights_version != ref.weights_version
    with pytest.raises(UsageError, match=r"other settings \(weights '"):
        ev.evaluate(f"m={model}", [], prompts, ["toy_fidelity"], out, **kwargs)


# The steps of evaluate, run one by one, give what evaluate gives


def test_evaluate_is_its_steps(tmp_path, models):
    prompts = _prompt_file(tmp_path / "p.txt")
    specs = [f"ours={models['model']}", f"base={models['base']}"]
    kwargs = dict(num_seeds=2, distinct_seeds=True, steps=2, resolution=32, batch_size=3, device="cpu",
                  progress=False, log=lambda s: None)
    whole = ev.evaluate(specs[0], specs[1:], prompts, ["toy_fidelity", "toy_label"], tmp_path / "whole", **kwargs)

    out = tmp_path / "steps"
    rewards = ev.check_rewards("toy_fidelity, toy_label")
    models_ = ev.model_refs(specs[0], specs[1:])
    with ev.output_lock(out):
        work = ev.choose_keys(prompts, out, None, 2, True)
        assert work.keys == [(0, 0), (0, 1), (1, 2), (1, 3)]  # distinct seeds: prompt i takes i·2, i·2 + 1
        images = ev.sample_models(models_, work, out, 2, None, 32, "cpu", torch.float32, 3, False, lambda s: None)
        scores, info = ev.score_images(models_, images, work, rewards, "cpu", 16, False)
        summary = ev.summarise(models_, work, images, scores, info, "cpu", 0.0, 0.0)
        rows = ev.score_rows(models_, work, images, scores, out)
    assert scores == whole.scores and rows == whole.rows
    for key in ("mean_scores", "win_rates_percent", "win_rate_intervals_percent", "prompt_set", "rewards"):
        assert summary[key] == whole.summary[key], key
    assert ev.markdown_table(summary).split("Sampling:")[0] == whole.table.split("Sampling:")[0]
    # The win rate in the table is the share of same-seed pairs that the model wins, ties half.
    pairs = [(scores["toy_label"]["ours"][k], scores["toy_label"]["base"][k]) for k in work.keys]
    expected = 100 * sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert whole.summary["win_rates_percent"]["base"]["toy_label"] == pytest.approx(expected)


# Entry points: unreadable inputs, a busy output folder


def test_unreadable_inputs_give_one_line_errors(tmp_path, capsys, models):
    base = models["base"]
    prompts = _prompt_file(tmp_path / "p.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a red circle\ncaf\xe9 au lait\n".encode("latin-1"))
    msg = _cli_error(capsys, ["--model", base, "--prompts", str(latin1), "--rewards", "toy_fidelity",
                              "--output_dir", str(tmp_path / "o")])
    assert "is not UTF-8 text (line 2" in msg
    msg = _cli_error(capsys, ["--model", base, "--prompts", str(tmp_path), "--rewards", "toy_fidelity",
                              "--output_dir", str(tmp_path / "o")])
    assert "is a folder, not a text file" in msg
    # A folder whose model_index.json is damaged, or that lacks a component: not a pipeline.
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "model_index.json").write_bytes(b'{"_class_name": "StableDiff')
    msg = _cli_error(capsys, ["--model", str(broken), "--prompts", prompts, "--rewards", "toy_fidelity"])
    assert "model_index.json is not valid JSON" in msg
    shutil.copy(Path(base) / "model_index.json", broken / "model_index.json")
    shutil.rmtree(broken / "unet")
    msg = _cli_error(capsys, ["--model", str(broken), "--prompts", prompts, "--rewards", "toy_fidelity",
                              "--output_dir", str(tmp_path / "o4")])
    assert msg.startswith(f"error: cannot load pipeline '{broken}'")
    assert not list((tmp_path / "o4").rglob("*.png"))
    # A LoRA folder whose base_model.json names no pipeline.
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (lora / "base_model.json").write_text("{}")
    msg = _cli_error(capsys, ["--model", str(lora), "--prompts", prompts, "--rewards", "toy_fidelity"])
    assert "names no base pipeline" in msg and "@PIPELINE" in msg
    # The output folder is a file.
    afile = tmp_path / "afile"
    afile.write_text("x")
    msg = _cli_error(capsys, ["--model", base, "--prompts", prompts, "--rewards", "toy_fidelity",
                              "--output_dir", str(afile)])
    assert f"--output_dir {afile} is a file" in msg
    assert _cli_error(capsys, ["--tiny", "--output_dir", str(afile)]).endswith("is a file, not a folder")
    # A damaged settings.json in an image folder: refused, with what to delete.
    out = tmp_path / "o5"
    argv = ["--model", base, "--prompts", prompts, "--rewards", "toy_fidelity", "--limit", "1", "--steps", "2",
            "--resolution", "32", "--device", "cpu", "--quiet", "--output_dir", str(out)]
    assert ev.main(argv) == 0
    settings = next((out / "images").glob("*/settings.json"))
    settings.write_text('{"steps": 2,')
    msg = _cli_error(capsys, argv)
    assert f"{settings} is not valid JSON" in msg and f"delete {settings.parent}" in msg
    # A damaged copy of a hub prompt set is set aside (here, offline, the set then cannot be loaded at all).
    (out / "prompts.json").write_text("[1, 2")
    msg = _cli_error(capsys, ["--model", base, "--prompts", "hpsv2", "--rewards", "toy_fidelity",
                              "--output_dir", str(out)])
    assert "cannot load prompt set 'hpsv2'" in msg


def test_a_second_run_into_a_busy_output_folder_is_refused_at_once(tmp_path, capsys, models, monkeypatch):
    import fcntl

    prompts = _prompt_file(tmp_path / "p.txt")
    out = tmp_path / "out"
    argv = ["--model", models["base"], "--prompts", prompts, "--rewards", "toy_fidelity", "--limit", "1",
            "--steps", "2", "--resolution", "32", "--device", "cpu", "--quiet", "--output_dir", str(out)]
    loader = CountingLoader(ev.load_pipeline)
    monkeypatch.setattr(ev, "load_pipeline", loader)
    with ev.output_lock(out):  # another run holds the folder (an flock conflicts across open files, same process too)
        assert (out / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        msg = _cli_error(capsys, argv)
        assert msg == (f"error: --output_dir {out} is in use by another run (pid {os.getpid()} on "
                       f"{socket.gethostname()}); wait for it, or choose another folder")
        assert loader.loads == 0 and not (out / "images").exists()

    # While a run evaluates, the folder is locked; afterwards it is free again.
    held = []

    def log(message):
        with open(out / ".lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except OSError:
                held.append(True)

    ev.evaluate(models["base"], [], prompts, ["toy_fidelity"], out, limit=1, steps=2, resolution=32, device="cpu",
                progress=False, log=log)
    assert held and all(held) and loader.loads == 1
    assert ev.main(argv) == 0


def test_a_full_disk_while_storing_images_is_one_line_with_exit_code_4(tmp_path, capsys, models, monkeypatch):
    """No space left while an image is written: one `error:` line naming the image folder, exit code 4 (as the
    trainers' DiskFull), nothing half written left beside the images, and the images stored before are kept."""
    import builtins
    import errno

    from mechanics import folder

    prompts = _prompt_file(tmp_path / "p.txt")
    out = tmp_path / "out"
    argv = ["--model", f"base={models['base']}", "--prompts", prompts, "--rewards", "toy_fidelity",
            "--num_seeds", "2", "--batch_size", "1", "--steps", "2", "--resolution", "32", "--device", "cpu",
            "--quiet", "--output_dir", str(out)]
    images = []

    class FullDisk:  # the disk fills up a few bytes into the file
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:4])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_on_the_third_image(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if ".png.tmp-" in str(path):
            images.append(path)
            if len(images) == 3:
                return FullDisk(f)
        return f

    monkeypatch.setattr(folder, "open", full_on_the_third_image, raising=False)  # folder.write_bytes' open
    rc = ev.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    store = out / "images" / ev.model_ref(f"base={models['base']}").tag
    assert rc == 4 and len(images) == 3
    assert err[-1].startswith(f"error: no space left on the device for {store / '00001_0.png'}: ")
    assert f"free in {store}; free some space, then run the same command again" in err[-1]
    assert [line for line in err if line.startswith("error:")] == err[-1:] and "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in store.iterdir()) == ["00000_0.png", "00000_1.png", "settings.json"]
    monkeypatch.undo()
    assert ev.main(argv) == 0 and len(list(store.glob("*.png"))) == 4


# Resume: a run killed mid-way, rerun, gives the numbers of a run never interrupted

_KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import eval as ev
import rewards as rw

where, after = sys.argv[1], int(sys.argv[2])
count = 0

def tick():
    global count
    count += 1
    return count == after

if where == "sampling":  # SIGKILL while an image is half written beside its final name (folder.write_bytes')
    save = ev._save_image_atomic
    def saving(image, path, prompt, seed):
        if tick():
            with open(f"{path}.tmp-{os.getpid()}", "wb") as f:
                f.write(b"\\x89PNG\\r\\n")
            os.kill(os.getpid(), signal.SIGKILL)
        save(image, path, prompt, seed)
    ev._save_image_atomic = saving
else:  # SIGKILL in the middle of the scoring (the second reward)
    build = rw.build_reward
    def building(spec, **kwargs):
        reward = build(spec, **kwargs)
        score = reward.score
        def scoring(images, prompts):
            if tick():
                os.kill(os.getpid(), signal.SIGKILL)
            return score(images, prompts)
        reward.score = scoring
        return reward
    rw.build_reward = building
sys.exit(ev.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where, after", [("sampling", 9), ("scoring", 2)])
def test_a_run_killed_mid_way_resumes_to_the_numbers_of_an_uninterrupted_run(where, after, tmp_path, models):
    import csv
    import json
    import signal
    import subprocess
    import sys

    prompts = _prompt_file(tmp_path / "p.txt")
    rewards = ["toy_fidelity", "toy_label"]
    settings = dict(num_seeds=3, distinct_seeds=True, steps=2, resolution=32, batch_size=4, device="cpu")
    specs = [f"ours={models['model']}", f"base={models['base']}"]
    quiet = dict(progress=False, log=lambda s: None)
    whole = ev.evaluate(specs[0], specs[1:], prompts, rewards, tmp_path / "whole", **settings, **quiet)

    out = tmp_path / "killed"
    argv = ["--model", specs[0], "--baseline", specs[1], "--prompts", prompts, "--rewards", ",".join(rewards),
            "--num_seeds", "3", "--distinct_seeds", "--steps", "2", "--resolution", "32", "--batch_size", "4",
            "--device", "cpu", "--quiet", "--output_dir", str(out)]
    root = Path(ev.__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, where, str(after), *argv], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert not (out / "summary.json").exists()
    stores = [out / "images" / ev.model_ref(spec).tag for spec in specs]
    if where == "sampling":  # ours' 6 images stored, then 2 of the baseline's, and a third half written aside
        assert [len(list(store.glob("*.png"))) for store in stores] == [6, 2]
        assert len(list(stores[1].glob("*.png.tmp-*"))) == 1
    else:
        assert len(list((out / "images").rglob("*.png"))) == 12
    # The dead run's name stays in the lock file, but its lock died with it: the rerun is not refused.
    assert (out / ".lock").read_text() == f"pid {proc.pid} on {socket.gethostname()}\n"

    again = ev.evaluate(specs[0], specs[1:], prompts, rewards, out, **settings, **quiet)
    # The baseline's 4 missing images are sampled in the batches of the uninterrupted run, [k0 … k3] and
    # [k4, k5]: one batch [k2 … k5] would round k4 and k5 differently (this tiny UNet: by one pixel level).
    expected = {"sampling": {"ours": 0, "base": 4}, "scoring": {"ours": 0, "base": 0}}[where]
    assert again.generated == expected
    assert not list(out.rglob("*.tmp-*"))  # the half-written file is gone
    for key in ("mean_scores", "win_rates_percent", "win_rate_intervals_percent"):
        assert again.summary[key] == whole.summary[key], key
    assert again.scores == whole.scores
    with open(out / "scores.csv") as a, open(tmp_path / "whole" / "scores.csv") as b:
        assert list(csv.reader(a)) == list(csv.reader(b))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["win_rates_percent"] == whole.summary["win_rates_percent"]
    for m in ("ours", "base"):
        for path in sorted((Path(whole.summary["models"][m]["images"])).glob("*.png")):
            resumed = Path(again.summary["models"][m]["images"]) / path.name
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(resumed))), resumed
