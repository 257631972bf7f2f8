"""The flags every trainer shares, resolved once into the values the run uses.

`resolve` is the one place a default is decided: the parser's generic values, then the script's paper recipe,
with --tiny its TINY_RECIPE (the offline demo), then the --method preset, then what the user typed.
Derived values (gradient accumulation, the learning rate × batch, β per objective, device, compile) are filled
in the same pass. `--help` prints exactly these values, run.json records them, and nothing changes them later.
`--config FILE` sets flags from a file (`_config`): a YAML or JSON file of flags is as if they were typed before
the command line's; a trainer's run.json replays that run's resolved values.
A value outside its range is refused before any model loads (`UsageError`: one line).
"""
import argparse
import difflib
import json
import math
import os
import sys

import data
from mechanics import folder, runtime
from mechanics.errors import UsageError
from mechanics.pipelines import SAMPLERS

# Valid values: (low, high, low included, high included). Checked on the resolved values, recipe ones too.
POSITIVE, NON_NEGATIVE = (0, math.inf, False, False), (0, math.inf, True, False)
RANGES = {
    "beta": POSITIVE, "delta": NON_NEGATIVE, "gamma": (0, 1, False, True), "num_bins": (1, 1000, True, True),
    "tau": NON_NEGATIVE, "monitor_samples": POSITIVE, "divergence_every": NON_NEGATIVE,
    "caption_dropout": (0, 1, True, True), "max_train_samples": POSITIVE, "resolution": POSITIVE,
    "max_steps": POSITIVE, "train_batch_size": POSITIVE, "effective_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "learning_rate": POSITIVE, "warmup_steps": NON_NEGATIVE,
    "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False), "weight_decay": NON_NEGATIVE,
    "adam_epsilon": POSITIVE, "max_grad_norm": NON_NEGATIVE, "seed": NON_NEGATIVE, "cpu_threads": POSITIVE,
    "dataloader_workers": NON_NEGATIVE, "lora_rank": NON_NEGATIVE, "lora_alpha": POSITIVE,
    "checkpoint_every": POSITIVE, "keep_checkpoints": POSITIVE, "max_nonfinite_steps": POSITIVE,
    "bin_stats_every": POSITIVE, "tie_margin": (0, 0.5, True, False),
    "guidance_scale": NON_NEGATIVE, "t5_max_length": (1, 512, True, True),  # FLUX's and SD3's own flags
    "validation_every": NON_NEGATIVE, "validation_images": POSITIVE, "sample_steps": POSITIVE,
    "sample_guidance_scale": NON_NEGATIVE, "eval_every": NON_NEGATIVE, "eval_limit": POSITIVE,
}


def range_text(spec) -> str:
    low, high, low_in, high_in = spec
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def in_range(value, spec) -> bool:
    low, high, low_in, high_in = spec
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def available_cpus() -> int:
    """DataLoader workers: the CPUs this process may run on, at most 8 (torch warns past the machine's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's resolved value in its help, and the script's docstring (its commands) kept as written."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):  # --reward_scale: its value is --no_reward_scale's
            return action.help
        spec = RANGES.get(action.dest)
        return super()._get_help_string(action) + (f" [valid: {range_text(spec)}]" if spec else "")


def parser(doc: str, objectives: dict, methods: dict) -> argparse.ArgumentParser:
    """Every flag the trainers share, with its generic default; a script adds its model's flags to it.
    objectives: losses.LOSSES (name → objective with `beta_help`), for --loss and --beta; methods: the
    --method presets."""
    p = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="set the flags from FILE, the flags typed here win: a YAML or JSON mapping of flag names "
                        "(without --) to values (true/false for on/off flags), as if typed; or a trainer's "
                        "OUTPUT_DIR/run.json, which replays that run's resolved values (not its --output_dir when "
                        "one is typed, nor --resume, --resume_override, --overwrite); --help shows the result")
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model", help="hub id or local folder of the diffusers pipeline to fine-tune")
    g.add_argument("--tiny", action="store_true",
                   help="offline demo: the script's TINY_RECIPE (a tiny model of the real classes and its pairs; "
                        "SD1.5: the pretrained toy model and pairs sampled from it), each value of which an "
                        "explicit flag overrides; `--tiny --help` shows them")
    g.add_argument("--dataset", default=data.DEFAULT_DATASET,
                   help="preference pairs: a hub dataset id (the recipe's: a public mirror of Pick-a-Pic v2), a local "
                        "parquet / csv / json(l) file or folder, a folder of chosen/ and rejected/ images, or HPDv2's "
                        "train.json; the layout (Pick-a-Pic, TRL prompt/chosen/rejected, ...) is detected from the "
                        "columns and logged (data.py)")
    g.add_argument("--split", default="train", help="dataset split")
    g.add_argument("--caption_column", help="the column of the captions, for a layout that is not detected")
    g.add_argument("--chosen_column",
                   help="the column of the preferred images (bytes, Image structs or file paths); with "
                        "--label_column: image A")
    g.add_argument("--rejected_column", help="the column of the other images; with --label_column: image B")
    g.add_argument("--label_column",
                   help="image A's preference in [0, 1] (as Pick-a-Pic's label_0; vote shares too): the image with "
                        "p > 0.5 wins (None: the chosen image always wins, or the detected layout's labels)")
    g.add_argument("--tie_margin", type=float, default=0.0,
                   help="a pair with |p - 0.5| <= this is a tie and is dropped (p: image A's preference; 0: only "
                        "p = 0.5, Pick-a-Pic's ties)")
    g.add_argument("--streaming", action="store_true",
                   help="stream the dataset instead of downloading it (Pick-a-Pic v2 is ~335 GB)")
    g.add_argument("--max_train_samples", type=int, help="use only the first N rows (None: all)")
    g.add_argument("--resolution", type=int, help="training resolution in pixels")
    g.add_argument("--random_crop", action="store_true", help="random instead of center crop")
    g.add_argument("--no_flip", action="store_true", help="disable random horizontal flips")
    g.add_argument("--caption_dropout", type=float, default=0.2,
                   help="probability of training a pair with the empty prompt (official recipe: 0.2)")
    g.add_argument("--dataloader_workers", type=int, default=available_cpus(),
                   help="DataLoader worker processes for decoding (the CPUs this process may use, at most 8)")

    g = p.add_argument_group("objective (losses.py)")
    g.add_argument("--loss", default="dpo", choices=sorted(objectives),
                   help="preference objective; 'sft' trains on the winners only")
    g.add_argument("--beta", type=float,
                   help="β of the objective; unset: its published value for this model. " + "; ".join(
                       f"{name}: {obj.beta_help}" for name, obj in objectives.items() if name != "sft"))
    g.add_argument("--method", default="ours", choices=sorted(methods),
                   help="plain: Diffusion-DPO (τ 0, γ 1, no λ); exploration: the τ/δ reference update only "
                        "(§2); timestep: γ over-sampling and λ(t) only (§3); ours: both (the paper)")

    g = p.add_argument_group("reference update (reference.py, PAPER.md §2)")
    g.add_argument("--tau", type=int,
                   help="copy the policy into the reference every τ optimizer steps; 0 = the initial model throughout")
    g.add_argument("--delta", type=float, help="divergence threshold δ of the monitor")
    g.add_argument("--on_diverge", default="freeze", choices=("freeze", "reinit", "ignore"),
                   help="once D > δ: freeze the reference (paper), reset it to the initial model (Re-Init), "
                        "or ignore the monitor (the unstable variant)")
    g.add_argument("--monitor", default="probe", choices=["probe", "batch"],
                   help="inputs of the divergence estimate D [choice: probe; one pair's D moves by ±25 %% between "
                        "checks, a probe of 64 by ±4 %% (README)]: 'probe' = --monitor_samples winners of the data, "
                        "each with a uniform grid point and an ε, drawn once and kept in the checkpoint (lower noise; "
                        "p_init's predictions on them computed once); 'batch' = the last micro-batch's winners "
                        "with fresh draws at every check")
    g.add_argument("--monitor_samples", type=int, default=64,
                   help="(winner latent, t, ε) draws of the divergence estimate D, per process")
    g.add_argument("--divergence_every", type=int, default=0,
                   help="also log D(policy, initial) every N steps (Fig. 1b); 0 = off")

    g = p.add_argument_group("timestep-aware training (schedule.py, PAPER.md §3)")
    g.add_argument("--gamma", type=float, default=0.9,
                   help="over-sample early (noisy) steps: bin k drawn with probability ∝ γ^k; 1 = uniform t")
    g.add_argument("--num_bins", type=int, default=50, help="K bins of the timestep grid for --gamma")
    g.add_argument("--no_reward_scale", action="store_true", default=False,
                   help="λ(t) ≡ 1 instead of the §3 schedule (--reward_scale: the schedule)")
    g.add_argument("--reward_scale", dest="no_reward_scale", action="store_false", default=False,
                   help="λ(t) of §3 on, also with --method plain or exploration")
    g.add_argument("--reward_scale_norm", action="store_true",
                   help="ablation: λ(t) divided by its mean under the active sampler (--gamma, --num_bins), so that "
                        "it changes the shape of β over t but not its average (under γ = 0.9 the mean λ is ≈ 1.50)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_steps", type=int, help="optimizer steps")
    g.add_argument("--train_batch_size", type=int, default=1,
                   help="pairs per process per micro-batch (unset: the recipe's, split over the processes)")
    g.add_argument("--effective_batch_size", type=int,
                   help="pairs per optimizer step; gradient accumulation = this / (batch × processes)")
    g.add_argument("--gradient_accumulation_steps", type=int,
                   help="micro-batches per optimizer step (unset: from --effective_batch_size)")
    g.add_argument("--learning_rate", type=float, default=1e-8,
                   help="the optimizer's learning rate; with --scale_lr a value given here is per pair and is "
                        "multiplied by the effective batch (the default shown is already multiplied)")
    g.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=True,
                   help="multiply a given --learning_rate by the effective batch size (official recipe)")
    g.add_argument("--warmup_steps", type=int, help="linear warm-up, then constant lr")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "adafactor"],
                   help="adamw8bit needs bitsandbytes; adafactor comes from transformers")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2")
    g.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 = no clipping")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise, timesteps and augmentation")

    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", help="cuda, cpu, ... (unset: cuda if available)")
    g.add_argument("--cpu_threads", type=int, help="torch intra-op threads on CPU (None: torch's own)")
    g.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast dtype; auto = `accelerate launch --mixed_precision`'s when launched by accelerate, "
                        "else bf16 on CUDA and none on CPU or MPS (bf16 is slower on a CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the policy and reference forward (unset: on with CUDA, off on CPU)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--fsdp", action="store_true",
                   help="with torchrun: shard the policy, its gradients and optimizer state, and the reference, block "
                        "by block over the processes (PyTorch FSDP2, sharded checkpoints); full fine-tunes only")
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode every image (both flips) and caption once, into --cache_dir, and train from there: "
                        "the VAE and text encoders never run again (mechanics/latent_cache.py; needs center crops and "
                        "a map-style dataset)")
    g.add_argument("--cache_dir", help="where --cache_latents keeps its files (None: OUTPUT_DIR/cache)")

    g = p.add_argument_group("LoRA (mechanics/lora.py)")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="train a LoRA adapter of this rank on the attention projections instead of the full model "
                        "(0 = full fine-tuning); the reference is the adapter-free base model, or with τ > 0 a "
                        "second adapter: about one base model of memory in all")
    g.add_argument("--lora_alpha", type=float, help="LoRA alpha (None: the rank, i.e. scale 1)")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", help="log.jsonl, checkpoints and final/ go here")
    g.add_argument("--checkpoint_every", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="keep only the newest N checkpoints")
    g.add_argument("--resume",
                   help="'latest' (newest readable checkpoint in --output_dir) or a checkpoint folder; a checkpoint of "
                        "a run with other defining flags or another base model is refused (README, checkpoints)")
    g.add_argument("--resume_override", metavar="FLAG,...",
                   help="with --resume: flags (names without --, comma-separated) that may differ from the run's; "
                        "their new values take effect (the optimizer's too)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output_dir that holds an earlier run: its log, checkpoints and final "
                        "model are deleted (without it such a folder is refused)")
    g.add_argument("--max_nonfinite_steps", type=int, default=3,
                   help="a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run "
                        "(exit code 3, no final model)")
    g.add_argument("--bin_stats_every", type=int, default=10,
                   help="emit per-t-bin statistics aggregated over this many steps")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the run's curves (plot.py) into OUTPUT_DIR/curves.png at the end")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="also send the log's numbers to an experiment tracker (its package must be installed; "
                        "log.jsonl stays the record)")
    g.add_argument("--tracker_project", default="rethinking-dpo",
                   help="the tracker's project (wandb) that --report_to logs into")
    g.add_argument("--run_name", help="the run's name in the tracker (None: the --output_dir folder's name); a "
                                      "resumed run continues the same tracker run")

    g = p.add_argument_group("watching the run (mechanics/samples.py)")
    g.add_argument("--validation_every", type=int, default=0,
                   help="every N steps, at step 0 (the base model) and at the last step: sample --validation_prompts "
                        "with the same seeds into OUTPUT_DIR/samples/step-NNNNNN.png (a grid, the prompt under each "
                        "column) and to --report_to's tracker; 0 = off")
    g.add_argument("--validation_prompts", metavar="FILE",
                   help="a text file with one prompt a line (None: a few fixed prompts; the toy demo: four of its "
                        "held-out prompts)")
    g.add_argument("--validation_images", type=int, default=2, help="images per validation prompt, each its own seed")
    g.add_argument("--sample_steps", type=int,
                   help="sampler steps of --validation_every and --eval_every (unset: the family's evaluation "
                        "setting, eval.py's)")
    g.add_argument("--sample_guidance_scale", type=float,
                   help="classifier-free guidance of --validation_every and --eval_every (unset: the family's "
                        "evaluation setting; FLUX: its distilled guidance, 0 for FLUX.1-schnell)")
    g.add_argument("--eval_every", type=int, default=0,
                   help="every N steps, at step 0 and at the last step: the policy's mean --eval_reward on "
                        "--eval_limit held-out prompts (one seed each) and its same-seed win rate over the base "
                        "model with its 95 %% interval, into log.jsonl (heldout_*) and plot.py's held-out panel; "
                        "0 = off")
    g.add_argument("--eval_reward", default="pickscore",
                   help="the reward of --eval_every: a spec of rewards.py (python eval.py --list_rewards)")
    g.add_argument("--eval_prompts", default="pickapic",
                   help="the prompts of --eval_every: pickapic, parti, hpsv2 (eval.py's sets), toy (the toy world's "
                        "held-out prompts) or a text file with one prompt a line")
    g.add_argument("--eval_limit", type=int, default=64, help="the first N prompts of --eval_prompts")
    return p


def _given(p: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flags the user typed (dest → value), found by parsing with every default suppressed; a wrong type or
    choice ends here with argparse's usage line. --help is left for the parse with the resolved defaults."""
    saved = {action: action.default for action in p._actions}
    for action in p._actions:
        action.default = argparse.SUPPRESS
    try:
        return vars(p.parse_args([a for a in argv if a not in ("-h", "--help")]))
    finally:
        for action, default in saved.items():
            action.default = default


# Keys of a run.json that are not replayed: how that run was started, not what it computed.
NOT_REPLAYED = ("resume", "resume_override", "overwrite", "config")


def _read_config(path: str) -> dict:
    """The mapping in FILE: JSON for *.json, else YAML (safe_load); anything else is one UsageError line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    try:
        if path.lower().endswith(".json"):
            content = json.loads(text)
        else:
            import yaml
            content = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError: their text on one line
        kind = "JSON" if path.lower().endswith(".json") else "YAML"
        raise UsageError(f"--config {path} is not valid {kind}: {' '.join(str(error).split())}") from None
    if not isinstance(content, dict):
        raise UsageError(f"--config {path} must hold a mapping of flag names to values, not {type(content).__name__}")
    return content


def _config_value(p: argparse.ArgumentParser, path: str, key, value) -> tuple[str, object]:
    """(dest, value) of one `key: value` of a --config file, converted as argparse converts a typed flag (its type
    and choices; YAML 1.1 reads `1e-5` as a string). An unknown key or a wrong value: one UsageError line."""
    key = str(key)
    action = p._option_string_actions.get("--" + key)
    if action is None or isinstance(action, argparse._HelpAction):
        names = [o[2:] for o in p._option_string_actions if o.startswith("--") and o != "--help"]
        near = difflib.get_close_matches(key, names, n=1)
        raise UsageError(f"--config {path}: no such flag {key}" + (f" (did you mean {near[0]}?)" if near else ""))
    if action.nargs == 0:  # on/off: store_true, --reward_scale (store_false), --compile/--no-compile
        if value is None and isinstance(action, argparse.BooleanOptionalAction):
            return action.dest, None  # --compile unset: from the device
        if not isinstance(value, bool):
            raise UsageError(f"--config {path}: {key} is an on/off flag: give true or false, not {value!r}")
        inverted = isinstance(action, argparse._StoreFalseAction) or key.startswith("no-")
        return action.dest, (not value) if inverted else value
    if value is None:
        return action.dest, None
    if isinstance(value, (bool, list, dict)):
        hint = " (YAML reads yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
        raise UsageError(f"--config {path}: {key} takes a value, not {value!r}{hint}")
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except (TypeError, ValueError):
        kind = getattr(action.type, "__name__", "value")
        raise UsageError(f"--config {path}: {key} {value!r} is not a valid {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"--config {path}: {key} {converted} is not one of {', '.join(map(str, action.choices))}")
    return action.dest, converted


def _config(p, typed: dict, family: str, tiny_recipe: dict, methods: dict) -> tuple[dict, float, bool]:
    """The values of `--config FILE` (dest → value), under the typed flags `typed`. Returns (values,
    lr_batch, recorded): lr_batch is the effective batch its learning rate was already multiplied by (1: a value
    per pair, as typed), recorded whether FILE is a trainer's run.json.

    A flags file (YAML or JSON) is as if its flags were typed before the command line's. A run.json (it has a
    "family") holds the RESOLVED values of a run of this script's family: they are replayed as they were (its
    learning rate is not multiplied again), except NOT_REPLAYED, and except what a typed flag derives anew: the
    gradient accumulation always comes from the effective batch again (the same on as many processes); a typed
    --method other than the run's re-applies the presets (τ, γ, λ(t) from the recipe and the new preset),
    --tiny on a run without it the TINY_RECIPE, --loss another β, --device another --compile."""
    path = typed["config"]
    content = _read_config(path)
    recorded = "family" in content
    if recorded and content["family"] != family:
        raise UsageError(f"--config {path} is the run.json of a {content['family']} run; this script trains "
                         f"{family}: replay it with train_{content['family']}.py")
    values = {}
    for key, value in content.items():
        if recorded and key in ("family", *NOT_REPLAYED):
            continue
        if key == "config":
            raise UsageError(f"--config {path}: a flags file cannot name another --config")
        dest, value = _config_value(p, path, key, value)
        values[dest] = value
    lr_batch = 1
    if recorded:
        values.pop("gradient_accumulation_steps", None)
        if "method" in typed and typed["method"] != values.get("method"):
            for name in {*methods.get(values.get("method"), {}), *methods[typed["method"]]}:
                values.pop(name, None)
        if typed.get("tiny") and not values.get("tiny"):
            for name in tiny_recipe:
                values.pop(name, None)
        if "loss" in typed and typed["loss"] != values.get("loss"):
            values.pop("beta", None)
        if "device" in typed and typed["device"] != values.get("device"):
            values.pop("compile", None)
        if values.get("scale_lr") and "learning_rate" in values and "learning_rate" not in typed:
            lr_batch = values.get("effective_batch_size") or 1
    return values, lr_batch, recorded


def _check_replay_folder(path: str, values: dict) -> None:
    """A run.json replayed into the folder of the run that wrote it (no --output_dir typed) would mix with it."""
    out = values["output_dir"]
    if not out or values["resume"] or values["overwrite"] or not os.path.isdir(out):
        return
    earlier = [n for n in folder.RUN_FILES if os.path.exists(os.path.join(out, n))]
    earlier += sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and d[11:].isdigit())
    if earlier:
        raise UsageError(f"--config {path} replays into its run's own folder {out}, which holds that run "
                         f"({', '.join(earlier[:4])}): give the replay another --output_dir (or continue that run "
                         "with --resume latest, or start it over with --overwrite)")


def _layered(p, given: dict, recipe: dict, tiny_recipe: dict, methods: dict) -> dict:
    """Generic defaults < the script's recipe < its TINY_RECIPE with --tiny < the --method preset < the
    command line. A recipe value may be a function of the values so far (a path in the cache, say),
    evaluated here in order."""
    values = {a.dest: a.default for a in p._actions if a.dest != "help"}
    values.update(recipe)
    if given.get("tiny"):
        values.update(tiny_recipe)
    values.update(methods[given.get("method", values["method"])])
    values.update(given)
    for name, value in values.items():
        if callable(value):
            values[name] = value(values)
    return values


def _derive(values: dict, given: dict, objectives: dict, family: str, world_size: int, lr_batch: float = 1) -> None:
    """The values that follow from others: β per objective and model, the batch geometry for this many
    processes, the learning rate × batch, the device and torch.compile. lr_batch: the effective batch the
    learning rate is already multiplied by (a replayed run.json's; 1: per pair)."""
    if values["beta"] is None:
        values["beta"] = objectives[values["loss"]].default_beta(family)
    effective, batch = values["effective_batch_size"], values["train_batch_size"]
    if values["gradient_accumulation_steps"] is None:
        if "train_batch_size" not in given:  # the demo on any number of processes: split the recipe's batch
            if effective % world_size:
                raise UsageError(f"--effective_batch_size {effective} is not a multiple of the {world_size} processes: "
                                 "set --effective_batch_size or --gradient_accumulation_steps")
            batch = values["train_batch_size"] = math.gcd(batch, effective // world_size)
        if effective % (batch * world_size):
            raise UsageError(f"--effective_batch_size {effective} is not a multiple of --train_batch_size {batch} × "
                             f"{world_size} processes: set --gradient_accumulation_steps, or an "
                             "--effective_batch_size that is")
        values["gradient_accumulation_steps"] = effective // (batch * world_size)
    values["effective_batch_size"] = batch * world_size * values["gradient_accumulation_steps"]
    if values["scale_lr"] and values["effective_batch_size"] != lr_batch:  # a replay at its own batch: as it was
        values["learning_rate"] = values["learning_rate"] * values["effective_batch_size"] / lr_batch
    if values["fsdp"] and values["optimizer"] == "adafactor":
        if "optimizer" in given:
            raise UsageError("--optimizer adafactor (transformers') cannot update FSDP's sharded parameters: use "
                             "--optimizer adamw, whose state --fsdp shards too (8 bytes per parameter, divided by "
                             "the processes)")
        values["optimizer"] = "adamw"  # the SDXL/SD3 recipes' Adafactor does not take DTensors (README, FSDP)
    values["device"] = values["device"] or runtime.default_device()
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # `accelerate launch --mixed_precision X` sets it
    if launched and "mixed_precision" not in given:
        if launched not in ("no", "bf16", "fp16"):
            raise UsageError(f"accelerate launch --mixed_precision {launched}: these trainers autocast in bf16 or "
                             "fp16 only; launch with --mixed_precision bf16 (or no)")
        values["mixed_precision"] = launched
    if values["compile"] is None:
        values["compile"] = values["device"].startswith("cuda")
    sampler = SAMPLERS[family]  # what --validation_every and --eval_every sample with: eval.py's setting
    if values["sample_steps"] is None:
        values["sample_steps"] = sampler["steps"]
    if values["sample_guidance_scale"] is None:
        values["sample_guidance_scale"] = sampler["guidance_scale"]


def _check_ranges(values: dict) -> None:
    for name, value in values.items():  # NaN passes no comparison; refused for every float flag, ranged or not
        if isinstance(value, float) and math.isnan(value):
            raise UsageError(f"--{name} nan is not a number")
    for name, spec in RANGES.items():
        value = values.get(name)
        if value is not None and not in_range(value, spec):
            raise UsageError(f"--{name} {value} is out of range: it must be {range_text(spec)}")


def _check(values: dict, resolution_multiple: int) -> None:
    _check_ranges(values)  # the derived values too (β per objective, accumulation)
    if values["resolution"] % resolution_multiple:
        raise UsageError(f"--resolution {values['resolution']} must be a multiple of {resolution_multiple} for this "
                         "model (its VAE's downsampling and the denoiser's patches)")
    checks = [(not (values["no_reward_scale"] and values["reward_scale_norm"]),
               "--reward_scale_norm needs λ(t): drop --no_reward_scale"),
              (not (values["cache_latents"] and values["streaming"]),
               "--cache_latents needs a map-style dataset: drop --streaming (a local parquet copy works)"),
              (not (values["cache_latents"] and values["random_crop"]),
               "--cache_latents caches center crops: drop --random_crop"),
              (not values["resume_override"] or values["resume"], "--resume_override goes with --resume"),
              (not (values["fsdp"] and values["lora_rank"]),
               "--fsdp shards a full fine-tune; a LoRA run keeps one frozen base model and fits on one GPU: drop "
               "--fsdp (torchrun then uses DDP) or set --lora_rank 0"),
              (not values["fsdp"] or int(os.environ.get("WORLD_SIZE", "1")) > 1,
               "--fsdp shards over torchrun's processes: launch with torchrun --nproc_per_node=N, N >= 2")]
    for variable, their in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            checks.append((False, f"accelerate launch with its {their} configuration: these trainers do not use "
                                  "accelerate's plugins; launch without it (torchrun or a plain `accelerate launch`) "
                                  "and shard with --fsdp (PyTorch FSDP2)"))
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    unknown = set(filter(None, (values["resume_override"] or "").split(","))) - set(values) - {"world_size"}
    if unknown:
        raise UsageError(f"--resume_override: no such flag {', '.join(sorted(unknown))}")


def resolve(argv, doc: str, family: str, recipe: dict, tiny_recipe: dict, objectives: dict, methods: dict, *,
            resolution_multiple: int = 8, model_flags=None):
    """The run's flags, every default decided here once. Returns (args, defaults): `defaults` are the values
    the run would take with no flag typed beyond --tiny and --method (a checkpoint written before a flag existed
    resumes when that flag is at its default). objectives: losses.LOSSES; methods: reference.METHODS (the
    --method presets); model_flags(parser): the script adds its model's flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(doc, objectives, methods)
    if model_flags is not None:
        model_flags(p)
    typed = given = _given(p, argv)
    lr_batch, recorded = 1, False
    if typed.get("config"):  # the file's flags under the typed ones
        from_file, lr_batch, recorded = _config(p, typed, family, tiny_recipe, methods)
        given = {**from_file, **typed}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    values = _layered(p, given, recipe, tiny_recipe, methods)
    if "-h" not in argv and "--help" not in argv:
        _check_ranges(values)
    _derive(values, given, objectives, family, world_size, lr_batch)
    defaults = _layered(p, {k: v for k, v in given.items() if k in ("tiny", "method", "pretrained_model")},
                        recipe, tiny_recipe, methods)
    if "-h" in argv or "--help" in argv:
        p.set_defaults(**values)
        p.parse_args(["--help"])
    _check(values, resolution_multiple)
    if recorded and "output_dir" not in typed:
        _check_replay_folder(given["config"], values)
    return argparse.Namespace(**values), defaults
