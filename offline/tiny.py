"""Offline tiny pipelines of the real model classes, written in the on-disk layout of the hub models.

Nothing can be downloaded on the development machines, so the tests, the `--tiny` runs and the toy
miniature use pipelines built here: the same classes as SD1.5, SDXL, SD3 (and SD3.5) and FLUX.1
(UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel, AutoencoderKL, CLIP and T5 text
encoders, the hub's scheduler configs), at most
about a million parameters each, saved with `save_pretrained` into folders laid out like the hub repositories
(model_index.json, unet/ or transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/). The trainers
load them with the very `from_pretrained` calls that load the real models; only the folder differs.

`tiny_pipeline_dir(kind)` is the entry point: it builds a pipeline once and caches it. For speed and memory
on an accelerator, `real_sd15_pipeline_dir()` builds the real SD1.5 architecture the same way, with random
weights. Also here: the built-in smooth-vs-noise pairs (`builtin_pairs`) and the tiny CLIP of the offline
rewards (`tiny_clip_dir`).

Two facts of transformers that shape this file: it ships no vocabulary files, so the tokenizers are built
here (a byte-level CLIP BPE written as vocab.json + merges.txt, a character-level T5 Unigram saved as
tokenizer.json); and freshly constructed models are in train() mode (T5's dropout made sampling
non-deterministic), so every frozen model is put in eval() before it is saved or used.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from offline import cache, toy

# Folder names carry this version: bump it whenever a builder changes, so stale caches are not reused.
TINY_VERSION = 1
KINDS = ("sd15", "sdxl", "sd3", "sd35", "flux")

# The tokenizers merge these words into single tokens (CLIP merges, T5 word pieces), so that short
# captions of the kind the toy world writes stay far below the 77-token limit; any other text still
# tokenizes, character by character.
COMMON_WORDS = (
    "background", "triangle", "picture", "yellow", "orange", "purple", "circle", "square", "bottom",
    "center", "middle", "photo", "image", "small", "large", "green", "white", "black", "brown", "three",
    "right", "cross", "blue", "pink", "gray", "star", "ring", "left", "with", "big", "red", "top", "two",
    "one", "the", "and", "of", "on", "in", "an", "a",
)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# The SD1.5 / SDXL scheduler configs as published on the hub (the keys DDPM/Euler do not use, such as
# set_alpha_to_one and skip_prk_steps, are kept too, so that swapping in DDIM or PNDM behaves as on the hub).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SDXL_SCHEDULER_CONFIG = {
    **SD_SCHEDULER_CONFIG,
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# SD3's and FLUX.1's (flow matching: a shifted σ grid; FLUX's shift grows with the image's token count).
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                         "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# FLUX.1-schnell's: no resolution-dependent shift, and a static shift of 1 (its σ grid unshifted).
FLUX_SCHNELL_SCHEDULER_CONFIG = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (the BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word as the tokenizer does: always the best-ranked adjacent pair first."""
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary ordered like CLIP's: bytes, bytes + `</w>`, merges, then the two specials.

    Each word gets the merges that join, left to right, the pieces the earlier merges already split it
    into; new merges rank last, so they never change how an earlier word is merged, and every word in
    COMMON_WORDS ends as one token.
    """
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols)}
    vocab.update({symbol + "</w>": len(byte_symbols) + i for i, symbol in enumerate(byte_symbols)})
    ranks: dict[tuple[str, str], int] = {}
    for word in COMMON_WORDS:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        merged = pieces[0]
        for piece in pieces[1:]:
            ranks.setdefault((merged, piece), len(ranks))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, list(ranks)


def build_clip_tokenizer(out_dir: str | os.PathLike | None = None, pad_token: str = "<|endoftext|>"):
    """Write a CLIP tokenizer folder as on the hub (vocab.json, merges.txt, configs) and load it from there.

    pad_token: "<|endoftext|>" as SD1.5's tokenizer; SDXL's and SD3's second tokenizer pad with "!".
    Without out_dir the files go to a temporary folder that is removed once the tokenizer is loaded.
    """
    from transformers import CLIPTokenizer

    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
            return build_clip_tokenizer(tmp, pad_token)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(out)


def build_t5_tokenizer(out_dir: str | os.PathLike | None = None):
    """A character-level T5 tokenizer (Unigram), saved as tokenizer.json and loaded as T5TokenizerFast.

    Ids: <pad> 0, </s> 1, <unk> 2 as in T5; then "▁" (word start), the printable ASCII characters and
    "▁word" pieces for COMMON_WORDS. The pieces' scores make Unigram prefer a whole word over its
    characters. No sentinel (<extra_id_*>) tokens: the encoder never sees them, and without them the
    tokenizer's length is the whole vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="tiny-t5-tokenizer-") as tmp:
            return build_t5_tokenizer(tmp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + word, -3.0) for word in COMMON_WORDS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_LENGTH, "extra_ids": 0, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return T5TokenizerFast.from_pretrained(out)


@contextlib.contextmanager
def _seeded(seed: int, component: int):
    """Seed torch's RNG for building one component, and restore the caller's RNG state afterwards.

    Each component gets its own seed derived from the pipeline seed, so two encoders of the same shape
    do not start identical, and resizing one component (unet_overrides) leaves the others unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + component)
        yield


def _clip_text_encoder(tokenizer, seed: int, component: int, with_projection: bool, hidden_act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed, component):
        return cls(config).eval()


def _t5_text_encoder(tokenizer, d_model: int, seed: int, component: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 layout (gated-GELU feed-forward, untied embeddings) like SD3's T5-XXL encoder.
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed, component):
        return T5EncoderModel(config).eval()


def _vae(seed: int, component: int, **config):
    from diffusers import AutoencoderKL

    # Two blocks: one downsampling step, so 32 px images <-> 16x16 latents (the real VAEs have four, x8).
    base = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )
    with _seeded(seed, component):
        return AutoencoderKL(**{**base, **config}).eval()


def _save_pipeline(pipe, out_dir: Path, clip_pads: dict[str, str]) -> None:
    """save_pretrained, then the tokenizer folders rewritten as the hub's repositories hold them.

    transformers 5 saves every tokenizer as tokenizer.json (plus a config listing local-loading flags).
    The hub's CLIP tokenizers are vocab.json + merges.txt, which load by a different path (conversion to a
    fast tokenizer); that is the path the real models take, so the tiny ones take it too. The T5 folder is
    rewritten for clean configs, and recorded as T5TokenizerFast as SD3's model_index.json does.
    """
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name, pad_token in clip_pads.items():
        shutil.rmtree(out_dir / name)
        build_clip_tokenizer(out_dir / name, pad_token=pad_token)
    t5 = "tokenizer_3" if getattr(pipe, "tokenizer_3", None) is not None else None
    if type(pipe).__name__ == "FluxPipeline":
        t5 = "tokenizer_2"  # FLUX: CLIP-L is tokenizer, T5 is tokenizer_2
    if t5 is not None:
        shutil.rmtree(out_dir / t5)
        build_t5_tokenizer(out_dir / t5)
        index_path = out_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        index[t5] = ["transformers", "T5TokenizerFast"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny_sd15(out_dir: str | os.PathLike, seed: int = 0, **unet_overrides) -> str:
    """Save a tiny StableDiffusionPipeline to out_dir and return the folder.

    unet_overrides replace entries of the UNet config (a bigger UNet of the same layout for the toy model,
    e.g. block_out_channels=(64, 128), layers_per_block=2); down/up block types must stay consistent.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, 1, with_projection=False, hidden_act="quick_gelu")
    unet_config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
        # UNet2DConditionModel reads this legacy name as the number of heads, as SD1.5's config does.
        attention_head_dim=4,
    )
    unet_config.update(unet_overrides)
    with _seeded(seed, 2):
        unet = UNet2DConditionModel(**unet_config)
    vae = _vae(seed, 3, latent_channels=4, scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler.from_config(SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, out, {"tokenizer": "<|endoftext|>"})
    return str(out)


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny StableDiffusionXLPipeline to out_dir and return the folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    # As SDXL: CLIP-L (quick_gelu, no projection) and OpenCLIP-bigG (gelu, with projection).
    text_encoder = _clip_text_encoder(tokenizer, seed, 1, with_projection=False, hidden_act="quick_gelu")
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed, 2, with_projection=True, hidden_act="gelu")
    time_embed_dim = 8
    pooled_dim = text_encoder_2.config.projection_dim
    with _seeded(seed, 3):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # Six micro-conditions (original size, crop top-left, target size), each embedded, + pooled text.
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        )
    vae = _vae(seed, 4, latent_channels=4, scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save_pipeline(pipe, out, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})
    return str(out)


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0, sd35: bool = False) -> str:
    """Save a tiny StableDiffusion3Pipeline to out_dir and return the folder. sd35: the SD3.5 Medium layout
    of the transformer (MMDiT-X): a second, self-attention-only attention in the first layer
    (dual_attention_layers) and RMS QK-norm in every attention, as stable-diffusion-3.5-medium's config has."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    tokenizer_3 = build_t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, 1, with_projection=True, hidden_act="quick_gelu")
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed, 2, with_projection=True, hidden_act="gelu")
    clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    # The pipeline zero-pads the concatenated CLIP states to T5's width; twice as wide, as in SD3
    # (768 + 1280 = 2048 against 4096), so that the padding is exercised.
    text_encoder_3 = _t5_text_encoder(tokenizer_3, d_model=2 * clip_width, seed=seed, component=3)
    with _seeded(seed, 4):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            num_attention_heads=4,
            attention_head_dim=8,
            caption_projection_dim=32,
            joint_attention_dim=text_encoder_3.config.d_model,
            pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
            # Positional embeddings for up to 32x32 patches: latents up to 64x64, images up to 128 px.
            pos_embed_max_size=32,
            **(dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}),
        )
    vae = _vae(
        seed,
        5,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        force_upcast=True,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    _save_pipeline(pipe, out, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})
    return str(out)


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True,
                    scheduler_config: dict | None = None) -> str:
    """Save a tiny FluxPipeline to out_dir and return the folder: CLIP-L (pooled) and T5 text encoders, a
    16-channel VAE without quant convs and with FLUX's shift and scale, a FluxTransformer2DModel (one double- and
    one single-stream block) on 2×2-packed latents with 3-axis RoPE ids, and a flow-matching scheduler.
    guidance_embeds: FLUX.1-dev's distilled guidance input (False: the FLUX.1-schnell layout). scheduler_config:
    the scheduler's config; by default the real model's of that layout, FLUX.1-dev's resolution-dependent
    (dynamic) shift with guidance embeddings, FLUX.1-schnell's unshifted grid without."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, 1, with_projection=False, hidden_act="quick_gelu")
    text_encoder_2 = _t5_text_encoder(tokenizer_2, d_model=48, seed=seed, component=2)
    with _seeded(seed, 3):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels × a 2×2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) sums to 128
        )
    vae = _vae(seed, 4, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.1159, scaling_factor=0.3611)
    if scheduler_config is None:
        scheduler_config = FLUX_SCHEDULER_CONFIG if guidance_embeds else FLUX_SCHNELL_SCHEDULER_CONFIG
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    _save_pipeline(pipe, out, {"tokenizer": "<|endoftext|>"})
    return str(out)


BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3,
            "sd35": lambda out, seed=0: build_tiny_sd3(out, seed, sd35=True), "flux": build_tiny_flux}


def pipeline_path(kind: str, root: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Where `tiny_pipeline_dir` keeps the tiny `kind` pipeline (nothing is built): the trainers' --tiny recipes
    name it, so that --help shows the real path."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {', '.join(KINDS)}")
    root_dir = Path(root).expanduser() if root is not None else cache.root()
    return str(root_dir / (f"tiny-{kind}-v{TINY_VERSION}" if seed == 0 else f"tiny-{kind}-seed{seed}-v{TINY_VERSION}"))


def tiny_pipeline_dir(kind: str, root: str | os.PathLike | None = None, seed: int = 0) -> str:
    """The folder of the tiny `kind` pipeline (one of KINDS) with weights drawn from `seed`, built on first use
    under `root` (default: the cache root) and cached (cache.build_aside: complete or absent)."""
    return str(cache.build_aside(pipeline_path(kind, root, seed), lambda tmp: BUILDERS[kind](tmp, seed=seed)))


def ensure(model: str, dataset: str, toy_pairs: int = 0) -> None:
    """Make the --tiny demo's model and pairs that a trainer's TINY_RECIPE named, if they are not cached yet:
    a tiny pipeline, the built-in pairs, or (toy_pairs > 0, SD1.5) `toy_pairs` preference pairs sampled from
    `model` and labelled by the toy reward (toy.py; minutes on first use). Raises FileNotFoundError when the
    toy pairs are to be sampled from a folder that is not a pipeline."""
    for kind in BUILDERS:
        if model == pipeline_path(kind):
            tiny_pipeline_dir(kind)
    if dataset == builtin_pairs_path():
        builtin_pairs()
    if toy_pairs and dataset == str(toy.pairs_path(model, toy_pairs)) and not os.path.isfile(dataset):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise FileNotFoundError(f"--tiny samples its preference pairs from a local pipeline folder, and {model} "
                                    "is not one: give --dataset, or build one with offline/toy_pretrain.py")
        toy.cached_pairs(model, toy_pairs, seed=0)


# The built-in pairs: smooth pictures preferred to noise, in Pick-a-Pic's row format

TINY_COLOURS = {"red": (220, 35, 35), "green": (40, 170, 60), "blue": (45, 80, 220), "yellow": (235, 210, 45),
                "purple": (135, 55, 175), "orange": (240, 140, 35), "cyan": (45, 200, 210), "pink": (240, 135, 185)}


def _smooth_image(rng: np.random.Generator, colour: tuple, size: int) -> np.ndarray:
    """The colour with a gentle linear gradient: low-frequency content only."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)[..., None] * rng.uniform(10, 40)
    return np.clip(np.asarray(colour, np.float64) + ramp, 0, 255).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tiny_pickapic(path: str, num_pairs: int = 64, resolution: int = 32, seed: int = 0) -> str:
    """Write a small deterministic preference set in the exact Pick-a-Pic row format; return the parquet path.

    Caption "a <colour> square"; the winner is a smooth image of that colour, the loser high-frequency noise,
    so a short DPO run can learn the preference. The winner's column is random (label_0 ∈ {0, 1}) and every
    8th row is a tie (two smooth images, labels 0.5/0.5). Images alternate PNG and JPEG bytes. `path` is the
    file to write, or an existing folder (or one ending in "/"): then <folder>/train-00000-of-00001.parquet,
    whose split name `data.load_pairs(folder)` infers.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if num_pairs <= 0 or resolution <= 0:
        raise ValueError("need num_pairs > 0 and resolution > 0")
    path = os.fspath(path)
    folder = os.path.isdir(path) or path.endswith(("/", os.sep))
    file = os.path.join(path, "train-00000-of-00001.parquet") if folder else path
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(TINY_COLOURS)
    cols: dict[str, list] = {k: [] for k in (
        "are_different", "best_image_uid", "caption", "has_label", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1",
        "label_0", "label_1", "model_0", "model_1", "ranking_id", "user_id", "num_example_per_prompt")}
    for i in range(num_pairs):
        colour = names[int(rng.integers(len(names)))]
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        smooth = _smooth_image(rng, TINY_COLOURS[colour], resolution)
        if i % 8 == 7:  # a tie
            images, labels = [smooth, _smooth_image(rng, TINY_COLOURS[colour], resolution)], (0.5, 0.5)
        else:
            noise = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
            winner = int(rng.integers(2))
            images = [smooth, noise] if winner == 0 else [noise, smooth]
            labels = (1.0, 0.0) if winner == 0 else (0.0, 1.0)
        uids = [f"tiny-{seed}-{i}-{k}" for k in (0, 1)]
        cols["are_different"].append(True)
        cols["best_image_uid"].append("" if labels[0] == 0.5 else uids[0 if labels[0] == 1.0 else 1])
        cols["caption"].append(f"a {colour} square")
        cols["has_label"].append(True)
        for k in (0, 1):
            cols[f"image_{k}_uid"].append(uids[k])
            cols[f"jpg_{k}"].append(_encode(images[k], fmt))
            cols[f"label_{k}"].append(labels[k])
            cols[f"model_{k}"].append("tiny")
        cols["ranking_id"].append(i)
        cols["user_id"].append(int(rng.integers(8)))
        cols["num_example_per_prompt"].append(1)
    table = pa.table({k: pa.array(v, type=pa.binary()) if k.startswith("jpg_") else v for k, v in cols.items()})
    pq.write_table(table, file, row_group_size=16)
    return file


def builtin_pairs_path() -> str:
    """Where `builtin_pairs` keeps the built-in smooth-vs-noise pairs (nothing is written)."""
    return str(cache.root() / "tiny-pairs-v1.parquet")


def builtin_pairs() -> str:
    """The built-in smooth-vs-noise pairs (`write_tiny_pickapic`), written once into the cache."""
    return str(cache.build_aside(builtin_pairs_path(),
                                 lambda tmp: write_tiny_pickapic(str(tmp), num_pairs=256, resolution=32, seed=0),
                                 folder=False))


# A tiny CLIP for the offline rewards (rewards.py's tiny_pickscore and tiny_clip): the real CLIP code path

TINY_CLIP_VERSION = 1


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Save a randomly initialised tiny CLIPModel with its processor (32 px images, this module's tokenizer).

    Its logit scale is set to 100, PickScore's, so that tiny_pickscore has the scale of the real one."""
    import math

    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:  # transformers 5 without torchvision: the PIL image processor, which needs no extra package
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32,
        logit_scale_init_value=math.log(100.0),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def tiny_clip_dir(root: str | os.PathLike | None = None) -> str:
    """The tiny CLIP folder, built once beside the tiny pipelines."""
    root_dir = Path(root) if root is not None else cache.root()
    return str(cache.build_aside(root_dir / f"tiny-clip-v{TINY_CLIP_VERSION}", build_tiny_clip))


# The real SD1.5 architecture with random weights

REAL_SD15_VERSION = 1
# The published configs of stable-diffusion-v1-5 (unet/, vae/, text_encoder/ config.json), written out so that
# nothing is downloaded; only the text encoder's vocabulary is sized to the offline tokenizer.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                 "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                 mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)


def real_sd15_pipeline_dir(root: str | os.PathLike | None = None) -> str:
    """An SD1.5 pipeline folder of the real architecture (860M-parameter UNet) with random weights, built once
    (atomically) under `root` (default: the tiny cache): the very from_pretrained path of a real run, for
    speed and memory measurements on an accelerator (speed/bench.py --real_size). Nothing is downloaded."""
    root = Path(root).expanduser() if root is not None else cache.root()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    final = root / f"bench-sd15-real-v{REAL_SD15_VERSION}"
    if (final / "model_index.json").is_file():
        return str(final)
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        tokenizer = build_clip_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                        eos_token_id=tokenizer.eos_token_id,
                                                        pad_token_id=tokenizer.pad_token_id, **SD15_TEXT))
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDPMScheduler.from_config(SD_SCHEDULER_CONFIG),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        _save_pipeline(pipe, tmp, {"tokenizer": "<|endoftext|>"})

    cache.build_aside(final, build)
    print(f"built the real-size SD1.5 pipeline (random weights) in {time.perf_counter() - start:.0f} s: {final}")
    return str(final)
