"""miniature/reproduce.py's smoke version end to end (the mechanics: files, tables, finite numbers — not the
scientific outcome), and the statistics its verdicts rest on."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from miniature import reproduce


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke study from the committed toy model; its pairs are sampled into the test's private cache."""
    out = tmp_path_factory.mktemp("repro")
    return out, reproduce.main(["--smoke", "--output_dir", str(out)])


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_smoke_writes_results_figures_and_a_verdict_per_claim(smoke):
    out, result = smoke
    assert set(result["figures"]) == {"fig1c_calibration", "fig1b_training", "fig2_fig5_timestep_bins", "samples_grid"}
    for path in result["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).stat().st_size > 5000
    md = (out / "results.md").read_text()
    assert "| claim | seeds | A − B | 95 % interval | verdict |" in md and "![samples_grid]" in md
    saved = json.loads((out / "results.json").read_text())
    claims = {row["a"] + "-" + row["b"]: row for row in saved["claims"]}
    assert claims["explore-dpo"]["verdict"] in ("reproduced", "refuted", "inconclusive")
    assert claims["explore-dpo"]["n"] == 2 and finite(claims["explore-dpo"]["low"])
    assert claims["nomonitor_long-nomonitor"]["verdict"].startswith("inconclusive (one seed")
    calibration = saved["calibration"]
    assert calibration["tau"] == 1 and calibration["delta"] > 0 and "optimum" in calibration["rule"]
    assert all(finite(p["score"]) and finite(p["divergence"]) for pts in calibration["curves"].values() for p in pts)
    assert all(len(v["accuracy"]) == reproduce.NUM_BINS for v in saved["diagnostics"].values())
    assert set(saved["timings"]) == {"pairs", "tuning", "calibration", "training", "evaluation", "diagnostics", "figures",
                                     "total"}
    tuning, gate = saved["tuning"], saved["gate"]
    assert (tuning["learning_rate"], tuning["beta"]) == (6e-5, 5000.0) and len(tuning["curves"]) == 1
    assert gate["n"] == 2 and not gate["passed"]  # two seeds: the gate is reported, never passed, in a smoke run
    assert not gate["checks"]["≥ 10 training seeds"] and 0 <= gate["win_rate"] <= 1
    assert 0.95 < gate["attainable"] <= 1.0  # the renderer's own pictures of the two prompts
    assert "**Positive control: not decided (2 seeds, the gate needs 10).**" in md and "seeds for 80 % power" in md
    for key in ("dpo", "full50"):
        assert (out / "runs" / f"{key}-s0" / "final" / "model_index.json").is_file()


def test_evaluation_gives_every_image_its_own_seed(smoke):
    out, _ = smoke
    images = sorted(p.name for p in out.glob("eval/gate/group0/images/dpo-s0-*/*.png"))
    assert images == ["00000_0.png", "00001_1.png"]  # prompt i, seed i·n + j with n = 1 image per prompt


def test_a_rerun_reuses_finished_runs_and_gives_the_same_numbers(smoke, capsys):
    out, result = smoke
    again = reproduce.main(["--smoke", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "training dpo: 2 runs (2 already done)" in printed and "7 runs (7 already done)" in printed
    assert again["means"] == result["means"] and again["claims"] == result["claims"]  # the stored images, rescored


def test_paired_intervals_and_verdicts_follow_the_pre_registered_rules():
    a, b = [0.70, 0.71, 0.72, 0.69], [0.68, 0.70, 0.70, 0.67]  # A − B = 0.02, 0.01, 0.02, 0.02
    interval = reproduce.paired_interval(a, b)
    d = np.array(a) - np.array(b)
    half = 3.182 * d.std(ddof=1) / 2  # t(0.975, 3), n = 4
    assert interval["mean"] == pytest.approx(0.0175) and interval["high"] - interval["mean"] == pytest.approx(half)
    assert reproduce.verdict(interval, "beats", 0.005) == "reproduced"
    assert reproduce.verdict({"low": -0.004, "high": 0.003}, "beats", 0.005) == "refuted"
    assert reproduce.verdict({"low": -0.004, "high": 0.009}, "beats", 0.005) == "inconclusive"
    assert reproduce.verdict({"low": -0.02, "high": -0.001}, "degrades", 0.005) == "reproduced"
    assert reproduce.verdict({"low": -0.004, "high": 0.01}, "degrades", 0.005) == "refuted"
    assert reproduce.verdict({"low": -0.01, "high": 0.004}, "not_better", 0.005) == "reproduced"
    assert reproduce.verdict({"low": 0.001, "high": 0.02}, "not_better", 0.005) == "refuted"


def test_bad_recipe_flags_are_refused_before_any_work(capsys):
    for argv, message in ((["--steps", "0"], "--steps must be at least 1"),
                          (["--taus", "0", "2"], "--taus must be positive"),
                          (["--betas", "5000", "-1"], "--betas"),
                          (["--freeze_window", "0.6", "0.3"], "--freeze_window")):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    args = reproduce.parse_args(["--quick", "--steps", "7"])
    assert (args.steps, args.seeds, args.cheap_seeds) == (7, 3, 0)
    assert [k for k, _ in reproduce.configs(args)] == list(reproduce.QUICK_CONFIGS)
    assert {len(seeds) for _, seeds in reproduce.configs(args)} == {3}  # --quick: 3 seeds of every row, as before


def test_the_powered_design_gives_claims_1_and_4_the_seeds_the_last_runs_sds_ask_for():
    # 2026-12-02's held-out SD of explore − DPO, 0.0113: (t_{0.975, 31} + z_{0.8}) · 0.0113 / √32 = 0.00575 ≤ 0.0058
    # (n = 31: 0.00585), so 32 seeds; claim 3b's SD 0.0068 needs 13.
    assert reproduce.seeds_for_power(0.0113, 0.0058) == 32
    seeds = {key: len(s) for key, s in reproduce.configs(reproduce.parse_args([]))}
    assert {k: seeds[k] for k in ("dpo", "explore", "full50", "full10")} == dict.fromkeys(("dpo", "explore", "full50", "full10"), 32)
    assert {k: seeds[k] for k in ("timestep10", "timestep50", "nomonitor", "fullnorm")} == dict.fromkeys(
        ("timestep10", "timestep50", "nomonitor", "fullnorm"), 13)
    assert (seeds["sft"], seeds["reinit"], seeds["nomonitor_long"]) == (3, 3, 3)


def test_seeds_for_power_is_the_smallest_n_whose_interval_clears_the_effect():
    # (t_{0.975, 11} + z_{0.8}) · 0.0068 / √12 = 0.00597 > 0.0058, (t_{0.975, 12} + z_{0.8}) · 0.0068 / √13 = 0.00570
    assert reproduce.seeds_for_power(0.0068, 0.0058) == 13
    assert reproduce.seeds_for_power(0.0018, 0.0058) == 3  # n = 3: (4.303 + 0.842) · 0.0018 / √3 = 0.0053; n = 2: 0.0172
    assert reproduce.t975(40) == pytest.approx(2.021, abs=0.003)  # past the table: 2.0211 exact


def _gate(dpo_means, base_mean, wins_per_seed, images=20):
    """positive_control on made-up numbers: per seed, the DPO mean and how many of `images` same-seed images win."""
    args = reproduce.parse_args(["--smoke"])
    keys = [(0, i) for i in range(images)]
    scores = {"base": {reproduce.PRIMARY: {k: 0.5 for k in keys}}}
    means = {"base": {reproduce.PRIMARY: base_mean}}
    for s, (mean, wins) in enumerate(zip(dpo_means, wins_per_seed)):
        means[("dpo", s)] = {reproduce.PRIMARY: mean}
        scores[("dpo", s)] = {reproduce.PRIMARY: {k: 0.6 if i < wins else 0.4 for i, k in enumerate(keys)}}
    return reproduce.positive_control(args, means, {"scores": scores}, list(range(len(dpo_means))))


def test_the_positive_control_passes_only_when_every_pre_registered_check_holds():
    strong = [0.63, 0.64, 0.635, 0.645, 0.64, 0.638, 0.642, 0.636, 0.644, 0.64]  # +0.039 over 0.60, SD 0.0045
    gate = _gate(strong, 0.60, [14] * 10)  # 70 % win rate
    assert gate["passed"] and gate["win_rate"] == pytest.approx(0.7) and gate["mean"] == pytest.approx(0.039, abs=1e-9)
    assert not _gate(strong, 0.60, [12] * 10)["passed"]  # 60 % < 65 %
    assert not _gate(strong[:9], 0.60, [14] * 9)["passed"]  # 9 seeds < 10
    assert not _gate([m - 0.025 for m in strong], 0.60, [14] * 10)["passed"]  # +0.015: the interval not above +0.02
    noisy = [0.60, 0.70, 0.61, 0.69, 0.62, 0.68, 0.60, 0.70, 0.62, 0.68]  # +0.05, SD 0.043: low end 0.019; 3 SD 0.13
    gate = _gate(noisy, 0.60, [14] * 10)
    assert not gate["passed"] and [ok for ok in gate["checks"].values()] == [False, False, True, True]
