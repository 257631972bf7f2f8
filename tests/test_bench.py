"""speed/bench.py runs each trainer on its tiny model and prints (and writes) every field. Numbers are not checked."""
import importlib
import json

import pytest

from speed import bench


def available(name):
    try:
        importlib.import_module(f"train_{name}")
    except ImportError:
        return False
    return True


SHORT = ["--steps", "2", "--warmup", "1", "--tau", "2", "--batch", "2"]


def check_output(text, result, json_path):
    for label in bench.LABELS.values():
        assert label.strip() in text, label
    for field in ("pairs/s", "peak memory", "overhead = step − (policy f+b + reference f)", "reference update:",
                  "timed steps after"):
        assert field in text, field
    written = json.loads(open(json_path).read())
    assert written == json.loads(json.dumps(result))
    for key in ("pairs_per_s", "step_ms", "overhead_pct", "reference_update_pct", "peak_memory", "machine", "config"):
        assert key in written, key
    assert set(bench.SECTIONS) <= set(written["sections_ms"]) and "other" in written["sections_ms"]
    assert written["config"]["timed_steps"] == 2 and written["pairs_per_s"] > 0
    assert written["reference_updates"] == 1  # step 2 of the window (steps 2–3)


@pytest.mark.parametrize("name", bench.TRAINERS)
def test_bench_runs_each_trainer_on_its_tiny_model(name, tmp_path, capsys):
    if not available(name):
        pytest.skip(f"train_{name}.py is not there yet")
    result = bench.main(["--trainer", name, *SHORT, "--json", str(tmp_path / "b.json")])
    check_output(capsys.readouterr().out, result, tmp_path / "b.json")
    assert result["sections_ms"]["encode:vae"] > 0 and result["sections_ms"]["encode:text"] > 0


def test_bench_with_cache_and_lora(tmp_path, capsys):
    result = bench.main(["--trainer", "sd15", *SHORT, "--cache_latents", "--lora_rank", "4",
                         "--json", str(tmp_path / "b.json"), "--", "--no_flip"])
    check_output(capsys.readouterr().out, result, tmp_path / "b.json")
    assert result["config"]["cache_latents"] and result["config"]["lora_rank"] == 4
    assert result["sections_ms"]["encode:vae"] == 0 and result["sections_ms"]["encode:text"] == 0


def test_real_size_is_sd15_only(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--trainer", "sdxl", "--real_size"])
    assert "sd15" in capsys.readouterr().err


def test_an_unwritable_json_path_is_refused_before_the_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--trainer", "sd15", "--json", str(tmp_path)])  # a folder
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(f"error: --json {tmp_path} cannot be written")


def test_reference_updates_copy_in_place_in_the_training_dtype():
    """What the bench's reference-update row measures: copies into tensors allocated once, in the reference's
    (training) dtype, with p_init in CPU memory in that dtype too."""
    import torch
    from torch import nn

    from reference import Reference

    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(6, 4)
    predict = lambda model: model(x.to(next(model.parameters()).dtype)).float()
    target = torch.zeros(6, 4)
    ref = Reference(policy, tau=1, delta=1e9, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ref.model.parameters())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in ref.initial)
    pointers = [t.data_ptr() for t in (*ref.model.parameters(), *ref.initial)]
    parked = None
    for step in range(1, 5):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.01)
        ref.step(step, policy, predict, target)
        ref.divergence(policy, predict, target)
        parked = parked or [t.data_ptr() for t in ref._parked]
        assert [t.data_ptr() for t in ref._parked] == parked
        assert [t.data_ptr() for t in (*ref.model.parameters(), *ref.initial)] == pointers
        assert all(torch.equal(r, p.to(torch.bfloat16)) for r, p in zip(ref.model.parameters(), policy.parameters()))
