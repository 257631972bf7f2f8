"""speed/gpu_check.py's --tiny mode: the prepared GPU check's plumbing on the tiny model, on this CPU."""
import argparse
import json

from offline import tiny
from speed import gpu_check
from speed.bench import real_pairs


def test_the_gpu_check_runs_at_tiny_size_and_writes_its_json_and_table(tmp_path):
    report = gpu_check.main(["--tiny", "--out", str(tmp_path), "--steps", "2", "--warmup", "1"])
    names = [r["name"] for r in report["results"]]
    assert names == [name for name, _ in gpu_check.configurations(tiny=True)]  # "full, eager" runs the 30 steps
    assert all("error" not in r for r in report["results"]), [r.get("error") for r in report["results"]]
    assert all(r["pairs_per_s"] > 0 and r["config"]["timed_steps"] >= 2 for r in report["results"])
    checks = {c["check"]: c for c in report["checks"]}
    step1 = checks["step-1 loss against log 2 (policy = reference)"]
    assert step1["ok"] and step1["deviation"] < 1e-6  # fp32 on a CPU: exactly log 2
    assert checks["30 steps, every loss and gradient norm finite"]["ok"]
    assert {r["config"]["lora_rank"] for r in report["results"]} == {0, 8}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["checks"] == report["checks"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| configuration | pairs/s |" in table and "| check | value | ok |" in table


STAND_IN = '''"""Stands in for diffusers' train_diffusion_dpo.py: its flags, its imports, its dataset call, N optimizer steps."""
import argparse
import sys

import torch
import wandb  # noqa: F401  (the real script imports it unconditionally)
from datasets import load_dataset

p = argparse.ArgumentParser()
for flag in ["--pretrained_model_name_or_path", "--dataset_name", "--dataset_split_name", "--output_dir", "--report_to",
             "--resolution", "--train_batch_size", "--gradient_accumulation_steps", "--rank", "--learning_rate",
             "--lr_scheduler", "--lr_warmup_steps", "--max_train_steps", "--checkpointing_steps", "--seed",
             "--dataloader_num_workers", "--mixed_precision"]:
    p.add_argument(flag)
args = p.parse_args()
rows = load_dataset(args.dataset_name, split=args.dataset_split_name)
if len(rows) != 64 or not {"jpg_0", "jpg_1", "label_0", "caption"} <= set(rows.column_names):
    sys.exit(f"unexpected dataset: {len(rows)} rows, {rows.column_names}")
if args.report_to == "wandb":
    sys.exit("would need the real wandb")
layer = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(layer.parameters())
for _ in range(int(args.max_train_steps)):
    layer(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()
'''


def test_the_diffusers_row_runs_its_script_on_a_folder_of_the_pairs_and_times_its_optimizer_steps(tmp_path):
    """The diffusers script itself is not part of this repository; a stand-in with its interface checks the row's
    plumbing: the flags, a dataset folder holding only the pairs, the train split, the wandb stand-in, the clock."""
    script = tmp_path / "train_diffusion_dpo.py"
    script.write_text(STAND_IN)
    opts = argparse.Namespace(tiny=True, batch=1, steps=5, warmup=2, diffusers_dpo_script=str(script))
    work = tmp_path / "work"
    work.mkdir()
    row = gpu_check.diffusers_dpo(opts, tiny.tiny_pipeline_dir("sd15"), real_pairs(32), work)
    assert "error" not in row, row["error"]
    assert 0 < row["step_ms"] < 5000 and abs(row["pairs_per_s"] - 1000 / row["step_ms"]) < 1e-9
    stamps = json.loads((work / "steps.json").read_text())["stamps"]
    assert len(stamps) == 7 and stamps == sorted(stamps)

    script.write_text("import sys\nsys.exit('error: the dataset has no train split')\n")
    failed = gpu_check.diffusers_dpo(opts, tiny.tiny_pipeline_dir("sd15"), real_pairs(32), tmp_path / "again")
    assert failed["error"] == ["error: the dataset has no train split"]
