"""A checkpoint as the model the run's end would have written, without a resume (DPO over-optimises: the best
step is often not the last):

    python -m tools.export out/sd15/checkpoint-500                 # -> out/sd15/export-500/
    python -m tools.export out/sd15/checkpoint-500 --out sd15-dpo-500
    python -m tools.export out/sd15/checkpoint-500@path/to/base    # the base pipeline moved since training

A full or --fsdp run's checkpoint becomes what final/ holds: the base pipeline with the checkpoint's weights in its
UNet (SD3, FLUX: transformer), which the pipeline class's from_pretrained loads. A LoRA run's becomes what
final_lora/ holds: the adapter (pytorch_lora_weights.safetensors for load_lora_weights, the file for ComfyUI and
AUTOMATIC1111, base_model.json). Either with run.json, the flags of the run that wrote the checkpoint. The folder
appears complete or not at all; an existing one is never replaced. eval.py also samples a checkpoint directly
(--model NAME=OUTPUT_DIR/checkpoint-N), with the numbers of its export.
"""
import argparse
import json
import os
import re
import shutil
import sys

from mechanics import checkpoints, errors, runtime
from mechanics.errors import UsageError
from mechanics.folder import atomic_dir
from mechanics.loading import PIPELINES
from mechanics.pipelines import DENOISERS, checkpoint_args, load_pipeline, model_ref


def default_out(checkpoint: str) -> str:
    """OUTPUT_DIR/export-N beside OUTPUT_DIR/checkpoint-N (another folder name: NAME-export beside it)."""
    name = os.path.basename(os.path.abspath(checkpoint))
    found = re.fullmatch(r"checkpoint-(\d+)", name)
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.join(parent, f"export-{found[1]}" if found else f"{name}-export")


def export(spec: str, out: str | None = None) -> str:
    """Write the model of checkpoint `spec` (CHECKPOINT or CHECKPOINT@PIPELINE) into `out`; returns `out`."""
    folder, _, base = spec.partition("@")
    folder = folder.rstrip("/") or folder
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder (a run's OUTPUT_DIR/checkpoint-N)")
    if not checkpoints.is_checkpoint(folder):
        raise UsageError(f"{folder} is not a checkpoint (it holds no state.pt): name a run's OUTPUT_DIR/checkpoint-N")
    reason = checkpoints.verify(folder)
    if reason is not None:
        raise UsageError(f"{folder} is damaged: {reason}; export another checkpoint")
    out = out or default_out(folder)
    if os.path.exists(out):
        raise UsageError(f"{out} exists: remove it or give another --out")
    try:
        ref = model_ref(f"{folder}@{base}" if base else folder)
    except UsageError as error:
        raise UsageError(f"cannot export {folder}: {error}") from None
    args = checkpoint_args(folder)
    pipeline, name = PIPELINES[ref.family], DENOISERS[ref.family][0]
    record = {"base_model": base or args["pretrained_model"], "pipeline": pipeline, "denoiser": name}
    with atomic_dir(out) as tmp:
        if ref.lora:  # the adapter files, as the checkpoint holds them (written as final_lora/'s)
            for file in sorted(os.listdir(folder)):
                if file.endswith(".safetensors") or file == checkpoints.BASE_RECORD:
                    shutil.copy2(os.path.join(folder, file), os.path.join(tmp, file))
            if base:  # the base it was given on
                checkpoints.write_base_record(tmp, record)
        elif args.get("lora_rank"):  # a LoRA checkpoint from before checkpoints held their adapter file
            checkpoints.write_adapter(tmp, getattr(load_pipeline(ref, "cpu", None), name), record)
        else:
            weights = checkpoints.policy_weights(folder)
            checkpoints.write_pipeline(tmp, pipeline, ref.source, name, weights)
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump({"family": ref.family, **args}, f, indent=1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a run's OUTPUT_DIR/checkpoint-N (CHECKPOINT@PIPELINE: on another copy of its base)")
    p.add_argument("--out", help="the folder to write (default: OUTPUT_DIR/export-N); must not exist")
    args = p.parse_args(argv)
    runtime.quiet_libraries()  # no loading bars: the one line it wrote
    try:
        out = export(args.checkpoint, args.out)
    except errors.RunError as error:
        return errors.report(error)
    lora = os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    print(f"wrote {out}: " + ("the LoRA adapter (pipe.load_lora_weights on the base its base_model.json names)"
                              if lora else "a diffusers pipeline folder (from_pretrained)"))
    print(f"next:  python eval.py --model {os.path.basename(out)}={out} --baseline ... --prompts ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
