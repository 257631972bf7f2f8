"""train_sdxl.py end to end on the tiny SDXL-layout model, offline (the real from_pretrained path)."""
import math
import os

import pytest
import torch
from PIL import Image

import data
from offline import tiny
import train_sdxl
from helpers import check_cached_latents_and_lora, check_resume_matches_an_uninterrupted_run, read_log, main_or_exit


@pytest.fixture(scope="module")
def model(tiny_cache):
    return train_sdxl.load_models(tiny.tiny_pipeline_dir("sdxl"), torch.device("cpu"), torch.float32)


def run(output_dir, *flags):
    """One in-process training run (saves the 5 s import of a subprocess); returns the log lines."""
    main_or_exit(train_sdxl, ["--tiny", "--output_dir", str(output_dir), *map(str, flags)])
    return read_log(output_dir)


def unet_weights(folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def test_tiny_run_with_the_defaults_updates_the_reference_oversamples_noise_and_saves_a_pipeline(tmp_path):
    log = run(tmp_path, "--max_steps", 8)
    assert [r["step"] for r in log] == list(range(1, 9))
    # Policy = reference at step 1.
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["accuracy"] == 0.5 and log[0]["reward_margin"] == 0.0
    # --tiny keeps the paper's defaults on, at τ = 8: one reference update, and γ = 0.9 over-sampling.
    assert [r["step"] for r in log if r["ref_updated"]] == [8]
    counts = log[-1]["bin_count"]
    assert sum(counts) == 8 * 4
    assert counts[-1] > sum(counts) / 4  # uniform t puts a tenth of the pairs in the noisiest bin, Cat(0.9^k) ~41 %
    assert log[-1]["bin_reward_scale"][-1] > 1.5  # λ(t) on
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "final")
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    trained, base = unet_weights(tmp_path / "final"), unet_weights(tiny.tiny_pipeline_dir("sdxl"))
    assert any(not torch.equal(trained[k], base[k]) for k in trained)


def test_time_ids_are_each_images_true_size_and_crop(model):
    batch = {"pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1, "captions": ["a red square", "a blue circle"],
             "original_sizes": torch.tensor([[48, 64], [32, 40], [64, 48], [35, 32]]),
             "crop_top_lefts": torch.tensor([[0, 16], [0, 4], [8, 0], [1, 0]])}
    _, cond = train_sdxl.encode(model, batch, torch.Generator().manual_seed(0))
    assert cond["time_ids"].tolist() == [[48, 64, 0, 16, 32, 32], [32, 40, 0, 4, 32, 32],
                                         [64, 48, 8, 0, 32, 32], [35, 32, 1, 0, 32, 32]]
    # They condition the UNet: other sizes, another prediction.
    noisy, t = torch.randn(4, 4, 16, 16), torch.tensor([500] * 4)
    with torch.no_grad():
        pred = train_sdxl.predict(model.unet, noisy, t, cond)
        other = train_sdxl.predict(model.unet, noisy, t, {**cond, "time_ids": torch.full_like(cond["time_ids"], 32)})
    assert not torch.allclose(pred, other)


def test_time_ids_of_a_pair_of_different_sizes_through_the_data_transform(model):
    rng = torch.Generator().manual_seed(0)

    def image(h, w):
        return Image.fromarray((torch.rand(h, w, 3, generator=rng) * 255).byte().numpy())
    pair = {"jpg_w": image(48, 64), "jpg_l": image(40, 32), "caption": "a red square", "winner_col": 0, "row": 0}
    transform = data.PairTransform(32, random_crop=True, random_flip=True, caption_dropout=0.0, seed=3)
    item = transform(pair, epoch=0, key=0)
    _, cond = train_sdxl.encode(model, data.collate_pairs([item]), torch.Generator().manual_seed(0))
    (top_w, left_w), (top_l, left_l) = item["crop_top_lefts"]
    assert cond["time_ids"].tolist() == [[48, 64, top_w, left_w, 32, 32], [40, 32, top_l, left_l, 32, 32]]
    assert (top_w, left_w) != (0, 0) or (top_l, left_l) != (0, 0)


def test_prompts_are_encoded_as_the_sdxl_pipeline_does(model):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.tiny_pipeline_dir("sdxl"))
    captions = ["a red square", ""]
    states, pooled = train_sdxl.encode_prompts(model, captions)
    expected, _, expected_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    assert states.shape == (2, 77, 64) and pooled.shape == (2, 32)


def test_vae_stays_in_fp32_and_latents_take_the_training_dtype(tiny_cache):
    bf16 = train_sdxl.load_models(tiny.tiny_pipeline_dir("sdxl"), torch.device("cpu"), torch.bfloat16)
    assert bf16.vae.dtype == torch.float32 and bf16.text_encoders[1].dtype == torch.bfloat16
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "captions": ["a red square"],
             "original_sizes": torch.tensor([[32, 32], [32, 32]]),
             "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long)}
    latents, cond = train_sdxl.encode(bf16, batch, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.bfloat16 and cond["time_ids"].dtype == torch.float32
    assert bf16.vae.config.scaling_factor == 0.13025


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    check_resume_matches_an_uninterrupted_run(run, unet_weights, tmp_path)


def test_cached_latents_give_the_same_losses_and_a_lora_adapter_loads(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    check_cached_latents_and_lora(run, StableDiffusionXLPipeline, os.environ["RDPO_CACHE"] + "/tiny-sdxl-v1", tmp_path)
