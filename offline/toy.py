"""The toy world: captioned 32×32 pictures of one coloured shape, programmatic rewards, and
preference pairs made the way Pick-a-Pic was made (miniature/README.md, design history).

World. A caption is "a [small|big] COLOUR SHAPE [on the left|on the right|at the top|at the bottom]"
with 6 colours × 3 shapes × 5 placements × 3 sizes = 270 captions. `render(spec)` draws the shape in a
flat colour with hard edges on a flat light-grey background. A caption leaves some geometry free (the word
"big" still allows a range of sizes, and "on the left" a range of places), so `sample_spec`
draws the concrete centre and size from a seeded generator: the data is deterministic given the seed.
The base model's pretraining pictures are a mixture (`with_defects`): half of them carry a defect mode
(`DEFECTS`: tinted background, stray shapes, blur) under the same caption as the clean ones.

Prompt split (fixed by a seeded permutation). `EVAL_PROMPTS` (54 captions) are never used to make training
pairs nor to tune anything: the evaluation's. `CALIBRATION_PROMPTS` (27) are the calibration's, where τ and δ
are chosen (reproduce.py), and are never used for training pairs either; `PAIR_PROMPTS` are the other 189.
Pretraining (toy_pretrain.py) sees all 270: the base model knows the whole world, as SD1.5 knew the kind of
prompt Pick-a-Pic's test split holds, and the held-out prompts measure whether preference learning transfers
to prompts that had no pairs.

Rewards (stand-ins for PickScore, HPSv2, ...; pure numpy on pixels, no learned weights):
- `fidelity`: does the image show the caption? Mean of the probabilities that the object has the named
  colour and shape (soft nearest-template classifiers), and, where the caption names them, that it sits
  in the named part of the frame and has the named size.
- `aesthetic`: is it a good picture? Crisp solid edges, a clean background, a flat fill colour, and for
  what the caption leaves free, a centred and well-sized object.
- `label_reward`: the mix that labels preference pairs (like the human raters behind Pick-a-Pic).
Each takes PIL images and captions and returns one float in [0, 1] per image; `TOY_REWARDS` names them.

Pairs: `python -m offline.toy pairs --model offline/toy_model --out toy_pairs.parquet` samples two images per prompt from
the base model and draws the winner from a Bradley–Terry model on the labelling reward, so the labels
agree with the reward only most of the time, as human labels do. `cached_pairs` makes them once per
model and keeps them in the cache; `train_sd15.py --tiny` and miniature/reproduce.py read them from there.
"""
import argparse
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from offline import cache

SIZE = 32
BACKGROUND = (235, 235, 235)
COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 70, 190),
    "cyan": (40, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
# Position word -> the phrase appended to the caption; None means "anywhere".
POSITIONS = {None: "", "left": " on the left", "right": " on the right", "top": " at the top",
             "bottom": " at the bottom"}
SIZES = (None, "small", "big")
# Half-extent r (pixels) of the shape for each size word: the shape spans about 2r pixels. Without a size
# word the object is medium-sized, as a photographer would frame it.
RADIUS_RANGE = {None: (7.0, 9.0), "small": (4.5, 6.0), "big": (10.0, 12.0)}
# The object's centre: within ±CENTRE_JITTER of the middle on every axis the caption leaves free; on the
# axis of a position word, between the frame's edge (as near as the shape fits) and POSITION_LIMIT px from it.
CENTRE_JITTER = 4.0
POSITION_LIMIT = 12.5


@dataclass(frozen=True)
class ToySpec:
    """What the caption says (colour … size) and the geometry drawn for it (centre cx, cy; half-extent r)."""
    colour: str
    shape: str
    position: str | None = None
    size: str | None = None
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    r: float = 8.0
    defect: str | None = None  # one of DEFECTS, drawn into the picture by `render`; the caption never says
    defect_seed: int = 0       # the defect's details (tint, stray shapes), so that a spec renders one picture

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.position, self.size)


def caption_for(colour: str, shape: str, position: str | None = None, size: str | None = None) -> str:
    size_word = f"{size} " if size else ""
    return f"a {size_word}{colour} {shape}{POSITIONS[position]}"


def parse_caption(caption: str) -> dict:
    """The caption's words: {'colour', 'shape', 'position', 'size'}, None where a word is absent."""
    words = caption.lower().replace(",", " ").split()
    found = {
        "colour": next((w for w in words if w in COLOURS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "position": next((w for w in words if w in POSITIONS), None),
        "size": next((w for w in words if w in SIZES), None),
    }
    if found["colour"] is None and found["shape"] is None:
        raise ValueError(f"not a toy-world caption (no colour and no shape word): {caption!r}")
    return found


ALL_PROMPTS = [caption_for(c, s, p, z) for c in COLOURS for s in SHAPES for p in POSITIONS for z in SIZES]
_order = np.random.default_rng(1234).permutation(len(ALL_PROMPTS))
_held_out = set(_order[: len(ALL_PROMPTS) // 5].tolist())
_calibration = set(_order[len(ALL_PROMPTS) // 5: len(ALL_PROMPTS) // 5 + len(ALL_PROMPTS) // 10].tolist())
EVAL_PROMPTS = [p for i, p in enumerate(ALL_PROMPTS) if i in _held_out]
CALIBRATION_PROMPTS = [p for i, p in enumerate(ALL_PROMPTS) if i in _calibration]
PAIR_PROMPTS = [p for i, p in enumerate(ALL_PROMPTS) if i not in _held_out and i not in _calibration]


def sample_spec(rng: np.random.Generator, caption: str | None = None) -> ToySpec:
    """A concrete spec for `caption` (or for a uniformly drawn caption), geometry drawn from `rng`."""
    words = parse_caption(caption if caption is not None else ALL_PROMPTS[rng.integers(len(ALL_PROMPTS))])
    r = float(rng.uniform(*RADIUS_RANGE[words["size"]]))
    lo, hi = r, SIZE - r  # the shape stays inside the frame
    cx, cy = (float(np.clip(SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER), lo, hi)) for _ in range(2))
    near = float(rng.uniform(lo, max(POSITION_LIMIT, lo)))  # distance of the centre from the named edge
    if words["position"] == "left":
        cx = near
    elif words["position"] == "right":
        cx = SIZE - near
    elif words["position"] == "top":
        cy = near
    elif words["position"] == "bottom":
        cy = SIZE - near
    return ToySpec(words["colour"], words["shape"], words["position"], words["size"], cx, cy, r)


def sample_specs(n: int, seed: int, prompts: list[str] | None = None) -> list[ToySpec]:
    """n specs, deterministic in `seed`; captions drawn uniformly from `prompts` (default: all 270)."""
    rng = np.random.default_rng(seed)
    prompts = ALL_PROMPTS if prompts is None else prompts
    return [sample_spec(rng, prompts[rng.integers(len(prompts))]) for _ in range(n)]


def _shape_mask(shape: str, cx: float, cy: float, rx: float, ry: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of `shape` with centre (cx, cy) and half-extents (rx, ry), tested at pixel centres."""
    px, py = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    u, v = (px - cx) / rx, (py - cy) / ry  # the shape's own frame, [-1, 1]²
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex up: half-width grows from 0 at the top to 1 at the base
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
    raise ValueError(f"unknown shape {shape!r}")


# The pretraining data's defect modes. The base model is pretrained on a mixture in which DEFECT_RATE of the
# pictures carry one of these, with the same captions as the clean ones, the way web pre-training left SD1.5
# with modes of very different quality that nothing in the prompt selects: its samples then mix good and bad
# modes, and preference data has something to re-weight (PAPER.md §1). Each defect is one the rewards penalise:
#   tint    - the background is an off-grey colour (aesthetic: not clean, not crisp);
#   clutter - one or two small stray shapes beside the object (aesthetic: not clean; fidelity: colour, shape, place);
#   blur    - the whole picture is blurred (aesthetic: not crisp).
DEFECTS = ("tint", "clutter", "blur")
PRETRAIN_DEFECTS = ("tint", "clutter")  # the committed toy_model's mixture (miniature/README.md, design history)
DEFECT_RATE = 0.5
TINTS = ((215, 205, 180), (185, 210, 225), (220, 195, 205), (200, 215, 190))  # 50–70 RGB units off BACKGROUND
BLUR_RADIUS = 1.2


def render(spec: ToySpec) -> Image.Image:
    """The picture of `spec`: a hard-edged flat shape on the flat background, then its defect, if any."""
    if spec.defect not in (None, *DEFECTS):
        raise ValueError(f"unknown defect {spec.defect!r}; expected one of {DEFECTS}")
    rng = np.random.default_rng(spec.defect_seed)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = TINTS[rng.integers(len(TINTS))] if spec.defect == "tint" else BACKGROUND
    if spec.defect == "clutter":  # stray shapes first, in the quarter of the frame farthest from the object
        for _ in range(int(rng.integers(1, 3))):
            sx = float(rng.uniform(3, 9)) if spec.cx > SIZE / 2 else float(rng.uniform(SIZE - 9, SIZE - 3))
            sy = float(rng.uniform(3, 9)) if spec.cy > SIZE / 2 else float(rng.uniform(SIZE - 9, SIZE - 3))
            colour = list(COLOURS.values())[rng.integers(len(COLOURS))]
            img[_shape_mask(SHAPES[rng.integers(len(SHAPES))], sx, sy, 2.5, 2.5)] = colour
    img[_shape_mask(spec.shape, spec.cx, spec.cy, spec.r, spec.r)] = COLOURS[spec.colour]
    image = Image.fromarray(img)
    if spec.defect == "blur":
        from PIL import ImageFilter

        image = image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    return image


def with_defects(specs: list[ToySpec], seed: int, rate: float = DEFECT_RATE,
                 defects: tuple[str, ...] = DEFECTS) -> list[ToySpec]:
    """The pretraining mixture: each spec, with probability `rate`, given one of `defects` (uniformly) and a
    seed for its details; deterministic in `seed`, and independent of the caption."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for spec in specs:
        flawed, kind, detail = rng.random() < rate, int(rng.integers(len(defects) or 1)), int(rng.integers(2**31))
        out.append(replace(spec, defect=defects[kind], defect_seed=detail) if flawed and defects else spec)
    return out


# Rewards.

# Distance (0–255 RGB units) from the background colour below which a pixel is background, and above
# which it is solid foreground; the band between is blur, smear or noise. Every palette colour is ≥ 190
# away from the background, so "foreground" means more than half way to a colour.
BG_TOLERANCE = 25.0
FG_THRESHOLD = 100.0
COLOUR_SIGMA = 35.0   # width of the colour classifier; palette colours are ≥ 95 apart
SHAPE_TEMPERATURE = 0.05  # IoU units; a correct shape scores IoU ≈ 1, the nearest wrong one ≈ 0.79
_PALETTE = np.array(list(COLOURS.values()), np.float64)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float64)


def _analyse(image) -> dict | None:
    """Foreground mask, its bounding box, centroid and mean colour; None if there is (almost) no object."""
    x = _pixels(image)
    dist = np.linalg.norm(x - np.array(BACKGROUND, np.float64), axis=-1)
    fg = dist > FG_THRESHOLD
    if fg.sum() < 4:
        return None
    ys, xs = np.nonzero(fg)
    return {
        "pixels": x, "dist": dist, "fg": fg,
        "box": (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),  # x0, y0, x1, y1 (exclusive)
        "centroid": (xs.mean() + 0.5, ys.mean() + 0.5),
        "colour": x[fg].mean(axis=0),
    }


def _softmax_prob(scores: np.ndarray, index: int) -> float:
    z = scores - scores.max()
    return float(np.exp(z[index]) / np.exp(z).sum())


def colour_prob(a: dict, colour: str) -> float:
    """P(object colour = `colour`): softmax over the palette of −‖mean colour − palette colour‖² / 2σ²."""
    d2 = ((_PALETTE - a["colour"]) ** 2).sum(axis=1)
    return _softmax_prob(-d2 / (2 * COLOUR_SIGMA ** 2), list(COLOURS).index(colour))


def shape_prob(a: dict, shape: str) -> float:
    """P(object shape = `shape`): softmax over the shapes of the IoU between the foreground mask and that
    shape drawn into the foreground's bounding box (so it judges form, not size or place)."""
    x0, y0, x1, y1 = a["box"]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    ious = []
    for s in SHAPES:
        t = _shape_mask(s, cx, cy, rx, ry)
        ious.append((t & a["fg"]).sum() / max((t | a["fg"]).sum(), 1))
    return _softmax_prob(np.array(ious) / SHAPE_TEMPERATURE, SHAPES.index(shape))


def _half_extent(a: dict) -> float:
    x0, y0, x1, y1 = a["box"]
    return max(x1 - x0, y1 - y0) / 2


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def position_prob(a: dict, position: str) -> float:
    """Soft test that the centroid lies in the named part of the frame (at least ~1 px past the middle)."""
    cx, cy = a["centroid"]
    offset = {"left": SIZE / 2 - cx, "right": cx - SIZE / 2, "top": SIZE / 2 - cy, "bottom": cy - SIZE / 2}
    return _sigmoid(offset[position] - 1.0)


def size_prob(a: dict, size: str) -> float:
    """Soft test of the size word: 'small' objects span < 15 px, 'big' ones more (half-extent 7.5)."""
    sign = 1.0 if size == "big" else -1.0
    return _sigmoid(sign * (_half_extent(a) - 7.5))


def fidelity_one(image, caption: str) -> float:
    """Caption agreement in [0, 1]: mean of the colour, shape, position and size probabilities
    (the last two only where the caption names them); 0 for an image without an object."""
    words, a = parse_caption(caption), _analyse(image)
    if a is None:
        return 0.0
    terms = []
    if words["colour"]:
        terms.append(colour_prob(a, words["colour"]))
    if words["shape"]:
        terms.append(shape_prob(a, words["shape"]))
    if words["position"]:
        terms.append(position_prob(a, words["position"]))
    if words["size"]:
        terms.append(size_prob(a, words["size"]))
    return float(np.mean(terms))


def aesthetic_one(image, caption: str) -> float:
    """Picture quality in [0, 1], the mean of:
    crisp  - share of non-background pixels that are solid foreground (few blurred/smeared pixels);
    clean  - share of pixels 2+ px away from the object's box that are background (no stray marks);
    flat   - the fill is one colour: exp(−std of the foreground colour / 30);
    and, only for what the caption leaves free (composition is the picture-maker's choice, not the caption's):
    centred - 1 − distance of the centroid from the middle / 16;
    sized   - exp(−((half-extent − 8) / 3)²): fills about half the frame, neither tiny nor cropped.
    """
    words, a = parse_caption(caption), _analyse(image)
    if a is None:
        return 0.0
    dist, fg = a["dist"], a["fg"]
    crisp = fg.sum() / max((dist > BG_TOLERANCE).sum(), 1)
    x0, y0, x1, y1 = a["box"]
    away = np.ones_like(fg)
    away[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False
    clean = (dist[away] <= BG_TOLERANCE).mean() if away.any() else 1.0
    flat = math.exp(-a["pixels"][fg].std(axis=0).mean() / 30.0)
    terms = [crisp, clean, flat]
    if words["position"] is None:
        cx, cy = a["centroid"]
        terms.append(max(0.0, 1.0 - math.hypot(cx - SIZE / 2, cy - SIZE / 2) / (SIZE / 2)))
    if words["size"] is None:
        terms.append(math.exp(-((_half_extent(a) - 8.0) / 3.0) ** 2))
    return float(np.mean(terms))


LABEL_WEIGHTS = {"fidelity": 0.5, "aesthetic": 0.5}


def fidelity(images, prompts) -> list[float]:
    return [fidelity_one(im, p) for im, p in zip(images, prompts, strict=True)]


def aesthetic(images, prompts) -> list[float]:
    return [aesthetic_one(im, p) for im, p in zip(images, prompts, strict=True)]


def label_reward(images, prompts) -> list[float]:
    """The reward behind the preference labels: LABEL_WEIGHTS-weighted fidelity and aesthetic."""
    return [LABEL_WEIGHTS["fidelity"] * f + LABEL_WEIGHTS["aesthetic"] * a
            for f, a in zip(fidelity(images, prompts), aesthetic(images, prompts))]


TOY_REWARDS = {"toy_fidelity": fidelity, "toy_aesthetic": aesthetic, "toy_label": label_reward}


# Sampling from a pipeline and making preference pairs.

# Sampler settings for pairs and for evaluation on the toy model. DDIM with "trailing" spacing: its first step
# is at t = 999, and its 10 steps (999, 899, …, 99) visit every tenth of the schedule, so a model is queried at
# the noisy end that the timestep-aware training over-samples ("leading" spacing starts at t = 876 and never
# queries above it). toy_model's scheduler config says so too, and the trained pipelines inherit it.
SAMPLER = "ddim"
TIMESTEP_SPACING = "trailing"
NUM_INFERENCE_STEPS = 10
GUIDANCE_SCALE = 3.0
# Bradley–Terry temperature of the labelling noise, in units of the labelling reward (see `bt_labels`).
BT_TEMPERATURE = 0.03


def load_pipeline(model: str, sampler: str = SAMPLER):
    """StableDiffusionPipeline from a hub-layout folder, with the named sampler ("ddim", "dpm" or "ddpm")."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    schedulers = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
    pipe.scheduler = schedulers[sampler].from_config(pipe.scheduler.config, timestep_spacing=TIMESTEP_SPACING)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int = NUM_INFERENCE_STEPS,
           guidance_scale: float = GUIDANCE_SCALE, batch_size: int = 64, progress: bool = False):
    """One image per (prompt, seed). Each image has its own generator, so it depends only on its prompt and
    seed, not on the batch it was drawn in (up to float rounding, which moves a pixel by a level or two)."""
    import torch
    from tqdm import tqdm

    images = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="sampling", disable=not progress, dynamic_ncols=True):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        with torch.no_grad():
            out = pipe(prompts[i:i + batch_size], generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pil")
        images += out.images
    return images


def bt_labels(r0, r1, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy preference labels: the first image wins with probability σ((r0 − r1) / temperature), the
    Bradley–Terry model that reward models are fitted to human choices with. Returns label_0 (1.0 or 0.0)."""
    p_first = bt_probability(r0, r1, temperature)
    return (rng.random(len(p_first)) < p_first).astype(np.float64)


def bt_probability(r0, r1, temperature: float) -> np.ndarray:
    """σ((r0 − r1) / temperature), written with tanh so that a tiny temperature does not overflow."""
    return 0.5 * (1.0 + np.tanh((np.asarray(r0, np.float64) - np.asarray(r1, np.float64)) / (2 * temperature)))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_pairs(pipe, prompts: list[str], seed: int = 0, temperature: float = BT_TEMPERATURE,
               num_inference_steps: int = NUM_INFERENCE_STEPS, guidance_scale: float = GUIDANCE_SCALE,
               batch_size: int = 64, progress: bool = False) -> tuple[dict, dict]:
    """Two samples of `pipe` per prompt (seeds 2·(seed·10⁶ + i) and that + 1), labelled by `bt_labels` on
    `label_reward`. Returns (columns in Pick-a-Pic v2's row format, stats) where stats has the share of
    pairs whose label agrees with the reward's ranking ("agreement") and its expectation under the model."""
    n = len(prompts)
    seeds = [2 * (seed * 10**6 + i) + k for i in range(n) for k in (0, 1)]
    images = sample(pipe, [p for p in prompts for _ in (0, 1)], seeds, num_inference_steps, guidance_scale,
                    batch_size, progress)
    rewards = np.array(label_reward(images, [p for p in prompts for _ in (0, 1)])).reshape(n, 2)
    label_0 = bt_labels(rewards[:, 0], rewards[:, 1], temperature, np.random.default_rng(seed))
    reward_first = rewards[:, 0] > rewards[:, 1]
    decided = rewards[:, 0] != rewards[:, 1]
    p_first = bt_probability(rewards[:, 0], rewards[:, 1], temperature)
    stats = {
        "pairs": n,
        "agreement": float(((label_0 == 1.0) == reward_first)[decided].mean()),
        "expected_agreement": float(np.maximum(p_first, 1 - p_first)[decided].mean()),
        "mean_abs_reward_gap": float(np.abs(rewards[:, 0] - rewards[:, 1]).mean()),
        "mean_label_reward": float(rewards.mean()),
    }
    uids = [[f"toy-{seed}-{i}-{k}" for k in (0, 1)] for i in range(n)]
    cols = {
        "are_different": [True] * n,
        "best_image_uid": [u[0] if l0 == 1.0 else u[1] for u, l0 in zip(uids, label_0)],
        "caption": list(prompts),
        "has_label": [True] * n,
        "image_0_uid": [u[0] for u in uids],
        "image_1_uid": [u[1] for u in uids],
        "jpg_0": [_png(images[2 * i]) for i in range(n)],
        "jpg_1": [_png(images[2 * i + 1]) for i in range(n)],
        "label_0": label_0.tolist(),
        "label_1": (1.0 - label_0).tolist(),
        "model_0": ["toy_model"] * n,
        "model_1": ["toy_model"] * n,
        "ranking_id": list(range(n)),
        "user_id": [0] * n,
        "num_example_per_prompt": [1] * n,
        # Not in Pick-a-Pic: the labelling reward of each image, kept for analysis.
        "reward_0": rewards[:, 0].tolist(),
        "reward_1": rewards[:, 1].tolist(),
    }
    return cols, stats


def write_parquet(cols: dict, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v, type=pa.binary()) if k.startswith("jpg_") else v for k, v in cols.items()})
    pq.write_table(table, path)


TOY_MODEL = Path(__file__).resolve().parent / "toy_model"  # the committed base model (toy_pretrain.py)


def pairs_key(model: str | os.PathLike) -> str:
    """A short hash of a pipeline folder's weights and configs: pairs cached for one model are never
    mistaken for another's (a retrained toy_model gets new pairs)."""
    digest = hashlib.sha1()
    for f in sorted(Path(model).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt"):
            digest.update(str(f.relative_to(model)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


PAIRS_VERSION = 2  # bumped when the sampler or the prompt split changes: cached pairs are then made again


def pairs_path(model: str | os.PathLike = TOY_MODEL, num_pairs: int = 1000, seed: int = 0, split: str = "pair") -> Path:
    """Where `cached_pairs` keeps these pairs, under the cache root (nothing is made)."""
    return cache.root() / f"toy-pairs-v{PAIRS_VERSION}-{pairs_key(model)}-{split}-n{num_pairs}-s{seed}.parquet"


def cached_pairs(model: str | os.PathLike = TOY_MODEL, num_pairs: int = 1000, seed: int = 0,
                 progress: bool = True, split: str = "pair") -> Path:
    """`make_pairs` of `model` on `pair_prompts(num_pairs, seed)` (split "pair": the training pairs) or on the
    held-out prompts cycled (split "eval": pairs for diagnostics only), written once as Pick-a-Pic parquet
    under the cache root (~/.cache/rethinking-dpo, or $RDPO_CACHE) and reused: sampling 1000 pairs takes a
    few CPU minutes. The file appears complete or not at all (cache.build_aside)."""
    path = pairs_path(model, num_pairs, seed, split)
    if not path.is_file():
        if progress:
            print(f"making {num_pairs} toy preference pairs from {model} (once; cached in {path})", flush=True)
        prompts = (pair_prompts(num_pairs, seed) if split == "pair"
                   else [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(num_pairs)])
        cols, stats = make_pairs(load_pipeline(str(model)), prompts, seed, progress=progress)
        cache.build_aside(path, lambda tmp: write_parquet(cols, str(tmp)), folder=False)
        path.with_suffix(".json").write_text(json.dumps(stats, indent=1))
    return path


def pair_prompts(num_prompts: int, seed: int) -> list[str]:
    """num_prompts captions drawn uniformly (with replacement) from PAIR_PROMPTS, never the evaluation's or
    the calibration's."""
    rng = np.random.default_rng(seed)
    return [PAIR_PROMPTS[i] for i in rng.integers(len(PAIR_PROMPTS), size=num_prompts)]


def image_grid(images, columns: int, scale: int = 3) -> Image.Image:
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * SIZE, rows * SIZE), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * SIZE, (i // columns) * SIZE))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The toy world: preference pairs and sample grids.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pairs = sub.add_parser("pairs", help="sample two images per prompt and label them with noise (Pick-a-Pic rows)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pairs.add_argument("--out", default="toy_pairs.parquet", help="parquet file to write")
    pairs.add_argument("--num_prompts", type=int, default=1000, help="pairs to make (one prompt each)")
    pairs.add_argument("--temperature", type=float, default=BT_TEMPERATURE,
                       help="Bradley–Terry temperature of the labels; smaller agrees more with the reward")
    grid = sub.add_parser("grid", help="sample the held-out prompts and save an image grid with rewards",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    grid.add_argument("--out", default="toy_grid.png", help="PNG file to write")
    grid.add_argument("--num_prompts", type=int, default=16, help="held-out prompts (rows of the grid)")
    grid.add_argument("--num_seeds", type=int, default=8, help="seeds per prompt (columns of the grid)")
    for p in (pairs, grid):
        p.add_argument("--model", default="toy_model", help="pipeline folder (hub layout)")
        p.add_argument("--seed", type=int, default=0, help="seeds the prompts, the sampling noise and the labels")
        p.add_argument("--sampler", choices=["ddim", "dpm", "ddpm"], default=SAMPLER, help="sampling scheduler")
        p.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS, help="sampler steps")
        p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance")
        p.add_argument("--batch_size", type=int, default=64, help="images per sampler batch")
        p.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (0: torch's default); see toy_pretrain.py --help for why 1")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    start = time.time()
    pipe = load_pipeline(args.model, args.sampler)
    if args.command == "pairs":
        cols, stats = make_pairs(pipe, pair_prompts(args.num_prompts, args.seed), args.seed, args.temperature,
                                 args.steps, args.guidance_scale, args.batch_size, progress=True)
        write_parquet(cols, args.out)
        stats["seconds"] = round(time.time() - start, 1)
        print(stats)
    else:
        prompts = EVAL_PROMPTS[: args.num_prompts]
        all_prompts = [p for p in prompts for _ in range(args.num_seeds)]
        seeds = [args.seed * 10**6 + k for _ in prompts for k in range(args.num_seeds)]
        images = sample(pipe, all_prompts, seeds, args.steps, args.guidance_scale, args.batch_size, progress=True)
        image_grid(images, args.num_seeds).save(args.out)
        for name, fn in TOY_REWARDS.items():
            print(f"{name}: {np.mean(fn(images, all_prompts)):.3f}")
        print(f"wrote {args.out} ({time.time() - start:.0f} s); rows: " + " | ".join(prompts))


if __name__ == "__main__":
    main()
