"""--config FILE (mechanics/flags.py): a trainer's run.json replays its run bitwise, a YAML or JSON file of flags
is as if typed, a typed flag wins over the file, and what cannot be used is refused in one `error:` line."""
import json

import pytest

import losses
import reference
import train_sd15
import train_sdxl
from helpers import main_or_exit, read_log, run_sd15
from mechanics import flags


def resolve(script, argv):
    family = script.__name__.removeprefix("train_")
    return flags.resolve([str(a) for a in argv], script.__doc__, family, script.RECIPE, script.TINY_RECIPE,
                         losses.LOSSES, reference.METHODS)[0]


def record(script, argv, folder) -> str:
    """The run.json runtime.start writes for these flags ({"family": ..., **vars(args)}), without a run."""
    args = resolve(script, [*argv, "--output_dir", folder])
    path = folder / "run.json"
    folder.mkdir(exist_ok=True)
    path.write_text(json.dumps({"family": script.__name__.removeprefix("train_"), **vars(args)}, indent=1))
    return str(path)


def train(*argv) -> None:
    main_or_exit(train_sd15, [str(a) for a in argv])


def numbers(log, key):
    return [r[key] for r in log]


def test_a_run_json_replays_its_run_bitwise_and_the_replay_resumes(tmp_path, capsys):
    original = run_sd15(tmp_path / "a", "--max_steps", 6, "--checkpoint_every", 3)
    train("--config", tmp_path / "a" / "run.json", "--output_dir", tmp_path / "c")
    replay = read_log(tmp_path / "c")
    for key in ("loss", "accuracy"):
        assert numbers(replay, key) == numbers(original, key), key
    recorded = json.loads((tmp_path / "a" / "run.json").read_text())
    replayed = json.loads((tmp_path / "c" / "run.json").read_text())
    assert replayed.pop("config") == str(tmp_path / "a" / "run.json")
    assert replayed.pop("output_dir") == str(tmp_path / "c")
    assert replayed == {k: v for k, v in recorded.items() if k not in ("config", "output_dir")}
    # the replay's own run.json replays too; a typed flag wins over the file's: 4 steps, the original's first 4
    train("--config", tmp_path / "c" / "run.json", "--output_dir", tmp_path / "b", "--max_steps", 4)
    short = read_log(tmp_path / "b")
    assert numbers(short, "step") == [1, 2, 3, 4] and numbers(short, "loss") == numbers(original, "loss")[:4]
    # continued from its checkpoint in its own folder: the original's six steps
    train("--config", tmp_path / "b" / "run.json", "--resume", "latest", "--max_steps", 6)
    resumed = read_log(tmp_path / "b")
    assert numbers(resumed, "step") == list(range(1, 7)) and numbers(resumed, "loss") == numbers(original, "loss")
    capsys.readouterr()
    # a replay into the recorded run's own folder, without --output_dir, would mix with that run: one line
    assert train_sd15.main(["--config", str(tmp_path / "a" / "run.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another --output_dir" in err[0] and str(tmp_path / "a") in err[0], err


def test_a_run_json_keeps_its_resolved_values_and_a_typed_flag_derives_anew(tmp_path, monkeypatch):
    path = record(train_sd15, [], tmp_path / "paper")  # the paper's recipe: lr 1e-8 × 2048, accumulation 2048
    args = resolve(train_sd15, ["--config", path, "--output_dir", tmp_path / "new"])
    assert args.learning_rate == 2048e-8 == json.loads((tmp_path / "paper" / "run.json").read_text())["learning_rate"]
    assert (args.gradient_accumulation_steps, args.effective_batch_size, args.beta) == (2048, 2048, 5000.0)
    halved = resolve(train_sd15, ["--config", path, "--effective_batch_size", 1024])  # lr per pair × the new batch
    assert halved.learning_rate == pytest.approx(1024e-8)
    assert resolve(train_sd15, ["--config", path, "--learning_rate", 1e-9]).learning_rate == pytest.approx(2048e-9)
    args = resolve(train_sd15, ["--config", path, "--method", "plain", "--loss", "kto"])  # the preset and β anew
    assert (args.tau, args.gamma, args.no_reward_scale, args.beta) == (0, 1.0, True, resolve(
        train_sd15, ["--method", "plain", "--loss", "kto"]).beta)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as many pairs per step on two processes
    args = resolve(train_sd15, ["--config", path])
    assert (args.gradient_accumulation_steps, args.effective_batch_size, args.learning_rate) == (1024, 2048, 2048e-8)
    monkeypatch.delenv("WORLD_SIZE")
    tiny = record(train_sd15, ["--tiny", "--resume", "latest", "--overwrite"], tmp_path / "tiny")
    args = resolve(train_sd15, ["--config", tiny, "--output_dir", tmp_path / "new"])
    assert (args.learning_rate, args.scale_lr, args.resume, args.overwrite) == (6e-5, False, None, False)


def test_a_flags_file_is_as_if_typed_and_the_command_line_wins(tmp_path, capsys, monkeypatch):
    yaml_file = tmp_path / "flags.yaml"
    yaml_file.write_text("learning_rate: 1e-5\nbeta: 300\nreward_scale: false\nno_flip: true\nloss: kto\n")
    args = resolve(train_sd15, ["--config", yaml_file])  # YAML 1.1 reads 1e-5 as a string: argparse's float
    assert (args.learning_rate, args.beta) == (pytest.approx(1e-5 * 2048), 300.0)  # typed: per pair × the batch
    assert (args.no_reward_scale, args.no_flip, args.loss, args.config) == (True, True, "kto", str(yaml_file))
    assert resolve(train_sd15, ["--config", yaml_file, "--no-scale_lr"]).learning_rate == 1e-5
    assert resolve(train_sd15, ["--config", yaml_file, "--beta", 50, "--reward_scale"]).beta == 50.0
    json_file = tmp_path / "flags.json"
    json_file.write_text(json.dumps({"max_steps": 7, "tau": 3, "compile": None, "tiny": True}))
    args = resolve(train_sd15, ["--config", json_file, "--method", "plain"])
    assert (args.max_steps, args.tau, args.gamma, args.compile, args.tiny) == (7, 3, 1.0, False, True)
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit) as exit_info:  # --help shows the values the run will take
        train_sd15.main(["--config", str(yaml_file), "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for value in (300.0, resolve(train_sd15, ["--config", yaml_file]).learning_rate, "kto"):
        assert f"(default: {value})" in shown, value


def test_what_cannot_be_used_is_refused_in_one_line(tmp_path, capsys):
    sdxl = record(train_sdxl, ["--tiny"], tmp_path / "sdxl")
    cases = {"lerning_rate: 1e-5\n": "no such flag lerning_rate (did you mean learning_rate?)",
             "max_steps: ten\n": "max_steps 'ten' is not a valid int",
             "tiny: 1\n": "tiny is an on/off flag",
             "loss: dop\n": "loss dop is not one of",
             "mixed_precision: no\n": "quote the value",
             "- beta\n": "must hold a mapping",
             "beta: [1\n": "is not valid YAML",
             "config: other.yaml\n": "cannot name another --config"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"flags{i}.yaml"
        path.write_text(text)
        assert train_sd15.main(["--config", str(path)]) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --config {path}") and message in err[0], (text, err)
    for argv, message in (([str(tmp_path / "missing.yaml")], "cannot be read"),
                          ([sdxl, "--output_dir", str(tmp_path / "x")], "run.json of a sdxl run")):
        assert train_sd15.main(["--config", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --config") and message in err[0], (argv, err)
