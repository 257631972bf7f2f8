"""What a run shows at its end: the report, the curves (plot.py, one run or several), a first screen without
library noise, and the optional experiment trackers. Tiny SD1.5, offline."""
import importlib.machinery
import subprocess
import sys
import types

import pytest
from PIL import Image

import plot
import train_sd15
from helpers import ROOT, read_log, run_sd15 as run, sd15_flags


def test_a_run_ends_with_its_report_and_a_png_of_its_curves(tmp_path, capsys):
    run(tmp_path, "--max_steps", 8, "--tau", 2, "--delta", 1e-6, "--learning_rate", 1e-3, "--bin_stats_every", 4,
        "--checkpoint_every", 1000)
    out = capsys.readouterr().out
    log = read_log(tmp_path)
    frozen = next(r for r in log if r.get("ref_frozen"))
    for line in ("implicit accuracy", "reward margin", f"frozen at step {frozen['step']}", "skipped           0 row(s)",
                 f"curves: {tmp_path / 'curves.png'}", f"model: {tmp_path / 'final'}",
                 f"python eval.py --tiny --model {tmp_path / 'final'} --baseline base="):
        assert line in out, line
    # Step 1 compares the policy with itself; then the first fifth (here step 2) and the last tenth (step 8).
    assert (f"implicit accuracy {log[0]['accuracy']:.3f} (step 1) → {log[1]['accuracy']:.3f} (step 2) → "
            f"{log[-1]['accuracy']:.3f} (last 1)") in out
    assert f"loss              {log[0]['loss']:.4f} (step 1) → {log[1]['loss']:.4f} (step 2)" in out
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 500
        assert len(set(im.convert("L").resize((64, 32)).getdata())) > 20  # something is drawn


def test_plot_draws_several_runs_and_seed_groups_on_one_figure(tmp_path):
    for name, tau in (("dpo", 0), ("ours", 2), ("ours2", 2)):
        run(tmp_path / name, "--max_steps", 4, "--tau", tau, "--bin_stats_every", 2, "--no-plot",
            "--checkpoint_every", 1000)
    out = plot.main([f"dpo={tmp_path / 'dpo'}", f"ours={tmp_path / 'ours'},{tmp_path / 'ours2'}",
                     "--out", str(tmp_path / "cmp.png")])
    with Image.open(out) as im:
        assert im.size[0] > 1000
    assert not (tmp_path / "dpo" / "curves.png").exists()  # --no-plot
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "dpo"), str(tmp_path / "ours")])  # several runs need --out
    profile = plot.bin_profile(read_log(tmp_path / "ours"), "bin_count")
    assert sum(x for x in profile if x == x) > 0


def test_the_first_screen_has_no_library_notices(tmp_path):
    result = subprocess.run([sys.executable, "train_sd15.py", *sd15_flags(), "--max_steps", "1", "--output_dir",
                             str(tmp_path), "--no-plot"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    screen = result.stdout + result.stderr
    for noise in ("torchvision", "Loading weights", "Loading pipeline components", "Writing model shards",
                  "Generating train split", "DataLoader will create"):
        assert noise not in screen, noise


def test_report_to_a_tracker_sends_the_log_and_a_missing_package_is_one_line(tmp_path, capsys, monkeypatch):
    code = train_sd15.main([*sd15_flags(), "--max_steps", "1", "--output_dir", str(tmp_path / "a"), "--report_to", "wandb"])
    assert code == 2 and "pip install wandb" in capsys.readouterr().err
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kwargs):
        calls.append(("init", kwargs["config"]["max_steps"], kwargs["project"], kwargs["name"], kwargs["id"],
                      kwargs["resume"]))
        return types.SimpleNamespace(id=kwargs["id"] or f"run-{len(calls)}")
    fake.init = init
    fake.log = lambda values, step: calls.append(("log", step, values["loss"]))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = run(tmp_path / "b", "--max_steps", 2, "--report_to", "wandb", "--no-plot", "--checkpoint_every", 1)
    assert calls == [("init", 2, "rethinking-dpo", "b", None, None), ("log", 1, log[0]["loss"]),
                     ("log", 2, log[1]["loss"]), ("finish",)]
    # Resumed, with its own project and name: the same wandb run goes on from step 3.
    calls.clear()
    log = run(tmp_path / "b", "--max_steps", 3, "--report_to", "wandb", "--no-plot", "--checkpoint_every", 1,
              "--resume", "latest", "--tracker_project", "mine", "--run_name", "dpo-3")
    assert calls == [("init", 3, "mine", "dpo-3", "run-1", "allow"), ("log", 3, log[2]["loss"]), ("finish",)]
