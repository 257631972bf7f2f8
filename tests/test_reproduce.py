"""reproduce.py's smoke version end to end (the mechanics: files, table shapes, finite numbers — not the
scientific outcome), and the seed pairing of its win-rate table."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from miniature import reproduce


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke reproduction from the committed toy model; its pairs are sampled into the test's private cache."""
    out = tmp_path_factory.mktemp("repro")
    result = reproduce.main(["--smoke", "--output_dir", str(out)])
    return out, result


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_smoke_writes_results_and_figures(smoke):
    out, result = smoke
    for name in ("results.md", "results.json"):
        assert (out / name).stat().st_size > 0
    figures = {"fig1c_calibration", "fig1b", "fig2", "fig5", "samples"}
    assert set(result["figures"]) == figures
    for path in result["figures"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 1000
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert all(os.path.relpath(p, out) in md for p in result["figures"].values())
    for key in ("dpo", "full"):
        assert (out / "runs" / f"{key}-s0" / "final" / "model_index.json").is_file()
        assert (out / "runs" / f"{key}-s0" / "log.jsonl").is_file()


def test_smoke_tables_have_the_papers_shape_and_finite_numbers(smoke):
    out, result = smoke
    saved = json.loads((out / "results.json").read_text())
    rewards = list(reproduce.REWARDS)
    # Mean reward per configuration: base + the two smoke configurations, one column per reward, (mean, std).
    assert list(saved["means"]) == ["base", "dpo", "full"]
    for row in saved["means"].values():
        assert list(row) == rewards and all(finite(v) for ms in row.values() for v in ms)
        assert all(0.0 <= ms[0] <= 1.0 for ms in row.values())
    # Win rates of the full method: one row per baseline, the rewards and their average, in percent.
    assert list(saved["win_rates"]) == ["base", "dpo"]
    for row in saved["win_rates"].values():
        assert list(row) == rewards + ["Avg"] and all(0.0 <= ms[0] <= 100.0 for ms in row.values())
    calibration = saved["calibration"]
    assert calibration["tau"] >= 1 and finite(calibration["delta"]) and calibration["delta"] > 0
    assert all(finite(p["divergence"]) and finite(p["score"]) for pts in calibration["curves"].values() for p in pts)
    assert all(len(v) == reproduce.NUM_BINS and all(finite(x) for x in v) for v in saved["divergence_by_bin"].values())
    assert set(saved["timings"]) == {"pairs", "calibration", "training", "evaluation", "figures", "total"}
    # The printed Markdown tables: 3 rewards (+ Avg) columns, a row per configuration / baseline.
    lines = result["tables"].splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| config | toy_fidelity"))
    assert lines[header].count("|") == len(rewards) + 2 and len(
        [l for l in lines[header + 2:header + 5] if l.startswith("| ")]) == 3
    wins = next(i for i, l in enumerate(lines) if l.startswith("| vs. |"))
    assert lines[wins].split("|")[-2].strip() == "Avg" and lines[wins + 2].startswith("| base")


def test_a_rerun_reuses_finished_runs_and_images(smoke, capsys):
    out, result = smoke
    saved = json.loads((out / "results.json").read_text())
    again = reproduce.main(["--smoke", "--output_dir", str(out), "--model", saved["args"]["model"],
                            "--pairs", saved["args"]["pairs"]])
    assert "2 runs (2 already done)" in capsys.readouterr().out
    assert again["means"].keys() == result["means"].keys()
    for key, row in result["means"].items():
        assert {c: ms[0] for c, ms in again["means"][key].items()} == pytest.approx({c: ms[0] for c, ms in row.items()})


def test_win_rates_pair_training_seed_s_with_seed_s():
    class Args:
        seeds = [0, 1]
    keys = [(0, 0), (1, 0)]
    # Seed 0 of the method beats seed 0 of DPO everywhere; seed 1 loses to seed 1 everywhere. An unpaired
    # comparison (seed 0 of one against seed 1 of the other) would give other numbers.
    scores = {"base": {"r": dict.fromkeys(keys, 0.5)},
              ("full", 0): {"r": dict.fromkeys(keys, 0.6)}, ("dpo", 0): {"r": dict.fromkeys(keys, 0.4)},
              ("full", 1): {"r": dict.fromkeys(keys, 0.3)}, ("dpo", 1): {"r": dict.fromkeys(keys, 0.35)}}
    table = reproduce.tables(Args, {"columns": ["r"], "scores": scores}, ["dpo", "full"])
    assert table["wins"]["dpo"]["r"][0] == pytest.approx(50.0)
    assert table["wins"]["dpo"]["r"][1] == pytest.approx(np.std([100.0, 0.0], ddof=1))
    assert table["wins"]["base"]["Avg"][0] == pytest.approx(50.0)
    assert table["means"]["full"]["r"] == pytest.approx((0.45, np.std([0.6, 0.3], ddof=1)))


def test_bad_recipe_flags_are_refused_before_any_work(capsys, tmp_path):
    for argv, message in ((["--steps", "0"], "--steps must be at least 1"),
                          (["--calibration_taus", "0", "2"], "--calibration_taus must be positive")):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--pairs .* does not exist"):
        reproduce.main(["--smoke", "--output_dir", str(tmp_path), "--pairs", str(tmp_path / "missing.parquet")])
    args = reproduce.parse_args(["--smoke", "--steps", "7"])
    assert (args.steps, args.batch, args.seeds) == (7, reproduce.SMOKE["batch"], [0])
