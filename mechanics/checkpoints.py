"""Checkpoints and the final model. Every checkpoint appears complete or not at all (folder.atomic_dir), and a
resume continues only the run that wrote the folder (its identity: defining flags, base model, world size)."""
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import nullcontext

import torch
from torch.utils._pytree import tree_leaves

from mechanics import lora
from mechanics.errors import DiskFull, UsageError
from mechanics.folder import atomic_dir, no_space_message
from mechanics.loading import DENOISERS, PIPELINES

logger = logging.getLogger("train")

# Flags that may change on --resume: how long, how often to save and log, and how fast; every other flag
# defines the run (its model, data, objective, schedule, batch geometry, precision) and must stay the same.
SAFE_TO_CHANGE = {"max_steps", "checkpoint_every", "keep_checkpoints", "bin_stats_every", "divergence_every",
                  "dataloader_workers", "cpu_threads", "device", "compile", "allow_tf32", "gradient_checkpointing",
                  "cache_latents", "cache_dir", "output_dir", "resume", "resume_override", "overwrite", "tiny",
                  "max_nonfinite_steps", "report_to", "plot", "tracker_project", "run_name", "validation_every",
                  "validation_prompts", "validation_images", "sample_steps", "sample_guidance_scale", "eval_every",
                  "eval_reward", "eval_prompts", "eval_limit", "config"}
OPTIMIZER_FLAGS = ("learning_rate", "adam_beta1", "adam_beta2", "weight_decay", "adam_epsilon")


def base_model_identity(folder: str) -> str:
    """Which base model a run started from, as a short hash of its folder: every file's path and size, the full
    text of the small ones (configs, tokenizers) and the first and last 64 KB of the weights."""
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if not os.path.isfile(path) or os.path.basename(path).startswith("."):
            continue
        size = os.path.getsize(path)
        digest.update(f"{os.path.relpath(path, folder)}:{size}".encode())
        with open(path, "rb") as f:
            if size <= 2**20:
                digest.update(f.read())
            else:
                digest.update(f.read(2**16))
                f.seek(-2**16, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


# What a model folder says about its base (final_lora/ and every checkpoint-N/): {"base_model": the base as the user
# gave --pretrained_model (a hub id, or a path as typed), "pipeline": its diffusers class, "denoiser": "unet" or
# "transformer"}. eval.py (mechanics/pipelines.model_ref) loads a LoRA folder or a checkpoint on that base.
BASE_RECORD = "base_model.json"


def base_record(args, pipeline: str, denoiser: str) -> dict:
    return {"base_model": args.pretrained_model, "pipeline": pipeline, "denoiser": denoiser}


def write_base_record(folder: str, record: dict) -> None:
    with open(os.path.join(folder, BASE_RECORD), "w") as f:
        json.dump(record, f, indent=1)


def write_adapter(folder: str, denoiser, record: dict) -> None:
    """The trained LoRA adapter of `denoiser` into `folder`, as final_lora/ and every LoRA checkpoint hold it:
    pytorch_lora_weights.safetensors (the pipeline's save_lora_weights; `pipe.load_lora_weights(folder)` reads it),
    the same adapter for ComfyUI and AUTOMATIC1111, alpha included (lora.KOHYA_FILE, lora.COMFYUI_FILE), and
    base_model.json."""
    import diffusers

    name, pipeline = record["denoiser"], record["pipeline"]
    getattr(diffusers, pipeline).save_lora_weights(folder, **{
        f"{name}_lora_layers": lora.adapter_state_dict(denoiser),
        f"{name}_lora_adapter_metadata": lora.adapter_metadata(denoiser)})
    lora.save_for_tools(folder, denoiser, name, pipeline, record["base_model"])
    write_base_record(folder, record)


def write_pipeline(folder: str, pipeline: str, model_path: str, denoiser: str, weights: dict) -> None:
    """The base pipeline in `model_path` with `weights` (a full state dict) in its denoiser, saved into `folder`."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(model_path)
    module = getattr(pipe, denoiser)
    module.to(next(iter(weights.values())).dtype)  # the trained dtype (fp32), as the trainer's own module saves
    module.load_state_dict(weights)
    pipe.save_pretrained(folder)


def save_final(args, run, model_path: str, pipeline: str, **denoiser) -> str:
    """The trained model in OUTPUT_DIR/final/: the base pipeline with the trained denoiser (`unet=` or
    `transformer=`) in its place, which diffusers' `pipeline` class's from_pretrained loads. With LoRA the adapter alone in
    OUTPUT_DIR/final_lora/ (write_adapter), for `pipe.load_lora_weights(final_lora)` on the base pipeline, with
    base_model.json naming that base (eval.py reads it). Either holds the run's run.json."""
    import diffusers

    pipeline_class = getattr(diffusers, pipeline)
    (name, module), = denoiser.items()
    final_dir = os.path.join(args.output_dir, "final_lora" if args.lora_rank else "final")
    if run.fsdp:  # every rank sends its shards; rank 0 holds the whole model, on the CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.is_main:
        with atomic_dir(final_dir) as tmp:
            if args.lora_rank:
                write_adapter(tmp, module, base_record(args, pipeline, name))
            elif run.fsdp:
                write_pipeline(tmp, pipeline, model_path, name, full)
            else:
                pipeline_class.from_pretrained(model_path, **denoiser).save_pretrained(tmp)
            copy_run_json(args.output_dir, tmp)
    run.barrier()
    return final_dir


def copy_run_json(output_dir: str, folder: str) -> None:
    """OUTPUT_DIR/run.json (the flags the run was started with, runtime.start) into a model folder, if there is one."""
    if os.path.isfile(os.path.join(output_dir, "run.json")):
        shutil.copyfile(os.path.join(output_dir, "run.json"), os.path.join(folder, "run.json"))


MANIFEST = "MANIFEST.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file below `folder` but the manifest, hidden ones too (DCP's sharded/.metadata)."""
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                  for name in names if name != MANIFEST)


def write_manifest(folder: str) -> None:
    """FOLDER/MANIFEST.json: every file's size and SHA-256 (the shards of every rank too), written with the
    checkpoint, so that a resume can tell a damaged, truncated or missing file from a good one."""
    entries = {rel: [os.path.getsize(os.path.join(folder, rel)), _sha256(os.path.join(folder, rel))]
               for rel in _files(folder)}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(entries, f, indent=0)


def verify(folder: str, rank: int = 0, world_size: int = 1, checksums: bool = True) -> str | None:
    """Why the checkpoint in `folder` cannot be trusted, or None: this rank's share of its manifest's files
    (every world_size-th, from `rank`) must be there with their size and checksum (checksums=False: their size, a
    quick look for a copy cut short). A checkpoint without a manifest (written before there was one) is read as it
    is."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None if os.path.isfile(os.path.join(folder, "state.pt")) else "it holds no state.pt"
    try:
        with open(path) as f:
            entries = sorted(json.load(f).items())
    except (OSError, ValueError) as error:
        return f"its {MANIFEST} cannot be read ({error})"
    for rel, (size, digest) in entries[rank::world_size]:
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != size:
            return f"{rel} has {os.path.getsize(file)} bytes, not the {size} it was written with"
        if checksums and _sha256(file) != digest:
            return f"{rel} is damaged (its checksum differs from the one written with it)"
    return None


def is_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "state.pt"))


def policy_weights(folder: str) -> dict:
    """The trained denoiser's weights (its state_dict) in the checkpoint `folder`, without a resume and without a
    process group: state.pt's "policy", memory-mapped (its optimizer state is never read into memory), or under
    --fsdp every "policy.*" tensor of sharded/, gathered from all ranks' shards by torch.distributed.checkpoint in
    this one process. In the dtype they were trained in (fp32)."""
    state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True, mmap=True)
    if not state.get("sharded"):
        return state["policy"]
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(os.path.join(folder, "sharded"))
    weights = {key.removeprefix("policy."): torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if key.startswith("policy.") and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"policy": weights}, storage_reader=reader, no_dist=True)
    return weights


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a checkpoint folder only exists once fully written)."""
    found = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    found = [d for d in found if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(found, key=lambda d: int(d.rsplit("-", 1)[1]))


def _tensor_bytes(state) -> int:
    """The bytes of the tensors in `state` that this process holds (a DTensor: its local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tree_leaves(state) if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local)


class Checkpoints:
    """OUTPUT_DIR/checkpoint-STEP/state.pt: everything a bit-exact resume needs — the objects passed as `state`
    (weights, reference, optimizer, lr schedule, loader position, fp16 loss scale, the log's pending
    statistics, the monitor's probe) — and the run's identity. Written atomically; only the newest
    --keep_checkpoints are kept. Read with torch.load(weights_only=True): a checkpoint is data, not a program.

    defaults: the values of flags.resolve's defaults; a flag that an older checkpoint does not know is not a
    change while it is at its default (the code gained a flag, the run is the same)."""

    def __init__(self, args, run, model_path: str, defaults: dict, **state):
        self.args, self.run, self.state, self.defaults = args, run, state, defaults
        self.identity = {"flags": {k: v for k, v in sorted(vars(args).items()) if k not in SAFE_TO_CHANGE
                                   and k != "pretrained_model"},
                         "pretrained_model": base_model_identity(model_path), "world_size": run.world_size}
        self.record = (base_record(args, PIPELINES[run.family], DENOISERS[run.family][0]) if run.family in PIPELINES
                       else None)

    def _model_files(self, folder: str) -> None:
        """What makes a checkpoint a model that eval.py and tools/export.py load without a resume: base_model.json
        naming the base, and with LoRA the trained adapter exactly as final_lora/ holds it (write_adapter)."""
        if self.record is None:
            return
        if self.args.lora_rank:
            write_adapter(folder, self.state["policy"], self.record)
        else:
            write_base_record(folder, self.record)

    def save(self, step: int) -> str | None:
        """Write checkpoint-STEP (with its MANIFEST.json) and prune the oldest; a failure on any rank (a full disk)
        ends every rank alike."""
        path = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if self.run.fsdp:
            return self.run.together(lambda: self._save_sharded(step, path))
        return self.run.together(lambda: self._save(step, path))

    def _save(self, step: int, path: str) -> str:
        if self.run.is_main:
            scaler = self.state["scaler"]
            state = {"step": step, **{name: obj.state_dict() for name, obj in self.state.items() if name != "scaler"},
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "identity": self.identity, "args": vars(self.args)}
            needed = _tensor_bytes(state)
            if needed > shutil.disk_usage(self.args.output_dir).free:
                raise DiskFull(no_space_message(path, needed))
            with atomic_dir(path, needed_bytes=needed) as tmp:
                with open(os.path.join(tmp, "state.pt"), "wb") as f:
                    torch.save(state, f)  # into a file object: a full disk is OSError(ENOSPC), not a zip RuntimeError
                self._model_files(tmp)
                write_manifest(tmp)
            for old in checkpoint_dirs(self.args.output_dir)[:-self.args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    # Under FSDP the policy, its optimizer state and the reference are saved by torch.distributed.checkpoint,
    # each rank writing its shards (sharded/); each rank its own loader, probe and log (rank-R.pt); rank 0 the
    # rest (state.pt). Rank 0's temporary folder is renamed into place once every rank has written.
    SHARDED = ("policy", "optimizer")

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(self.state["policy"], self.state["optimizer"])
        return {"policy": model_state, "optimizer": optimizer_state,
                "reference": self.state["reference"].model.state_dict()}

    def _save_sharded(self, step: int, path: str) -> str:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        sharded = self._sharded_state()
        # The shards land in one folder: every rank's bytes, checked by all before any writes (agreed, so that no
        # rank waits in dcp.save for one that refused).
        needed = _tensor_bytes(sharded) * self.run.world_size
        short = self.run.first_of_ranks(
            no_space_message(path, needed) if needed > shutil.disk_usage(self.args.output_dir).free else None)
        if short is not None:
            raise DiskFull(short)
        pid = [os.getpid()]
        dist.broadcast_object_list(pid)
        tmp = path + f".tmp-{pid[0]}"  # rank 0's atomic_dir folder, which every rank writes into
        with atomic_dir(path, pid[0], needed_bytes=needed) if self.run.is_main else nullcontext():
            self.run.barrier()  # rank 0 has made the folder
            try:
                dcp.save(sharded, checkpoint_id=os.path.join(tmp, "sharded"))
            except Exception as error:  # DCP gathers every rank's write failures into one exception
                if "No space left" in str(error) or getattr(error, "errno", None) == errno.ENOSPC:
                    raise DiskFull(no_space_message(path, needed)) from None
                raise
            own = {name: obj.state_dict() for name, obj in self.state.items() if name not in self.SHARDED + ("scaler",)}
            own["reference"].pop("model")
            torch.save(own, os.path.join(tmp, f"rank-{self.run.rank}.pt"))
            if self.run.is_main:
                scaler = self.state["scaler"]
                torch.save({"step": step, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                            "identity": self.identity, "args": vars(self.args), "sharded": True},
                           os.path.join(tmp, "state.pt"))
                self._model_files(tmp)
            self.run.barrier()  # every rank has written
            if self.run.is_main:
                write_manifest(tmp)
        if self.run.is_main:
            for old in checkpoint_dirs(self.args.output_dir)[:-self.args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def _load_sharded(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sharded = self._sharded_state()
        dcp.load(sharded, checkpoint_id=os.path.join(folder, "sharded"))
        set_state_dict(self.state["policy"], self.state["optimizer"], model_state_dict=sharded["policy"],
                       optim_state_dict=sharded["optimizer"])
        self.state["reference"].model.load_state_dict(sharded["reference"])
        own = torch.load(os.path.join(folder, f"rank-{self.run.rank}.pt"), map_location="cpu", weights_only=True)
        for name, obj in self.state.items():
            if name in own:
                obj.load_state_dict(own[name])

    def _load(self) -> tuple[str, dict] | None:
        """The checkpoint --resume names, read; for "latest" the newest that reads, with a warning for each
        newer one that does not (a disk error, a copy cut short)."""
        resume = self.args.resume
        if resume is None:
            return None
        if resume == "latest":
            candidates = checkpoint_dirs(self.args.output_dir)[::-1]
            if not candidates:
                logger.info("no checkpoint in %s: starting from scratch", self.args.output_dir)
                return None
        elif os.path.isfile(os.path.join(resume, "state.pt")):
            candidates = [resume]
        else:
            raise UsageError(f"--resume {resume}: no checkpoint there (expected {resume}/state.pt)")
        for folder in candidates:
            # Every rank checks its share of the files against the manifest and reads state.pt; the ranks agree,
            # so that all of them fall back together (one corrupt shard must not resume one rank and not another).
            reason, saved = verify(folder, self.run.rank, self.run.world_size), None
            if reason is None:
                try:
                    saved = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
                except Exception as error:  # a truncated zip, a pickle with code in it, an empty file: not usable
                    text = str(error).strip()
                    reason = f"its state.pt cannot be read ({text.splitlines()[0][:200] if text else type(error).__name__})"
            reason = self.run.first_of_ranks(reason)
            if reason is None:
                return folder, saved
            if resume != "latest":
                raise UsageError(f"--resume {resume}: {reason}")
            if self.run.is_main:
                logger.warning("%s: %s; trying the one before", folder, reason)
        raise UsageError(f"no checkpoint in {self.args.output_dir} can be read; start over with --overwrite")

    def _changed(self, saved: dict) -> dict:
        """Defining values that differ from the checkpoint's: flag → (then, now)."""
        old, new = saved.get("identity") or {}, self.identity
        old_flags, changed = old.get("flags", {}), {}
        for key in sorted(set(old_flags) | set(new["flags"])):
            if key not in old_flags and new["flags"][key] == self.defaults.get(key, "(unset)"):
                continue  # a flag the code gained since, at its default: the same run
            a, b = old_flags.get(key, "(unset)"), new["flags"].get(key, "(unset)")
            if a != b:
                changed[key] = (a, b)
        if old.get("pretrained_model") != new["pretrained_model"]:
            changed["pretrained_model"] = ("the model it was started from", f"another model ({self.args.pretrained_model})")
        if old.get("world_size") != new["world_size"]:
            changed["world_size"] = (old.get("world_size"), new["world_size"])
        return changed

    def resume(self) -> int:
        """Load the checkpoint --resume names into the state objects; returns its step (0: a fresh run). A
        checkpoint of another run is refused unless the differing flags are named in --resume_override; then
        their new values take effect, the optimizer's hyper-parameters included. A refusal on any rank is every
        rank's."""
        return self.run.together(self._resume)

    def _resume(self) -> int:
        loaded = self._load()
        if loaded is None:
            return 0
        folder, saved = loaded
        changed = self._changed(saved)
        override = set(filter(None, (self.args.resume_override or "").split(",")))
        refused = {k: v for k, v in changed.items() if k not in override}
        if refused:
            listed = "; ".join(f"--{k} {a} → {b}" for k, (a, b) in refused.items())
            raise UsageError(f"--resume {folder} belongs to another run: {listed}. Resume with the run's own "
                             f"flags, pass --resume_override {','.join(refused)} to change them anyway, or start a "
                             "new --output_dir")
        for k, (a, b) in changed.items():
            logger.warning("--resume_override: --%s %s → %s", k, a, b)
        name = "the checkpoint"
        try:
            if saved.get("sharded"):
                self._load_sharded(folder)
            else:
                for name, obj in self.state.items():
                    if name != "scaler":
                        obj.load_state_dict(saved[name])
        except (RuntimeError, KeyError, ValueError, FileNotFoundError) as error:
            raise UsageError(f"--resume {folder} does not fit this run's {name}: {str(error).splitlines()[0][:300]}")
        if saved["scaler"] and self.state["scaler"].is_enabled():
            self.state["scaler"].load_state_dict(saved["scaler"])
        if set(changed) & set(OPTIMIZER_FLAGS):
            self._set_optimizer_flags()
        if self.run.is_main:
            self._branch(saved["step"])
            logger.info("resumed from %s at step %d", folder, saved["step"])
        return saved["step"]

    def _branch(self, step: int) -> None:
        """A resume from before the newest point of the run (a rewind) starts a branch: the newer checkpoints,
        the final model written after `step` and the log (whose later lines the branch rewrites) move into
        OUTPUT_DIR/abandoned-after-STEP[-N]/, so that --resume latest and --keep_checkpoints never return to or
        prune by the abandoned line and the log stays one trajectory."""
        out = self.args.output_dir
        newer = [d for d in checkpoint_dirs(out) if int(d.rsplit("-", 1)[1]) > step]
        log = os.path.join(out, "log.jsonl")
        last_logged = 0
        if os.path.exists(log):
            with open(log) as f:
                for line in f:
                    try:
                        last_logged = max(last_logged, json.loads(line)["step"])
                    except (ValueError, KeyError, TypeError):
                        pass  # a torn line
        finals = [os.path.join(out, name) for name in ("final", "final_lora", "heldout")
                  if last_logged > step and os.path.exists(os.path.join(out, name))]
        if not newer and not finals:  # the newest point, or a run cut short after it: nothing to set aside
            return
        branch, k = os.path.join(out, f"abandoned-after-{step}"), 1
        while os.path.exists(branch):
            k += 1
            branch = os.path.join(out, f"abandoned-after-{step}-{k}")
        os.makedirs(branch)
        for path in newer + finals:
            shutil.move(path, os.path.join(branch, os.path.basename(path)))
        if os.path.exists(log):
            shutil.copy2(log, os.path.join(branch, "log.jsonl"))  # the abandoned line's whole log
        logger.warning("--resume at step %d rewinds the run: %s and the log moved into %s", step,
                       ", ".join(os.path.basename(p) for p in newer + finals), branch)

    def _set_optimizer_flags(self) -> None:
        """The optimizer's state_dict carries its hyper-parameters: an overridden --learning_rate (or β, weight
        decay, ε) is set into it again."""
        optimizer, schedule = self.state.get("optimizer"), self.state.get("lr_schedule")
        if optimizer is None:
            return
        flags = {"betas": (self.args.adam_beta1, self.args.adam_beta2), "weight_decay": self.args.weight_decay,
                 "eps": self.args.adam_epsilon}
        for group in optimizer.param_groups:
            group.update({k: v for k, v in flags.items() if k in group and not (k == "eps" and isinstance(group[k], tuple))})
        if schedule is not None:
            schedule.base_lrs = [self.args.learning_rate] * len(optimizer.param_groups)
            factor = schedule.lr_lambdas[0](schedule.last_epoch)
            for group in optimizer.param_groups:
                group["lr"] = self.args.learning_rate * factor
