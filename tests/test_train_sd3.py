"""train_sd3.py end to end on the tiny SD3-layout model, offline (the real from_pretrained path)."""
import math
import json
import os

import pytest
import torch

import losses
import reference
import schedule
from mechanics import flags
from offline import tiny
import train_sd3
from helpers import check_cached_latents_and_lora, check_resume_matches_an_uninterrupted_run, read_log, main_or_exit


def load_model(drop_t5=False):
    return train_sd3.load_models(tiny.tiny_pipeline_dir("sd3"), torch.device("cpu"), torch.float32, drop_t5)


@pytest.fixture(scope="module")
def model(tiny_cache):
    return load_model()


def run(output_dir, *flags):
    """One in-process training run (saves the 5 s import of a subprocess); returns the log lines."""
    main_or_exit(train_sd3, ["--tiny", "--output_dir", str(output_dir), *map(str, flags)])
    return read_log(output_dir)


def sample_index(n, generator, gamma, num_bins):
    """The grid points train_sd3.train draws: Cat(γ^k) over the index of the shifted σ grid (schedule.py, §3)."""
    return schedule.sample_timesteps(n, 1000, gamma, num_bins, generator=generator)


def transformer_weights(folder):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()


def test_tiny_run_with_the_defaults_updates_the_reference_oversamples_noise_and_saves_a_pipeline(tmp_path):
    log = run(tmp_path, "--max_steps", 8)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["accuracy"] == 0.5 and log[0]["reward_margin"] == 0.0
    # --tiny keeps the paper's defaults on, at τ = 8: one reference update, and γ = 0.9 over-sampling.
    assert [r["step"] for r in log if r["ref_updated"]] == [8]
    counts = log[-1]["bin_count"]
    assert sum(counts) == 8 * 4
    # Bins of σ·1000. Uniform draws on the shift-3 grid put a quarter of the pairs at σ > 0.9; Cat(0.9^k)
    # draws the noisiest quarter of the grid three times in four.
    assert counts[-1] > sum(counts) / 2
    assert log[-1]["bin_reward_scale"][-1] > 1.5  # λ(σ) on
    # Bin b holds σ·1000 in [100b, 100b + 100): its mean λ lies between the flow λ at the bin's two ends
    # (λ_flow is increasing), so each pair was scaled by λ_flow of its own σ, not by SD1.5's λ(t).
    for b, mean_scale in enumerate(log[-1]["bin_reward_scale"]):
        if mean_scale is not None:
            low, high = schedule.reward_scale_flow(torch.tensor([b / 10, (b + 1) / 10 - 1e-6])).tolist()
            assert low - 1e-5 <= mean_scale <= high + 1e-5, (b, mean_scale)
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "final")
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    trained, base = transformer_weights(tmp_path / "final"), transformer_weights(tiny.tiny_pipeline_dir("sd3"))
    assert any(not torch.equal(trained[k], base[k]) for k in trained)


def test_noising_is_rectified_flow_with_a_velocity_target(model):
    latents, noise = torch.randn(4, 16, 16, 16), torch.randn(4, 16, 16, 16)
    index = sample_index(4, torch.Generator().manual_seed(0), gamma=0.9, num_bins=50)
    noisy, target = train_sd3.add_noise(model, latents, noise, index)
    sigmas = train_sd3.sigma_grid(model.scheduler)[index]
    assert torch.equal(model.sigmas, train_sd3.sigma_grid(model.scheduler))  # the grid, computed once at load
    sigma = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(target, noise - latents)  # v = ε − x0: the per-sample errors are velocity errors
    assert not torch.allclose(target, noise, atol=1e-2)
    # σ comes from the scheduler's shifted grid: the timestep σ·1000 is one the pipeline passes.
    grid = model.scheduler.timesteps
    assert all((grid - t).abs().min() < 1e-3 for t in sigmas * 1000)
    assert (train_sd3.sigma_grid(model.scheduler).diff() > 0).all()  # indexed like t: σ grows with the index


def test_gamma_oversamples_high_sigma(model):
    uniform = model.sigmas[sample_index(4000, torch.Generator().manual_seed(0), gamma=None, num_bins=50)] * 1000
    skewed = model.sigmas[sample_index(4000, torch.Generator().manual_seed(0), gamma=0.9, num_bins=50)] * 1000
    assert skewed.mean() > uniform.mean() + 100
    assert (uniform / 1000 > 0.9).float().mean() == pytest.approx(0.25, abs=0.03)  # the shift-3 grid


def test_latents_are_shifted_and_scaled(model):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"pixel_values": pixels, "captions": ["a red square"]}
    latents, _ = train_sd3.encode(model, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)


def test_prompts_are_encoded_as_the_sd3_pipeline_does_with_and_without_t5(model):
    from diffusers import StableDiffusion3Pipeline
    captions = ["a red square", ""]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny.tiny_pipeline_dir("sd3"))
    states, pooled = train_sd3.encode_prompts(model, captions)
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=77)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    assert states.shape == (2, 77 + 77, 128) and pooled.shape == (2, 64)  # with T5: T5_MAX_LENGTH, 77 tokens

    # --drop_t5: the zero T5 block of the pipeline loaded without T5, at that pipeline's own length (its
    # max_sequence_length default, 256, not passed here), unless --t5_max_length is given.
    no_t5 = StableDiffusion3Pipeline.from_pretrained(tiny.tiny_pipeline_dir("sd3"), text_encoder_3=None,
                                                     tokenizer_3=None)
    dropped = load_model(drop_t5=True)
    assert dropped.text_encoder_3 is None and dropped.t5_max_length == 256
    states, pooled = train_sd3.encode_prompts(dropped, captions)
    expected, _, expected_pooled, _ = no_t5.encode_prompt(captions, None, None, device="cpu",
                                                          do_classifier_free_guidance=False)
    assert states.shape == expected.shape == (2, 77 + 256, 128)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    assert states[:, 77:].abs().max() == 0 and states[:, :77].abs().max() > 0
    given = train_sd3.load_models(tiny.tiny_pipeline_dir("sd3"), torch.device("cpu"), torch.float32, True, 100)
    expected = no_t5.encode_prompt(captions, None, None, device="cpu", do_classifier_free_guidance=False,
                                   max_sequence_length=100)[0]
    torch.testing.assert_close(train_sd3.encode_prompts(given, captions)[0], expected)


def test_the_t5_length_flag_follows_drop_t5_unless_given():
    def resolved(*argv):
        args, _ = flags.resolve(list(argv), train_sd3.__doc__, "sd3", train_sd3.RECIPE, train_sd3.TINY_RECIPE,
                                losses.LOSSES, reference.METHODS, resolution_multiple=16,
                                model_flags=train_sd3.model_flags)
        return args.t5_max_length
    assert resolved("--tiny") == 77 and resolved("--tiny", "--drop_t5") == 256
    assert resolved("--tiny", "--drop_t5", "--t5_max_length", "77") == 77
    assert resolved("--tiny", "--t5_max_length", "256") == 256


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    check_resume_matches_an_uninterrupted_run(run, transformer_weights, tmp_path)


def test_cached_latents_give_the_same_losses_and_a_lora_adapter_loads(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    check_cached_latents_and_lora(run, StableDiffusion3Pipeline, os.environ["RDPO_CACHE"] + "/tiny-sd3-v1", tmp_path)


def test_an_sd35_layout_model_trains_with_the_same_script(tmp_path):
    """SD3.5 Medium is the same pipeline class with MMDiT-X blocks (a second attention in some layers) and
    QK-norm: train_sd3.py trains it unchanged, full and with LoRA."""
    folder = tiny.tiny_pipeline_dir("sd35")
    config = json.load(open(os.path.join(folder, "transformer", "config.json")))
    assert config["dual_attention_layers"] == [0] and config["qk_norm"] == "rms_norm"
    log = run(tmp_path / "full", "--pretrained_model", folder, "--max_steps", 4, "--tau", 2, "--learning_rate", 1e-4)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and log[1]["ref_updated"]
    trained, base = transformer_weights(tmp_path / "full" / "final"), transformer_weights(folder)
    assert any(not torch.equal(trained[k], base[k]) for k in trained if "attn2" in k)  # the MMDiT-X attention trains
    lora_log = run(tmp_path / "lora", "--pretrained_model", folder, "--max_steps", 2, "--lora_rank", 4,
                   "--learning_rate", 1e-3)
    assert lora_log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(tmp_path / "lora" / "final_lora")
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
