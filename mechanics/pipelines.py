"""The models an evaluation samples, as named on the command line: a diffusers pipeline folder or hub id, a UNet
(SD3, FLUX: transformer) swapped into a pipeline (DENOISER@PIPELINE), or LoRA weights on their base pipeline;
each with the fingerprint of its weights, so that images stored for other weights are refused, and its pipeline
loaded with one-line errors."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mechanics.checkpoints import base_model_identity
from mechanics.errors import UsageError
from mechanics.loading import OFFLINE_HINT, PIPELINES, check_tokenizer, go_offline_unless_reachable, read_json

PIPELINE_FAMILIES = {cls: family for family, cls in PIPELINES.items()}  # class name → family
# What DENOISER@PIPELINE swaps in, per family: the pipeline's component and its diffusers class.
DENOISERS = {"sd15": ("unet", "UNet2DConditionModel"), "sdxl": ("unet", "UNet2DConditionModel"),
             "sd3": ("transformer", "SD3Transformer2DModel"), "flux": ("transformer", "FluxTransformer2DModel")}


@dataclass
class ModelRef:
    """A model to sample, resolved from its spec (model_ref); `tag` names its image folder."""
    label: str               # the name in the tables
    source: str              # pipeline folder or hub id
    family: str              # sd15 / sdxl / sd3 / flux
    is_local: bool
    weights_version: str     # changes when the weights change (stored images are then refused); stored as
                             # the "weights" entry of the image folder's settings.json
    denoiser: tuple[str, str | None, bool] | None = None  # (folder or hub id, subfolder, is_local) of a UNet /
                                                          # SD3 transformer that replaces the pipeline's own
    lora: str | None = None  # a folder of LoRA weights loaded into the pipeline (load_lora_weights)
    tag: str = ""            # image folder name

    def __post_init__(self):
        identity = os.path.realpath(self.source) if self.is_local else f"hub:{self.source}"
        if self.lora:
            identity += "|lora:" + os.path.realpath(self.lora)
        if self.denoiser:
            src, sub, local = self.denoiser
            identity += "|" + (os.path.realpath(src) if local else f"hub:{src}") + f"/{sub or ''}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_.")[-48:] or "model"
        self.tag = f"{slug}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_ref(spec: str) -> ModelRef:
    """'[LABEL=]SOURCE' -> ModelRef, the family read from the pipeline's model_index.json.

    SOURCE is a pipeline folder or hub id, or DENOISER@PIPELINE: a UNet (SD3: transformer) checkpoint,
    with or without its unet/ (transformer/) subfolder, swapped into PIPELINE. That is how checkpoints
    published as a UNet alone load, e.g. Diffusion-DPO's
    mhdang/dpo-sd1.5-text2image-v1@stable-diffusion-v1-5/stable-diffusion-v1-5. A LoRA folder
    (pytorch_lora_weights.safetensors: the trainers' final_lora/, or what diffusers' train_diffusion_dpo.py
    writes) is LORA@PIPELINE, or the folder alone when its base_model.json names the pipeline."""
    label, sep, source = spec.partition("=")
    if not sep:
        label, source = spec, spec
    label, source = label.strip().rstrip("/") or source, source.strip()
    lora, _, base = source.partition("@")
    if _is_lora(lora.strip().rstrip("/")):
        lora = lora.strip().rstrip("/")
        if not base:
            named = Path(lora, "base_model.json")
            if not named.is_file():
                raise UsageError(f"{lora} holds LoRA weights without base_model.json: give its base pipeline "
                                 f"as {lora}@PIPELINE")
            base = read_json(named, "a JSON object naming the LoRA's base pipeline").get("base_model")
            if not isinstance(base, str) or not base.strip():
                raise UsageError(f"{named} names no base pipeline (no \"base_model\"): give it as {lora}@PIPELINE")
        ref = model_ref(f"{label}={base}")
        return ModelRef(label, ref.source, ref.family, ref.is_local,
                        f"{ref.weights_version}+lora:{base_model_identity(lora)}", ref.denoiser, lora)
    if "@" in source:
        denoiser, _, pipeline = source.partition("@")
        ref = model_ref(f"{label}={pipeline}")
        sub, local, version = _resolve_denoiser(denoiser.strip().rstrip("/"), ref.family)
        return ModelRef(label, ref.source, ref.family, ref.is_local, f"{ref.weights_version}+{version}",
                        (denoiser.strip().rstrip("/"), sub, local))
    source = source.rstrip("/") or source
    if os.path.isdir(source):
        index = Path(source) / "model_index.json"
        if not index.is_file():
            raise UsageError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
        return ModelRef(label, source, _family(index, source), True, base_model_identity(source))
    looks_local = source.startswith((".", "/", "~")) or os.path.exists(source) or not _HUB_ID.match(source)
    if looks_local:
        raise UsageError(f"model folder not found: {source}")
    from huggingface_hub import hf_hub_download

    online = go_offline_unless_reachable()
    try:
        index = Path(hf_hub_download(source, "model_index.json", local_files_only=not online))
    except Exception as exc:
        if not online:
            why = "and as a hub id it is not in the local cache (the hub is offline)"
        else:
            why = f"and the hub has no pipeline {source!r} ({type(exc).__name__}; gated? run `hf auth login`)"
        raise UsageError(f"model {source!r}: no such folder, {why}; {OFFLINE_HINT}") from exc
    # .../snapshots/<commit>/model_index.json: the commit identifies the weights.
    return ModelRef(label, source, _family(index, source), False, f"hub:{index.parent.name}")


def _is_lora(source: str) -> bool:
    return os.path.isfile(os.path.join(source, "pytorch_lora_weights.safetensors")) and \
        not os.path.isfile(os.path.join(source, "model_index.json"))


def _resolve_denoiser(source: str, family: str) -> tuple[str | None, bool, str]:
    """(subfolder, is_local, weights version) of a UNet / SD3 or FLUX transformer checkpoint."""
    component = DENOISERS[family][0]
    if os.path.isdir(source):
        for sub in (component, None):
            if (Path(source, sub or "", "config.json")).is_file():
                return sub, True, base_model_identity(os.path.join(source, sub or ""))
        raise UsageError(f"{source}: no {component}/config.json or config.json: not a {component} checkpoint")
    if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise UsageError(f"{component} folder not found: {source}")
    from huggingface_hub import hf_hub_download

    online = go_offline_unless_reachable()
    for sub in (component, None):
        try:
            config = Path(hf_hub_download(source, f"{sub}/config.json" if sub else "config.json",
                                          local_files_only=not online))
            return sub, False, f"hub:{(config.parent.parent if sub else config.parent).name}"
        except Exception:
            continue
    why = "not in the local cache (the hub is offline)" if not online else "not found on the hub"
    raise UsageError(f"{component} checkpoint {source!r}: {why}; {OFFLINE_HINT}")


def denoiser_config(model: ModelRef) -> dict:
    """The config.json of the UNet or transformer `model` samples with: the swapped-in one (DENOISER@PIPELINE),
    else the pipeline's own (`unet/` or `transformer/`); a hub model's from the local cache when the hub is offline.
    eval.py reads FLUX's `guidance_embeds` here (false: FLUX.1-schnell's layout)."""
    component = DENOISERS[model.family][0]
    if model.denoiser:
        source, sub, local = model.denoiser
    else:
        source, sub, local = model.source, component, model.is_local
    name = f"{sub}/config.json" if sub else "config.json"
    if local:
        path = Path(source, name)
    else:
        from huggingface_hub import hf_hub_download

        online = go_offline_unless_reachable()
        try:
            path = Path(hf_hub_download(source, name, local_files_only=not online))
        except Exception as exc:
            why = "not in the local cache (the hub is offline)" if not online else "not found on the hub"
            raise UsageError(f"{source}: the {component}'s {name} is {why}; {OFFLINE_HINT}") from exc
    if not path.is_file():
        raise UsageError(f"{source}: no {name}, the {component}'s config")
    return read_json(path, f"the {component}'s config")


def _family(index: Path, source: str) -> str:
    class_name = read_json(index, "a diffusers pipeline's model_index.json").get("_class_name", "")
    if class_name not in PIPELINE_FAMILIES:
        raise UsageError(f"{source}: unsupported pipeline {class_name!r}; "
                         f"expected one of {', '.join(PIPELINE_FAMILIES)}")
    return PIPELINE_FAMILIES[class_name]


def load_pipeline(model: ModelRef, device: str, dtype: torch.dtype):
    """The model's diffusers pipeline on `device`, built with its family's class."""
    import diffusers

    cls = getattr(diffusers, PIPELINES[model.family])
    online = go_offline_unless_reachable()
    kwargs = {"dtype": dtype, "local_files_only": not model.is_local and not online}
    if model.family == "sd15":
        # Scored as generated: the safety checker would replace flagged images by black ones.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if model.denoiser:
        src, sub, local = model.denoiser
        name, class_name = DENOISERS[model.family]
        try:
            kwargs[name] = getattr(diffusers, class_name).from_pretrained(
                src, subfolder=sub, dtype=dtype, local_files_only=not local and not online)
        except OSError as exc:
            raise UsageError(f"cannot load the {name} {src!r}: {exc}") from exc
    try:
        pipe = cls.from_pretrained(model.source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load pipeline {model.source!r}: {exc}") from exc
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # an uncached hub tokenizer loads tiny, silently
        tokenizer, encoder = getattr(pipe, name, None), getattr(pipe, name.replace("tokenizer", "text_encoder"), None)
        if tokenizer is not None and encoder is not None:
            check_tokenizer(tokenizer, encoder, f"{model.source}: {name}")
    if model.lora:
        try:
            pipe.load_lora_weights(model.lora)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot load the LoRA weights in {model.lora} into {model.source}: "
                             f"{str(exc).splitlines()[0]}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
