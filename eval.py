"""Evaluate a trained model the way the paper does (PAPER.md §6): same-seed win rates against baselines,
per reward model and averaged, on the paper's prompt sets.

Real models (GPU, network on first use; the paper's settings are the defaults):

    # SD1.5: Pick-a-Pic v2 test_unique, 500 prompts x 5 seeds, 50 steps, guidance 7.5, 512 px; baselines: the
    # base model, our own Diffusion-DPO run, and Diffusion-DPO's released UNet swapped into SD1.5 (UNET@PIPELINE)
    python eval.py --model ours=out/sd15/final \\
        --baseline sd15=stable-diffusion-v1-5/stable-diffusion-v1-5 --baseline dpo=out/sd15-dpo/final \\
        --baseline dpo-release=mhdang/dpo-sd1.5-text2image-v1@stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts pickapic --rewards pickscore,hpsv2,clip,aesthetic,imagereward --output_dir out/eval-sd15-pickapic
    # the same on PartiPrompts (1,632 x 1 seed) and the HPSv2 benchmark (4 x 800 x 1 seed)
    python eval.py --model ours=out/sd15/final --baseline sd15=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts parti --output_dir out/eval-sd15-parti
    python eval.py --model ours=out/sd15/final --baseline sd15=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts hpsv2 --output_dir out/eval-sd15-hpsv2
    # SDXL (50 steps, guidance 5.0, 1024 px) and SD3 (28 steps, guidance 7.0, 1024 px); FLUX.1-dev samples with
    # 50 steps, guidance 3.5, 1024 px, in bfloat16, and FLUX.1-schnell with 4 steps and guidance 0
    python eval.py --model ours=out/sdxl/final --baseline sdxl=stabilityai/stable-diffusion-xl-base-1.0 \\
        --baseline dpo-release=mhdang/dpo-sdxl-text2image-v1@stabilityai/stable-diffusion-xl-base-1.0 \\
        --prompts pickapic --output_dir out/eval-sdxl
    python eval.py --model ours=out/sd3/final --baseline sd3=stabilityai/stable-diffusion-3-medium-diffusers \\
        --prompts pickapic --output_dir out/eval-sd3

    (hpsv2 and imagereward need `pip install hpsv2` / `pip install image-reward`; both pull torchvision.)

Offline (no GPU, no network; tiny pipelines, a small prompt file, rewards without downloaded weights,
through the same code path):

    python train_sd15.py --tiny --output_dir out/tiny && python eval.py --tiny --model out/tiny/final
                                                            # the demo's trained model vs the toy base model
    python eval.py --tiny                                   # a random-init tiny pipeline vs the toy base model

How it works. Every (prompt, seed) is sampled with its own CPU generator seeded with `seed`, so a model's
image and a baseline's image of the same key start from the same noise, whatever the batching. Images go to
OUTPUT_DIR/images/<model-tag>/<prompt_idx:05d>_<seed>.png (written atomically, the prompt stored inside
the PNG), next to a settings.json of the sampler settings; a rerun skips every image that exists, so an
interrupted evaluation resumes (to the same numbers: a missing image is sampled in the batch it would have had),
and re-scoring or adding a reward never samples again. Different sampler settings for the same folder are
refused rather than mixed, and so is a second run into a folder another run is using (OUTPUT_DIR/.lock). Then
every reward scores every image, one reward model in memory at a time, and the outputs are
    scores.csv    one row per (model, prompt, seed), one column per reward
    summary.json  settings, mean scores, win rates
    table.md      the Markdown tables of PAPER.md §6 (also printed)

Win rate of A over B = mean over (prompt, seed) keys of 1 if A's image scores higher than B's, 1/2 if equal,
0 if lower (`win_rate`). The "Avg" column is the mean of the per-reward win rates, as in the paper's table.
"""
from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

import rewards as rw
from mechanics import errors, folder, runtime
from mechanics.comparison import win_rate, win_rate_interval
from mechanics.errors import UsageError
from mechanics.loading import go_offline_unless_reachable, read_json
from mechanics.pipelines import (FLUX_SCHNELL_SAMPLER, SAMPLERS, ModelRef, denoiser_config, load_pipeline,
                                 model_ref)
from mechanics.prompts import PICKAPIC_DATASET, PromptSet, load_prompt_set, select_prompts

EVAL_FORMAT = 2  # bump when the image store layout changes (2: weights named by base_model_identity)

# The sampler of each family (mechanics/pipelines.py: SAMPLERS, FLUX_SCHNELL_SAMPLER), each value a flag.
FAMILY_DEFAULTS, FLUX_SCHNELL_DEFAULTS = SAMPLERS, FLUX_SCHNELL_SAMPLER

# The toy world's rewards; tiny_pickscore / tiny_clip (random CLIP weights, numbers without meaning) exercise the
# CLIP reward code offline and can be added with --rewards.
TINY_REWARDS = ("toy_fidelity", "toy_aesthetic", "toy_label")
# The offline demo samples as the toy world's pairs were sampled (toy.py: DDIM trailing, 10 steps, guidance 3),
# every image with its own seed.
TINY_DEFAULTS = {"steps": 10, "guidance_scale": 3.0, "resolution": 32, "num_seeds": 2, "limit": None}
BATCH_SIZE = 4  # images per pipeline call unless --batch_size says otherwise
TINY_PROMPTS = 54  # the toy world's held-out prompts (all of toy.EVAL_PROMPTS) in the demo's prompt file
TINY_BASELINE = "toy-base"  # the toy base model's name in --tiny's tables and in the demo's report


# The image store


def image_path(store: Path, prompt_idx: int, seed: int) -> Path:
    return store / f"{prompt_idx:05d}_{seed}.png"


def _write(path: Path, text: str) -> None:
    """A text file of the evaluation, written aside and renamed; a full disk is one line (folder.write_text)."""
    folder.write_text(str(path), text, then=folder.RERUN)


def _save_image_atomic(image: Image.Image, path: Path, prompt: str, seed: int) -> None:
    """A sampled image, written aside and renamed: a crash leaves PATH.tmp-PID, never a truncated image."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("prompt", prompt)  # read back on resume: an edited prompt list must not reuse stale images
    info.add_text("seed", str(seed))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    folder.write_bytes(str(path), buffer.getvalue(), then=folder.RERUN)


def _stored_prompt(path: Path) -> str | None:
    """The prompt a stored image was made for, or None if it is not a complete image: it is decoded in full,
    so that a file truncated by something else (a full disk, a killed copy) is sampled again, not scored."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.info.get("prompt")
    except (OSError, SyntaxError, ValueError):
        return None


def _check_settings(store: Path, settings: dict) -> None:
    """Record the sampler settings of a store; refuse to add images made with other settings."""
    path = store / "settings.json"
    if path.is_file():
        try:
            old = read_json(path, "the sampler settings of the images beside it")
        except UsageError as exc:
            raise UsageError(f"{exc}; delete {store} to sample its images again") from exc
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            details = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise UsageError(f"{store} holds images made with other settings ({details}); use another "
                             f"--output_dir, or delete that folder to sample again")
    else:
        _write(path, json.dumps(settings, indent=2))


def generate_images(model: ModelRef, prompts: Mapping[int, str], keys: Sequence[tuple[int, int]], store: Path,
                    settings: dict, device: str, dtype: torch.dtype, batch_size: int, progress: bool = True) -> int:
    """Sample every (prompt_idx, seed) key whose image is not in `store` yet; returns how many were made.

    The pipeline is loaded only when something is missing, so a complete store costs nothing. The batches are
    cut from `keys` in order, whatever is missing, and a batch with a missing image is sampled whole (only its
    missing images are written): an interrupted run thus samples every image in the batch an uninterrupted run
    samples it in, and its pixels come out bit-identical (batched kernels round differently at other batch
    sizes, which moved pixels by one level)."""
    store.mkdir(parents=True, exist_ok=True)
    _check_settings(store, settings)
    missing = set()
    for idx, seed in keys:
        path = image_path(store, idx, seed)
        stored = _stored_prompt(path) if path.exists() else None
        if stored is None:
            missing.add((idx, seed))
        elif stored != prompts[idx]:
            raise UsageError(f"{path} was made for the prompt {stored!r}, but prompt {idx} is now "
                             f"{prompts[idx]!r}: the prompt list changed; use another --output_dir")
    if not missing:
        return 0
    pipe = load_pipeline(model, device, dtype)
    extra = {}
    if settings.get("max_sequence_length") is not None:  # SD3 and FLUX: T5 tokens per prompt
        extra["max_sequence_length"] = settings["max_sequence_length"]
    try:
        with tqdm(total=len(missing), desc=f"sampling {model.label}", unit="img", disable=not progress) as bar:
            for start in range(0, len(keys), batch_size):
                batch = list(keys[start:start + batch_size])
                if missing.isdisjoint(batch):
                    continue
                # One CPU generator per image: the initial noise of a key depends only on its seed, not on
                # the batch it lands in or the device, so model and baseline images pair up.
                generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
                with torch.no_grad():
                    images = pipe(
                        prompt=[prompts[idx] for idx, _ in batch],
                        generator=generators,
                        num_inference_steps=settings["steps"],
                        guidance_scale=settings["guidance_scale"],
                        height=settings["height"],
                        width=settings["width"],
                        output_type="pil",
                        **extra,
                    ).images
                for (idx, seed), image in zip(batch, images, strict=True):
                    if (idx, seed) in missing:
                        _save_image_atomic(image, image_path(store, idx, seed), prompts[idx], seed)
                        bar.update(1)
    finally:
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return len(missing)


# Evaluation


@dataclass
class EvalResult:
    summary: dict
    table: str
    rows: list[dict]
    generated: dict[str, int]             # images sampled in this run, per model label
    scores: dict[str, dict[str, dict]]    # reward column -> model label -> {(prompt_idx, seed): score}
    output_dir: Path = field(default_factory=Path)


def sampler_defaults(model: ModelRef) -> dict:
    """The sampler defaults of `model`: its family's (FAMILY_DEFAULTS), or FLUX_SCHNELL_DEFAULTS for a FLUX model
    whose transformer has no guidance embeddings (FLUX.1-schnell's layout)."""
    if model.family == "flux" and not denoiser_config(model).get("guidance_embeds", False):
        return FLUX_SCHNELL_DEFAULTS
    return FAMILY_DEFAULTS[model.family]


def sampling_settings(model: ModelRef, prompt_set: PromptSet, steps=None, guidance_scale=None,
                      resolution=None, dtype: torch.dtype = torch.float32, max_sequence_length=None) -> dict:
    """The settings images of `model` are made with: its defaults (sampler_defaults) unless overridden; the T5
    length only for the families with T5 (SD3, FLUX)."""
    defaults = sampler_defaults(model)
    size = resolution or defaults["resolution"]
    t5 = {}
    if "max_sequence_length" in defaults:
        t5["max_sequence_length"] = int(max_sequence_length or defaults["max_sequence_length"])
    return {
        "eval_format": EVAL_FORMAT,
        "model": model.source,
        "weights": model.weights_version,
        "family": model.family,
        "prompt_set": prompt_set.name,
        "steps": int(steps or defaults["steps"]),
        "guidance_scale": float(defaults["guidance_scale"] if guidance_scale is None else guidance_scale),
        "height": int(size),
        "width": int(size),
        "dtype": str(dtype).replace("torch.", ""),
        **t5,
    }


@dataclass
class EvalKeys:
    """The (prompt, seed) keys every model is sampled and scored on."""
    prompt_set: PromptSet
    indices: list[int]                 # the prompts evaluated: indices into the whole set
    seeds: list[int]                   # 0 … N−1: the seeds of each prompt (shifted per prompt with distinct_seeds)
    distinct_seeds: bool
    keys: list[tuple[int, int]]        # (prompt index, seed), prompt by prompt
    prompt_of: dict[int, str]          # prompt index → prompt


@dataclass
class ModelImages:
    """One model's image folder, the settings its images are made with, and how many this run sampled."""
    store: Path
    settings: dict
    generated: int


def evaluate(model: str, baselines: Sequence[str], prompts: str, rewards: Sequence[str], output_dir,
             *, num_seeds: int | None = None, distinct_seeds: bool = False, limit: int | None = None,
             steps: int | None = None,
             guidance_scale: float | None = None, resolution: int | None = None, batch_size: int = 4,
             reward_batch_size: int = 16, device: str | None = None, dtype: str | torch.dtype | None = None,
             pickapic_dataset: str = PICKAPIC_DATASET, progress: bool = True,
             log: Callable[[str], None] = print, max_sequence_length: int | None = None) -> EvalResult:
    """Sample (or reuse) images of `model` and each baseline, score them with each reward, and write
    scores.csv, summary.json and table.md to output_dir. Raises UsageError on bad input, before any work.

    Everything cheap is checked first (a typo must not surface after hours of sampling), then, holding the
    output folder: the keys, the images, the scores, the comparison, the files."""
    started = time.time()
    device = device or runtime.default_device()
    runtime.sampling_dtype(dtype, device)  # an unknown name is refused first; each model's dtype below
    if batch_size < 1 or reward_batch_size < 1:
        raise UsageError("batch sizes must be at least 1")
    if max_sequence_length is not None and not 1 <= max_sequence_length <= 512:
        raise UsageError(f"--max_sequence_length {max_sequence_length} is out of range: T5 takes 1 to 512 tokens "
                         "in StableDiffusion3Pipeline and FluxPipeline")
    if not progress:
        runtime.quiet_libraries()
    reward_specs = check_rewards(rewards)
    models = model_refs(model, baselines)
    for m in models:  # per family (auto: FLUX in bfloat16); float16 for FLUX is refused here, before any work
        runtime.sampling_dtype(dtype, device, m.family)
    out = Path(output_dir)
    with output_lock(out):
        work = choose_keys(prompts, out, limit, num_seeds, distinct_seeds, pickapic_dataset)
        log(f"{work.prompt_set.description}: {len(work.indices)} prompts x {len(work.seeds)} seeds = "
            f"{len(work.keys)} images per model")
        images = sample_models(models, work, out, steps, guidance_scale, resolution, device, dtype,
                               batch_size, progress, log, max_sequence_length)
        sampled_s = time.time() - started
        scores, reward_info = score_images(models, images, work, reward_specs, device, reward_batch_size, progress)
        summary = summarise(models, work, images, scores, reward_info, device, started, sampled_s)
        table, rows = markdown_table(summary), score_rows(models, work, images, scores, out)
        _write_outputs(out, rows, summary, table)
    return EvalResult(summary, table, rows, {label: i.generated for label, i in images.items()}, scores, out)


def check_rewards(rewards: Sequence[str] | str) -> list[str]:
    """The reward specs, each known and usable: its optional package installed and, with the hub offline, its
    weights in the local cache. Checked before anything is sampled."""
    if isinstance(rewards, str):
        rewards = rewards.split(",")
    reward_specs = [s.strip() for s in rewards if s.strip()]
    if not reward_specs:
        raise UsageError("no reward given")
    try:
        for spec in reward_specs:  # names and optional packages first: a typo is the likelier mistake
            rw.check_spec(spec)
        if any(rw.needs_hub(spec) for spec in reward_specs) and not go_offline_unless_reachable():
            for spec in reward_specs:
                rw.check_spec(spec, offline=True)
    except rw.RewardError as exc:
        raise UsageError(str(exc)) from exc
    return reward_specs


def model_refs(model: str, baselines: Sequence[str]) -> list[ModelRef]:
    """The evaluated model, then the baselines (model_ref); each may appear once, under its own name."""
    models = [model_ref(model)] + [model_ref(b) for b in baselines]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels) or len({m.tag for m in models}) != len(models):
        raise UsageError(f"each model must appear once, with distinct names (got {', '.join(labels)}); "
                         f"name them with NAME=PATH")
    return models


# What a killed run was writing aside (an image, an output, the prompt set), named NAME.tmp-PID.
STALE = ("*.tmp-*", "images/*/*.tmp-*")


def output_lock(out: Path):
    """Own the output folder for one evaluation, as the trainers own theirs (folder.held): a second run into the
    same folder is refused at once, rather than both sampling the same images and overwriting each other's
    scores; OUT/.lock names its holder, and its lock goes with the process however that ends. What a killed run
    left written aside is removed."""
    return folder.held(str(out), stale=STALE)


def choose_keys(prompts: str, out: Path, limit: int | None, num_seeds: int | None, distinct_seeds: bool,
                pickapic_dataset: str = PICKAPIC_DATASET) -> EvalKeys:
    """The prompt set (a hub set is kept in OUT/prompts.json), its first `limit` prompts, and their seeds."""
    prompt_set = load_prompt_set(prompts, pickapic_dataset, cache_dir=out)
    indices = select_prompts(prompt_set, limit)
    n_seeds = num_seeds or prompt_set.default_seeds
    if n_seeds < 1:
        raise UsageError(f"--num_seeds must be at least 1, got {n_seeds}")
    seeds = list(range(n_seeds))
    # distinct_seeds: prompt i's images take seeds i·n … i·n + n − 1, so that no two images of the set share their
    # initial noise (in the toy world the noise largely fixes the layout: shared seeds would score n layouts).
    keys = [(idx, idx * n_seeds + seed if distinct_seeds else seed) for idx in indices for seed in seeds]
    prompt_of = {idx: prompt_set.prompts[idx] for idx in indices}
    return EvalKeys(prompt_set, indices, seeds, distinct_seeds, keys, prompt_of)


def sample_models(models: Sequence[ModelRef], work: EvalKeys, out: Path, steps: int | None,
                  guidance_scale: float | None, resolution: int | None, device: str,
                  dtype: str | torch.dtype | None, batch_size: int, progress: bool = True,
                  log: Callable[[str], None] = print, max_sequence_length: int | None = None) -> dict[str, ModelImages]:
    """Each model's images, in OUT/images/<tag>/: those already stored are kept, the missing ones sampled
    (generate_images), each model in its own dtype (runtime.sampling_dtype of its family). Returns
    {label: ModelImages}."""
    images = {}
    for m in models:
        m_dtype = runtime.sampling_dtype(dtype, device, m.family)
        settings = sampling_settings(m, work.prompt_set, steps, guidance_scale, resolution, m_dtype,
                                     max_sequence_length)
        store = out / "images" / m.tag
        log(f"{m.label}: {m.family}, {settings['steps']} steps, guidance {settings['guidance_scale']}, "
            f"{settings['width']}x{settings['height']}, {settings['dtype']} -> {store}")
        generated = generate_images(m, work.prompt_of, work.keys, store, settings, device, m_dtype, batch_size,
                                    progress)
        if generated == 0:
            log(f"{m.label}: all {len(work.keys)} images already stored, none sampled")
        images[m.label] = ModelImages(store, settings, generated)
    return images


def score_images(models: Sequence[ModelRef], images: Mapping[str, ModelImages], work: EvalKeys,
                 reward_specs: Sequence[str], device: str, batch_size: int, progress: bool = True
                 ) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """Every reward's score of every stored image, one reward model in memory at a time. Returns
    ({column: {label: {(prompt_idx, seed): score}}}, {column: {"spec", "units"}}); a reward's column is its
    name, or its spec when two specs share a name. Scores are not stored: a run stopped while scoring scores
    the stored images again."""
    scores: dict[str, dict[str, dict]] = {}
    reward_info: dict[str, dict] = {}
    for spec in reward_specs:
        try:
            offline = rw.needs_hub(spec) and not go_offline_unless_reachable()
            reward = rw.build_reward(spec, device=device, local_files_only=offline)
        except rw.RewardError as exc:
            raise UsageError(str(exc)) from exc
        column = reward.name if reward.name not in scores else spec
        reward_info[column] = {"spec": spec, "units": reward.units}
        scores[column] = {}
        try:
            with tqdm(total=len(work.keys) * len(models), desc=f"scoring {column}", unit="img",
                      disable=not progress) as bar:
                for m in models:
                    table = scores[column][m.label] = {}
                    for start in range(0, len(work.keys), batch_size):
                        batch = work.keys[start:start + batch_size]
                        pictures = []
                        for idx, seed in batch:
                            with Image.open(image_path(images[m.label].store, idx, seed)) as im:
                                pictures.append(im.convert("RGB"))
                        values = reward.score(pictures, [work.prompt_of[idx] for idx, _ in batch])
                        table.update(zip(batch, values))
                        bar.update(len(batch))
        finally:
            reward.close()
            del reward
            gc.collect()
    return scores, reward_info


def compare(models: Sequence[ModelRef], work: EvalKeys, scores: Mapping[str, Mapping[str, dict]]) -> dict:
    """The numbers of the tables: each model's mean score per reward (and per HPSv2 style), and the win rate
    of the first model over each baseline per reward, their average ("Avg"), and each one's bootstrap
    interval, in percent."""
    columns = list(scores)
    main, base_labels = models[0].label, [m.label for m in models[1:]]
    means = {m.label: {c: _mean(scores[c][m.label].values()) for c in columns} for m in models}
    wins, intervals = {}, {}
    for b in base_labels:
        row = {c: 100.0 * win_rate(scores[c][main], scores[c][b]) for c in columns}
        row["Avg"] = sum(row.values()) / len(columns)
        wins[b] = row
        intervals[b] = {c: [100.0 * x for x in win_rate_interval(scores[c][main], scores[c][b])] for c in columns}
    by_group = {}
    groups = work.prompt_set.groups
    if groups:  # the HPSv2 benchmark is usually reported per style as well
        for group in dict.fromkeys(groups[idx] for idx in work.indices):
            in_group = [k for k in work.keys if groups[k[0]] == group]
            by_group[group] = {m.label: {c: _mean(scores[c][m.label][k] for k in in_group) for c in columns}
                               for m in models}
    return {"mean_scores": means, "mean_scores_by_group": by_group, "win_rates_percent": wins,
            "win_rate_intervals_percent": intervals}


def summarise(models: Sequence[ModelRef], work: EvalKeys, images: Mapping[str, ModelImages],
              scores: Mapping[str, Mapping[str, dict]], reward_info: dict, device: str, started: float,
              sampled_s: float) -> dict:
    """summary.json: what was evaluated and how (prompts, seeds, each model's source and sampler settings,
    the rewards' scales), the comparison's numbers, and the time taken."""
    numbers = compare(models, work, scores)
    return {
        "model": models[0].label,
        "baselines": [m.label for m in models[1:]],
        "prompt_set": {"name": work.prompt_set.name, "description": work.prompt_set.description,
                       "num_prompts": len(work.indices), "seeds": work.seeds, "distinct_seeds": work.distinct_seeds,
                       "num_pairs": len(work.keys)},
        "models": {m.label: {"source": m.source, "family": m.family, "images": str(images[m.label].store),
                             "settings": images[m.label].settings, "sampled_this_run": images[m.label].generated}
                   for m in models},
        "rewards": reward_info,
        **numbers,
        "win_rate_rule": "share of (prompt, seed) where the model's image scores higher than the baseline's "
                         "image of the same seed; ties count 1/2; Avg = mean over rewards",
        "device": device,
        "seconds": {"sampling": round(sampled_s, 1), "total": round(time.time() - started, 1)},
    }


def score_rows(models: Sequence[ModelRef], work: EvalKeys, images: Mapping[str, ModelImages],
               scores: Mapping[str, Mapping[str, dict]], out: Path) -> list[dict]:
    """scores.csv's rows: one per (model, prompt, seed), its prompt and image, one column per reward."""
    groups = work.prompt_set.groups
    rows = []
    for m in models:
        for idx, seed in work.keys:
            row = {"model": m.label, "prompt_idx": idx, "seed": seed, "group": groups[idx] if groups else "",
                   "prompt": work.prompt_of[idx],
                   "image": os.path.relpath(image_path(images[m.label].store, idx, seed), out)}
            row.update({c: scores[c][m.label][(idx, seed)] for c in scores})
            rows.append(row)
    return rows


def verdicts(summary: dict) -> list[str]:
    """One line per comparison and reward: whether the win rate is distinguishable from 50 %."""
    lines = []
    n = summary["prompt_set"]["num_prompts"]
    for base, row in summary.get("win_rate_intervals_percent", {}).items():
        for column, (low, high) in row.items():
            rate = summary["win_rates_percent"][base][column]
            verdict = (f"{summary['model']} wins more often" if low > 50 else f"{base} wins more often" if high < 50
                       else "not distinguishable from 50 %")
            lines.append(f"- {summary['model']} vs {base}, {column}: {rate:.1f} % [{low:.1f}, {high:.1f}] "
                         f"(95 % bootstrap over {n} prompts): {verdict}")
    return lines


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def markdown_table(summary: dict) -> str:
    """The two tables of PAPER.md §6: mean score per model and reward; win rate of the model per baseline."""
    columns = list(summary["rewards"])
    ps = summary["prompt_set"]
    lines = [
        f"Prompt set: {ps['description']}; {ps['num_prompts']} prompts x {len(ps['seeds'])} seeds = "
        f"{ps['num_pairs']} same-seed image pairs per comparison.",
        "",
        "Mean score per model:",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, row in summary["mean_scores"].items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    if summary["baselines"]:
        lines += [
            "",
            f"Win rate (%) of {summary['model']} against each baseline (same prompt and seed; ties count half):",
            "",
            "| vs. | " + " | ".join(columns) + " | Avg |",
            "|---|" + "---|" * (len(columns) + 1),
        ]
        for label, row in summary["win_rates_percent"].items():
            lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" for c in columns + ['Avg']) + " |")
        lines += ["", "Is each win rate distinguishable from 50 %?", "", *verdicts(summary)]
    lines += ["", "Scales:"]
    lines += [f"- {c}: {info['units']}" for c, info in summary["rewards"].items()]
    settings = "; ".join(
        f"{label}: {m['family']}, {m['settings']['steps']} steps, guidance {m['settings']['guidance_scale']}, "
        f"{m['settings']['width']} px, {m['settings']['dtype']}" for label, m in summary["models"].items()
    )
    lines += ["", f"Sampling: {settings}."]
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, rows: list[dict], summary: dict, table: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write(out / "scores.csv", buffer.getvalue())
    _write(out / "summary.json", json.dumps(summary, indent=2))
    _write(out / "table.md", table)


# The offline demo


def tiny_prompt_file(out: Path) -> str:
    """The demo's prompt file: captions of the toy world's held-out prompts (toy.py), one per line."""
    from offline import toy

    folder.check_writable(str(out))
    path = out / "tiny_prompts.txt"
    _write(path, "\n".join(toy.EVAL_PROMPTS[:TINY_PROMPTS]) + "\n")
    return str(path)


def evaluate_tiny(model: str, output_dir, progress: bool = True, log: Callable[[str], None] = print) -> EvalResult:
    """What `python eval.py --tiny --model MODEL` computes (MODEL against the toy base model on the toy world's
    held-out prompts, TINY_DEFAULTS' sampler, every image its own seed), for train_sd15.py --tiny's report: the
    same keys, settings (main's --tiny defaults) and batches, so the same images and numbers."""
    from offline import toy
    out = Path(output_dir)
    return evaluate(model, [f"{TINY_BASELINE}={toy.TOY_MODEL}"], tiny_prompt_file(out), TINY_REWARDS, out,
                    num_seeds=TINY_DEFAULTS["num_seeds"], distinct_seeds=True, steps=TINY_DEFAULTS["steps"],
                    guidance_scale=TINY_DEFAULTS["guidance_scale"], resolution=TINY_DEFAULTS["resolution"],
                    batch_size=BATCH_SIZE, device="cpu", progress=progress, log=log)


def side_by_side(result: EvalResult, path, baseline: str, count: int = 16, columns: int = 4, scale: int = 3,
                 caption_lines: int = 2) -> str:
    """A PNG of `count` same-seed image pairs, the baseline's left of the model's, `columns` pairs per row
    (held-out prompts spread over the set), under a header row naming the two ("toy-base | trained"), each pair
    over its prompt (read from the stored image, cut to `caption_lines` lines); returns its path."""
    from PIL import ImageDraw, ImageFont

    model = result.summary["model"]
    stores = {label: Path(info["images"]) for label, info in result.summary["models"].items()}
    keys = sorted(next(iter(result.scores.values()))[model])
    picked = [keys[round(i * (len(keys) - 1) / max(count - 1, 1))] for i in range(min(count, len(keys)))]
    tiles, prompts = [], []
    for key in picked:
        for label in (baseline, model):
            with Image.open(image_path(stores[label], *key)) as im:
                tiles.append(im.convert("RGB"))
                if label == model:
                    prompts.append(im.info.get("prompt") or f"prompt {key[0]}")
    w, h = tiles[0].size[0] * scale, tiles[0].size[1] * scale
    gap = max(2, tiles[0].size[0] // 8) * scale  # a white gap between pairs, none inside a pair
    # The text is drawn after the ×scale enlargement, at the font's own size: enlarged, it would be blurred.
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 3  # a text line's height in pixels
    head, caption = line + gap // 2, caption_lines * line + gap // 2
    rows = math.ceil(len(picked) / columns)
    grid = Image.new("RGB", (columns * (2 * w + gap) - gap, head + rows * (h + caption + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    width = lambda text: draw.textlength(text, font=font)

    def fit(text: str, room: float) -> str:  # cut with "..." to at most `room` pixels
        if width(text) <= room:
            return text
        while text and width(text + "...") > room:
            text = text[:-1]
        return text + "..."

    def wrap(text: str, room: float) -> list[str]:  # word by word into caption_lines lines, the last cut with "..."
        out, words = [], text.split()
        while words and len(out) < caption_lines:
            current = words.pop(0)
            while words and width(current + " " + words[0]) <= room:
                current += " " + words.pop(0)
            out.append(current)
        if words:
            out[-1] += " " + " ".join(words)
        return [fit(s, room) for s in out]  # also a single word wider than the pair

    for c in range(min(columns, len(picked))):
        for offset, label in ((0, baseline), (w, model)):
            text = fit(label, w)
            draw.text((c * (2 * w + gap) + offset + (w - width(text)) / 2, 0), text, fill=(0, 0, 0), font=font)
    for i, prompt in enumerate(prompts):
        x, y = (i % columns) * (2 * w + gap), head + (i // columns) * (h + caption + gap)
        grid.paste(tiles[2 * i].resize((w, h), Image.NEAREST), (x, y))
        grid.paste(tiles[2 * i + 1].resize((w, h), Image.NEAREST), (x + w, y))
        for n, text in enumerate(wrap(prompt, 2 * w)):
            draw.text((x, y + h + 2 + n * line), text, fill=(60, 60, 60), font=font)
    grid.save(path)
    return str(path)


def tiny_report(model: str, output_dir) -> list[str]:
    """train_sd15.py --tiny's last lines: evaluate_tiny of its final model into output_dir, then the mean toy
    reward before → after, the same-seed win rate over the toy base with its interval, and the side-by-side PNG."""
    result = evaluate_tiny(f"trained={model}", output_dir, progress=True, log=lambda message: None)
    means, png = result.summary["mean_scores"], side_by_side(result, Path(output_dir) / "side_by_side.png",
                                                            TINY_BASELINE)
    ps = result.summary["prompt_set"]
    lines = [f"held-out comparison ({ps['num_prompts']} held-out prompts x {ps['num_pairs'] // ps['num_prompts']} "
             f"seeds; python eval.py --tiny --model {model} computes the same):"]
    lines += [f"  mean {c:13s} {means[TINY_BASELINE][c]:.4f} (toy base) → {means['trained'][c]:.4f} (trained)"
              for c in TINY_REWARDS]
    lines += ["  " + line[2:] for line in verdicts(result.summary) if ", toy_label:" in line]
    lines.append(f"  same-seed samples, toy base left of trained: {png}")
    return lines


# CLI


def build_parser() -> argparse.ArgumentParser:
    every = {**FAMILY_DEFAULTS, "flux-schnell": FLUX_SCHNELL_DEFAULTS}  # schnell: no guidance embeddings

    def per_family(key: str) -> str:
        return ", ".join(f"{family} {defaults[key]}" for family, defaults in every.items() if key in defaults)

    family_defaults = "; ".join(f"{k}: {v['steps']} steps, guidance {v['guidance_scale']}, {v['resolution']} px"
                                for k, v in every.items())
    p = argparse.ArgumentParser(
        description="Same-seed win rates of a model against baselines, per reward and averaged (PAPER.md §6).",
        epilog=f"Sampler defaults per family: {family_defaults}. Rewards: "
               + "; ".join(f"{k}: {v}" for k, v in rw.available_rewards().items()),
    )
    p.add_argument("--model", metavar="[NAME=]PATH",
                   help="the evaluated model: a diffusers pipeline folder or hub id (the family, SD1.5, SDXL, "
                        "SD3 or FLUX, is read from its model_index.json); NAME= names it in the tables; UNET@PIPELINE "
                        "swaps a UNet (SD3, FLUX: transformer) checkpoint into a pipeline")
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]PATH",
                   help="a baseline, given as --model; repeat the flag for several")
    p.add_argument("--prompts", help="prompt set: pickapic (Pick-a-Pic v2 test_unique, 500 prompts, 5 seeds), "
                                     "parti (PartiPrompts, 1,632), hpsv2 (HPSv2 benchmark, 4 x 800), "
                                     "or a text file with one prompt per line")
    p.add_argument("--rewards", default=None,
                   help="comma-separated reward specs (default: " + ",".join(rw.PAPER_REWARDS) + "); "
                        "NAME:ARG selects a checkpoint, e.g. clip:openai/clip-vit-large-patch14; see --list_rewards")
    p.add_argument("--output_dir", default=None, help="where images, scores.csv, summary.json and table.md go "
                                                      "(default out/eval, out/eval-tiny with --tiny); reused on reruns")
    p.add_argument("--distinct_seeds", action="store_true",
                   help="seeds i·N … i·N+N−1 for prompt i instead of 0 … N−1 for every prompt "
                        "(always on with --tiny)")
    p.add_argument("--num_seeds", type=int, default=None,
                   help="seeds 0..N-1 per prompt (default: 5 for pickapic, 1 for the other sets)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N prompts (per style for hpsv2); images are reused by a full run")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps (default per family: {per_family('steps')})")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help=f"classifier-free guidance scale (default per family: {per_family('guidance_scale')}; "
                        "flux's is FLUX.1-dev's distilled guidance)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"image height and width in pixels (default per family: {per_family('resolution')})")
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help=f"T5 tokens per prompt, for the families with T5 (default: "
                        f"{per_family('max_sequence_length')}; the others have none)")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                   help=f"images per pipeline call (default {BATCH_SIZE})")
    p.add_argument("--reward_batch_size", type=int, default=16, help="images per reward forward pass (default 16)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto",
                   help="pipeline dtype: auto (on a GPU bfloat16 for FLUX, a bf16 model, float16 for the others; "
                        "float32 on CPU), float32, float16 (refused for FLUX: black or NaN images) or bfloat16; "
                        "rewards always run in float32")
    p.add_argument("--pickapic_dataset", default=PICKAPIC_DATASET,
                   help="hub id or local folder holding Pick-a-Pic v2's test_unique split "
                        f"(default {PICKAPIC_DATASET})")
    p.add_argument("--tiny", action="store_true",
                   help="offline demo: baseline the toy base model (offline/toy_model/), model --model (e.g. the "
                        "final/ of train_sd15.py --tiny) or else a random-init tiny pipeline, held-out toy prompts, "
                        "rewards without downloads, 10 steps, guidance 3, 32 px, 2 seeds per prompt")
    p.add_argument("--list_rewards", action="store_true", help="print the available reward specs and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_rewards:
        for name, help in rw.available_rewards().items():
            print(f"{name:16s} {help}")
        return 0
    try:
        if args.tiny:
            from offline import toy
            args.output_dir = args.output_dir or "out/eval-tiny"
            if not args.baseline:
                args.baseline = [f"{TINY_BASELINE}={toy.TOY_MODEL}"]
            if not args.model:
                from offline import tiny
                args.model = f"tiny-random={tiny.tiny_pipeline_dir('sd15', seed=1)}"
                print("note: no --model given: evaluating a random-init tiny pipeline against the toy base model; "
                      "pass --model out/tiny/final (python train_sd15.py --tiny) for a trained one", file=sys.stderr)
            args.prompts = args.prompts or tiny_prompt_file(Path(args.output_dir))
            args.rewards = args.rewards or ",".join(TINY_REWARDS)
            args.steps = args.steps or TINY_DEFAULTS["steps"]
            args.guidance_scale = args.guidance_scale or TINY_DEFAULTS["guidance_scale"]
            args.resolution = args.resolution or TINY_DEFAULTS["resolution"]
            args.num_seeds = args.num_seeds or TINY_DEFAULTS["num_seeds"]
            args.distinct_seeds = True
            args.device = args.device or "cpu"
        if not args.model:
            raise UsageError("--model is required (or --tiny for the offline demo)")
        if not args.prompts:
            raise UsageError("--prompts is required: pickapic, parti, hpsv2 or a text file")
        result = evaluate(
            args.model, args.baseline, args.prompts, (args.rewards or ",".join(rw.PAPER_REWARDS)).split(","),
            args.output_dir or "out/eval", num_seeds=args.num_seeds, distinct_seeds=args.distinct_seeds,
            limit=args.limit, steps=args.steps,
            guidance_scale=args.guidance_scale, resolution=args.resolution, batch_size=args.batch_size,
            reward_batch_size=args.reward_batch_size, device=args.device, dtype=args.dtype,
            pickapic_dataset=args.pickapic_dataset, progress=not args.quiet,
            max_sequence_length=args.max_sequence_length,
        )
    except (errors.RunError, rw.RewardError) as error:  # one line, even when a library's message has several
        line = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
        return errors.report(type(error)(line) if isinstance(error, errors.RunError) else UsageError(line))
    print()
    print(result.table)
    print(f"wrote {result.output_dir / 'scores.csv'}, summary.json, table.md "
          f"({result.summary['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
