"""train_sd15.py end to end on the tiny SD1.5-layout model, offline (the real from_pretrained path).

The runs pass the random tiny pipeline and the built-in smooth-vs-noise pairs explicitly: they test the
mechanics in seconds, and `--tiny` alone (the toy model and its sampled pairs) is tested in test_toy.py."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mechanics import checkpoints, loading, runtime as mruntime
from mechanics.errors import UsageError
import reference
import train_sd15
from helpers import ROOT, check_resume_matches_an_uninterrupted_run, run_sd15 as run, sd15_flags as tiny_flags, unet_weights


def test_tiny_run_starts_at_log2_and_saves_a_pipeline_that_samples(tmp_path):
    log = run(tmp_path, "--max_steps", 3)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["accuracy"] == 0.5 and log[0]["reward_margin"] == 0.0
    assert all(key in log[-1] for key in ("bin_accuracy", "bin_reward_scale", "bin_count", "lr", "grad_norm"))
    assert sum(log[-1]["bin_count"]) == 3 * 4  # every pair of the 3 steps lands in one t-bin
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "final")
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    trained, base = unet_weights(tmp_path / "final"), unet_weights(os.environ["RDPO_CACHE"] + "/tiny-sd15-v1")
    assert any(not torch.equal(trained[k], base[k]) for k in trained)


def test_accuracy_rises_above_chance_on_easy_pairs(tmp_path):
    # Plain Diffusion-DPO on pairs whose winner is a smooth image of the named colour and the loser noise;
    # uniform t so that the low-noise steps, where the pair can be told apart, are well sampled.
    log = run(tmp_path, "--max_steps", 60, "--tau", 0, "--gamma", 1, "--learning_rate", 1e-3,
              "--train_batch_size", 8, "--effective_batch_size", 8, "--bin_stats_every", 30,
              "--checkpoint_every", 1000)
    assert log[0]["accuracy"] == 0.5
    late = [r["accuracy"] for r in log[-20:]]
    assert sum(late) / len(late) > 0.6
    low_noise_bins = log[-1]["bin_accuracy"][:5]
    assert sum(low_noise_bins) / 5 > 0.6


def test_reference_updates_at_multiples_of_tau_and_freezes_past_delta(tmp_path):
    log = run(tmp_path, "--max_steps", 8, "--tau", 2, "--delta", 1e-5, "--learning_rate", 1e-4)
    updates = [r["step"] for r in log if r["ref_updated"]]
    assert updates[0] == 2 and all(s % 2 == 0 for s in updates)
    crossed = next(r for r in log if r["ref_updated"] and r["divergence"] > 1e-5)
    assert crossed["ref_frozen"]
    assert all(r["ref_frozen"] and not r["ref_updated"] for r in log if r["step"] > crossed["step"])


def test_diffusion_dpo_settings_never_change_the_reference(tmp_path):
    run(tmp_path, "--max_steps", 4, "--tau", 0, "--gamma", 1, "--no_reward_scale", "--checkpoint_every", 4,
        "--learning_rate", 1e-4)
    state = torch.load(tmp_path / "checkpoint-4" / "state.pt", weights_only=False)
    base = unet_weights(os.environ["RDPO_CACHE"] + "/tiny-sd15-v1")
    assert all(torch.equal(state["reference"]["model"][k], base[k]) for k in base)
    assert any(not torch.equal(state["policy"][k], base[k]) for k in base)
    assert not state["reference"]["frozen"] and state["reference"]["num_updates"] == 0


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    check_resume_matches_an_uninterrupted_run(run, unet_weights, tmp_path)


def test_two_process_torchrun_matches_one_process_with_twice_the_accumulation(tmp_path):
    common = [*tiny_flags(), "--max_steps", "3", "--train_batch_size", "1", "--learning_rate", "1e-4",
              "--tau", "2", "--checkpoint_every", "1000", "--no_flip", "--caption_dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train_sd15.py", *common, "--effective_batch_size", "2",
                          "--output_dir", str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "train_sd15.py", *common, "--effective_batch_size", "2",
                          "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = unet_weights(tmp_path / "one" / "final"), unet_weights(tmp_path / "two" / "final")
    base = unet_weights(os.environ["RDPO_CACHE"] + "/tiny-sd15-v1")
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-5 and gap < 1e-3 * moved + 1e-6
    log_one = [json.loads(l) for l in open(tmp_path / "one" / "log.jsonl")]
    log_two = [json.loads(l) for l in open(tmp_path / "two" / "log.jsonl")]
    assert [r["loss"] for r in log_two] == pytest.approx([r["loss"] for r in log_one], rel=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, "train_sd15.py", *tiny_flags(), "--max_steps", "1000",
                             "--output_dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # a stop by signal exits with its own code
    saved = checkpoints.checkpoint_dirs(str(tmp_path))
    assert len(saved) == 1 and "stopped at step" in out
    step = int(saved[0].rsplit("-", 1)[1])
    assert json.loads(log.read_text().splitlines()[-1])["step"] == step


def test_sigterm_to_the_torchrun_launcher_checkpoints_every_rank_and_the_launcher_exits_1(tmp_path):
    """The README's account: the launcher passes SIGTERM on; both ranks stop at the same step with one checkpoint
    that verifies; torchrun's own exit code is 1."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29535", "train_sd15.py", *tiny_flags(), "--max_steps", "1000", "--train_batch_size", "1",
                             "--effective_batch_size", "4", "--checkpoint_every", "1000", "--no-plot",
                             "--output_dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log, deadline = tmp_path / "log.jsonl", time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    saved = checkpoints.checkpoint_dirs(str(tmp_path))
    assert len(saved) == 1 and checkpoints.verify(saved[0]) is None and "stopped at step" in out
    assert json.loads(log.read_text().splitlines()[-1])["step"] == int(saved[0].rsplit("-", 1)[1])


def expect_error(capsys, argv, *fragments):
    assert train_sd15.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in err[-1]


def test_offline_hub_model_fails_at_once_naming_the_offline_option(capsys, tmp_path):
    start = time.time()
    expect_error(capsys, ["--output_dir", str(tmp_path), "--dataset", str(tmp_path)], "--tiny")
    assert time.time() - start < 10


def test_bad_inputs_give_one_line_errors(capsys, tmp_path):
    expect_error(capsys, ["--tiny", "--pretrained_model", str(tmp_path / "missing"), "--output_dir", str(tmp_path)],
                 "is not one: give --dataset")
    expect_error(capsys, [*tiny_flags(), "--max_steps", "0", "--output_dir", str(tmp_path)], "--max_steps")
    expect_error(capsys, [*tiny_flags(), "--resume", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)], "--resume")
    expect_error(capsys, [*tiny_flags(), "--train_batch_size", "4", "--effective_batch_size", "6", "--output_dir",
                          str(tmp_path)], "multiple")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    expect_error(capsys, ["--pretrained_model", str(empty), "--dataset", str(tmp_path), "--output_dir",
                          str(tmp_path)], "text_encoder")


def test_tokenizer_with_a_handful_of_tokens_is_an_error(capsys):
    class Tok:
        def __len__(self):
            return 2

    class Enc:
        class config:
            vocab_size = 49408
    with pytest.raises(UsageError, match="2 tokens"):
        loading.check_tokenizer(Tok(), Enc(), "tokenizer")


def clean_latents(probe, scheduler):
    """x0 of each probe image, recovered from its noised latent and its ε target: x_t = √ᾱ x0 + √(1−ᾱ) ε."""
    a = scheduler.alphas_cumprod[probe["t"].cpu()].view(-1, 1, 1, 1)
    return (probe["noisy"].cpu() - (1 - a).sqrt() * probe["target"].cpu()) / a.sqrt()


def distinct_rows(x, tolerance=1e-2):
    """How many different images the rows of x hold. Two rows are one image when no element differs by more
    than `tolerance`: ~1000× the float error of recovering x0 at t near T (dividing by √ᾱ ≈ 0.07 amplifies a
    CPU's rounding ~15×), and far below the distance between two images' latents. No rounding to a grid, whose
    boundaries a CPU's last bit can cross."""
    images = []
    for row in x.flatten(1):
        if not any((row - image).abs().max() <= tolerance for image in images):
            images.append(row)
    return len(images)


def test_one_pair_micro_batches_still_monitor_many_winners(tmp_path):
    """PAPER.md §5 trains on 1 pair per micro-batch; the monitor's D must not then rest on one image."""
    from diffusers import DDPMScheduler
    log = run(tmp_path, "--max_steps", 2, "--tau", 1, "--train_batch_size", 1, "--effective_batch_size", 1,
              "--monitor_samples", 16, "--checkpoint_every", 2)
    assert all(r["ref_updated"] and math.isfinite(r["divergence"]) and r["ref_distance"] > 0 for r in log)
    probe = torch.load(tmp_path / "checkpoint-2" / "state.pt", weights_only=False)["monitor_probe"]
    scheduler = DDPMScheduler.from_pretrained(tiny_flags()[2], subfolder="scheduler")
    assert probe["noisy"].shape[0] == 16 and distinct_rows(clean_latents(probe, scheduler)) == 16
    assert len(set(probe["t"].tolist())) > 8  # each image its own t


def test_batch_monitor_repeats_the_micro_batch_winner_and_the_probe_does_not(tmp_path):
    """The two estimators of --monitor, built as the loop builds them, from a one-pair micro-batch."""
    import data
    from helpers import setup_sd15
    args, runtime, models = setup_sd15(tmp_path, "--monitor_samples", 8)
    one_pair = next(iter(data.PairLoader(data.load_pairs(args.dataset), data.PairTransform(32), batch_size=1)))
    generators = mruntime.micro_generators(0, 1, reference.MONITOR_STREAM, runtime.device)
    batch_probe = train_sd15.monitor_probe(models, one_pair, 8, generators, runtime, chunk=2)
    probe_pairs = next(iter(loading.pair_loader(args, runtime, batch_size=8, num_workers=0, caption_dropout=0.0,
                                                seed=args.seed + reference.PROBE_SEED, announce=False)))
    probe = train_sd15.monitor_probe(models, probe_pairs, 8, generators, runtime, chunk=2)
    assert distinct_rows(clean_latents(batch_probe.state_dict(), models.scheduler)) == 1
    assert distinct_rows(clean_latents(probe.state_dict(), models.scheduler)) == 8
    assert probe(models.unet).shape == probe.target.shape and probe.target.shape[0] == 8


def test_reward_scale_norm_divides_lambda_by_its_mean_under_the_sampler(tmp_path):
    import schedule
    from diffusers import DDPMScheduler
    plain = run(tmp_path / "plain", "--max_steps", 2, "--bin_stats_every", 2, "--checkpoint_every", 1000)
    normed = run(tmp_path / "normed", "--max_steps", 2, "--bin_stats_every", 2, "--checkpoint_every", 1000,
                 "--reward_scale_norm")
    scheduler = DDPMScheduler.from_pretrained(tiny_flags()[2], subfolder="scheduler")
    mean = schedule.sampler_mean(schedule.reward_scale(scheduler.alphas_cumprod), 0.9, 50)
    assert mean == pytest.approx(1.50, abs=0.01)
    for a, b in zip(plain[-1]["bin_reward_scale"], normed[-1]["bin_reward_scale"]):
        assert (a is None) == (b is None) and (a is None or b == pytest.approx(a / mean, rel=1e-5))


def test_kto_reference_point_is_the_previous_steps_mean_reward(tmp_path):
    log = run(tmp_path, "--max_steps", 4, "--loss", "kto", "--train_batch_size", 2, "--effective_batch_size", 4,
              "--learning_rate", 1e-4, "--checkpoint_every", 1000)
    assert log[0]["kl_baseline"] == 0.0 and log[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    for previous, record in zip(log, log[1:]):
        assert record["kl_baseline"] == pytest.approx(max(0.0, previous["kto_mean_reward"]), rel=1e-5, abs=1e-9)
    assert all(r["kto_mean_reward"] != 0 for r in log[1:])  # the policy has moved: the recursion is exercised
