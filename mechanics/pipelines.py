"""The models an evaluation samples, as named on the command line: a diffusers pipeline folder or hub id, a UNet
(SD3, FLUX: transformer) swapped into a pipeline (DENOISER@PIPELINE), LoRA weights on their base pipeline, or a
trainer's checkpoint-N/ (its weights in its base pipeline); each with the fingerprint of its weights, so that
images stored for other weights are refused, and its pipeline loaded with one-line errors."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mechanics import checkpoints, lora as lora_adapters
from mechanics.checkpoints import base_model_identity
from mechanics.errors import UsageError
from mechanics.loading import (DENOISERS, OFFLINE_HINT, PIPELINES, check_tokenizer, go_offline_unless_reachable,
                               read_json)

PIPELINE_FAMILIES = {cls: family for family, cls in PIPELINES.items()}  # class name → family


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
    checkpoint: str | None = None  # a trainer's checkpoint-N/ whose trained weights replace the denoiser's
    tag: str = ""            # image folder name

    def __post_init__(self):
        identity = os.path.realpath(self.source) if self.is_local else f"hub:{self.source}"
        if self.lora:
            identity += "|lora:" + os.path.realpath(self.lora)
        if self.checkpoint:
            identity += "|checkpoint:" + os.path.realpath(self.checkpoint)
        if self.denoiser:
            src, sub, local = self.denoiser
            identity += "|" + (os.path.realpath(src) if local else f"hub:{src}") + f"/{sub or ''}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_.")[-48:] or "model"
        self.tag = f"{slug}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"


# Sampler defaults per model family, of eval.py and of sampling during training. SD1.5: the Diffusion-DPO evaluation
# setting (50 steps, guidance 7.5, 512 px). SDXL and SD3: the diffusers pipelines' own defaults for these models
# (SDXL 50 steps and 5.0; SD3-medium 28 steps and 7.0, as its model card, with StableDiffusion3Pipeline's 256 T5
# tokens), at their native 1024 px. FLUX.1-dev: its model card's 50 steps at distilled guidance 3.5 with 512 T5 tokens
# (FluxPipeline's own default is 28 steps; the scheduler shifts σ by the resolution itself).
SAMPLERS = {
    "sd15": {"steps": 50, "guidance_scale": 7.5, "resolution": 512},
    "sdxl": {"steps": 50, "guidance_scale": 5.0, "resolution": 1024},
    "sd3": {"steps": 28, "guidance_scale": 7.0, "resolution": 1024, "max_sequence_length": 256},
    "flux": {"steps": 50, "guidance_scale": 3.5, "resolution": 1024, "max_sequence_length": 512},
}
# FLUX.1-schnell, as its model card samples it: 4 steps, guidance 0 (it has no guidance input), 256 T5 tokens. A FLUX
# model is schnell-like when its transformer has no guidance embeddings (`guidance_embeds: false` in its config),
# whatever its name, so that a fine-tune of schnell in another folder samples as schnell.
FLUX_SCHNELL_SAMPLER = {"steps": 4, "guidance_scale": 0.0, "resolution": 1024, "max_sequence_length": 256}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_ref(spec: str) -> ModelRef:
    """'[LABEL=]SOURCE' -> ModelRef, the family read from the pipeline's model_index.json.

    SOURCE is a pipeline folder or hub id, or DENOISER@PIPELINE: a UNet (SD3: transformer) checkpoint,
    with or without its unet/ (transformer/) subfolder, swapped into PIPELINE. That is how checkpoints
    published as a UNet alone load, e.g. Diffusion-DPO's
    mhdang/dpo-sd1.5-text2image-v1@stable-diffusion-v1-5/stable-diffusion-v1-5. A LoRA folder
    (pytorch_lora_weights.safetensors: the trainers' final_lora/, or what diffusers' train_diffusion_dpo.py
    writes) is LORA@PIPELINE, or the folder alone when its base_model.json names the pipeline. A trainer's
    OUTPUT_DIR/checkpoint-N/ is a model too: a LoRA run's holds its adapter as final_lora/ does; a full (or --fsdp)
    run's its weights, loaded into the base pipeline its base_model.json (or, written before there was one, its
    state.pt's flags) names, or CHECKPOINT@PIPELINE. Its weights_version hashes its MANIFEST.json: other weights,
    other images."""
    label, sep, source = spec.partition("=")
    if not sep:
        label, source = spec, spec
    label, source = label.strip().rstrip("/") or source, source.strip()
    lora, _, base = source.partition("@")
    head = lora.strip().rstrip("/") or lora
    is_checkpoint = checkpoints.is_checkpoint(head) and not os.path.isfile(os.path.join(head, "model_index.json"))
    if is_checkpoint:
        reason = checkpoints.verify(head, checksums=False)  # sizes only: a full checksum reads every byte
        if reason is not None:
            raise UsageError(f"{head} is damaged: {reason}")
    if _is_lora(head):
        lora = head
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
    if is_checkpoint:  # a full or --fsdp run's: its weights into its base pipeline
        named, base = not base.strip(), base.strip() or _checkpoint_base(head)
        try:
            ref = model_ref(f"{label}={base}")
        except UsageError as exc:  # the base has moved since the run (or the run was elsewhere)
            raise UsageError(f"{exc} (the base pipeline of {head}; give it as {head}@PIPELINE)" if named
                             else str(exc)) from None
        return ModelRef(label, ref.source, ref.family, ref.is_local,
                        f"{ref.weights_version}+checkpoint:{base_model_identity(head)}", checkpoint=head)
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


def _checkpoint_base(folder: str) -> str:
    """The base pipeline a checkpoint was trained from: its base_model.json's, else (a checkpoint written before
    checkpoints named their base) the --pretrained_model of its state.pt's flags."""
    named = Path(folder, checkpoints.BASE_RECORD)
    if named.is_file():
        base = read_json(named, "a JSON object naming the checkpoint's base pipeline").get("base_model")
    else:
        base = (checkpoint_args(folder) or {}).get("pretrained_model")
    if not isinstance(base, str) or not base.strip():
        raise UsageError(f"{folder} names no base pipeline: give it as {folder}@PIPELINE")
    return base


def checkpoint_args(folder: str) -> dict:
    """The flags of the run that wrote a checkpoint (state.pt's "args"), read without its tensors."""
    try:
        return torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True, mmap=True)["args"]
    except Exception as exc:  # a truncated zip, an empty file, another kind of file
        text = str(exc).strip().splitlines()
        raise UsageError(f"{folder}/state.pt cannot be read ({text[0][:200] if text else type(exc).__name__}): "
                         "not a complete checkpoint") from None


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
    """The model's diffusers pipeline on `device`, built with its family's class. A checkpoint's trained weights
    (fp32) go into the denoiser loaded in `dtype`, cast as from_pretrained casts a saved model's."""
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
    if model.checkpoint:
        _load_checkpoint(getattr(pipe, DENOISERS[model.family][0]), model)
    if model.lora:
        try:
            pipe.load_lora_weights(model.lora)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot load the LoRA weights in {model.lora} into {model.source}: "
                             f"{str(exc).splitlines()[0]}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_checkpoint(denoiser, model: ModelRef) -> None:
    """The trained weights of `model.checkpoint` into the pipeline's `denoiser` (checkpoints.policy_weights). A LoRA
    checkpoint written before checkpoints held their adapter file gets its adapter from state.pt: the denoiser gains
    the run's adapters (lora.add_lora, the run's rank and alpha) and takes the trained one's weights, not the frozen
    base weights kept beside them (cast to the training dtype)."""
    folder, name = model.checkpoint, DENOISERS[model.family][0]
    try:
        weights = checkpoints.policy_weights(folder)
        if any(".lora_" in key for key in weights):
            args = checkpoint_args(folder)
            lora_adapters.add_lora(denoiser, args["lora_rank"], args.get("lora_alpha"), base_dtype=denoiser.dtype,
                                   reference_adapter=any(f".{lora_adapters.REFERENCE}." in key for key in weights))
            loaded = denoiser.load_state_dict({k: v for k, v in weights.items() if ".lora_" in k}, strict=False)
            missing = [key for key in loaded.missing_keys if ".lora_" in key]
            if missing or loaded.unexpected_keys:
                raise KeyError(f"adapter tensors missing or unexpected: {(missing + loaded.unexpected_keys)[0]}")
            denoiser.requires_grad_(False)
        else:
            denoiser.load_state_dict(weights)
    except UsageError:
        raise
    except Exception as exc:  # a damaged state.pt or shard, the weights of another model
        text = str(exc).strip().splitlines()
        raise UsageError(f"the weights in {folder} do not load into the {name} of {model.source} "
                         f"({text[0][:300] if text else type(exc).__name__})") from None
