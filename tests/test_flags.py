"""Flags are resolved once (mechanics/flags.py): --help shows the value each flag takes, run.json records the
same values, --method sets τ, γ and λ together, every numeric flag has a range, and a checkpoint stays
resumable when the code gains a flag."""
import json
import math

import pytest

import losses
import reference
import train_flux
import train_sd15
import train_sd3
import train_sdxl
from helpers import run_sd15
from mechanics import flags, runtime
from mechanics.errors import UsageError

TRAINERS = {"sd15": train_sd15, "sdxl": train_sdxl, "sd3": train_sd3, "flux": train_flux}


def resolve(script, argv):
    family = script.__name__.removeprefix("train_")
    return flags.resolve(argv, script.__doc__, family, script.RECIPE, script.TINY_RECIPE, losses.LOSSES,
                         reference.METHODS, resolution_multiple=16 if family in ("sd3", "flux") else 8,
                         model_flags=getattr(script, "model_flags", None))


def help_defaults(script, argv, capsys, monkeypatch) -> dict:
    """flag dest → the text after "(default: " in `script --help`, read back from what argparse printed."""
    monkeypatch.setenv("COLUMNS", "100000")  # one line per flag's help
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = flags.parser("", losses.LOSSES, reference.METHODS)
    if hasattr(script, "model_flags"):
        script.model_flags(parser)
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    found = {}
    for action in parser._actions:
        block = blocks.get(action.option_strings[0]) if action.option_strings else None
        if block and "(default: " in block:
            found[action.dest] = block.rsplit("(default: ", 1)[1].rsplit(")", 1)[0].split(") [valid")[0]
    return found


@pytest.mark.parametrize("name", sorted(TRAINERS))
@pytest.mark.parametrize("extra", [[], ["--tiny"], ["--tiny", "--method", "plain", "--loss", "kto"]])
def test_help_shows_the_values_that_run_json_records(name, extra, tmp_path, capsys, monkeypatch):
    script = TRAINERS[name]
    argv = [*extra, "--output_dir", str(tmp_path)]
    shown = help_defaults(script, argv, capsys, monkeypatch)
    args, _ = resolve(script, argv)
    runtime.start(args, name)
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert len(shown) > 50  # every flag with a value; --help only prints the store_false twin without one
    for dest, text in shown.items():
        assert text == str(recorded[dest]), dest
    if extra == ["--tiny"] and name == "sd15":  # the toy recipe, not the generic one: τ 20, the calibrated δ
        assert (recorded["tau"], recorded["delta"], recorded["max_steps"], recorded["beta"]) == (20, 0.045, 100, 100.0)
        assert recorded["pretrained_model"].endswith("toy_model")
    if not extra and name != "flux":  # the paper's recipe: 1e-8 per pair × 2048 pairs (FLUX: LoRA at 1e-5)
        assert recorded["learning_rate"] == pytest.approx(2048e-8) and recorded["gradient_accumulation_steps"] == 2048


def test_method_sets_tau_gamma_and_lambda_together_and_a_flag_still_wins():
    expected = {"plain": (0, 1.0, True), "exploration": (32, 1.0, True), "timestep": (0, 0.9, False),
                "ours": (32, 0.9, False)}
    for method, values in expected.items():
        args, _ = resolve(train_sd15, ["--method", method])
        assert (args.tau, args.gamma, args.no_reward_scale) == values, method
    args, _ = resolve(train_sd15, ["--method", "plain", "--tau", "4", "--reward_scale"])
    assert (args.tau, args.gamma, args.no_reward_scale) == (4, 1.0, False)


def test_the_demo_splits_its_batch_over_the_processes(monkeypatch):
    for world, batch in ((1, 4), (2, 2), (4, 1)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args, _ = resolve(train_sdxl, ["--tiny"])
        assert (args.train_batch_size, args.gradient_accumulation_steps, args.effective_batch_size) == (batch, 1, 4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match="--effective_batch_size"):
        resolve(train_sdxl, ["--tiny"])  # 4 pairs cannot be split over 3 processes: says which flag to set


# (flag, a value out of its range) for every flag with a range; resolution per family below.
OUT_OF_RANGE = {"beta": -5, "delta": -1, "gamma": 1.5, "num_bins": 0, "tau": -1, "monitor_samples": 0,
                "divergence_every": -1, "caption_dropout": 1.5, "max_train_samples": 0, "resolution": 0,
                "max_steps": 0, "train_batch_size": 0, "effective_batch_size": 0, "gradient_accumulation_steps": 0,
                "learning_rate": 0, "warmup_steps": -1, "adam_beta1": 1, "adam_beta2": -0.1, "weight_decay": -1,
                "adam_epsilon": 0, "max_grad_norm": -1, "seed": -1, "cpu_threads": 0, "dataloader_workers": -1,
                "lora_rank": -1, "lora_alpha": 0, "checkpoint_every": 0, "keep_checkpoints": 0,
                "max_nonfinite_steps": 0, "bin_stats_every": 0, "tie_margin": 0.5, "guidance_scale": -1,
                "t5_max_length": 513, "validation_every": -1, "validation_images": 0, "sample_steps": 0,
                "sample_guidance_scale": -1, "eval_every": -1, "eval_limit": 0}


def test_every_ranged_flag_has_a_bad_value_in_this_table():
    assert set(OUT_OF_RANGE) == set(flags.RANGES)


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_flag_out_of_its_range_is_refused_in_one_line(name, capsys):
    script = TRAINERS[name]
    known = vars(resolve(script, ["--tiny"])[0])  # SD3 and FLUX have flags of their own
    bad = [(flag, value) for flag, value in OUT_OF_RANGE.items() if flag in known]
    bad.append(("resolution", {"sd15": 33, "sdxl": 1020, "sd3": 40, "flux": 40}[name]))  # VAE 8×; SD3, FLUX 2×2 patches
    bad += [(flag, "nan") for flag, value in known.items() if isinstance(value, float)]  # NaN: every float flag
    for flag, value in bad:
        assert script.main(["--tiny", f"--{flag}", str(value)]) == 2, flag  # refused before anything loads
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, (flag, err)
        assert err[0].startswith(f"error: --{flag} {value}"), err[0]
    assert {"guidance_scale", "t5_max_length"} <= {flag for flag, _ in bad} or name not in ("flux",)
    args, _ = resolve(script, ["--tiny", "--resolution", "48", "--max_grad_norm", "0"])  # 0: no clipping
    assert args.resolution == 48 and args.max_grad_norm == 0


def test_a_checkpoint_stays_resumable_when_the_code_gains_a_flag(tmp_path, monkeypatch, capsys):
    flags_before = ["--max_steps", 2, "--checkpoint_every", 1, "--tau", 1]
    run_sd15(tmp_path, *flags_before)
    original = flags.parser

    def parser_with_a_new_flag(doc, objectives, methods):
        p = original(doc, objectives, methods)
        p.add_argument("--new_flag", type=int, default=7, help="a flag the code gained after the checkpoint")
        return p

    monkeypatch.setattr(flags, "parser", parser_with_a_new_flag)
    with pytest.raises(SystemExit):  # the new flag at another value is another run
        run_sd15(tmp_path, "--max_steps", 3, "--checkpoint_every", 1, "--tau", 1, "--resume", "latest",
                 "--new_flag", 8)
    assert "--new_flag (unset) → 8" in capsys.readouterr().err
    log = run_sd15(tmp_path, "--max_steps", 3, "--checkpoint_every", 1, "--tau", 1, "--resume", "latest")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)


def test_fsdp_is_refused_where_it_cannot_work_and_takes_adamw_for_the_adafactor_recipes(monkeypatch, capsys):
    for argv, message in ((["--fsdp"], "launch with torchrun"),):
        with pytest.raises(UsageError, match=message):
            resolve(train_sdxl, argv)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, message in ((["--fsdp", "--lora_rank", "4"], "drop --fsdp"),
                          (["--fsdp", "--optimizer", "adafactor"], "use --optimizer adamw")):
        with pytest.raises(UsageError, match=message):
            resolve(train_sdxl, argv)
    assert resolve(train_sdxl, ["--fsdp"])[0].optimizer == "adamw" and resolve(train_sdxl, [])[0].optimizer == "adafactor"
