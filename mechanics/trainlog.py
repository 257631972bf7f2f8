"""The training log: OUTPUT_DIR/log.jsonl (one JSON line per optimizer step), Fig. 2's per-t-bin statistics,
the progress bar, an experiment tracker, and the run's closing lines. It records and prints; the loop decides."""
import errno
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from mechanics import folder
from mechanics.errors import DiskFull

logger = logging.getLogger("train")

NUM_LOG_BINS = 10  # the paper's figures bin t into 10 equal intervals (PAPER.md §3, Fig. 2)


@dataclass
class _BinStats:
    """Per-pair values accumulated on the device between logs (one host sync per log, not per step)."""
    timesteps: list = field(default_factory=list)
    margins: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    model_errors: list = field(default_factory=list)

    def add(self, t, margin, scale, model_err):
        self.timesteps.append(t.detach())
        self.margins.append(margin.detach())
        self.scales.append(scale.detach().expand_as(margin))
        self.model_errors.append(model_err.detach())

    def summary(self, num_train_timesteps: int, world_size: int) -> dict:
        """Per t-bin (10 equal intervals, bin 0 = cleanest): pair count, implicit accuracy, mean |margin|
        (implicit-reward magnitude), mean λ(t) and mean policy error — Fig. 2's panels."""
        if not self.timesteps:
            return {}
        columns = [torch.cat(c).float() for c in (self.timesteps, self.margins, self.scales, self.model_errors)]
        t, margin, scale, model_err = columns
        bins = (t * NUM_LOG_BINS // num_train_timesteps).long().clamp(max=NUM_LOG_BINS - 1)
        one_hot = torch.nn.functional.one_hot(bins, NUM_LOG_BINS).float()
        correct = (margin > 0).float() + 0.5 * (margin == 0).float()
        sums = torch.stack([one_hot.sum(0), one_hot.T @ correct, one_hot.T @ margin.abs(),
                            one_hot.T @ scale, one_hot.T @ model_err])
        if world_size > 1:
            dist.all_reduce(sums)
        count, correct, magnitude, scale, model_err = sums.cpu().tolist()
        per = lambda xs: [round(x / n, 6) if n else None for x, n in zip(xs, count)]
        self.__init__()
        return {"bin_count": [int(n) for n in count], "bin_accuracy": per(correct),
                "bin_reward_magnitude": per(magnitude), "bin_reward_scale": per(scale),
                "bin_model_err": per(model_err)}


def _over_ranks(values: dict, world_size: int, mean: bool = True) -> dict:
    names = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[n]).detach().float().reshape(()) for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)
        if mean:
            stacked /= world_size
    return dict(zip(names, stacked.cpu().tolist()))


class TrainLog:
    """One JSON line per optimizer step: the means over the step's micro-batches (and ranks) of the loss and the
    objective's metrics, and what the loop adds (gradient norm, lr, the reference's state, whether the step was
    skipped); every --bin_stats_every steps the per-t-bin statistics of Fig. 2. It also counts the skipped
    steps it was told of (`nonfinite_in_a_row`, for the loop's guard) and keeps them across a resume."""

    def __init__(self, args, run, num_train_timesteps: int, desc: str):
        self.args, self.run, self.num_train_timesteps, self.desc = args, run, num_train_timesteps, desc
        self.path = os.path.join(args.output_dir, "log.jsonl")
        self.sums, self.skipped, self.bins, self.progress, self.tracker = {}, 0, _BinStats(), None, None
        self.nonfinite_in_a_row = self.nonfinite_steps = 0
        self.step_start = time.perf_counter()

    def begin(self, step: int) -> None:
        """A fresh run starts a new log; a resumed one drops the lines past its step (they are run again) and
        a line cut short by a kill."""
        if self.run.is_main:
            if step:
                self._truncate(step)
            elif os.path.exists(self.path):
                os.remove(self.path)
        self.progress = tqdm(total=self.args.max_steps, initial=step, disable=not self.run.is_main,
                             desc=self.desc, dynamic_ncols=True)
        self.tracker = _Tracker(self.args, step) if self.run.is_main and self.args.report_to != "none" else None
        self.step_start = time.perf_counter()

    def _truncate(self, last_step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= last_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s: dropping a line cut short (%d characters)", self.path, len(line))
        folder.write_text(self.path, "".join(kept))

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as error:  # a torn last line is dropped on resume (begin)
            if error.errno == errno.ENOSPC:
                raise DiskFull(folder.no_space_message(self.path, len(line))) from None
            raise
        if self.tracker is not None:
            self.tracker.log(record)

    def read(self) -> list[dict]:
        """The log's complete lines."""
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return rows

    def state_dict(self) -> dict:
        columns = ("timesteps", "margins", "scales", "model_errors")
        return {"bins": {c: torch.cat(getattr(self.bins, c)).cpu() if getattr(self.bins, c) else torch.empty(0)
                         for c in columns}, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.bins = _BinStats(**{c: [v.to(self.run.device)] if v.numel() else [] for c, v in state["bins"].items()})
        self.nonfinite_in_a_row, self.nonfinite_steps = state["nonfinite_in_a_row"], state["nonfinite_steps"]

    def add(self, loss, metrics: dict, num_skipped: int, t, scale, margin=None, model_err=None) -> None:
        """One micro-batch: its loss and metrics (weighted 1/accumulation), and for paired objectives per pair its
        t, λ(t), reward margin (losses.pair_margin) and policy errors [2B] for the t-bin statistics."""
        accumulation = self.args.gradient_accumulation_steps
        for name, value in {**metrics, "loss": loss}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach() / accumulation
        self.skipped += num_skipped
        if margin is not None:
            n = len(t)
            self.bins.add(t, margin, scale, (model_err[:n] + model_err[n:]).detach() / 2)

    def write(self, step: int, skipped_step: bool = False, **fields) -> dict:
        """Close optimizer step `step`: one JSON line with the accumulated means and `fields`."""
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped_step else 0
        self.nonfinite_steps += int(skipped_step)
        record = {"step": step, **_over_ranks(self.sums, self.run.world_size),
                  **{k: v.item() if torch.is_tensor(v) else v for k, v in fields.items()},
                  "skipped_rows": int(_over_ranks({"n": self.skipped}, self.run.world_size, mean=False)["n"]),
                  "nonfinite_steps": self.nonfinite_steps,
                  "step_seconds": round(time.perf_counter() - self.step_start, 4)}
        if skipped_step:
            record["skipped_step"] = True
        if step % self.args.bin_stats_every == 0 or step == self.args.max_steps:
            record.update(self.bins.summary(self.num_train_timesteps, self.run.world_size))
        self.sums, self.skipped, self.step_start = {}, 0, time.perf_counter()
        if self.run.is_main:
            self._append(record)
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('accuracy', float('nan')):.2f}",
                                      ref="frozen" if record.get("ref_frozen") else "live")
        if skipped_step:
            self.note(f"step {step}: non-finite loss {record['loss']} or gradient norm {record.get('grad_norm')}: "
                      "step skipped")
        return record

    def record(self, step: int, **fields) -> None:
        """A line of its own, outside the optimizer steps: step 0's held-out numbers (the base model, before any
        step); the main process writes it."""
        if self.run.is_main and fields:
            self._append({"step": step, **fields})

    def image(self, step: int, name: str, image) -> None:
        """An image (a validation grid) to --report_to's tracker; log.jsonl keeps numbers only."""
        if self.tracker is not None and image is not None:
            self.tracker.image(name, image, step)

    def note(self, message: str) -> None:
        """A line above the progress bar, from the main process only."""
        if self.run.is_main:
            (self.progress.write if self.progress is not None else print)(message)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar and the tracker (again: nothing more happens)."""
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class _Tracker:
    """--report_to: the log's numbers also to TensorBoard (OUTPUT_DIR/tensorboard, which a resumed run writes on)
    or Weights & Biases (--tracker_project, --run_name): a resumed run continues the wandb run whose id
    OUTPUT_DIR/wandb_run.json keeps."""

    def __init__(self, args, step: int = 0):
        self.kind = args.report_to
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
            return
        import wandb
        self.writer = wandb
        record = os.path.join(args.output_dir, "wandb_run.json")
        run_id = None
        if step:
            try:
                with open(record) as f:
                    run_id = json.load(f)["id"]
            except (OSError, ValueError, KeyError):
                logger.warning("resumed at step %d without %s: the log goes to a new wandb run", step, record)
        run = wandb.init(project=args.tracker_project, dir=args.output_dir, config=vars(args),
                         name=args.run_name or os.path.basename(os.path.normpath(args.output_dir)),
                         id=run_id, resume="allow" if run_id else None)
        folder.write_text(record, json.dumps({"id": run.id}))

    def log(self, record: dict) -> None:
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, record["step"])
        else:
            self.writer.log(scalars, step=record["step"])

    def image(self, name: str, image, step: int) -> None:
        if self.kind == "tensorboard":
            import numpy as np
            self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()
        else:
            self.writer.log({name: self.writer.Image(image)}, step=step)

    def close(self) -> None:
        (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()


def summary_lines(args, log: list[dict]) -> list[str]:
    """What the run did, in a few lines: implicit accuracy and margin at the start and the end, the
    reference's updates and freeze, the last D, what was skipped."""
    heldout = [r for r in log if "heldout_win_rate" in r]
    log = [r for r in log if "loss" in r]  # step 0's held-out line has no loss
    if not log:
        return []
    k, fifth = max(1, len(log) // 10), max(2, len(log) // 5)
    mean = lambda rows, name: sum(r.get(name, math.nan) for r in rows) / len(rows)
    lines = []
    for name, label, digits in (("loss", "loss             ", 4), ("accuracy", "implicit accuracy", 3)):
        if name in log[0] and len(log) >= 2:  # step 1 compares the policy with itself: log 2 and 0.5
            early = f"steps 2–{fifth}, the first fifth" if fifth > 2 else "step 2"
            lines.append(f"  {label} {log[0][name]:.{digits}f} (step 1) → {mean(log[1:fifth], name):.{digits}f} "
                         f"({early}) → {mean(log[-k:], name):.{digits}f} (last {k})")
    if "reward_margin" in log[0]:
        lines.append(f"  reward margin     {mean(log[:k], 'reward_margin'):.2e} → {mean(log[-k:], 'reward_margin'):.2e}")
    updates = [r for r in log if r.get("ref_updated")]
    frozen = next((r for r in updates if r.get("ref_frozen")), None)
    if not args.tau:
        lines.append("  reference         the initial model throughout (τ = 0: Diffusion-DPO)")
    else:
        state = (f"frozen at step {frozen['step']} (D = {frozen['divergence']:.4g} > δ = {args.delta:g})" if frozen
                 else f"never frozen; last D = {updates[-1]['divergence']:.4g} (δ = {args.delta:g})" if updates
                 else "no update yet")
        lines.append(f"  reference         {len(updates)} update(s) every τ = {args.tau}, {state}"
                     + (f", {sum(bool(r.get('ref_reinit')) for r in updates)} Re-Init reset(s)" if args.on_diverge == "reinit" else ""))
    lines.append(f"  skipped           {sum(r.get('skipped_rows', 0) for r in log)} row(s), "
                 f"{log[-1].get('nonfinite_steps', 0)} non-finite step(s)")
    if heldout:
        last = heldout[-1]
        lines.append(f"  held-out          mean {last['heldout_reward_name']} {last['heldout_base_reward']:.4f} (base) → "
                     f"{last['heldout_reward']:.4f} at step {last['step']}; win rate over the base "
                     f"{100 * last['heldout_win_rate']:.1f} % [{100 * last['heldout_win_low']:.1f}, "
                     f"{100 * last['heldout_win_high']:.1f}] on {last['heldout_prompts']} prompts (--eval_every)")
    return lines


def report(args, run, log: TrainLog, final_dir: str, step: int, curves: str | None, baseline: str | None) -> None:
    """The run's last lines: what it did, where its curves, model and log are, and the command that evaluates
    it against `baseline` (None: eval.py's own default for --tiny)."""
    if not run.is_main:
        return
    print(f"\n{run.family} {args.loss} ({args.method}), {step} steps of {args.effective_batch_size} pairs:")
    print("\n".join(summary_lines(args, log.read())))
    if curves:
        print(f"curves: {curves}")
    print(f"model: {final_dir}\nlog:   {log.path}")
    flags = ("--tiny " if args.tiny else "") + f"--model {final_dir}" + (f" --baseline base={baseline}" if baseline else "")
    print(f"next:  python eval.py {flags}   # same-seed win rates (PAPER.md §6)")


def report_stop(args, run, step: int, reason: str) -> None:
    """The last lines of a run that stopped early: why, and how to go on (the loop returns the exit code)."""
    if run.is_main:
        print(f"{reason}; resume with --resume latest --output_dir {args.output_dir}", flush=True)


def divergence_advice(args) -> str:
    """The flag most likely at fault when a run diverges, from what the run set (its first unusual value)."""
    if args.on_diverge == "ignore" and args.tau:
        return (f"--on_diverge ignore with --tau {args.tau} runs the reference update without its monitor, the failure "
                "mode of PAPER.md §2: keep the monitor (--on_diverge freeze)")
    if args.mixed_precision == "fp16":
        return "--mixed_precision fp16 overflows where bf16 does not: use --mixed_precision bf16"
    if not args.max_grad_norm:
        return "--max_grad_norm 0 turned gradient clipping off: use --max_grad_norm 1"
    return f"try a lower --learning_rate (now {args.learning_rate:g}) or --beta (now {args.beta:g})"


def report_diverged(args, run, log: TrainLog, step: int, kept: list[str]) -> None:
    """Why a run stopped with no final model, where its last checkpoint is, and the flag likely at fault."""
    if run.is_main:
        print(f"error: the run diverged: {log.nonfinite_in_a_row} steps in a row (to step {step}) had a non-finite "
              f"loss or gradient norm; no final model was written; the last checkpoint is "
              f"{kept[-1] if kept else 'none'}; {divergence_advice(args)}", file=sys.stderr, flush=True)
