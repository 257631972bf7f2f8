"""The model card of a trained model: README.md in Hugging Face's model-card format (a YAML header the hub reads
for its licence, base model, tags and pipeline, then markdown), written into final/ or final_lora/ beside the
weights, so that the folder says what it is, how it was made and how to load it when it is copied or uploaded.

Everything in it comes from what the run already has: its resolved flags, log.jsonl's records, its command and
its last validation grid. It writes through folder.write_text / write_bytes, so a full disk is a DiskFull."""
import glob
import json
import os
import re
import shlex
import sys

import yaml

from mechanics import lora
from mechanics.folder import write_bytes, write_text
from mechanics.loading import PIPELINES, SCRIPTS

CARD = "README.md"
GRID = "validation.png"
PAPER_URL = "https://arxiv.org/abs/2505.18736"

# The licences of the bases people start from, as each base's own card declares them (its YAML `license`, and
# for `other` its license_name). A derivative's weights carry the base's licence, so the card repeats it. Keys are
# lower-case: the hub resolves ids without regard to case. [choice: the SD3 and SD3.5 links go to the hub page,
# not a file in it; the name of their licence file has changed between releases]
_SD3_LICENCE = dict(license="other", license_name="stabilityai-ai-community")
KNOWN_LICENCES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(license="creativeml-openrail-m"),
    "runwayml/stable-diffusion-v1-5": dict(license="creativeml-openrail-m"),
    "compvis/stable-diffusion-v1-4": dict(license="creativeml-openrail-m"),
    "stabilityai/stable-diffusion-2-1": dict(license="openrail++"),
    "stabilityai/stable-diffusion-2-1-base": dict(license="openrail++"),
    "stabilityai/stable-diffusion-xl-base-1.0": dict(license="openrail++"),
    "stabilityai/stable-diffusion-3-medium-diffusers": _SD3_LICENCE,
    "stabilityai/stable-diffusion-3.5-medium": _SD3_LICENCE,
    "stabilityai/stable-diffusion-3.5-large": _SD3_LICENCE,
    "black-forest-labs/flux.1-dev": dict(
        license="other", license_name="flux-1-dev-non-commercial-license",
        license_link="https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "black-forest-labs/flux.1-schnell": dict(license="apache-2.0"),
}
# What the body says of a licence beyond its id: the restrictions a user could otherwise miss.
LICENCE_NOTES = {
    "flux-1-dev-non-commercial-license":
        "**Non-commercial use only.** FLUX.1-dev's weights are under the FLUX.1 [dev] Non-Commercial License, and "
        "so is this model, which is derived from them: it may not be used commercially (what the licence allows "
        "for its outputs is stated there); read it before using or sharing the model.",
    "stabilityai-ai-community":
        "Stability AI's Community License: free for research, non-commercial use and commercial use by "
        "organisations or individuals with under USD 1M in annual revenue; above that Stability AI's Enterprise "
        "licence is needed.",
    "creativeml-openrail-m": "CreativeML OpenRAIL-M: open use, with the use restrictions listed in the licence "
                             "(which apply to this model and must be passed on with it).",
    "openrail++": "CreativeML Open RAIL++-M: open use, with the use restrictions listed in the licence (which apply "
                  "to this model and must be passed on with it).",
    "apache-2.0": "Apache 2.0.",
}

FAMILY_TAGS = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux"}
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL", "sd3": "Stable Diffusion 3", "flux": "FLUX.1"}
OBJECTIVES = {"dpo": "Diffusion-DPO", "hinge": "the hinge loss on Diffusion-DPO's logit", "ipo": "IPO",
              "kto": "Diffusion-KTO", "mapo": "MaPO", "dspo": "DSPO", "sft": "supervised fine-tuning on the "
              "preferred images"}
# Objectives without a reference model (losses.LOSSES' needs_reference=False): τ and δ change nothing for them.
NO_REFERENCE = {"mapo", "sft"}
METHODS = {"ours": "the paper's full method (stable reference update and timestep-aware training)",
           "plain": "no reference update and uniform timesteps (plain {objective})",
           "exploration": "the stable reference update only", "timestep": "timestep-aware training only"}

# From CITATION.cff's preferred-citation (which names its authors by family name only).
BIBTEX = """@inproceedings{kang2026rethinking,
  title     = {Rethinking Direct Preference Optimization in Diffusion Models},
  author    = {Kang and Lim and Baek and Shim},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume    = {40},
  number    = {7},
  pages     = {5611--5619},
  year      = {2026},
  url       = {https://arxiv.org/abs/2505.18736}
}"""


def _front_matter(text: str) -> dict:
    """The YAML header of a model card's text ({} when it has none or it does not parse)."""
    match = re.match(r"\A\ufeff?---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not match:
        return {}
    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def _cached_card(hub_id: str) -> str | None:
    """The base's own README.md if the hub cache holds it (looked up on disk only: a card is written offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(hub_id, CARD)
    except Exception:  # not a valid repo id, or no huggingface_hub: no cached card
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def base_licence(base_model: str) -> tuple[dict, bool]:
    """(the licence fields of the card's header, whether they are known): the table's for a known hub base, else
    those a local base folder's (or the hub cache's) README.md declares, else `other` — the caller then says that
    the licence is the base's, to be checked."""
    known = KNOWN_LICENCES.get(base_model.strip("/").lower())
    if known is not None and not os.path.isdir(base_model):
        return dict(known), True
    card = os.path.join(base_model, CARD) if os.path.isdir(base_model) else _cached_card(base_model)
    if card is not None and os.path.isfile(card):
        try:
            with open(card, encoding="utf-8") as f:
                header = _front_matter(f.read())
        except (OSError, UnicodeDecodeError):
            header = {}
        if isinstance(header.get("license"), str) and header["license"].strip():
            return {k: str(header[k]) for k in ("license", "license_name", "license_link") if header.get(k)}, True
    unknown = {"license": "other", "license_name": "base-model-license"}
    page = _hub_page(base_model)  # the hub asks `other` for a name and a link: the base's page, where its terms are
    return ({**unknown, "license_link": page} if page else unknown), False


def _hub_page(base_model: str) -> str | None:
    return None if os.path.isdir(base_model) or os.path.isabs(base_model) else f"https://huggingface.co/{base_model}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def heldout_line(records: list[dict]) -> str | None:
    """The last held-out comparison of the log in one sentence, or None when the run made none."""
    last = next((r for r in reversed(records) if r.get("heldout_win_rate") is not None), None)
    if last is None:
        return None
    reward = last.get("heldout_reward_name", "reward")
    interval = (f" [{_pct(last['heldout_win_low'])}, {_pct(last['heldout_win_high'])}]"
                if last.get("heldout_win_low") is not None and last.get("heldout_win_high") is not None else "")
    prompts = f" on {last['heldout_prompts']} held-out prompts" if last.get("heldout_prompts") else ""
    parts = [f"win rate over the base {_pct(last['heldout_win_rate'])} %{interval}{prompts}"]
    if last.get("heldout_reward") is not None and last.get("heldout_base_reward") is not None:
        parts.append(f"mean {reward} {last['heldout_base_reward']:.4g} → {last['heldout_reward']:.4g}")
    # Step 0 compares the base with itself: say so, or a reader takes its 50 % for the trained model's.
    note = " (the base model itself: no later comparison was logged)" if last.get("step") == 0 else ""
    return f"step {last.get('step')}{note}: " + ", ".join(parts)


def training_summary(args, records: list[dict]) -> list[str]:
    """Markdown bullets: loss and implicit accuracy at the start and the end, the reference's updates and freeze,
    the last divergence, the skipped steps (the lines trainlog.summary_lines prints at the run's end)."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        return ["- no training step was logged"]
    k = max(1, len(steps) // 10)
    tail = steps[-k:]
    last = f"step {steps[-1]['step']}" if k == 1 else f"mean of the last {k} steps"
    lines = []
    for name, label, digits in (("loss", "loss", 4), ("accuracy", "implicit accuracy", 3)):
        values = [r[name] for r in tail if isinstance(r.get(name), (int, float))]
        if isinstance(steps[0].get(name), (int, float)) and values:
            lines.append(f"- {label}: {steps[0][name]:.{digits}f} (step {steps[0]['step']}) → "
                         f"{sum(values) / len(values):.{digits}f} ({last})")
    updates = [r for r in steps if r.get("ref_updated")]
    frozen = next((r for r in updates if r.get("ref_frozen")), None)
    if not args.tau:
        lines.append("- reference: the initial model throughout (τ = 0)")
    elif not updates:
        lines.append(f"- reference: not updated yet (τ = {args.tau})")
    else:
        divergence = lambda r: f"{r['divergence']:.4g}" if isinstance(r.get("divergence"), (int, float)) else "?"
        state = (f"frozen at step {frozen['step']} (D = {divergence(frozen)} > δ = {args.delta:g})" if frozen
                 else f"never frozen; last D = {divergence(updates[-1])} (δ = {args.delta:g})")
        reinits = sum(bool(r.get("ref_reinit")) for r in updates)
        lines.append(f"- reference: {len(updates)} update(s) every τ = {args.tau} steps, {state}"
                     + (f", {reinits} Re-Init reset(s)" if reinits else ""))
    policy = [r for r in steps if isinstance(r.get("policy_divergence"), (int, float))]
    if policy:
        lines.append(f"- D(policy, initial model): {policy[-1]['policy_divergence']:.4g} at step {policy[-1]['step']}")
    nonfinite = steps[-1].get("nonfinite_steps", 0) or 0
    skipped = sum(r.get("skipped_rows", 0) or 0 for r in steps)
    lines.append(f"- skipped: {nonfinite} non-finite step(s), {skipped} data row(s) (undecodable, or bad labels)")
    return lines


def _objective(args) -> str:
    name = OBJECTIVES.get(args.loss, args.loss)
    return f"{name} (`--loss {args.loss}`" + ("" if args.loss == "sft" else f", β = {args.beta:g}") + ")"


def _reference_text(args) -> str:
    if args.loss in NO_REFERENCE:
        return "no reference model (this objective uses none)"
    if not args.tau:
        return "the reference fixed at the initial model (τ = 0)"
    after = {"freeze": "then frozen for the rest of the run",
             "reinit": "then reset to the initial model (Re-Init)",
             "ignore": "its verdict ignored (the unstable variant)"}.get(args.on_diverge, args.on_diverge)
    return (f"the reference copied from the policy every τ = {args.tau} steps while the monitor's divergence "
            f"D(p_ref, p_init) stays within δ = {args.delta:g}, {after} (`--on_diverge {args.on_diverge}`)")


def _timestep_text(args, family: str) -> str:
    sampling = ("timesteps drawn uniformly (γ = 1)" if args.gamma >= 1 else
                f"the noisy end over-sampled with γ = {args.gamma:g} over {args.num_bins} bins")
    if args.no_reward_scale:
        scale = "λ(t) off (≡ 1)"
    else:
        flow = getattr(args, "flow_lambda", None)
        scale = "λ(t) on" + (f" (the flow version by `{flow}`)" if family in ("sd3", "flux") and flow else "")
        scale += ", divided by its mean" if getattr(args, "reward_scale_norm", False) else ""
    return f"{sampling}, {scale}"


def _data_text(args, steps: int, num_pairs: int | None) -> str:
    seen = steps * args.effective_batch_size
    text = f"`{args.dataset}`"
    if num_pairs:
        text += f" ({num_pairs:,} usable pairs); {seen:,} pairs seen, {seen / num_pairs:.2f} passes over the data"
    else:
        text += f"; {seen:,} pairs seen"
    return text


def _loading_snippet(args, family: str, pipeline: str, base_model: str, is_lora: bool) -> str:
    dtype = "torch.bfloat16" if family == "flux" else "torch.float16"  # FLUX gives black images in fp16 (eval.py)
    source = base_model if is_lora else "path/to/final"
    lines = ["import torch", f"from diffusers import {pipeline}", "",
             f"pipe = {pipeline}.from_pretrained({json.dumps(source)}, torch_dtype={dtype}).to(\"cuda\")"]
    if is_lora:
        lines.append("pipe.load_lora_weights(\"path/to/final_lora\")")
    steps, guidance = getattr(args, "sample_steps", None), getattr(args, "sample_guidance_scale", None)
    settings = (f", num_inference_steps={steps}" if steps else "") + (
        f", guidance_scale={guidance:g}" if guidance is not None else "")
    lines.append(f"image = pipe(\"a red fox sitting in a snowy forest at golden hour\"{settings}).images[0]")
    return "\n".join(lines)


def _header(args, family: str, base_model: str, is_lora: bool, licence: dict) -> str:
    tags = ["text-to-image", "diffusers", "diffusion-dpo", "dpo", FAMILY_TAGS.get(family, family)]
    tags += ["lora"] if is_lora else []
    tags.append("diffusers-training")
    header = {"base_model": base_model, "base_model_relation": "adapter" if is_lora else "finetune", **licence,
              "library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    if not os.path.exists(args.dataset) and re.fullmatch(r"[\w.-]+/[\w.-]+", args.dataset or ""):
        header["datasets"] = [args.dataset]  # a hub dataset: the hub links the two
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def write_card(folder: str, args, family: str, pipeline: str, base_model: str, records: list[dict],
               command: list[str], world_size: int, num_pairs: int | None, grid: str | None) -> str:
    """Write FOLDER/README.md, the model card of the model in `folder` (final/, or final_lora/ when
    args.lora_rank > 0), with the last validation grid copied beside it as validation.png. Returns the card's
    path. A full disk raises DiskFull."""
    is_lora = bool(args.lora_rank)
    licence, licence_known = base_licence(base_model)
    steps = max((r.get("step", 0) for r in records if isinstance(r.get("step"), int)), default=0)
    page = _hub_page(base_model)
    base_ref = f"[{base_model}]({page})" if page else f"`{base_model}`"
    kind = (f"A LoRA adapter (rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank:g}) for" if is_lora
            else "A full fine-tune of")
    method = METHODS.get(args.method, args.method).format(objective=OBJECTIVES.get(args.loss, args.loss))

    out = [_header(args, family, base_model, is_lora, licence),
           f"# {os.path.basename(base_model.rstrip('/')) or base_model}: {OBJECTIVES.get(args.loss, args.loss)}"
           f" with `--method {args.method}`{' (LoRA)' if is_lora else ''}", "",
           f"{kind} {base_ref} ({FAMILY_NAMES.get(family, family)}, `{pipeline}`), trained on human preference pairs "
           f"with `train_{family}.py` of the reference implementation of [*Rethinking Direct Preference Optimization "
           f"in Diffusion Models*]({PAPER_URL}) (Kang et al., AAAI 2026). Objective: {_objective(args)}; "
           f"`--method {args.method}`: {method}, i.e. {_reference_text(args)}; {_timestep_text(args, family)}. "
           f"{steps} optimizer steps of {args.effective_batch_size} pairs (effective batch) at learning rate "
           f"{args.learning_rate:g} ({args.optimizer}, {args.warmup_steps or 0} warm-up steps), "
           f"{args.resolution} px. Data: {_data_text(args, steps, num_pairs)}.", ""]

    out += ["## Licence", ""]
    name = licence.get("license_name") or licence["license"]
    if licence_known:
        link = licence.get("license_link") or (f"{page}" if page else None)
        out.append(f"This model is derived from {base_ref} and is under its licence, `{name}`"
                   + (f" ([text]({link}))" if link else "") + ". " + LICENCE_NOTES.get(name, ""))
    else:
        out.append(f"The licence is the base model's ({base_ref}), which this card could not determine: check it "
                   "before using or sharing the model (the header says `other` until then).")
    out += ["", "## How it was trained", ""]
    if world_size > 1:
        out += [f"Launched with `torchrun --nproc_per_node={world_size}` ({world_size} processes):", ""]
    out += ["```bash", shlex.join(command), "```", "",
            "The run's resolved flags are in `run.json` beside its `log.jsonl` (`--config run.json` replays them).", ""]

    out += ["## Use with diffusers", "", "```python", _loading_snippet(args, family, pipeline, base_model, is_lora),
            "```", ""]
    if is_lora:
        tools = lora.tools_file("unet" if family in ("sd15", "sdxl") else "transformer")
        where = ("ComfyUI (`models/loras/`), AUTOMATIC1111, Forge, SD.Next and InvokeAI (`models/Lora/`; rename it "
                 "first, since the file name is the prompt's `<lora:NAME:1>` tag)" if tools == lora.KOHYA_FILE
                 else "ComfyUI (`models/loras/`)" + (" and Forge" if family == "flux" else ""))
        out += [f"The same adapter, alpha included, is in `{tools}` for {where}; `pytorch_lora_weights.safetensors` "
                "is diffusers' file, and `base_model.json` names the base for `eval.py`.", ""]

    heldout = heldout_line(records)
    out += ["## Results", ""]
    if heldout:
        out += [f"Held-out comparison with the base model (`--eval_every`, same seeds): {heldout}.", ""]
    out += ["Training (log.jsonl):", "", *training_summary(args, records), ""]
    if grid and os.path.isfile(grid):
        with open(grid, "rb") as f:
            write_bytes(os.path.join(folder, GRID), f.read())
        match = re.search(r"step-(\d+)", os.path.basename(grid))
        at = f" at step {int(match.group(1))}" if match else ""
        out += [f"The last validation grid{at} (one column per prompt, the same seeds at every step; the run's "
                "`samples/step-000000.png` shows the base model):", "", f"![validation grid{at}]({GRID})", ""]

    out += ["## Citation", "", "```bibtex", BIBTEX, "```", ""]
    path = os.path.join(folder, CARD)
    write_text(path, "\n".join(out))
    return path


def write(folder: str, args, run, log, argv, loader) -> str | None:
    """The card of the run's final/ (or final_lora/), from what the trainer holds: its flags, Run, TrainLog, the
    command line it was given (None: this process's) and its pair loader; the main process writes it."""
    if not run.is_main:
        return None
    command = ["python", SCRIPTS[run.family], *(sys.argv[1:] if argv is None else map(str, argv))]
    grids = sorted(glob.glob(os.path.join(args.output_dir, "samples", "step-*.png")))
    return write_card(folder, args, run.family, PIPELINES[run.family], args.pretrained_model, log.read(), command,
                      run.world_size, getattr(loader, "num_pairs", None), grids[-1] if grids else None)
