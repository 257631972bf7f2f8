"""What the policy makes while it trains: every --validation_every steps a grid of fixed prompts and seeds
(OUTPUT_DIR/samples/step-NNNNNN.png, and the tracker), and every --eval_every steps its mean reward on held-out
prompts with its same-seed win rate over the base model (the heldout_* fields of log.jsonl). Step 0 is the base
model, so the first grid and the first held-out numbers are the reference the later ones are read against.

The loop decides when; this module samples, scores and draws. It leaves the training's random streams alone:
every image has its own CPU generator seeded by its key (as eval.py's), and the global generators are forked
around sampling, so a run with samples logs the same losses as one without. The pipeline is the base pipeline's
sampler around the very modules being trained (no copy): under DDP the main process samples alone, under FSDP
every process runs the same forward (each holds a shard of the weights), and the main one writes.
"""
from __future__ import annotations

import io
import json
import logging
import os
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from mechanics import folder
from mechanics.comparison import win_rate, win_rate_interval
from mechanics.errors import UsageError
from mechanics.loading import PIPELINES
from mechanics.pipelines import SAMPLERS
from mechanics.prompts import load_prompt_set, read_prompt_file

logger = logging.getLogger("train")

# --validation_prompts unset: a few prompts of the kinds Pick-a-Pic users write (a photo, an animal, a scene, a
# painting) [choice: these four; fixed so that grids of different runs compare].
VALIDATION_PROMPTS = ("a photo of an astronaut riding a horse on the moon",
                      "a red fox sitting in a snowy forest at golden hour",
                      "a cozy cafe interior with plants and warm light, detailed illustration",
                      "an oil painting of a lighthouse on a cliff in a storm")
TOY_VALIDATION_PROMPTS = 4  # --validation_prompts toy: four of the toy world's held-out prompts, spread over them
SAMPLE_BATCH = 8  # images per pipeline call
MIN_TILE = 128    # a smaller image (the tiny models' 32 px) is enlarged, pixel for pixel, to leave room for its prompt
HELDOUT_BASE = "heldout_base.json"  # the base model's held-out scores, computed once (step 0) and reused on resume


def validation_prompts(spec: str | None) -> list[str]:
    """The prompts of the validation grid: a text file's lines, `toy` (four held-out prompts of the toy world) or,
    unset, VALIDATION_PROMPTS."""
    if spec is None:
        return list(VALIDATION_PROMPTS)
    if spec == "toy":
        every = load_prompt_set("toy").prompts
        return every[::len(every) // TOY_VALIDATION_PROMPTS][:TOY_VALIDATION_PROMPTS]
    return read_prompt_file(spec)


def draw_grid(columns: list[list[Image.Image]], prompts: list[str], title: str) -> Image.Image:
    """One column per prompt (its images top to bottom, the prompt under them), `title` above."""
    font = ImageFont.load_default()
    w, h = columns[0][0].size
    scale = max(1, -(-MIN_TILE // w))
    w, h = w * scale, h * scale
    chars = max(8, w // 7)  # the default bitmap font is about 6 px a character
    captions = [textwrap.wrap(p, chars)[:4] for p in prompts]
    line = 12
    top, bottom, gap = 2 * line, line * max(len(c) for c in captions) + line // 2, 4
    rows = len(columns[0])
    grid = Image.new("RGB", (len(columns) * (w + gap) + gap, top + rows * (h + gap) + bottom), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((gap, line // 2), title, fill="black", font=font)
    for c, (images, caption) in enumerate(zip(columns, captions)):
        x = gap + c * (w + gap)
        for r, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (x, top + r * (h + gap)))
        for k, text in enumerate(caption):
            draw.text((x, top + rows * (h + gap) + k * line), text, fill="black", font=font)
    return grid


class Sampler:
    """The run's sampler: the base pipeline's scheduler and configuration around the trained modules.

    The pipeline is the family's (loading.PIPELINES: the class save_final writes); components: its modules as
    the trainer holds them, the trained denoiser among them (a LoRA denoiser samples through its policy adapter);
    offloaded: modules --cache_latents moved to the CPU, brought back while sampling; reward: the --eval_every
    reward (rewards.py; main process only, None elsewhere)."""

    def __init__(self, args, run, model_path: str, components: dict, denoiser: str, offloaded=(), reward=None):
        import diffusers  # its pipelines import transformers' image processors: after runtime.quiet_libraries

        self.args, self.run, self.reward, self.offloaded = args, run, reward, list(offloaded)
        self.denoiser_name, self.model_path = denoiser, model_path
        self.pipeline_class = getattr(diffusers, PIPELINES[run.family])
        self.folder = os.path.join(args.output_dir, "samples")
        self.takes_part = run.is_main or run.fsdp  # FSDP: every process holds a shard of the forward
        self.pipe = None
        if not self.takes_part or not (args.validation_every or args.eval_every):
            return
        self.pipe = self._pipeline(components)
        self.call = {"num_inference_steps": args.sample_steps, "guidance_scale": args.sample_guidance_scale,
                     "height": args.resolution, "width": args.resolution}
        t5 = SAMPLERS[run.family].get("max_sequence_length")
        if t5 is not None:  # SD3, FLUX: the T5 length eval.py samples with (FLUX.1-schnell's layout: 256)
            config = getattr(self.pipe, denoiser).config
            self.call["max_sequence_length"] = 256 if not config.get("guidance_embeds", True) else t5
        self.grid_prompts = validation_prompts(args.validation_prompts) if args.validation_every else []
        if args.eval_every:
            prompt_set = load_prompt_set(args.eval_prompts, cache_dir=self._dir())
            self.eval_prompts = prompt_set.prompts[:args.eval_limit]
            self.eval_name = prompt_set.name
        self.base_scores = self._read_base() if args.eval_every and run.is_main else None

    def _pipeline(self, components: dict):
        """The base pipeline with `components` in place of its own (those not given load from its folder)."""
        extra = {"safety_checker": None, "requires_safety_checker": False} if self.pipeline_class.__name__ == \
            "StableDiffusionPipeline" else {}  # scored as generated, as eval.py does
        try:
            pipe = self.pipeline_class.from_pretrained(self.model_path, **components, **extra)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot build the sampling pipeline from {self.model_path}: "
                             f"{str(error).splitlines()[0]}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _dir(self) -> Path:
        os.makedirs(self.folder, exist_ok=True)
        return Path(self.folder)

    @torch.no_grad()
    def _sample(self, prompts: list[str], seeds: list[int], pipe=None) -> list[Image.Image]:
        """Images of `prompts`, image i from CPU generator `seeds[i]`, in batches of SAMPLE_BATCH; training mode
        and the global random state are restored afterwards."""
        pipe = pipe or self.pipe
        denoiser = getattr(pipe, self.denoiser_name)
        was_training = denoiser.training
        device = self.run.device
        for module in self.offloaded:
            module.to(device)
        denoiser.eval()
        images = []
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for start in range(0, len(prompts), SAMPLE_BATCH):
                    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + SAMPLE_BATCH]]
                    with self.run.autocast():
                        images += pipe(prompt=prompts[start:start + SAMPLE_BATCH], generator=generators,
                                            output_type="pil", **self.call).images
        finally:
            denoiser.train(was_training)
            for module in self.offloaded:
                module.to("cpu")
        return images

    def validation(self, step: int) -> Image.Image | None:
        """The grid of step `step`: --validation_images images per prompt, image k of prompt p from seed
        p·K + k (the same every time), written to samples/step-NNNNNN.png; returned on the main process."""
        if self.pipe is None:
            return None
        k = self.args.validation_images
        prompts = [p for p in self.grid_prompts for _ in range(k)]
        images = self._sample(prompts, list(range(len(prompts))))
        if not self.run.is_main:
            return None
        columns = [images[i * k:(i + 1) * k] for i in range(len(self.grid_prompts))]
        what = "the base model" if step == 0 else f"step {step}"
        grid = draw_grid(columns, self.grid_prompts, f"{what}: {self.args.sample_steps} steps, guidance "
                                                     f"{self.args.sample_guidance_scale:g}, seeds fixed")
        path = os.path.join(self._dir(), f"step-{step:06d}.png")
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        folder.write_bytes(path, buffer.getvalue())
        return grid

    def _keys(self) -> list[tuple[int, int]]:
        return [(i, i) for i in range(len(self.eval_prompts))]  # one seed per prompt: its index, as eval.py's --tiny

    def _settings(self) -> dict:
        return {"reward": self.args.eval_reward, "prompts": self.eval_name, "limit": len(self.eval_prompts),
                **{k: v for k, v in self.call.items()}, "mixed_precision": str(self.run.autocast_dtype)}

    def _read_base(self) -> dict | None:
        path = os.path.join(self.folder, HELDOUT_BASE)
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved["settings"] == self._settings():
                return {(i, s): score for i, s, score in saved["scores"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _score(self, images: list[Image.Image]) -> dict:
        values = self.reward.score(images, self.eval_prompts)
        return dict(zip(self._keys(), (float(v) for v in values)))

    def _base_scores(self, seeds: list[int]) -> dict:
        """The base model's held-out scores when step 0's are not stored (--eval_every turned on at a resume): its
        denoiser loaded once more from the base folder, in the training dtype, on the main process."""
        logger.info("--eval_every: sampling the base model once for its held-out scores (none stored in %s)",
                    self.folder)
        frozen = {k: v for k, v in self.pipe.components.items() if k not in (self.denoiser_name, "safety_checker")}
        base = self._pipeline(frozen)
        getattr(base, self.denoiser_name).to(self.run.device, self.run.weight_dtype)
        try:
            return self._score(self._sample(self.eval_prompts, seeds, base))
        finally:
            del base

    def heldout(self, step: int) -> dict:
        """The policy's held-out quality at `step`: its mean --eval_reward on the first --eval_limit prompts of
        --eval_prompts (prompt i from seed i), the base model's on the same keys, and the policy's same-seed win rate
        over it with the 95 % bootstrap interval over prompts (eval.py's). At step 0 the policy is the base model,
        whose scores are kept in samples/heldout_base.json for the rest of the run and its resumes. Returns the
        log's fields on the main process, {} elsewhere."""
        if self.pipe is None or not self.args.eval_every:
            return {}
        seeds = [s for _, s in self._keys()]
        if self.run.is_main and self.base_scores is None and step > 0:
            self.base_scores = self._base_scores(seeds)
        images = self._sample(self.eval_prompts, seeds)
        if not self.run.is_main:
            return {}
        scores = self._score(images)
        if self.base_scores is None:  # step 0: the policy is the base model
            self.base_scores = scores
        if self._read_base() is None:
            rows = [[i, s, v] for (i, s), v in sorted(self.base_scores.items())]
            folder.write_text(os.path.join(self._dir(), HELDOUT_BASE),
                              json.dumps({"settings": self._settings(), "scores": rows}))
        low, high = win_rate_interval(scores, self.base_scores)
        mean = lambda table: sum(table.values()) / len(table)
        return {"heldout_reward": mean(scores), "heldout_base_reward": mean(self.base_scores),
                "heldout_win_rate": win_rate(scores, self.base_scores), "heldout_win_low": low,
                "heldout_win_high": high, "heldout_reward_name": self.reward.name,
                "heldout_prompts": len(self.eval_prompts)}
