"""What a run shows while it trains (mechanics/samples.py): validation grids of fixed prompts and seeds from step 0
(the base model) on, in OUTPUT_DIR/samples/ and the tracker, and the held-out reward and win rate over the base
model in log.jsonl — without changing a single loss."""
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import train_sd15
import train_sdxl
from mechanics import samples
from helpers import main_or_exit, read_log, run_sd15

HELDOUT = ["--eval_every", 2, "--eval_reward", "toy_fidelity", "--eval_prompts", "toy", "--eval_limit", 6,
           "--sample_steps", 2]


def losses(log):
    return [(r["step"], r["loss"], r["accuracy"]) for r in log if "loss" in r]


def heldout(log):
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("heldout_")} for r in log
            if "heldout_win_rate" in r]


def test_the_toy_demo_samples_the_base_model_then_every_n_steps_and_logs_the_heldout_curve(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    monkeypatch.setattr(train_sd15, "TOY_DEMO_PAIRS", 8)  # the demo samples 1000; the mechanics are the same
    main_or_exit(train_sd15, ["--tiny", "--max_steps", "4", "--train_batch_size", "2", "--effective_batch_size", "2", "--validation_every", "2", "--eval_every", "2",
                              "--eval_limit", "12", "--output_dir", str(out)])
    grids = sorted(p.name for p in (out / "samples").glob("step-*.png"))
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]
    grid = Image.open(out / "samples" / "step-000004.png")
    # Four toy prompts (columns) × two images (rows) of 32 px, each enlarged to 128 px, with gaps of 4 px.
    assert grid.width == 4 * (128 + 4) + 4 and grid.height > 2 * (128 + 4)
    log = read_log(out)
    assert log[0]["step"] == 0 and "loss" not in log[0]  # the base model, before any step
    assert log[0]["heldout_win_rate"] == 0.5 and log[0]["heldout_reward"] == log[0]["heldout_base_reward"]
    points = heldout(log)
    assert [p["step"] for p in points] == [0, 2, 4]
    assert {p["heldout_reward_name"] for p in points} == {"toy_label"} and {p["heldout_prompts"] for p in points} == {12}
    assert len({p["heldout_base_reward"] for p in points}) == 1  # one base model, scored once
    for p in points:
        assert 0 <= p["heldout_win_low"] <= p["heldout_win_rate"] <= p["heldout_win_high"] <= 1
    assert (out / "curves.png").is_file()
    # The model card in final/: its header, the run's values, the held-out result and the last grid.
    card = (out / "final" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"].endswith("toy_model") and header["pipeline_tag"] == "text-to-image"
    last = points[-1]
    assert f"β = 100" in card and "τ = 20" in card and "--eval_every 2" in card
    assert f"win rate over the base {100 * last['heldout_win_rate']:.1f} %" in card
    assert (out / "final" / "validation.png").read_bytes() == (out / "samples" / "step-000004.png").read_bytes()
    assert json.loads((out / "final" / "run.json").read_text())["eval_limit"] == 12


def test_samples_and_heldout_scores_leave_every_loss_unchanged(tmp_path):
    plain = run_sd15(tmp_path / "plain", "--max_steps", 4, "--checkpoint_every", 100)
    watched = run_sd15(tmp_path / "watched", "--max_steps", 4, "--checkpoint_every", 100, "--validation_every", 2,
                       *HELDOUT)
    assert losses(watched) == losses(plain)
    assert [p["step"] for p in heldout(watched)] == [0, 2, 4]
    assert len(list((tmp_path / "watched" / "samples").glob("step-*.png"))) == 3


def test_a_resumed_run_reads_the_base_scores_back_and_logs_what_an_uninterrupted_run_logs(tmp_path):
    whole = run_sd15(tmp_path / "whole", "--max_steps", 4, "--checkpoint_every", 2, *HELDOUT)
    run_sd15(tmp_path / "cut", "--max_steps", 2, "--checkpoint_every", 2, *HELDOUT)
    resumed = run_sd15(tmp_path / "cut", "--max_steps", 4, "--checkpoint_every", 2, "--resume", "latest", *HELDOUT)
    assert heldout(resumed) == heldout(whole)
    # --eval_every turned on at a resume: no stored base scores, so the base model is sampled once more, from its
    # folder; its images are step 0's, and so are its scores.
    run_sd15(tmp_path / "late", "--max_steps", 2, "--checkpoint_every", 2)
    late = run_sd15(tmp_path / "late", "--max_steps", 4, "--checkpoint_every", 2, "--resume", "latest", *HELDOUT)
    assert heldout(late)[-1] == heldout(whole)[-1]


def test_sdxl_lora_validation_grids_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sdxl"
    main_or_exit(train_sdxl, ["--tiny", "--lora_rank", "4", "--max_steps", "5", "--checkpoint_every", "100",
                              "--validation_every", "5", "--report_to", "tensorboard", "--no-plot",
                              "--output_dir", str(out)])
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("validation")
    assert [image.step for image in images] == [0, 5]
    for image in images:
        sent = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(out / "samples" / f"step-{image.step:06d}.png").convert("RGB"))
        assert np.array_equal(sent, saved)
    header = yaml.safe_load((out / "final_lora" / "README.md").read_text().split("---")[1])
    assert header["base_model_relation"] == "adapter" and "lora" in header["tags"]


def test_a_prompt_file_sets_the_columns_and_a_bad_reward_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    run_sd15(tmp_path / "run", "--max_steps", 1, "--validation_every", 1, "--validation_prompts", prompts,
             "--validation_images", 1, "--sample_steps", 2)
    grid = Image.open(tmp_path / "run" / "samples" / "step-000001.png")
    assert grid.width == 3 * (128 + 4) + 4 and grid.height < 2 * (128 + 4) + 100  # three columns, one row
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_sd15(tmp_path / "bad", "--max_steps", 1, "--eval_every", 1, "--eval_reward", "pickscroe")
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error: --eval_reward pickscroe")


def test_the_grid_puts_each_prompt_under_its_column():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    grid = np.asarray(samples.draw_grid([[red, red, red], [blue, blue, blue]], ["a red one", "a blue one"], "step 7"))
    top, gap, tile = 24, 4, 128
    images_end = top + 3 * (tile + gap)
    assert grid.shape[1] == 2 * (tile + gap) + gap
    assert (grid[top + 10, gap + 10] == [255, 0, 0]).all() and (grid[top + 10, 2 * gap + tile + 10] == [0, 0, 255]).all()
    assert (grid[images_end:, :tile] < 128).any() and (grid[images_end:, tile + gap:] < 128).any()  # the captions
    assert (grid[:top, :] < 128).any()  # the title
    assert grid.shape[0] - images_end < 60  # two short captions: one line each
