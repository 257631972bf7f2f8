"""Reward models that score generated images, behind one interface, for eval.py.

Every reward is an object with
    name    the column name in the tables ("PickScore", "CLIP", ...)
    units   one line saying what the number is and on which scale it is reported
    score(images: list[PIL.Image], prompts: list[str]) -> list[float]   (one score per image, higher = better)
    close() frees its weights (evaluation loads one reward model at a time)

and is built from a spec string "NAME" or "NAME:ARG" by `build_reward(spec, device)`. `REWARDS` maps NAME to
a factory and a line of help; a reward that is a plain function of pixels (the toy world's) is one entry
made by `_pixels`. A fork adds its own reward as one more entry.

The paper's five rewards, and the scale each is reported on (PAPER.md §6 tables):

| spec          | model                                                                   | reported as |
|---------------|-------------------------------------------------------------------------|-------------|
| pickscore     | yuvalkirstain/PickScore_v1, processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K | logit_scale.exp() · cos = 100 · cos (≈ 21 for SD1.5) |
| hpsv2         | HPSv2 (`pip install hpsv2`), checkpoint xswu/HPSv2 HPS_v2_compressed.pt  | 100 · cos (≈ 27) |
| clip          | laion/CLIP-ViT-H-14-laion2B-s32B-b79K                                   | 100 · cos (≈ 34) |
| aesthetic     | LAION improved aesthetic predictor (MLP on openai/clip-vit-large-patch14 image embeddings) | raw, 1–10 (≈ 5.5) |
| imagereward   | ImageReward-v1.0 (`pip install image-reward`)                           | raw, z-scored (≈ 0.3) |

Why ViT-H-14 for CLIP score: the Diffusion-DPO evaluation code, whose protocol the paper follows, computes
CLIP score as the cosine of OpenCLIP ViT-H-14 (laion2B-s32B-b79K) embeddings; ×100 gives the ≈ 34 of the
paper's ablation table (an OpenAI ViT-L/14 cosine is lower, ≈ 0.27–0.31). `clip:openai/clip-vit-large-patch14`
selects the other convention.

Variants and offline rewards (no downloaded weights needed for the last three groups):
    pickscore:DIR_OR_ID   the PickScore formula with any transformers CLIP checkpoint (model + processor)
    clip:DIR_OR_ID        100 · cos with any transformers CLIP checkpoint
    aesthetic:FILE.pth    the aesthetic MLP from a local state dict (e.g. sac+logos+ava1-l14-linearMSE.pth)
    hpsv2:v2.1            HPS v2.1 instead of v2.0
    tiny_pickscore, tiny_clip   the same code on a tiny, randomly initialised CLIP built and saved locally
                          (offline/tiny.py, `tiny_clip_dir()`): numbers without meaning, for tests and the offline demo
    toy_fidelity, toy_aesthetic, toy_label   offline/toy.py's programmatic rewards of the toy world (pure pixels)
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Sequence

import torch

from mechanics import loading
from mechanics.errors import UsageError
from offline import tiny, toy

# The paper's rewards in the column order of its tables.
PAPER_REWARDS = ("pickscore", "hpsv2", "clip", "aesthetic", "imagereward")

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
# The improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE weights as hosted on the hub for TRL's DDPO.
AESTHETIC_WEIGHTS = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
HPSV2_WEIGHTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class RewardError(RuntimeError):
    """A reward cannot be built or used: unknown name, missing optional package, weights not found."""


class Reward:
    """Base class: subclasses set `name` and `units` and implement `_score` on one batch."""

    name: str = "reward"
    units: str = ""

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        with torch.no_grad():
            values = self._score([im.convert("RGB") for im in images], list(prompts))
        return [float(v) for v in values]

    def _score(self, images: list, prompts: list[str]) -> Sequence[float]:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the weights so the next reward model has the accelerator memory."""
        for attr in list(vars(self)):
            if isinstance(getattr(self, attr), torch.nn.Module):
                setattr(self, attr, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class FunctionReward(Reward):
    """A reward that is a plain function fn(images, prompts) -> list[float] (no weights)."""

    def __init__(self, name: str, fn: Callable, units: str = ""):
        self.name, self.fn, self.units = name, fn, units

    def _score(self, images, prompts):
        return self.fn(images, prompts)


# CLIP-based rewards (transformers)


def _embedding(output) -> torch.Tensor:
    """get_*_features returns a tensor on transformers 4 and an output object (pooler_output) on 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_clip(model_id: str, processor_id: str, device: str, local_files_only: bool):
    """CLIPModel + its processor from a folder or hub id, with the checks the hub's silent failures need."""
    from transformers import AutoProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=local_files_only)
        processor = AutoProcessor.from_pretrained(processor_id, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:  # not a folder, not a valid hub id, not cached, or no network
        raise RewardError(_not_found(f"CLIP checkpoint {model_id!r} / {processor_id!r}", local_files_only)) from exc
    # An uncached hub id's tokenizer loads with a handful of tokens instead of failing: scores on garbage text.
    loading.check_tokenizer(processor.tokenizer, model.text_model, f"the tokenizer of {processor_id!r}")
    return model.to(device).eval().requires_grad_(False), processor


def _not_found(what: str, local_files_only: bool) -> str:
    where = "the hub is offline and it is not in the local cache" if local_files_only else "it could not be loaded"
    return (f"{what}: {where}. Download it once with network access, pass a local folder, "
            f"or use the offline rewards (tiny_clip, tiny_pickscore, toy_*) with `python eval.py --tiny`")


class _CLIPPair(Reward):
    """Normalised CLIP image and text embeddings of each (image, prompt) pair."""

    def __init__(self, model_id: str, processor_id: str | None, device: str, local_files_only: bool = False):
        self.device = device
        self.model, self.processor = _load_clip(model_id, processor_id or model_id, device, local_files_only)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def embed(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        img = _embedding(self.model.get_image_features(pixel_values=pixels)).float()
        txt = _embedding(self.model.get_text_features(input_ids=text["input_ids"],
                                                      attention_mask=text["attention_mask"])).float()
        return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


class PickScoreReward(_CLIPPair):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() · cos(image emb, text emb).

    The learned logit scale of PickScore_v1 is ≈ 100, so the value is already on the ×100 scale of the
    paper's tables (≈ 21 for SD1.5 on Pick-a-Pic)."""

    name = "PickScore"

    def __init__(self, model_id=PICKSCORE_MODEL, processor_id=PICKSCORE_PROCESSOR, device="cpu", local_files_only=False):
        super().__init__(model_id, processor_id, device, local_files_only)
        self.units = f"logit_scale.exp() × cosine (= {self.model.logit_scale.exp().item():.1f} × cos), {model_id}"

    def _score(self, images, prompts):
        img, txt = self.embed(images, prompts)
        return (self.model.logit_scale.exp().float() * (img * txt).sum(-1)).tolist()


class CLIPScoreReward(_CLIPPair):
    """CLIP score as the paper's tables report it: 100 · cosine of image and prompt embeddings."""

    name = "CLIP"

    def __init__(self, model_id=CLIPSCORE_MODEL, device="cpu", local_files_only=False):
        super().__init__(model_id, None, device, local_files_only)
        self.units = f"100 × cosine, {model_id}"

    def _score(self, images, prompts):
        img, txt = self.embed(images, prompts)
        return (100.0 * (img * txt).sum(-1)).tolist()


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor head (christophschuhmann/improved-aesthetic-predictor).

    Linear layers with dropout and no activations, exactly as the published checkpoint was trained
    (its ReLUs are commented out), so its state dict keys are layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class AestheticReward(Reward):
    """LAION aesthetic score: the MLP on L2-normalised CLIP ViT-L/14 image embeddings, raw (1–10 scale)."""

    name = "Aesthetic"

    def __init__(self, weights: str | None = None, clip_id: str = AESTHETIC_CLIP, device="cpu", local_files_only=False):
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = device
        path = weights or self._download(local_files_only)
        if not os.path.isfile(path):
            raise RewardError(f"aesthetic predictor weights not found: {path}")
        try:
            # The whole CLIPModel, not CLIPVisionModelWithProjection: the projection width lives in the
            # top-level config of a CLIP checkpoint, which the vision-only class does not read.
            self.clip = CLIPModel.from_pretrained(clip_id, local_files_only=local_files_only)
            self.processor = CLIPImageProcessor.from_pretrained(clip_id, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            raise RewardError(_not_found(f"CLIP model {clip_id!r}", local_files_only)) from exc
        self.clip = self.clip.to(device).eval().requires_grad_(False)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        self.mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.mlp = self.mlp.to(device).eval().requires_grad_(False)
        self.units = f"LAION aesthetic predictor, raw 1–10 scale, on {clip_id} image embeddings"

    @staticmethod
    def _download(local_files_only: bool) -> str:
        from huggingface_hub import hf_hub_download

        repo, filename = AESTHETIC_WEIGHTS
        try:
            return hf_hub_download(repo, filename, local_files_only=local_files_only)
        except Exception as exc:  # offline, not cached, or the file moved
            raise RewardError(
                _not_found(f"aesthetic predictor weights {repo}/{filename}", local_files_only)
                + "; or pass aesthetic:PATH to a local sac+logos+ava1-l14-linearMSE.pth"
            ) from exc

    def _score(self, images, prompts):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        emb = _embedding(self.clip.get_image_features(pixel_values=pixels)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(-1).tolist()


# Optional packages: HPSv2 and ImageReward (they pull torchvision / the CUDA torch, so they are not in
# requirements.txt)


def _require(module: str, pip_name: str, reward: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RewardError(f"the {reward} reward needs the optional package {pip_name!r}: pip install {pip_name}")


class HPSv2Reward(Reward):
    """HPSv2 (Wu et al. 2023) through the `hpsv2` package: cosine of its fine-tuned OpenCLIP ViT-H-14, ×100.

    hpsv2.score() reloads its checkpoint on every call, which is far too slow for thousands of images, so
    the model is built once here with the package's own constructor and checkpoint, as its score() does."""

    name = "HPSv2"

    def __init__(self, version: str | None = None, device="cpu", local_files_only=False):
        _require("hpsv2", "hpsv2", "HPSv2")
        version = version or "v2.0"
        if version not in HPSV2_WEIGHTS:
            raise RewardError(f"unknown HPSv2 version {version!r}; expected one of {', '.join(HPSV2_WEIGHTS)}")
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        from huggingface_hub import hf_hub_download

        self.device = device
        self.model, _, self.preprocess = create_model_and_transforms(
            "ViT-H-14", "laion2B-s32B-b79K", precision="amp", device=device, jit=False,
            force_quick_gelu=False, force_custom_text=False, force_patch_dropout=False, force_image_size=None,
            pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True, aug_cfg={},
            output_dict=True, with_score_predictor=False, with_region_predictor=False,
        )
        try:
            checkpoint = hf_hub_download("xswu/HPSv2", HPSV2_WEIGHTS[version], local_files_only=local_files_only)
        except Exception as exc:
            raise RewardError(_not_found(f"HPSv2 checkpoint xswu/HPSv2/{HPSV2_WEIGHTS[version]}", local_files_only)) from exc
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["state_dict"])
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.units = f"HPS {version}, 100 × cosine (the package reports the cosine)"

    def _score(self, images, prompts):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        text = self.tokenizer(prompts).to(self.device)
        with torch.autocast(device_type=torch.device(self.device).type, enabled=self.device != "cpu"):
            out = self.model(pixels, text)
        img, txt = out["image_features"].float(), out["text_features"].float()  # already normalised
        return (100.0 * (img * txt).sum(-1)).tolist()


class ImageRewardReward(Reward):
    """ImageReward-v1.0 (Xu et al. 2023) through the `image-reward` package, raw (z-scored by the package)."""

    name = "ImageReward"

    def __init__(self, version: str | None = None, device="cpu", local_files_only=False):
        _require("ImageReward", "image-reward", "ImageReward")
        import ImageReward as RM

        version = version or "ImageReward-v1.0"
        try:
            self.model = RM.load(version, device=device)
        except Exception as exc:
            raise RewardError(_not_found(f"ImageReward checkpoint {version}", local_files_only)) from exc
        self.model.eval()
        self.units = f"{version}, raw (the package's z-scored reward)"

    def _score(self, images, prompts):
        # The package scores one prompt against a list of images; prompts differ per image here.
        return [float(self.model.score(p, im)) for im, p in zip(images, prompts)]


# The registry: NAME -> (factory(arg, device=, local_files_only=) -> Reward, one line of help)

def _tiny_pickscore(arg, device="cpu", local_files_only=False):
    path = tiny.tiny_clip_dir()
    reward = PickScoreReward(path, path, device=device, local_files_only=True)
    reward.name, reward.units = "tiny_pickscore", "PickScore formula on a random tiny CLIP (offline demo: no meaning)"
    return reward


def _tiny_clip(arg, device="cpu", local_files_only=False):
    reward = CLIPScoreReward(tiny.tiny_clip_dir(), device=device, local_files_only=True)
    reward.name, reward.units = "tiny_clip", "100 × cosine on a random tiny CLIP (offline demo: no meaning)"
    return reward


def _pixels(name: str, fn: Callable, units: str) -> Callable:
    """A reward that is a plain function of pixels and prompts (the toy world's)."""
    return lambda arg, device="cpu", local_files_only=False: FunctionReward(name, fn, units=units)


REWARDS: dict[str, tuple[Callable, str]] = {
    "pickscore": (lambda arg, **kw: PickScoreReward(arg or PICKSCORE_MODEL, arg or PICKSCORE_PROCESSOR, **kw),
                  "PickScore_v1, logit_scale·cos (×100 scale); pickscore:DIR uses another CLIP checkpoint"),
    "hpsv2": (lambda arg, **kw: HPSv2Reward(arg, **kw), "HPS v2.0 ×100 (pip install hpsv2); hpsv2:v2.1 for v2.1"),
    "clip": (lambda arg, **kw: CLIPScoreReward(arg or CLIPSCORE_MODEL, **kw),
             "100·cos, laion/CLIP-ViT-H-14-laion2B-s32B-b79K; clip:DIR_OR_ID for another CLIP"),
    "aesthetic": (lambda arg, **kw: AestheticReward(arg, **kw),
                  "LAION aesthetic predictor (1–10) on CLIP ViT-L/14; aesthetic:FILE.pth for local weights"),
    "imagereward": (lambda arg, **kw: ImageRewardReward(arg, **kw), "ImageReward-v1.0, raw (pip install image-reward)"),
    "tiny_pickscore": (_tiny_pickscore, "offline: PickScore formula on a random tiny CLIP"),
    "tiny_clip": (_tiny_clip, "offline: 100·cos on a random tiny CLIP"),
    # The toy world's programmatic rewards (offline/toy.py), in [0, 1].
    **{name: (_pixels(name, fn, units), units) for name, fn, units in (
        ("toy_fidelity", toy.fidelity, "toy world: caption fidelity in [0, 1] (offline/toy.py)"),
        ("toy_aesthetic", toy.aesthetic, "toy world: picture quality in [0, 1] (offline/toy.py)"),
        ("toy_label", toy.label_reward, "toy world: the labelling reward in [0, 1] (offline/toy.py)"))},
}


def available_rewards() -> dict[str, str]:
    """{name: help} of every registered reward."""
    return {name: help for name, (_, help) in REWARDS.items()}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'clip:/path/to/model' -> ('clip', '/path/to/model'); 'clip' -> ('clip', None)."""
    name, sep, arg = spec.strip().partition(":")
    return name.strip().lower(), (arg.strip() or None) if sep else None


# The hub files each built-in reward needs, checked in the local cache before sampling when offline.
_HUB_FILES = {
    "pickscore": [(PICKSCORE_MODEL, "config.json"), (PICKSCORE_PROCESSOR, "preprocessor_config.json")],
    "clip": [(CLIPSCORE_MODEL, "config.json")],
    "aesthetic": [AESTHETIC_WEIGHTS, (AESTHETIC_CLIP, "config.json")],
    "hpsv2": [("xswu/HPSv2", HPSV2_WEIGHTS["v2.0"])],
    "imagereward": [("THUDM/ImageReward", "ImageReward.pt")],
}


def needs_hub(spec: str) -> bool:
    """Whether the reward loads anything from the hub (the offline tiny_* and toy_* rewards do not)."""
    name, arg = parse_spec(spec)
    return name in _HUB_FILES and not (arg and os.path.exists(arg))


def check_spec(spec: str, offline: bool = False) -> None:
    """Fail early (before hours of sampling) on an unknown name, a missing optional package, or, offline,
    weights that are not in the local cache."""
    name, arg = parse_spec(spec)
    if name not in REWARDS:
        raise RewardError(f"unknown reward {spec!r}; available: {', '.join(REWARDS)}")
    if name == "hpsv2":
        _require("hpsv2", "hpsv2", "HPSv2")
    if name == "imagereward":
        _require("ImageReward", "image-reward", "ImageReward")
    if offline and needs_hub(spec):
        from huggingface_hub import try_to_load_from_cache

        files = _HUB_FILES[name]
        if arg and name in ("pickscore", "clip"):
            files = [(arg, "config.json")]
        elif arg and name == "hpsv2":
            files = [("xswu/HPSv2", HPSV2_WEIGHTS.get(arg, arg))]
        elif arg:
            files = []  # aesthetic:FILE / imagereward:VERSION: checked when built
        for repo, filename in files:
            try:
                cached = try_to_load_from_cache(repo, filename)
            except ValueError:  # not a valid hub id either: a folder that does not exist
                raise RewardError(f"reward {spec!r}: no such folder: {repo}") from None
            if not isinstance(cached, str):
                raise RewardError(_not_found(f"reward {spec!r} ({repo}/{filename})", True))


def build_reward(spec: str, device: str = "cpu", local_files_only: bool = False) -> Reward:
    """Build the reward named by `spec` ("NAME" or "NAME:ARG"), loading its weights on `device`."""
    check_spec(spec)
    name, arg = parse_spec(spec)
    factory, _ = REWARDS[name]
    reward = factory(arg, device=device, local_files_only=local_files_only)
    if arg is not None and name in ("pickscore", "clip", "aesthetic"):
        reward.name = f"{reward.name}({arg})"  # a non-default checkpoint gets its own column
    return reward


def load(spec: str, device) -> Reward:
    """A reward for the trainers' --eval_every: checked and built before the models load, its weights from the
    local cache when the hub is offline; a reward that cannot be used is one line (UsageError)."""
    try:
        offline = needs_hub(spec) and not loading.go_offline_unless_reachable()
        check_spec(spec, offline=offline)
        return build_reward(spec, device=str(device), local_files_only=offline)
    except RewardError as error:
        raise UsageError(f"--eval_reward {spec}: {' '.join(str(error).split())}") from None
