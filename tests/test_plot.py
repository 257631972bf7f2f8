"""The entry points refuse what they cannot read in one `error:` line with exit code 2, and no traceback:
plot.py's run folders and logs (issue 23: a log of random bytes), and miniature/reproduce.py's file inputs.
A log's last line cut short by a kill is not an error: it is left out."""
import json
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
