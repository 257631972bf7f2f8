"""train_flux.py on the tiny FLUX-layout model, offline (the real from_pretrained path): FLUX's packing and ids,
the velocity target, the resolution-dependent shift, λ(σ) and the sampler on FLUX's grid, the guidance input,
and whole runs (LoRA, full, cached latents, resume, two processes)."""
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import schedule
from offline import tiny
import train_flux
from helpers import ROOT, check_cached_latents_and_lora, check_resume_matches_an_uninterrupted_run, read_log, main_or_exit


def run(output_dir, *flags):
    main_or_exit(train_flux, ["--tiny", "--output_dir", str(output_dir), *map(str, flags)])
    return read_log(output_dir)


@pytest.fixture(scope="module")
def model(tiny_cache):
    return train_flux.load_models(tiny.tiny_pipeline_dir("flux"), torch.device("cpu"), torch.float32, 32, 3.5, 16)


def transformer_weights(folder):
    return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()


def test_packing_and_ids_round_trip_and_match_the_pipeline():
    latents = torch.randn(3, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = train_flux.pack(latents)
    assert packed.shape == (3, 4 * 3, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 16, 8, 6))
    assert torch.equal(train_flux.unpack(packed, 8, 6), latents)
    assert torch.equal(train_flux.unpack(packed, 8, 6), FluxPipeline._unpack_latents(packed, 8 * 8, 6 * 8, 8))
    # token (row 1, column 2) holds the 2×2 patch at latent rows 2–3, columns 4–5, channel-major
    assert torch.equal(packed[0, 1 * 3 + 2].view(16, 2, 2), latents[0, :, 2:4, 4:6])
    ids = train_flux.image_ids(8, 6, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32))
    assert ids[1 * 3 + 2].tolist() == [0.0, 1.0, 2.0]


def test_noising_is_rectified_flow_with_a_velocity_target():
    x0, eps = torch.full((2, 16, 4, 4), 2.0), torch.full((2, 16, 4, 4), -1.0)
    grid = types.SimpleNamespace(sigmas=torch.tensor([0.0, 0.25, 0.5, 1.0]))  # the Models field add_noise reads
    noisy, target = train_flux.add_noise(grid, x0, eps, torch.tensor([1, 3]))
    assert torch.allclose(noisy[0], torch.full((16, 4, 4), 0.75 * 2 - 0.25)) and torch.equal(noisy[1], eps[1])
    assert torch.equal(target, eps - x0)


def pipeline_sigmas(scheduler, index, tokens):
    """FluxPipeline's sampling σ at the training grid's points s = (index + 1) / 1000 for an image of `tokens`
    packed tokens: the pipeline's own μ (calculate_shift, from the scheduler's config) into set_timesteps."""
    c = scheduler.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=(index + 1) / 1000, mu=mu)
    return scheduler.sigmas[:-1].float()


def test_the_sigma_grid_is_fluxs_own_shift_at_the_training_resolution(model):
    scheduler = model.scheduler
    assert scheduler.config.use_dynamic_shifting  # FLUX.1-dev's config
    # 256 image tokens: 256 px on the real VAE (8×, then 2×2 packing); 1024 tokens: 512 px; 4096 tokens: 1024 px
    index = np.arange(999, 0, -50)  # 20 points of the training grid, s = (index + 1) / 1000
    for tokens in (256, 1024, 4096):
        grid = train_flux.sigma_grid(scheduler, tokens)
        assert len(grid) == 1000 and bool((grid[1:] > grid[:-1]).all()) and grid[-1] == pytest.approx(1.0)
        assert torch.allclose(grid[index], pipeline_sigmas(scheduler, index, tokens), atol=1e-6)
    c = scheduler.config
    assert [calculate_shift(n, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            for n in (256, 1024, 4096)] == pytest.approx([0.5, 0.63, 1.15])  # μ at 256, 512 and 1024 px
    # the shift is exp(μ)/(exp(μ) + 1/s − 1): at s = 1/2, σ = e^μ / (e^μ + 1), 0.76 at 1024 px
    assert train_flux.sigma_grid(scheduler, 4096)[499] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=1e-6)


@pytest.fixture(scope="module")
def schnell(tiny_cache, tmp_path_factory):
    """A tiny FLUX.1-schnell-layout pipeline: no guidance embeddings, schnell's scheduler (no dynamic shift,
    shift 1)."""
    return tiny.build_tiny_flux(tmp_path_factory.mktemp("schnell") / "schnell", guidance_embeds=False)


def test_without_dynamic_shifting_the_grid_is_the_schedulers_static_shift(schnell):
    """FLUX.1-schnell's scheduler has no resolution-dependent shift (and shift 1): its pipeline samples the grid
    unshifted at any size, and so does training, where μ's shift would put the median σ at 0.76 at 1024 px."""
    m = train_flux.load_models(schnell, torch.device("cpu"), torch.float32, 32, 3.5, 16)
    assert not m.scheduler.config.use_dynamic_shifting and m.scheduler.config.shift == 1.0
    # the loaded grid is the scheduler's own training σ (noisiest first there), whatever the resolution
    own = FlowMatchEulerDiscreteScheduler.from_pretrained(schnell, subfolder="scheduler").sigmas.flip(0)
    assert torch.allclose(m.sigmas, own, atol=1e-6) and m.sigmas.median() == pytest.approx(0.5, abs=1e-3)
    index = np.arange(999, 0, -50)
    # a static shift other than 1 (a config with use_dynamic_shifting false, shift 3) is the scheduler's too
    for config in (tiny.FLUX_SCHNELL_SCHEDULER_CONFIG, {**tiny.FLUX_SCHNELL_SCHEDULER_CONFIG, "shift": 3.0}):
        for tokens in (256, 1024, 4096):
            scheduler = FlowMatchEulerDiscreteScheduler(**config)
            grid = train_flux.sigma_grid(scheduler, tokens)
            assert torch.allclose(grid, scheduler.sigmas.flip(0), atol=1e-6)  # its training σ, at construction
            assert torch.allclose(grid[index], pipeline_sigmas(scheduler, index, tokens), atol=1e-6)  # its sampling σ
    assert train_flux.sigma_grid(FlowMatchEulerDiscreteScheduler(**tiny.FLUX_SCHEDULER_CONFIG), 4096).median() \
        == pytest.approx(0.76, abs=0.005)  # the dev grid at 1024 px, which schnell trained on before


def test_lambda_and_the_sampler_on_fluxs_grid(model):
    grid = train_flux.sigma_grid(model.scheduler, 4096)
    scale = schedule.reward_scale_flow(grid)
    assert scale.min() >= 1 and scale.max() == pytest.approx(2.0) and bool((scale[1:] >= scale[:-1]).all())
    draws = schedule.sample_timesteps(50_000, 1000, 0.9, 50, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(49 - draws // 20, minlength=50).double() / len(draws)  # bin 0 = the noisiest
    assert torch.allclose(frequency, schedule.bin_probabilities(0.9, 50), atol=0.006)
    # The README's flow-λ figures (tools/flow_lambda.py) are exact sums over the grid; the sampler's own draws agree.
    # λ = 2 wherever 1/√SNR = σ/(1 − σ) reaches SD1.5's largest, 14.6146, i.e. σ ≥ 0.93595.
    mean, at_two = schedule.sampler_mean(scale, 0.9, 50), schedule.sampler_mean((scale >= 2 - 1e-6).float(), 0.9, 50)
    assert mean == pytest.approx(scale[draws].double().mean().item(), abs=0.01)
    assert at_two == pytest.approx((grid[draws] >= 0.93595).double().mean().item(), abs=0.01)
    assert mean > schedule.sampler_mean(schedule.reward_scale_by_step(1000), 0.9, 50) + 0.25  # 1.81 against 1.50


def test_flow_lambda_step_scales_by_generation_step(tmp_path):
    snr = run(tmp_path / "snr", "--max_steps", 2, "--bin_stats_every", 2, "--lora_rank", 0)
    step = run(tmp_path / "step", "--max_steps", 2, "--bin_stats_every", 2, "--lora_rank", 0, "--flow_lambda", "step")
    assert snr[0]["loss"] == step[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    counts = snr[-1]["bin_count"]
    assert counts == step[-1]["bin_count"]  # the same σ drawn; only their λ differs
    mean = lambda r: sum(n * s for n, s in zip(r["bin_count"], r["bin_reward_scale"]) if n) / sum(r["bin_count"])
    assert mean(step[-1]) < mean(snr[-1])


def test_the_guidance_input_reaches_fluxs_transformer(model, schnell):
    batch = {"pixel_values": torch.zeros(4, 3, 32, 32), "captions": ["a red square", "a blue circle"]}
    latents, cond = train_flux.encode(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(cond["guidance"], torch.full((4,), 3.5))
    t = torch.full((4,), 500.0)
    with torch.no_grad():
        a = train_flux.predict(model.transformer, latents, t, cond)
        b = train_flux.predict(model.transformer, latents, t, {**cond, "guidance": torch.full((4,), 1.0)})
    assert a.shape == latents.shape and (a - b).abs().max() > 0  # the distilled guidance is an input
    m = train_flux.load_models(schnell, torch.device("cpu"), torch.float32, 32, 3.5, 16)
    latents, cond = train_flux.encode(m, batch, torch.Generator().manual_seed(0))
    assert m.guidance is None and "guidance" not in cond
    with torch.no_grad():
        assert train_flux.predict(m.transformer, latents, t, cond).shape == latents.shape


def test_a_tiny_lora_run_starts_at_log2_and_its_adapter_loads_in_flux_pipeline(tmp_path):
    log = run(tmp_path, "--max_steps", 8, "--learning_rate", 1e-3)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and log[0]["accuracy"] == 0.5
    assert [r["step"] for r in log if r["ref_updated"]] == [8]
    assert json.loads((tmp_path / "run.json").read_text())["lora_rank"] == 8  # the one-GPU recipe: LoRA
    assert (tmp_path / "curves.png").stat().st_size > 10_000  # plot.py draws a FLUX run
    pipe = FluxPipeline.from_pretrained(tiny.tiny_pipeline_dir("flux"))

    def sample():
        return pipe("a red square", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    before = sample()
    pipe.load_lora_weights(tmp_path / "final_lora")
    after = sample()
    assert after.shape == (32, 32, 3) and abs(after - before).max() > 0


def test_a_full_fine_tune_saves_a_flux_pipeline(tmp_path):
    log = run(tmp_path, "--max_steps", 4, "--lora_rank", 0, "--tau", 2)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = FluxPipeline.from_pretrained(tmp_path / "final")
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    trained, base = transformer_weights(tmp_path / "final"), transformer_weights(tiny.tiny_pipeline_dir("flux"))
    assert any(not torch.equal(trained[k], base[k]) for k in trained)


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    check_resume_matches_an_uninterrupted_run(lambda out, *f: run(out, "--lora_rank", 0, *f),
                                              lambda folder: transformer_weights(folder), tmp_path)


def test_cached_latents_give_the_same_losses_and_a_lora_adapter_loads(tmp_path):
    check_cached_latents_and_lora(run, FluxPipeline, tiny.tiny_pipeline_dir("flux"), tmp_path)


def test_two_process_torchrun_matches_one_process(tmp_path):
    common = ["--tiny", "--max_steps", "2", "--train_batch_size", "1", "--effective_batch_size", "2",
              "--lora_rank", "0", "--learning_rate", "1e-4", "--tau", "1", "--checkpoint_every", "1000", "--no_flip",
              "--caption_dropout", "0", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train_flux.py", *common, "--output_dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", "train_flux.py", *common, "--output_dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["loss"] for r in log_two] == pytest.approx([r["loss"] for r in log_one], rel=1e-4)
    # Each process measures D on its own probe (--monitor_samples per process), averaged over the ranks.
    assert all(r["ref_updated"] and math.isfinite(r["divergence"]) for r in log_two)


def test_eval_compares_a_flux_lora_and_a_full_fine_tune_with_the_base(tmp_path):
    import eval as ev
    base = tiny.tiny_pipeline_dir("flux")
    run(tmp_path / "lora", "--max_steps", 2, "--learning_rate", 1e-2, "--no-plot")
    run(tmp_path / "full", "--max_steps", 2, "--lora_rank", 0, "--learning_rate", 1e-3, "--no-plot")
    lora = ev.model_ref(f"lora={tmp_path / 'lora' / 'final_lora'}")  # base_model.json names the FLUX base
    assert lora.lora and lora.family == "flux" and lora.source == base
    assert ev.model_ref(f"full={tmp_path / 'full' / 'final'}").family == "flux"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na big blue square on the left\n")
    result = ev.evaluate(f"lora={tmp_path / 'lora' / 'final_lora'}", [f"full={tmp_path / 'full' / 'final'}",
                         f"base={base}"], str(prompts), ["toy_fidelity"], tmp_path / "eval", num_seeds=2, steps=2,
                         resolution=32, device="cpu", progress=False, log=lambda s: None)
    assert result.generated == {"lora": 4, "full": 4, "base": 4}
    settings = json.loads(next((tmp_path / "eval" / "images").rglob("settings.json")).read_text())
    assert settings["steps"] == 2 and settings["guidance_scale"] == 3.5  # FLUX's default guidance
