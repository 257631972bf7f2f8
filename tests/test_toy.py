"""The toy world (toy.py), its rewards, the committed toy base model (toy_model/) and pair-making."""
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from offline import toy
TOY_MODEL = str(toy.TOY_MODEL)


def test_world_is_deterministic_and_captions_match_specs():
    a, b = toy.sample_specs(50, seed=3), toy.sample_specs(50, seed=3)
    assert a == b
    assert all(toy.render(x).tobytes() == toy.render(y).tobytes() for x, y in zip(a, b))
    assert toy.sample_specs(50, seed=4) != a
    for spec in a:
        words = toy.parse_caption(spec.caption)
        assert (words["colour"], words["shape"], words["position"], words["size"]) == (
            spec.colour, spec.shape, spec.position, spec.size)
        lo, hi = toy.RADIUS_RANGE[spec.size]
        assert lo <= spec.r <= hi and spec.r <= spec.cx <= toy.SIZE - spec.r and spec.r <= spec.cy <= toy.SIZE - spec.r
        centre = {"left": spec.cx, "right": toy.SIZE - spec.cx, "top": spec.cy, "bottom": toy.SIZE - spec.cy}
        if spec.position:
            assert centre[spec.position] < toy.SIZE / 2
        img = np.asarray(toy.render(spec))
        assert img.shape == (32, 32, 3)
        assert (img == toy.COLOURS[spec.colour]).all(axis=-1).sum() > 20  # the named colour is drawn
    assert toy.caption_for("red", "circle", "left", "big") == "a big red circle on the left"


def test_defect_modes_are_a_caption_blind_mixture_that_every_reward_penalises():
    specs = toy.sample_specs(400, seed=11)
    mixed = toy.with_defects(specs, seed=11)
    assert mixed == toy.with_defects(specs, seed=11) and mixed != toy.with_defects(specs, seed=12)
    assert [m.caption for m in mixed] == [s.caption for s in specs]  # the caption never says which
    kinds = [m.defect for m in mixed]
    assert 0.42 < sum(k is not None for k in kinds) / len(kinds) < 0.58  # DEFECT_RATE 0.5, ±4 standard errors
    assert {k for k in kinds if k} == set(toy.DEFECTS)
    assert all(m.defect is None for m in toy.with_defects(specs, seed=11, rate=0.0))
    captions = [s.caption for s in specs[:120]]
    clean = toy.label_reward([toy.render(s) for s in specs[:120]], captions)
    assert np.mean(clean) > 0.95
    from dataclasses import replace

    for defect, component, floor in (("tint", toy.aesthetic, 0.3), ("clutter", toy.fidelity, 0.15),
                                     ("blur", toy.aesthetic, 0.15)):
        flawed = [toy.render(replace(s, defect=defect, defect_seed=i)) for i, s in enumerate(specs[:120])]
        drop = np.array(component([toy.render(s) for s in specs[:120]], captions)) - np.array(component(flawed, captions))
        assert drop.mean() > floor, (defect, drop.mean())  # each defect costs its reward a clear margin
        assert np.mean(toy.label_reward(flawed, captions)) < np.mean(clean) - 0.08
    tinted = np.asarray(toy.render(replace(specs[0], defect="tint", defect_seed=3)), np.int64)
    assert tuple(tinted[0, 0]) in toy.TINTS  # the corner is background, tinted
    with pytest.raises(ValueError, match="unknown defect"):
        toy.render(replace(specs[0], defect="smudge"))


def test_prompt_split_is_disjoint_and_covers_the_world():
    assert len(toy.ALL_PROMPTS) == 270 == len(set(toy.ALL_PROMPTS))
    splits = (toy.EVAL_PROMPTS, toy.CALIBRATION_PROMPTS, toy.PAIR_PROMPTS)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(splits) for b in splits[i + 1:])
    assert sorted(toy.EVAL_PROMPTS + toy.CALIBRATION_PROMPTS + toy.PAIR_PROMPTS) == sorted(toy.ALL_PROMPTS)
    assert (len(toy.EVAL_PROMPTS), len(toy.CALIBRATION_PROMPTS)) == (54, 27)
    assert set(toy.pair_prompts(200, seed=0)) <= set(toy.PAIR_PROMPTS)


def _score(name, spec, caption):
    return toy.TOY_REWARDS[name]([toy.render(spec)], [caption])[0]


def test_rewards_rank_correct_rendering_above_wrong_ones():
    cap = "a red circle"
    good = toy.ToySpec("red", "circle", cx=16, cy=16, r=8)
    wrong_colour = toy.ToySpec("blue", "circle", cx=16, cy=16, r=8)
    wrong_shape = toy.ToySpec("red", "square", cx=16, cy=16, r=8)
    off_centre = toy.ToySpec("red", "circle", cx=7, cy=8, r=5)
    fid = {k: _score("toy_fidelity", s, cap) for k, s in
           [("good", good), ("colour", wrong_colour), ("shape", wrong_shape), ("off", off_centre)]}
    aes = {k: _score("toy_aesthetic", s, cap) for k, s in [("good", good), ("off", off_centre)]}
    lab = {k: _score("toy_label", s, cap) for k, s in
           [("good", good), ("colour", wrong_colour), ("shape", wrong_shape), ("off", off_centre)]}
    # Fidelity judges what the caption says: colour and shape, not composition.
    assert fid["good"] > 0.95 and fid["colour"] < 0.55 and fid["shape"] < 0.55
    assert fid["off"] > 0.95
    # Aesthetic judges the picture: the off-centre, small circle is worse.
    assert aes["good"] > 0.95 and aes["off"] < 0.8
    # The labelling mix prefers the correct rendering to every wrong one.
    assert all(lab["good"] > lab[k] + 0.1 for k in ("colour", "shape", "off"))

    # A named position or size is the caption's business (fidelity), and no longer the aesthetic's.
    left = toy.ToySpec("green", "triangle", "left", None, cx=8, cy=16, r=6)
    right = toy.ToySpec("green", "triangle", "left", None, cx=24, cy=16, r=6)
    assert _score("toy_fidelity", left, left.caption) > 0.95 > 0.7 > _score("toy_fidelity", right, left.caption)
    assert _score("toy_aesthetic", left, left.caption) == pytest.approx(_score("toy_aesthetic", right, left.caption))
    small = toy.ToySpec("yellow", "square", None, "small", r=5)
    assert _score("toy_fidelity", small, "a small yellow square") > 0.95 > 0.7 > _score(
        "toy_fidelity", small, "a big yellow square")

    # Blur and stray marks cost aesthetic, not fidelity.
    img = toy.render(good)
    blurred = img.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(img).copy()
    noisy[np.random.default_rng(0).random((32, 32)) < 0.1] = (90, 90, 90)
    aes_blur, aes_noise = toy.aesthetic([blurred, Image.fromarray(noisy)], [cap, cap])
    assert aes["good"] - aes_blur > 0.05 and aes["good"] - aes_noise > 0.05
    assert toy.fidelity([blurred], [cap])[0] > 0.9
    # No object at all scores zero.
    blank = Image.new("RGB", (32, 32), toy.BACKGROUND)
    assert toy.fidelity([blank], [cap]) == [0.0] and toy.aesthetic([blank], [cap]) == [0.0]


def test_rewards_reject_captions_outside_the_world():
    with pytest.raises(ValueError, match="toy-world caption"):
        toy.fidelity([toy.render(toy.ToySpec("red", "circle"))], ["a photo of a cat"])


def test_bradley_terry_labels_agree_with_the_reward_mostly():
    rng = np.random.default_rng(0)
    r0, r1 = rng.random(4000), rng.random(4000)
    labels = toy.bt_labels(r0, r1, temperature=0.1, rng=np.random.default_rng(1))
    agree = ((labels == 1.0) == (r0 > r1)).mean()
    assert 0.7 < agree < 0.95
    assert ((toy.bt_labels(r0, r1, 1e-6, np.random.default_rng(1)) == 1.0) == (r0 > r1)).all()


@pytest.fixture(scope="module")
def toy_pipe():
    return toy.load_pipeline(TOY_MODEL)


def test_toy_model_loads_with_from_pretrained_and_samples_32px(toy_pipe):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    out = pipe(["a red circle", "a big blue square on the left"], num_inference_steps=4, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    total = sum(f.stat().st_size for f in Path(TOY_MODEL).rglob("*") if f.is_file())
    assert total < 5 * 2**20


def test_pretraining_beats_random_init_on_held_out_prompts(toy_pipe):
    from offline import tiny
    prompts = toy.EVAL_PROMPTS[:8]
    seeds = list(range(len(prompts)))
    random_pipe = toy.load_pipeline(tiny.tiny_pipeline_dir("sd15"))
    base = np.mean(toy.fidelity(toy.sample(toy_pipe, prompts, seeds, num_inference_steps=10), prompts))
    rand = np.mean(toy.fidelity(toy.sample(random_pipe, prompts, seeds, num_inference_steps=10), prompts))
    # 0.60 against 0.31 here; the mixture base's stray shapes (a quarter of its pretraining pictures) cost it
    # some fidelity by design, and a random tiny pipeline draws no recognisable object.
    assert base > rand + 0.2, (base, rand)


def test_pairs_are_pickapic_rows_labelled_with_noise(toy_pipe, tmp_path):
    prompts = toy.pair_prompts(48, seed=0)
    cols, stats = toy.make_pairs(toy_pipe, prompts, seed=0, num_inference_steps=8)
    path = tmp_path / "pairs.parquet"
    toy.write_parquet(cols, str(path))
    table = pq.read_table(path).to_pylist()
    assert len(table) == 48
    for row, prompt in zip(table, prompts):
        assert row["caption"] == prompt and prompt not in toy.EVAL_PROMPTS
        assert (row["label_0"], row["label_1"]) in [(1.0, 0.0), (0.0, 1.0)]
        for k in ("jpg_0", "jpg_1"):
            img = Image.open(io.BytesIO(row[k]))
            assert img.format == "PNG" and img.size == (32, 32)
    # Seeded: the same call gives the same rows.
    again, _ = toy.make_pairs(toy_pipe, prompts[:4], seed=0, num_inference_steps=8)
    pixels = lambda blobs: np.stack([np.asarray(Image.open(io.BytesIO(b)), np.int16) for b in blobs])
    # Another batch size rounds the UNet's matmuls differently: equal up to a pixel level or two.
    assert np.abs(pixels(again["jpg_0"]) - pixels(cols["jpg_0"][:4])).max() <= 2
    assert again["label_0"] == cols["label_0"][:4]
    # Labels follow the reward more often than chance, but not always (as human labels do).
    agree = np.mean([(r["label_0"] == 1.0) == (r["reward_0"] > r["reward_1"]) for r in table])
    assert 0.5 < agree < 1.0 and stats["agreement"] == pytest.approx(agree)


def test_cached_pairs_are_made_once_per_model(tmp_path):
    import os
    import shutil

    first = toy.cached_pairs(TOY_MODEL, num_pairs=4, seed=0, progress=False)
    assert Path(os.environ["RDPO_CACHE"]) in first.parents and pq.read_table(first).num_rows == 4
    stamp = first.stat().st_mtime_ns
    assert toy.cached_pairs(TOY_MODEL, num_pairs=4, seed=0, progress=False) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not sampled again
    # Other weights, other pairs: a retrained model never reads the old model's pairs.
    copy = tmp_path / "model"
    shutil.copytree(TOY_MODEL, copy)
    assert toy.pairs_key(copy) == toy.pairs_key(TOY_MODEL)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"beta_end": 0.012', '"beta_end": 0.013'))
    assert toy.pairs_key(copy) != toy.pairs_key(TOY_MODEL)


def test_tiny_demo_trains_the_toy_model_and_reports_what_eval_py_reports(tmp_path, monkeypatch, capsys):
    import json
    import math
    import os

    from diffusers import UNet2DConditionModel

    import eval as ev
    import train_sd15

    monkeypatch.setattr(train_sd15, "TOY_DEMO_PAIRS", 8)  # the demo samples 1000; the mechanics are the same
    train_sd15.main(["--tiny", "--max_steps", "2", "--output_dir", str(tmp_path), "--train_batch_size", "2",
                     "--effective_batch_size", "2"])
    report = capsys.readouterr().out.split("held-out comparison")[1]
    summary = json.loads((tmp_path / "heldout" / "summary.json").read_text())
    base, trained = (summary["mean_scores"][k]["toy_label"] for k in ("toy-base", "trained"))
    assert f"mean toy_label     {base:.4f} (toy base) → {trained:.4f} (trained)" in report
    rate, (low, high) = summary["win_rates_percent"]["toy-base"]["toy_label"], \
        summary["win_rate_intervals_percent"]["toy-base"]["toy_label"]
    assert f"trained vs toy-base, toy_label: {rate:.1f} % [{low:.1f}, {high:.1f}]" in report
    assert summary["prompt_set"]["num_prompts"] == 54 and summary["prompt_set"]["num_pairs"] == 108
    grid = Image.open(tmp_path / "heldout" / "side_by_side.png")
    # 16 pairs, 4 to a row, 4 px gaps, ×3; above them the header ("toy-base | trained"), under each pair its prompt
    assert grid.width == 3 * (4 * 64 + 3 * 4) and grid.height > 3 * (4 * 32 + 3 * 4) + 4 * 20
    # `eval.py --tiny --model` recomputes the demo's comparison and must print the same numbers.
    assert ev.main(["--tiny", "--model", str(tmp_path / "final"), "--output_dir", str(tmp_path / "eval"), "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert again["win_rates_percent"]["toy-base"] == summary["win_rates_percent"]["toy-base"]
    assert list(again["mean_scores"].values()) == list(summary["mean_scores"].values())
    pairs = list(Path(os.environ["RDPO_CACHE"]).glob("toy-pairs-*-pair-n8-s0.parquet"))
    assert len(pairs) == 1 and pq.read_table(pairs[0]).num_rows == 8
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]  # the step-0 line holds the base model's held-out score, no loss
    assert log[0]["step"] == 0 and "heldout_win_rate" in log[0]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "final", subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(TOY_MODEL, subfolder="unet").state_dict()
    assert trained.keys() == base.keys()
    change = max((trained[k] - base[k]).abs().max().item() for k in base)
    assert 0 < change < 0.01  # two small steps away from the toy model, not from a random tiny one
    # The demo extended with --resume latest, and run again with --overwrite: its own heldout/ is made anew.
    assert train_sd15.main(["--tiny", "--max_steps", "3", "--output_dir", str(tmp_path), "--train_batch_size", "2",
                            "--effective_batch_size", "2", "--resume", "latest"]) == 0
    extended = json.loads((tmp_path / "heldout" / "summary.json").read_text())
    assert "held-out comparison" in capsys.readouterr().out and extended["mean_scores"]["trained"] != \
        summary["mean_scores"]["trained"]
    from types import SimpleNamespace

    from mechanics import folder
    folder.prepare_output(SimpleNamespace(output_dir=str(tmp_path), overwrite=True, resume=None), is_main=True)
    folder.release()
    assert not (tmp_path / "heldout").exists() and not (tmp_path / "final").exists()  # --overwrite: all of it
