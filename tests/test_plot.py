"""The entry points refuse what they cannot read in one `error:` line with exit code 2, and no traceback:
plot.py's run folders and logs (issue 23: a log of random bytes), and miniature/reproduce.py's file inputs.
A log's last line cut short by a kill is not an error: it is left out."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import plot
from helpers import ROOT


def records(n):
    return [{"step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.02 * s, "reward_margin": 0.1 * s,
             "note": "λ(t) — ok"} for s in range(1, n + 1)]


def write_run(folder, text: bytes, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_bytes(text)
    if config is not None:
        (folder / "run.json").write_text(json.dumps(config))
    return folder


def log_bytes(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_log_of_random_bytes_is_refused_in_one_line_not_a_traceback(tmp_path):
    run = write_run(tmp_path / "run", np.random.default_rng(0).bytes(4096))
    result = subprocess.run([sys.executable, "plot.py", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {run / 'log.jsonl'} line 1 of ")
    assert "is not UTF-8 text" in result.stderr and not (run / "curves.png").exists()


def test_a_last_line_cut_short_is_left_out_and_the_run_is_drawn(tmp_path):
    rows = records(6)
    whole = log_bytes(rows)
    # Killed while writing step 7: cut inside a two-byte character, so the torn line is not even UTF-8.
    seventh = json.dumps({"step": 7, "loss": 0.6, "note": "λ"}, ensure_ascii=False).encode()
    torn = seventh[: seventh.index("λ".encode()) + 1]
    run = write_run(tmp_path / "run", whole + torn)
    assert plot.read_log(run) == rows
    run2 = write_run(tmp_path / "run2", whole + b'{"step": 7, "lo\n')  # torn, then a newline: still the last line
    assert plot.read_log(run2) == rows
    out = plot.main([str(run)])
    assert out == str(run / "curves.png")
    with Image.open(out) as im:
        assert im.size[0] > 1000


def test_unreadable_runs_are_refused(tmp_path, capsys):
    good = write_run(tmp_path / "good", log_bytes(records(4)))
    assert refused(capsys, [tmp_path / "missing"]) == f"error: run folder {tmp_path / 'missing'} not found"
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a run folder" in refused(capsys, [tmp_path / "afile"])
    (tmp_path / "empty").mkdir()
    assert refused(capsys, [f"a={good},{tmp_path / 'empty'}", "--out", tmp_path / "x.png"]) == \
        f"error: {tmp_path / 'empty'} holds no log.jsonl (a run's --output_dir?)"
    # A line in the middle that is not JSON, or JSON but not a record: not a log the trainers wrote.
    middle = write_run(tmp_path / "middle", log_bytes(records(2)) + b"hello\n" + log_bytes(records(3)[2:]))
    assert refused(capsys, [middle]) == f"error: {middle / 'log.jsonl'} line 3 of 4 is not JSON: not a log written by the trainers"
    listed = write_run(tmp_path / "listed", b"[1, 2]\n" + log_bytes(records(2)))
    assert 'line 1 of 3 is not a JSON object with an integer "step"' in refused(capsys, [listed])
    latin = write_run(tmp_path / "latin", log_bytes(records(1)) + '{"step": 2, "note": "é"}\n'.encode("latin-1")
                      + log_bytes(records(3)[2:]))
    assert "line 2 of 3 is not UTF-8 text" in refused(capsys, [latin])
    # Nothing but a torn line (or nothing at all): no record to draw.
    assert "holds no complete record yet" in refused(capsys, [write_run(tmp_path / "torn", b'{"step": 1, "lo')])
    assert "holds no complete record yet" in refused(capsys, [write_run(tmp_path / "zero", b"")])
    # The flags file beside the log, damaged.
    flags = write_run(tmp_path / "flags", log_bytes(records(2)), config=None)
    (flags / "run.json").write_text('{"tau": ')
    assert f"{flags / 'run.json'} is not JSON text" in refused(capsys, [flags])
    # Where the figure goes.
    assert "matplotlib writes no .txt files" in refused(capsys, [good, "--out", tmp_path / "fig.txt"])
    assert "is a folder" in refused(capsys, [good, "--out", tmp_path / "empty"])
    assert not list(tmp_path.rglob("*.png"))  # nothing was drawn
    assert plot.main([str(good), "--out", str(tmp_path / "new" / "fig.png")]) == str(tmp_path / "new" / "fig.png")


# What the figure shows (plot.figure: the figure plot.draw saves)


def panel(fig, title):
    """The axes whose title starts with `title`."""
    found = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def drawn(groups, **kwargs):
    import matplotlib.pyplot as plt

    fig = plot.figure(groups, **kwargs)
    plt.close(fig)
    return fig


HELDOUT = {"heldout_reward_name": "toy_label", "heldout_prompts": 54, "heldout_base_reward": 0.30}


def heldout_run(folder, config=None):
    """Ten steps; held-out numbers at step 0 (a record of its own: no loss), 5 and 10."""
    rows = [{"step": 0, "heldout_reward": 0.30, "heldout_win_rate": 0.5, "heldout_win_low": 0.4,
             "heldout_win_high": 0.6, **HELDOUT}] + records(10)
    rows[5].update(heldout_reward=0.34, heldout_win_rate=0.62, heldout_win_low=0.5, heldout_win_high=0.72, **HELDOUT)
    rows[10].update(heldout_reward=0.37, heldout_win_rate=0.7, heldout_win_low=0.6, heldout_win_high=0.8, **HELDOUT)
    return write_run(folder, log_bytes(rows), config)


def eval_summary(path, rate=71.3, interval=(64.0, 78.0)):
    """eval.py's summary.json, as its compare() writes the numbers (percent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "trained", "baselines": ["toy-base"],
                                "mean_scores": {"trained": {"toy_label": 0.4}, "toy-base": {"toy_label": 0.3}},
                                "win_rates_percent": {"toy-base": {"toy_label": rate, "Avg": rate}},
                                "win_rate_intervals_percent": {"toy-base": {"toy_label": list(interval)}}}))
    return path


def test_the_held_out_panel_draws_the_logs_win_rate_and_eval_pys_result_at_the_end(tmp_path, capsys):
    run = heldout_run(tmp_path / "run")
    eval_summary(run / "heldout" / "summary.json")
    fig = drawn({"run": [str(run)]})
    win = panel(fig, "held-out win rate over the base model")
    assert "toy_label" in win.get_title() and "54 prompts" in win.get_title()
    line = win.lines[0]
    assert list(line.get_xdata()) == [0, 5, 10] and list(line.get_ydata()) == [0.5, 0.62, 0.7]
    band = win.collections[0].get_paths()[0].vertices  # the interval: 0.4 … 0.8 over steps 0 … 10
    assert band[:, 1].min() == pytest.approx(0.4) and band[:, 1].max() == pytest.approx(0.8)
    assert any(list(l.get_ydata()) == [0.5, 0.5] for l in win.lines)  # the 50 % line
    (marker,) = win.containers  # eval.py's toy_label win rate, at the last step, with its interval
    assert list(marker.lines[0].get_xdata()) == [10] and list(marker.lines[0].get_ydata()) == [0.713]
    (segment,) = marker.lines[2][0].get_segments()
    assert segment[:, 1].tolist() == pytest.approx([0.64, 0.78])
    assert any("eval.py at the end: trained vs toy-base, toy_label" in t.get_text() for t in win.get_legend().texts)
    reward = panel(fig, "held-out mean toy_label")
    assert [list(l.get_ydata()) for l in reward.lines] == [[0.3, 0.34, 0.37], [0.3, 0.3, 0.3]]
    loss = panel(fig, "loss")  # the step-0 record holds no loss: the other panels start at step 1
    assert loss.lines[0].get_xdata()[0] == 1 and len(loss.lines[0].get_xdata()) == 10
    assert panel(fig, "gradient norm").get_title() and panel(fig, "learning rate").get_title()
    # A summary older than the log compares an earlier model (the run went on after it): left out.
    os.utime(run / "heldout" / "summary.json", (1, 1))
    assert not panel(drawn({"run": [str(run)]}), "held-out win rate").containers
    # --heldout names one elsewhere; with several runs it says whose.
    other = eval_summary(tmp_path / "eval" / "summary.json", rate=40.0, interval=(30.0, 50.0))
    fig = drawn({"run": [str(run)]}, heldout={"run": str(other)})
    assert list(panel(fig, "held-out win rate").containers[0].lines[0].get_ydata()) == [0.4]
    assert plot.main([str(run), "--heldout", str(tmp_path / "eval"), "--out", str(tmp_path / "h.png")])
    second = heldout_run(tmp_path / "second")
    assert "say whose result it is as LABEL=PATH (labels: run, second)" in refused(
        capsys, [f"run={run}", f"second={second}", "--heldout", other, "--out", tmp_path / "x.png"])
    assert plot.main([f"run={run}", f"second={second}", "--heldout", f"second={other}", "--out", str(tmp_path / "x.png")])
    assert "not found" in refused(capsys, [run, "--heldout", tmp_path / "nowhere"])
    (tmp_path / "bad.json").write_text("[1]")
    assert "not a summary.json written by eval.py" in refused(capsys, [run, "--heldout", tmp_path / "bad.json"])


def test_smoothing_is_a_trailing_mean_over_the_window_the_flag_gives(tmp_path, capsys):
    assert plot.smooth([1, 2, 3, 4, float("nan"), 6], 2).tolist() == [1, 1.5, 2.5, 3.5, 4, 6]
    assert plot.smoothing_window(100) == 4 and plot.smoothing_window(30) == 1  # default: a 25th of the steps
    assert plot.smoothing_window(100, 1) == 1 and plot.smoothing_window(10, 7) == 7
    run = write_run(tmp_path / "run", log_bytes(records(6)))  # loss 0.69, 0.68, …, 0.64
    fig = drawn({"run": [str(run)]}, smooth_steps=3)
    assert list(panel(fig, "loss").lines[0].get_ydata()) == pytest.approx([0.69, 0.685, 0.68, 0.67, 0.66, 0.65])
    assert panel(fig, "loss").get_title() == "loss (trailing mean)"
    assert "trailing mean over 3 steps" in fig.get_suptitle()
    fig = drawn({"run": [str(run)]}, smooth_steps=1)
    assert list(panel(fig, "loss").lines[0].get_ydata()) == pytest.approx([0.69, 0.68, 0.67, 0.66, 0.65, 0.64])
    assert "raw values" in fig.get_suptitle() and panel(fig, "loss").get_title() == "loss (raw)"
    assert "--smooth 0: the window is at least 1 step" in refused(capsys, [run, "--smooth", "0"])


FLAGS = {"family": "sd15", "method": "ours", "beta": 500.0, "tau": 8, "on_diverge": "freeze", "gamma": 0.9,
         "no_reward_scale": False, "reward_scale_norm": False, "seed": 0, "output_dir": "x", "report_to": "none"}


def test_the_title_names_exactly_the_flags_the_configurations_differ_in(tmp_path):
    seeds = [write_run(tmp_path / f"a{s}", log_bytes(records(4)), {**FLAGS, "seed": s, "output_dir": f"a{s}"})
             for s in range(2)]
    other = write_run(tmp_path / "b", log_bytes(records(4)),
                      {**FLAGS, "beta": 1000.0, "tau": 0, "output_dir": "b", "report_to": "wandb"})
    shared = {"a": plot.shared_flags([plot.read_config(r) for r in seeds]), "b": plot.read_config(other)}
    assert "seed" not in shared["a"]  # it varies among the configuration's runs
    assert plot.differing_flags(shared) == ["beta", "tau"]  # not output_dir, report_to (bookkeeping), nor seed
    suptitle = drawn({"a": list(map(str, seeds)), "b": [str(other)]}).get_suptitle()
    assert "runs differ in beta, tau:  a: beta=500, tau=8  |  b: beta=1000, tau=0" in suptitle
    assert plot.differing_flags({"a": shared["a"]}) == [] and plot.differing_flags({"a": shared["a"], "c": {}}) == []


def test_a_note_says_when_curves_are_on_different_scales(tmp_path):
    folders = itertools.count()

    def note(*configs):
        runs = {f"r{i}": [str(write_run(tmp_path / str(next(folders)), log_bytes(records(4)), c))]
                for i, c in enumerate(configs)}
        return [t.get_text() for t in drawn(runs).texts if t.get_gid() == "scale_note"]

    (text,) = note(FLAGS, {**FLAGS, "tau": 0})
    assert text.startswith("Loss, accuracy, margin not comparable across these runs: tau differs: a reference "
                           "re-copied every τ steps is a recent copy of the policy")
    assert "λ(t)" not in text
    (text,) = note(FLAGS, {**FLAGS, "no_reward_scale": True}, {**FLAGS, "no_reward_scale": False, "seed": 3})
    assert "λ(t) multiplies β·Δ" in text and "τ" not in text
    assert note(FLAGS, {**FLAGS, "seed": 1}) == []  # seeds of one configuration: comparable


def test_each_t_bin_accuracy_shows_the_pairs_it_rests_on(tmp_path):
    low, high = plot.binomial_interval([0.5, 1.0, 0.5], [100, 10, 0])
    # Wilson's interval: 50 of 100 → [0.4038, 0.5962]; 10 of 10 → [10 / (10 + 1.96²), 1]; no pairs → none.
    assert low[:2] == pytest.approx([0.4038, 10 / (10 + 1.96 ** 2)], abs=1e-4)
    assert high[:2] == pytest.approx([0.5962, 1.0], abs=1e-4) and np.isnan(low[2]) and np.isnan(high[2])
    rows = records(10)
    for s, counts in ((2, [9] * 10), (6, [3, 0, 1, 2, 3, 4, 5, 6, 7, 8]), (10, [5, 0, 1, 1, 1, 1, 1, 1, 1, 1])):
        rows[s - 1].update(bin_count=counts, bin_accuracy=[None if c == 0 else 0.5 for c in counts],
                           bin_reward_magnitude=[1.0] * 10, bin_model_err=[1.0] * 10, bin_reward_scale=[1.0] * 10)
    assert plot.bin_pairs(rows, 5).tolist() == [8, 0, 2, 3, 4, 5, 6, 7, 8, 9]  # steps 6 and 10: the 2nd half
    ax = panel(drawn({"run": [str(write_run(tmp_path / "run", log_bytes(rows)))]}), "implicit accuracy per t-bin")
    assert "95 % binomial interval" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["8", "2", "3", "4", "5", "6", "7", "8", "9"]  # bin 1 held none
    (bars,) = ax.containers
    first = bars.lines[2][0].get_segments()[0][:, 1]
    assert first.tolist() == pytest.approx([0.2152, 0.7848], abs=1e-4)  # Wilson, 4 of 8


# miniature/reproduce.py's inputs (the smoke study itself is in test_reproduce.py)


def test_reproduce_refuses_unusable_inputs_before_any_work(tmp_path, capsys):
    from miniature import reproduce

    def refused_study(*argv):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.main(["--smoke", *map(str, argv)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err and err[-1].startswith("error: ")
        return err[-1]

    out = tmp_path / "out"
    assert "no such folder" in refused_study("--model", tmp_path / "nope", "--output_dir", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    assert "no model_index.json" in refused_study("--model", bad, "--output_dir", out)
    (bad / "model_index.json").write_bytes(b"\xff\xfe not json")
    assert "model_index.json is not readable JSON" in refused_study("--model", bad, "--output_dir", out)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    msg = refused_study("--model", bad, "--output_dir", out)
    assert "is a StableDiffusionXLPipeline, not an SD1.5 StableDiffusionPipeline" in msg
    assert not out.exists()  # refused before the output folder is made
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"--output_dir {afile} is a file" in refused_study("--output_dir", afile)
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["--jobs", "0"])
    assert exit_info.value.code == 2 and "error: --jobs must be at least 1" in capsys.readouterr().err


def test_reproduce_takes_a_record_cut_short_as_not_done(tmp_path):
    """A run's reproduce.json written when the kill came: the run is trained again, not a traceback."""
    from miniature import reproduce

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model_index.json").write_text("{}")
    argv = ["--seed", "0"]
    (run / "reproduce.json").write_text(json.dumps({"argv": argv, "wall_s": 1.0, "cpu_s": 1.0}))
    assert reproduce.run_done(run, argv) and not reproduce.run_done(run, ["--seed", "1"])
    (run / "reproduce.json").write_text('{"argv": ["--se')
    assert not reproduce.run_done(run, argv)
    (run / "reproduce.json").write_bytes(b"\x00\xff")
    assert not reproduce.run_done(run, argv)
    assert reproduce.read_state(run / "missing.json") is None
