"""Where the trainers run: Windows and macOS (no fcntl at import time; the device default cuda → mps → cpu), the
run's first line (device, precision, processes, engine), the warning before a real recipe on a CPU, and what
`accelerate launch` hands over (its mixed precision; its DeepSpeed and FSDP plugins refused)."""
import subprocess
import sys

import pytest
import torch

import losses
import reference
import train_sd15
import train_sdxl
from helpers import ROOT, sd15_flags
from mechanics import flags, runtime
from mechanics.errors import UsageError


def resolve(script, argv):
    family = script.__name__.removeprefix("train_")
    return flags.resolve(argv, script.__doc__, family, script.RECIPE, script.TINY_RECIPE, losses.LOSSES,
                         reference.METHODS)


def test_without_fcntl_the_trainers_and_eval_import_and_run(tmp_path):
    """As on Windows: no fcntl module. --help, a --tiny run (its folder lock included) and eval.py still work."""
    code = f"""
import sys
sys.modules["fcntl"] = None  # import fcntl now raises ImportError, as on Windows
import eval, train_flux, train_sd15, train_sd3, train_sdxl
try:
    train_sdxl.main(["--help"])
except SystemExit as exit_:
    assert exit_.code == 0
assert train_sdxl.main(["--tiny", "--max_steps", "1", "--no-plot", "--output_dir", r"{tmp_path / 'run'}"]) == 0
assert eval.main(["--tiny", "--limit", "1", "--num_seeds", "1", "--quiet", "--model", r"{tmp_path / 'run' / 'final'}",
                  "--output_dir", r"{tmp_path / 'eval'}"]) == 0
assert "fcntl" not in {{name for name, module in sys.modules.items() if module is not None}}
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 1


def test_the_device_default_is_cuda_then_mps_then_cpu(monkeypatch):
    for cuda, mps, device in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert runtime.default_device() == device


def test_a_device_this_torch_does_not_have_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, fragment in (("mps", "no MPS device"), ("tpu", "not a device torch knows")):
        assert train_sd15.main([*sd15_flags(), "--device", device, "--output_dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: --device {device}") and fragment in err[-1], err[-1]


def test_the_first_line_names_device_precision_processes_and_engine(tmp_path):
    result = subprocess.run([sys.executable, "train_sdxl.py", "--tiny", "--max_steps", "1", "--no-plot",
                             "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stderr.strip().splitlines()[0]
    assert first == "INFO train: device cpu (1 threads), precision fp32, one process", first
    run = runtime.Run(torch.device("cpu"), world_size=4, autocast_dtype=torch.bfloat16, fsdp=True)
    assert runtime.device_line(run) == f"device cpu ({torch.get_num_threads()} threads), precision bf16 autocast, " \
                                       "4 processes (FSDP2)"


def test_a_real_recipe_on_a_cpu_is_warned_with_its_time_and_the_demo_is_not(tmp_path, caplog):
    args, _ = resolve(train_sd15, ["--output_dir", str(tmp_path / "real"), "--device", "cpu"])
    runtime.start(args, "sd15")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # 2000 steps × 2048 pairs × 70 s / 86400 s = 3318.5 days at 512 px
    assert warnings == ["sd15 at 512 px on a CPU: 2000 steps × 2048 pairs would take at least 3,319 days "
                        "(~70 s per SD1.5 pair at 512 px on a 2-core CPU); run it on a GPU, or try the offline demo "
                        "with --tiny"], warnings
    caplog.clear()
    args, _ = resolve(train_sdxl, ["--tiny", "--output_dir", str(tmp_path / "demo")])
    runtime.start(args, "sdxl")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_accelerate_launch_mixed_precision_is_the_runs_unless_the_flag_says_otherwise(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve(train_sdxl, ["--tiny"])[0].mixed_precision == "bf16"
    assert resolve(train_sdxl, ["--tiny", "--mixed_precision", "no"])[0].mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UsageError, match="bf16 or fp16 only"):
        resolve(train_sdxl, ["--tiny"])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve(train_sdxl, ["--tiny"])[0].mixed_precision == "auto"


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_accelerate_deepspeed_or_fsdp_plugins_are_refused_naming_fsdp(variable, monkeypatch):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(UsageError, match="--fsdp"):
        resolve(train_sdxl, ["--tiny"])
