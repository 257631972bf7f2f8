"""--cache_latents (latent_cache.py): the same batches and the same loss as the uncached path, and the VAE and
text encoder never run once the cache is built. Tiny SD1.5, offline."""
import math
import os
import threading

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

import data
from mechanics import runtime as mruntime
import train_sd15
from helpers import run_sd15 as run_log, sd15_dpo_loss, setup_sd15 as setup
from mechanics import latent_cache


def encoders(model):
    return (lambda pixels: train_sd15.encode_images(model, pixels),
            lambda captions: train_sd15.encode_captions(model, captions))


def data_of(args):
    dataset = data.load_pairs(args.dataset, max_samples=args.max_train_samples)
    transform = data.PairTransform(args.resolution, random_flip=not args.no_flip,
                                   caption_dropout=args.caption_dropout, seed=args.seed)
    return dataset, transform


def test_cached_batches_give_the_same_loss_as_uncached_ones(tmp_path):
    args, runtime, model = setup(tmp_path, "--caption_dropout", 0.3, "--max_train_samples", 64)
    dataset, transform = data_of(args)
    uncached = data.PairLoader(dataset, transform, args.train_batch_size, seed=args.seed)
    cached = latent_cache.cached_loader(args, runtime, dataset, transform, *encoders(model))
    # A policy apart from its reference, so that the loss is not log 2 whatever the inputs.
    reference = train_sd15.UNet2DConditionModel.from_config(model.unet.config)
    reference.load_state_dict(model.unet.state_dict())
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    flips = drops = 0
    for step, (a, b) in enumerate(zip(uncached, cached)):
        if step == 6:
            break
        assert a["captions"] == b["captions"] and torch.equal(a["rows"], b["rows"])
        assert torch.equal(a["original_sizes"], b["original_sizes"]) and torch.equal(a["crop_top_lefts"], b["crop_top_lefts"])
        assert "pixel_values" not in b and b["latent_moments"].shape[0] == 2 * len(b["captions"])
        assert torch.allclose(b["latent_moments"], train_sd15.encode_images(model, a["pixel_values"]), atol=1e-5)
        draws = [transform.draws(0, int(r)) for r in a["rows"]]
        flips += sum(d["flip"] for d in draws)
        drops += sum(d["drop_caption"] for d in draws)
        results = []
        for batch in (a, b):
            generators = mruntime.micro_generators(args.seed, step, 0, runtime.device)
            loss, metrics = sd15_dpo_loss(args, model, batch, generators, model.unet, reference)
            results.append((loss.item(), {k: v.item() for k, v in metrics.items()}))
        (loss_a, metrics_a), (loss_b, metrics_b) = results
        # The VAE run on another batch composition rounds differently (~1e-7), and β/2 = 250 amplifies
        # error differences in the logit: float tolerance, tighter on the errors than on the loss.
        assert abs(loss_a - math.log(2)) > 1e-4
        assert loss_b == pytest.approx(loss_a, rel=1e-4)
        for name in metrics_a:
            tolerance = 1e-5 if name.endswith(("err_w", "err_l")) else 1e-3
            assert metrics_b[name] == pytest.approx(metrics_a[name], rel=tolerance, abs=1e-6), name
    assert flips and drops  # both augmentations were exercised


def counting(cls, method, calls):
    original = getattr(cls, method)

    def counted(self, *args, **kwargs):
        calls[cls.__name__] = calls.get(cls.__name__, 0) + 1
        return original(self, *args, **kwargs)
    return counted


def test_training_from_the_cache_matches_and_never_runs_the_encoders(tmp_path, monkeypatch):
    flags = ["--max_steps", 3, "--tau", 2, "--learning_rate", 1e-4, "--checkpoint_every", 1000,
             "--cache_dir", tmp_path / "cache", "--max_train_samples", 32]
    plain = run_log(tmp_path / "plain", *flags)
    first = run_log(tmp_path / "first", *flags, "--cache_latents")  # builds the cache
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    divergences = lambda log: [r["divergence"] for r in log if r["ref_updated"]]
    assert len(divergences(first)) == 1
    assert divergences(first) == pytest.approx(divergences(plain), rel=1e-3, abs=1e-7)
    calls = {}
    monkeypatch.setattr(AutoencoderKL, "encode", counting(AutoencoderKL, "encode", calls))
    monkeypatch.setattr(CLIPTextModel, "forward", counting(CLIPTextModel, "forward", calls))
    again = run_log(tmp_path / "again", *flags, "--cache_latents")  # reads the cache the first run built
    assert calls == {}
    assert [r["loss"] for r in again] == [r["loss"] for r in first]
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_cache_built_by_two_ranks_equals_one_built_by_one(tmp_path, monkeypatch):
    args, runtime, model = setup(tmp_path, "--max_train_samples", 40)
    dataset, transform = data_of(args)
    captions = latent_cache.pair_captions(dataset)
    latent_cache.build(str(tmp_path / "one"), *encoders(model), dataset, transform, captions, runtime)
    # Two ranks as two threads on one model, meeting at a thread barrier in place of torch.distributed's.
    barrier = threading.Barrier(2)
    monkeypatch.setattr(latent_cache, "_barrier", lambda runtime: barrier.wait())
    ranks = [mruntime.Run(runtime.device, rank=r, world_size=2) for r in (0, 1)]
    errors = []

    def build(rank_runtime):
        try:
            latent_cache.build(str(tmp_path / "two"), *encoders(model), dataset, transform, captions, rank_runtime)
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()
    threads = [threading.Thread(target=build, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    one, two = latent_cache.LatentCache(str(tmp_path / "one")), latent_cache.LatentCache(str(tmp_path / "two"))
    assert two.world == 2 and one.captions == two.captions and np.array_equal(one.caption_ids, two.caption_ids)
    for i in range(len(dataset)):
        for flip in (False, True):
            (m1, s1), (m2, s2) = one.pair(i, flip), two.pair(i, flip)
            assert torch.allclose(m1, m2, atol=1e-5) and torch.equal(s1, s2)
    ids = list(range(len(one.captions)))
    assert torch.allclose(one.prompts(ids)["encoder_hidden_states"], two.prompts(ids)["encoder_hidden_states"],
                          atol=1e-5)


def test_flips_off_halve_the_cache_and_flipped_variants_differ(tmp_path):
    args, runtime, model = setup(tmp_path, "--no_flip", "--max_train_samples", 16)
    dataset, transform = data_of(args)
    latent_cache.build(str(tmp_path / "c"), *encoders(model), dataset, transform, latent_cache.pair_captions(dataset),
                       runtime)
    cache = latent_cache.LatentCache(str(tmp_path / "c"))
    assert cache.num_flips == 1 and cache.moments[0].shape[1] == 1
    args, runtime, model = setup(tmp_path, "--max_train_samples", 16)
    dataset, transform = data_of(args)
    latent_cache.build(str(tmp_path / "f"), *encoders(model), dataset, transform, latent_cache.pair_captions(dataset),
                       runtime)
    flipped = latent_cache.LatentCache(str(tmp_path / "f"))
    assert flipped.num_flips == 2
    assert torch.equal(flipped.pair(0, False)[0], cache.pair(0, False)[0])
    assert not torch.equal(flipped.pair(0, True)[0], flipped.pair(0, False)[0])


def test_bf16_round_trips_through_numpy():
    t = torch.randn(3, 5).to(torch.bfloat16)
    assert torch.equal(latent_cache._to_torch(latent_cache._to_numpy(t), torch.bfloat16), t)


def test_cache_refuses_random_crops_and_streaming(tmp_path, capsys):
    for flag in ("--random_crop", "--streaming"):
        assert train_sd15.main(["--tiny", "--cache_latents", flag, "--output_dir", str(tmp_path)]) == 2
        assert "--cache_latents" in capsys.readouterr().err
