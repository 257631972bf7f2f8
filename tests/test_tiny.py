"""The tiny pipelines load through the real pipeline classes, sample, and are cached safely."""
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from offline import tiny
# kind -> (pipeline class name, denoiser folder, latent channels, text encoder suffixes)
KINDS = {
    "sd15": ("StableDiffusionPipeline", "unet", 4, ("",)),
    "sdxl": ("StableDiffusionXLPipeline", "unet", 4, ("", "_2")),
    "sd3": ("StableDiffusion3Pipeline", "transformer", 16, ("", "_2", "_3")),
}


def _weights(folder):
    """Every tensor of every safetensors file in a pipeline folder, keyed by file and tensor name."""
    tensors = {}
    for path in sorted(Path(folder).rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            tensors[f"{path.relative_to(folder)}:{name}"] = tensor
    return tensors


@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_loads_and_samples(kind, tmp_path):
    import diffusers

    class_name, denoiser, latent_channels, suffixes = KINDS[kind]
    folder = Path(tiny.BUILDERS[kind](tmp_path / kind))

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == class_name
    encoders = [f"{part}{suffix}" for suffix in suffixes for part in ("text_encoder", "tokenizer")]
    for name in [denoiser, "vae", "scheduler", *encoders]:
        assert (folder / name).is_dir(), name
    # CLIP tokenizers are stored as on the hub (vocab.json + merges.txt), so they load by the real path.
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert not (folder / "tokenizer" / "tokenizer.json").exists()
    assert all(t.dtype == torch.float32 for t in _weights(folder).values())

    pipe = getattr(diffusers, class_name).from_pretrained(folder)
    assert type(pipe).__name__ == class_name
    for suffix in suffixes:
        tokenizer, encoder = getattr(pipe, f"tokenizer{suffix}"), getattr(pipe, f"text_encoder{suffix}")
        assert len(tokenizer) == tokenizer.vocab_size == encoder.config.vocab_size
        assert not encoder.training

    image = pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.std() > 1e-3

    # 32 px images <-> 16x16 latents.
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample()
    assert latents.shape == (1, latent_channels, 16, 16)


def test_pipeline_flags(tmp_path):
    from diffusers import DDPMScheduler

    sd15 = json.loads((Path(tiny.build_tiny_sd15(tmp_path / "sd15")) / "model_index.json").read_text())
    assert sd15["requires_safety_checker"] is False and sd15["safety_checker"] == [None, None]
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "sd15", subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert scheduler.config.clip_sample is False and scheduler.config.prediction_type == "epsilon"
    sdxl = json.loads((Path(tiny.build_tiny_sdxl(tmp_path / "sdxl")) / "model_index.json").read_text())
    assert sdxl["force_zeros_for_empty_prompt"] is True


def test_clip_tokenizer_offline():
    tokenizer = tiny.build_clip_tokenizer()
    assert tokenizer.model_max_length == 77
    red, blue = tokenizer("red circle").input_ids, tokenizer("blue square").input_ids
    assert red[0] == blue[0] == tokenizer.bos_token_id and red[-1] == blue[-1] == tokenizer.eos_token_id
    assert set(red[1:-1]).isdisjoint(blue[1:-1])
    # Listed words are one token each; anything else still tokenizes, byte by byte, and round-trips.
    assert all(len(tokenizer(word).input_ids) == 3 for word in tiny.COMMON_WORDS)
    assert tokenizer.decode(tokenizer("Zebra stripes").input_ids, skip_special_tokens=True) == "zebra stripes"
    padded = tokenizer("red circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77


def test_t5_tokenizer_offline():
    tokenizer = tiny.build_t5_tokenizer()
    red, blue = tokenizer("red circle").input_ids, tokenizer("blue square").input_ids
    assert red[-1] == blue[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert set(red[:-1]).isdisjoint(blue[:-1])
    assert tokenizer.decode(tokenizer("Zebra 42!").input_ids, skip_special_tokens=True) == "Zebra 42!"


def test_same_seed_same_weights(tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = _weights(tiny.build_tiny_sd15(tmp_path / "a", seed=0))
    # Building leaves the caller's random stream where it was.
    assert torch.equal(torch.rand(3), expected_draw)
    b = _weights(tiny.build_tiny_sd15(tmp_path / "b", seed=0))
    c = _weights(tiny.build_tiny_sd15(tmp_path / "c", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unet_overrides(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tiny.build_tiny_sd15(tmp_path / "big", block_out_channels=(64, 128), layers_per_block=2)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert tuple(unet.config.block_out_channels) == (64, 128) and unet.config.layers_per_block == 2
    assert unet.config.cross_attention_dim == 32


def _counting_builder(monkeypatch, kind, before_rename=None):
    calls = []
    real_build = tiny.BUILDERS[kind]

    def build(out_dir, seed=0):
        calls.append(out_dir)
        real_build(out_dir, seed=seed)
        if before_rename is not None:
            before_rename()

    monkeypatch.setitem(tiny.BUILDERS, kind, build)
    return calls


def test_tiny_pipeline_dir_caches(tmp_path, monkeypatch):
    calls = _counting_builder(monkeypatch, "sd3")
    first = tiny.tiny_pipeline_dir("sd3", root=tmp_path)
    second = tiny.tiny_pipeline_dir("sd3", root=tmp_path)
    assert first == second and len(calls) == 1
    assert Path(first).name == f"tiny-sd3-v{tiny.TINY_VERSION}"
    assert (Path(first) / "model_index.json").is_file()
    assert stat.S_IMODE(Path(first).stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name]  # no temporary folder left behind

    monkeypatch.setenv("RDPO_CACHE", str(tmp_path))
    assert tiny.tiny_pipeline_dir("sd3") == first and len(calls) == 1

    other = tiny.tiny_pipeline_dir("sd3", seed=1)  # other random weights, their own folder
    assert Path(other).name == f"tiny-sd3-seed1-v{tiny.TINY_VERSION}" and len(calls) == 2
    a, b = _weights(first), _weights(other)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_tiny_pipeline_dir_lost_race_and_crash(tmp_path, monkeypatch):
    final = tmp_path / f"tiny-sd3-v{tiny.TINY_VERSION}"
    # Another process finishes first: its folder is kept and ours is discarded.
    calls = _counting_builder(monkeypatch, "sd3", before_rename=lambda: tiny.build_tiny_sd3(final, seed=7))
    winner_weights = _weights(tiny.build_tiny_sd3(tmp_path.parent / f"{tmp_path.name}-ref", seed=7))
    assert tiny.tiny_pipeline_dir("sd3", root=tmp_path) == str(final)
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == [final.name]
    kept = _weights(final)
    assert all(torch.equal(kept[k], winner_weights[k]) for k in kept)

    # A crash mid-build leaves nothing that looks like a pipeline.
    def crash(out_dir, seed=0):
        (Path(out_dir) / "model_index.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(tiny.BUILDERS, "sdxl", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        tiny.tiny_pipeline_dir("sdxl", root=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_tiny_pipeline_dir_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny pipeline kind 'sd2'"):
        tiny.tiny_pipeline_dir("sd2", root=tmp_path)
    assert not any(tmp_path.iterdir())
