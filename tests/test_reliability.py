"""What a demanding user does to a run, each on the tiny SD1.5 model: resume the wrong run, share a folder,
diverge, feed it broken data, kill it mid-write, corrupt its files, and give it bad flags. Each case ends in
the documented behaviour (README, "Checkpoints and resume"), never a traceback or a silent wrong run."""
import errno
import os
import pickle
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
from offline import tiny
import train_sd15
from mechanics import checkpoints
from mechanics.errors import EXIT_DISK_FULL, EXIT_DIVERGED
from helpers import ROOT, read_log, run_sd15 as run, sd15_flags


def fails(capsys, argv, *fragments, code=2):
    """main(argv) ends with `code` and one `error:` line holding every fragment; returns that line."""
    assert train_sd15.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err[-5:]
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])
    return err[-1]


def flags(tmp_path, *more):
    return [*sd15_flags(), "--output_dir", str(tmp_path), *map(str, more)]


SHORT = ["--max_steps", 2, "--checkpoint_every", 2, "--learning_rate", 1e-4, "--tau", 2]


# Resume validates the run


def test_resume_refuses_changed_defining_flags_naming_each_old_and_new_value(tmp_path, capsys):
    run(tmp_path, *SHORT)
    line = fails(capsys, flags(tmp_path, "--max_steps", 4, "--resume", "latest", "--tau", 4,
                               "--learning_rate", 2e-4, "--train_batch_size", 2, "--effective_batch_size", 2),
                 "--tau 2 → 4", "--learning_rate 0.0001 → 0.0002", "--train_batch_size 4 → 2", "--resume_override")
    assert "--max_steps" not in line  # safe to change: allowed
    argv = flags(tmp_path, *SHORT, "--max_steps", 4, "--resume", "latest")
    argv[argv.index("--pretrained_model") + 1] = tiny.tiny_pipeline_dir("sd15", seed=1)  # same shape, other weights
    fails(capsys, argv, "--pretrained_model")


def test_resume_override_makes_the_new_value_take_effect(tmp_path):
    run(tmp_path, *SHORT)
    log = run(tmp_path, "--max_steps", 4, "--checkpoint_every", 2, "--tau", 2, "--learning_rate", 3e-4,
              "--resume", "latest", "--resume_override", "learning_rate")
    assert [r["lr"] for r in log] == pytest.approx([1e-4, 1e-4, 3e-4, 3e-4])
    state = torch.load(tmp_path / "checkpoint-4" / "state.pt", weights_only=True)
    assert all(g["lr"] == pytest.approx(3e-4) for g in state["optimizer"]["param_groups"])


def test_resume_after_a_lora_change_is_one_line_not_a_load_state_dict_traceback(tmp_path, capsys):
    run(tmp_path, *SHORT)
    fails(capsys, flags(tmp_path, *SHORT, "--max_steps", 4, "--resume", "latest", "--lora_rank", 4), "--lora_rank 0 → 4")


def test_a_checkpoint_is_data_not_a_program(tmp_path, capsys):
    run(tmp_path, *SHORT)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    with open(crafted / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "policy": Payload()}, f)
    fails(capsys, flags(tmp_path, *SHORT, "--max_steps", 4, "--resume", crafted), "cannot be read")
    assert not marker.exists()


# One run per output folder


def test_a_fresh_run_into_a_folder_with_another_run_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    run(tmp_path, *SHORT)
    fails(capsys, flags(tmp_path, *SHORT), "--resume latest", "--overwrite", "checkpoint-2")
    assert (tmp_path / "checkpoint-2").is_dir() and len(read_log(tmp_path)) == 2  # nothing was touched
    log = run(tmp_path, *SHORT, "--max_steps", 1, "--overwrite")
    assert [r["step"] for r in log] == [1] and checkpoints.checkpoint_dirs(str(tmp_path)) == []


def start_subprocess_run(output_dir, *more):
    proc = subprocess.Popen([sys.executable, "train_sd15.py", *flags(output_dir, "--max_steps", 1000, *more)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = output_dir / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    return proc


def test_two_runs_into_one_folder_the_second_is_refused_and_a_killed_ones_lock_is_gone(tmp_path, capsys):
    proc = start_subprocess_run(tmp_path, "--checkpoint_every", 1)
    try:
        fails(capsys, flags(tmp_path, "--max_steps", 2000, "--resume", "latest"), "in use by another run",
              f"pid {proc.pid}")
    finally:
        proc.kill()  # SIGKILL: no clean-up of its own
        proc.communicate()
    last = int(checkpoints.checkpoint_dirs(str(tmp_path))[-1].rsplit("-", 1)[1])
    log = run(tmp_path, "--max_steps", last + 2, "--checkpoint_every", 1, "--resume", "latest")
    assert [r["step"] for r in log] == list(range(1, last + 3))  # one run's log, no interleaved or repeated steps


# Divergence stops the run


def test_the_divergence_advice_names_the_flag_likely_at_fault():
    from types import SimpleNamespace
    from mechanics.trainlog import divergence_advice
    plain = dict(on_diverge="freeze", tau=32, mixed_precision="auto", max_grad_norm=1.0, learning_rate=2e-5, beta=5000.0)
    for change, flag in ((dict(on_diverge="ignore"), "--on_diverge freeze"), (dict(mixed_precision="fp16"),
                         "--mixed_precision bf16"), (dict(max_grad_norm=0.0), "--max_grad_norm 1"), ({}, "--learning_rate")):
        assert flag in divergence_advice(SimpleNamespace(**{**plain, **change})), change


def test_divergence_skips_steps_then_stops_with_exit_3_keeping_finite_checkpoints(tmp_path, capsys):
    fails(capsys, flags(tmp_path, "--max_steps", 30, "--learning_rate", 1e9, "--checkpoint_every", 1,
                        "--keep_checkpoints", 30), "diverged", "3 steps in a row", "--learning_rate (now 1e+09)",
          code=EXIT_DIVERGED)
    log = read_log(tmp_path)
    assert [r.get("skipped_step", False) for r in log[-3:]] == [True, True, True] and log[-1]["nonfinite_steps"] == 3
    assert not (tmp_path / "final").exists()
    for checkpoint in checkpoints.checkpoint_dirs(str(tmp_path)):
        state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["policy"].values()), checkpoint


# Data that cannot yield a batch fails fast


def broken_pairs(tmp_path, bad_images: bool = False, bad_labels: int = 0) -> str:
    """The built-in pairs with every image replaced by bytes that are no image, or some labels out of range."""
    table = pq.read_table(tiny.builtin_pairs()).to_pydict()
    if bad_images:
        table["jpg_0"] = table["jpg_1"] = [b"not an image"] * len(table["caption"])
    for i in range(bad_labels):
        table["label_0"][i], table["label_1"][i] = 1.3, -0.3  # outside [0, 1] (0.3/0.7 is a soft label)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({k: pa.array(v, type=pa.binary()) if k.startswith("jpg_") else v
                             for k, v in table.items()}), path)
    return str(path)


def test_undecodable_data_fails_fast_with_one_line_and_few_warnings(tmp_path, capsys):
    start = time.time()
    argv = flags(tmp_path, "--max_steps", 5)
    argv[argv.index("--dataset") + 1] = broken_pairs(tmp_path, bad_images=True)
    fails(capsys, argv, "no pair could be decoded")
    assert time.time() - start < 60


def test_a_stop_is_honoured_while_no_pair_decodes():
    class Undecodable(data.PairTransform):
        def __call__(self, pair, epoch, key):
            return None
    requests = []
    loader = data.PairLoader(data.load_pairs(tiny.builtin_pairs()), Undecodable(32), batch_size=2,
                             max_bad_in_a_row=10**9, stop_requested=lambda: requests.append(1) or len(requests) > 5)
    with pytest.raises(data.Interrupted):
        next(iter(loader))
    assert len(requests) == 6  # polled at every batch that yielded nothing, until the stop came


def test_bad_label_rows_are_counted_in_the_log(tmp_path):
    argv_pairs = broken_pairs(tmp_path, bad_labels=3)
    log = run(tmp_path / "run", "--max_steps", 2, "--dataset", argv_pairs, "--checkpoint_every", 1000)
    assert log[0]["skipped_rows"] == 3 and log[1]["skipped_rows"] == 0


# Crash-safe files


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    run(tmp_path, *SHORT)
    stale = tmp_path / "checkpoint-4.tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half")
    mine = tmp_path / f"checkpoint-9.tmp-{os.getppid()}"  # a live process's: left alone
    mine.mkdir()
    run(tmp_path, *SHORT, "--max_steps", 3, "--resume", "latest")
    assert not stale.exists() and mine.exists()


def test_a_full_disk_is_one_line_saying_how_much_the_checkpoint_needs(tmp_path, capsys, monkeypatch):
    real = checkpoints.shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    fails(capsys, flags(tmp_path, *SHORT), f"{tmp_path}", "checkpoint-2", "needs about", code=EXIT_DISK_FULL)


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one_resumable(tmp_path, capsys, monkeypatch):
    """The free-space check passes, then the write of checkpoint-2 hits ENOSPC: one line naming the folder and
    the space needed, exit code 4 (not the user-error 2), the progress bar closed, no temporary folder left,
    checkpoint-1 intact; after the disk is freed, --resume latest ends where a run never stopped ends."""
    steps = ["--max_steps", 3, "--checkpoint_every", 1, "--learning_rate", 1e-4, "--tau", 2]
    full = run(tmp_path / "full", *steps)
    real_save, saves = checkpoints.torch.save, []

    def fills_up(obj, f, *args, **kwargs):
        saves.append(f.name)
        if len(saves) == 2:
            f.write(b"x" * 100)  # part of the file made it to the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", fills_up)
    out = tmp_path / "cut"
    line = fails(capsys, flags(out, *steps), f"{out}/checkpoint-2", "needs about", "MB are free",
                 "--resume latest", code=EXIT_DISK_FULL)
    assert "checkpoint-2" in saves[1] and line.startswith("error: no space left on the device")
    assert [d.name for d in out.glob("checkpoint-*")] == ["checkpoint-1"] and not list(out.glob("*.tmp-*"))
    assert [r["step"] for r in read_log(out)] == [1, 2]  # every line written is whole
    assert not tqdm_bars_open()  # the log was closed: its progress bar is gone
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    resumed = run(out, *steps, "--resume", "latest")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def tqdm_bars_open() -> int:
    from tqdm import tqdm
    return sum(not getattr(bar, "disable", False) for bar in getattr(tqdm, "_instances", ()))


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    run(tmp_path, *SHORT)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.69')  # killed mid-write
    log = run(tmp_path, *SHORT, "--max_steps", 3, "--resume", "latest")
    assert [r["step"] for r in log] == [1, 2, 3]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_or_refuses(tmp_path, capsys, caplog):
    run(tmp_path, "--max_steps", 4, "--checkpoint_every", 2, "--tau", 2, "--learning_rate", 1e-4)
    (tmp_path / "checkpoint-4" / "state.pt").write_bytes(b"")
    log = run(tmp_path, "--max_steps", 5, "--checkpoint_every", 2, "--tau", 2, "--learning_rate", 1e-4,
              "--resume", "latest", "--keep_checkpoints", 5)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and "checkpoint-4: state.pt has 0 bytes" in caplog.text
    for checkpoint in checkpoints.checkpoint_dirs(str(tmp_path)):
        with open(os.path.join(checkpoint, "state.pt"), "wb"):
            pass  # emptied
    fails(capsys, flags(tmp_path, "--max_steps", 6, "--checkpoint_every", 2, "--tau", 2, "--learning_rate", 1e-4,
                        "--resume", "latest"), "can be read", "--overwrite")


def test_bin_statistics_survive_a_resume(tmp_path):
    common = ["--tau", 2, "--learning_rate", 1e-4, "--bin_stats_every", 4]
    full = run(tmp_path / "full", "--max_steps", 4, "--checkpoint_every", 1000, *common)
    run(tmp_path / "split", "--max_steps", 3, "--checkpoint_every", 2, *common)
    resumed = run(tmp_path / "split", "--max_steps", 4, "--checkpoint_every", 2, *common,  # mid-window: steps 1–2's
                  "--resume", str(tmp_path / "split" / "checkpoint-2"))
    assert sum(full[-1]["bin_count"]) == 4 * 4  # the four steps' pairs, not only the two since the resume
    for key in ("bin_count", "bin_accuracy", "bin_reward_magnitude", "bin_model_err"):
        assert resumed[-1][key] == full[-1][key], key


# Every bad flag and path is refused before the models load


def test_bad_flags_and_paths_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_sd15, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    fails(capsys, flags(afile), "is a file")
    fails(capsys, flags(afile / "under"), "cannot be written")
    fails(capsys, flags("/proc/1/not-writable"), "cannot be written")
    for flag in ("--checkpoint_every", "--train_batch_size", "--resolution", "--keep_checkpoints", "--bin_stats_every"):
        fails(capsys, flags(tmp_path / "out", flag, 0), f"{flag} 0 is out of range: it must be > 0")
    fails(capsys, flags(tmp_path / "out", "--dataloader_workers", -1), "--dataloader_workers -1 is out of range: it must be >= 0")
    sdxl = [*flags(tmp_path / "out")]
    sdxl[sdxl.index("--pretrained_model") + 1] = tiny.tiny_pipeline_dir("sdxl")
    fails(capsys, sdxl, "StableDiffusionXLPipeline", "train_sdxl.py")
    fails(capsys, flags(tmp_path / "out", "--resume_override", "tau"), "goes with --resume")


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    proc = start_subprocess_run(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # The first Ctrl-C gave SIGINT its default action back, so the second ends the process by that signal (a shell
    # shows 130); if both arrive inside one forward pass, Python sees one and the run stops after the step (130).
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT) and "Traceback" not in err, err[-2000:]


# eval.py's image store


def test_eval_samples_a_truncated_stored_image_again(tmp_path):
    import eval as ev
    base = tiny.tiny_pipeline_dir("sd15")
    model = ev.model_ref(f"tiny={base}")
    settings = {"steps": 2, "guidance_scale": 1.0, "height": 32, "width": 32, "family": "sd15"}
    keys, prompts = [(0, 0), (0, 1)], {0: "a red square"}
    store = tmp_path / "images"
    assert ev.generate_images(model, prompts, keys, store, settings, "cpu", torch.float32, 2, progress=False) == 2
    path = ev.image_path(store, 0, 1)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # cut short by something else
    assert ev.generate_images(model, prompts, keys, store, settings, "cpu", torch.float32, 2, progress=False) == 1
    from PIL import Image
    with Image.open(path) as im:
        im.load()  # complete again
        assert im.size == (32, 32)


def test_the_last_step_is_checkpointed_before_final_is_written(tmp_path):
    """A run that checkpoints keeps its last steps even if writing final/ fails (one that never reaches its first
    checkpoint, as most tests, is not made to write one)."""
    run(tmp_path, "--max_steps", 3, "--checkpoint_every", 2)
    assert [os.path.basename(d) for d in checkpoints.checkpoint_dirs(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    assert torch.load(tmp_path / "checkpoint-3" / "state.pt", weights_only=True)["step"] == 3


def test_a_rewind_is_a_branch_that_latest_and_pruning_never_return_to(tmp_path, capsys):
    """--resume checkpoint-4 with a new learning rate, on a run at step 8: checkpoints 6 and 8, final/ and the log
    move into abandoned-after-4/; the branch's log reads 1..8 once; --keep_checkpoints 1 keeps the branch's own."""
    common = ["--checkpoint_every", 2, "--tau", 2, "--learning_rate", 1e-4]
    first = run(tmp_path, "--max_steps", 8, *common, "--keep_checkpoints", 10)
    branched = run(tmp_path, "--max_steps", 6, *common[:-2], "--learning_rate", 5e-5, "--keep_checkpoints", 1,
                   "--resume", str(tmp_path / "checkpoint-4"), "--resume_override", "learning_rate")
    aside = tmp_path / "abandoned-after-4"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-6", "checkpoint-8", "final", "log.jsonl"]
    assert [r["step"] for r in read_log(aside)] == list(range(1, 9))  # the abandoned line, whole
    assert [d.name for d in tmp_path.glob("checkpoint-*")] == ["checkpoint-6"]  # the branch's, not pruned away
    assert [r["loss"] for r in branched[:4]] == [r["loss"] for r in first[:4]]
    assert branched[4]["loss"] != first[4]["loss"] or branched[4]["lr"] != first[4]["lr"]
    again = run(tmp_path, "--max_steps", 8, *common[:-2], "--learning_rate", 5e-5, "--keep_checkpoints", 1,
                "--resume", "latest")
    assert [r["step"] for r in again] == list(range(1, 9)) and again[:6] == branched[:6]
    assert not (tmp_path / "abandoned-after-6").exists()  # continuing the branch's newest point is no rewind


def test_a_checkpoint_with_damaged_bytes_is_not_trusted_and_the_one_before_resumes(tmp_path, caplog):
    """A few bytes changed inside the newest checkpoint's tensors (the zip still reads): its manifest's checksum
    says so, --resume latest warns once and continues from the one before, to the losses of a run never damaged;
    named explicitly, it is refused in one line."""
    steps = ["--checkpoint_every", 2, "--tau", 2, "--learning_rate", 1e-4, "--keep_checkpoints", 5]
    full = run(tmp_path / "full", "--max_steps", 6, *steps)
    run(tmp_path / "cut", "--max_steps", 4, *steps)
    state = tmp_path / "cut" / "checkpoint-4" / "state.pt"
    blob = bytearray(state.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 4096] = os.urandom(4096)
    state.write_bytes(bytes(blob))
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path / "cut", "--max_steps", 6, *steps, "--resume", "latest")
    warned = [r.getMessage() for r in caplog.records if "trying the one before" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint-4: state.pt is damaged" in warned[0], warned
    assert (tmp_path / "cut" / "abandoned-after-2" / "checkpoint-4").is_dir()  # set aside, never resumed again
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    (tmp_path / "cut" / "checkpoint-6" / "MANIFEST.json").unlink()  # a checkpoint from before manifests: read as is
    assert checkpoints.verify(str(tmp_path / "cut" / "checkpoint-6")) is None
    os.remove(tmp_path / "cut" / "checkpoint-2" / "state.pt")
    assert checkpoints.verify(str(tmp_path / "cut" / "checkpoint-2")) == "state.pt is missing"


def test_a_full_disk_at_a_log_line_is_one_line_naming_the_log(tmp_path, capsys, monkeypatch):
    import builtins
    from mechanics import trainlog
    real_open, lines = builtins.open, []

    def log_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.jsonl") and mode == "a":
            lines.append(path)
            if len(lines) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(trainlog, "open", log_open, raising=False)  # the log's own appends only
    fails(capsys, flags(tmp_path, "--max_steps", 3), f"{tmp_path}/log.jsonl: it needs about", "are free",
          code=EXIT_DISK_FULL)
    assert [r["step"] for r in read_log(tmp_path)] == [1]


def test_the_manifest_tells_truncated_overwritten_and_missing_files_apart(tmp_path):
    """What `cp -r ckpt/sharded/* dst/` or a copy cut short leaves: every case named, each rank checking its share."""
    folder = tmp_path / "checkpoint-2"
    (folder / "sharded").mkdir(parents=True)
    for name, size in (("state.pt", 3000), ("rank-0.pt", 2000), ("rank-1.pt", 2000), ("sharded/.metadata", 500),
                       ("sharded/__0_0.distcp", 8000), ("sharded/__1_0.distcp", 8000)):
        (folder / name).write_bytes(os.urandom(size))
    checkpoints.write_manifest(str(folder))
    assert checkpoints.verify(str(folder)) is None
    shard = folder / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:5000])  # truncated
    assert checkpoints.verify(str(folder)) == "sharded/__1_0.distcp has 5000 bytes, not the 8000 it was written with"
    shard.write_bytes(b"PK" + os.urandom(7998))  # its zip structure overwritten, same size
    assert "sharded/__1_0.distcp is damaged" in checkpoints.verify(str(folder))
    found = [checkpoints.verify(str(folder), rank, 2) for rank in (0, 1)]  # the file is one rank's share only
    assert sum(reason is not None for reason in found) == 1
    (folder / "sharded" / ".metadata").unlink()
    assert any(checkpoints.verify(str(folder), rank, 2) == "sharded/.metadata is missing" for rank in (0, 1))
