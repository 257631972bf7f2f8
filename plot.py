"""The paper's panels for any run, drawn from its log.jsonl (PAPER.md §6; Fig. 1b and Fig. 2).

    python plot.py out/sd15                                   # → out/sd15/curves.png
    python plot.py dpo=out/sd15-dpo ours=out/sd15 --out cmp.png    # several runs on one figure
    python plot.py ours=out/s0,out/s1,out/s2 dpo=out/d0,out/d1     # seeds of one configuration: mean and band

Top row, over optimizer steps: the loss, the implicit accuracy, the implicit reward margin r(w) − r(l), and
the monitor (§2): D(p_ref, p_init) at each reference update (and D of the policy where --divergence_every
logged it), with δ and the freeze step marked. Bottom row, per t-bin over the second half of training (Fig. 2):
implicit accuracy, reward magnitude |r(w) − r(l)|, the policy's error, and λ(t). The trainers draw it at
the end of every run (OUTPUT_DIR/curves.png; --no-plot to skip).
"""
import argparse
import json
import math
import os
import sys
import warnings

import numpy as np

from mechanics import errors
from mechanics.errors import UsageError
from mechanics.trainlog import NUM_LOG_BINS as NUM_BINS  # the log's 10 equal t-bins, bin 0 the cleanest
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


class LogError(ValueError):
    """A run's files cannot be read as its log: the CLI prints it as one `error: ...` line (exit code 2)."""


def read_log(run_dir) -> list[dict]:
    """The run's log records, one JSON object with its "step" per line. The last line may be cut short by a
    kill (the trainers drop such a line when they resume): it is left out. Any other line that is not UTF-8
    text or not such a record raises LogError, as does a log that cannot be read."""
    path = os.path.join(run_dir, "log.jsonl")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise LogError(f"cannot read {path}: {error.strerror or error}") from error
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with an integer \"step\"")
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number == len(lines):
                break  # cut short by a kill
            why = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else \
                "not JSON" if isinstance(error, json.JSONDecodeError) else str(error)
            raise LogError(f"{path} line {number} of {len(lines)} is {why}: not a log written by the "
                           f"trainers") from error
        records.append(record)
    return records


def read_config(run_dir) -> dict:
    """The flags the run was started with (OUTPUT_DIR/run.json, written by the trainers), or {}; LogError if
    that file is there but not a JSON object."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as error:
        raise LogError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise LogError(f"{path} is not JSON text ({error})") from error
    if not isinstance(config, dict):
        raise LogError(f"{path} holds a JSON {type(config).__name__}, not the run's flags")
    return config


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (NaN-aware) over `window` steps."""
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = chunk.mean() if len(chunk) else np.nan
    return out


def series(log, name) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold `name`."""
    rows = [(r["step"], r[name]) for r in log if isinstance(r.get(name), (int, float))]
    return (np.array([s for s, _ in rows]), np.array([v for _, v in rows], dtype=float)) if rows else (np.array([]), np.array([]))


def bin_profile(log, name: str, from_step: int = 0) -> np.ndarray:
    """Per t-bin mean of a bin statistic over the records from `from_step` on, weighted by the pairs each
    record's bin held (NaN for a bin no pair fell in)."""
    total, weight = np.zeros(NUM_BINS), np.zeros(NUM_BINS)
    for r in log:
        if r["step"] >= from_step and name in r and "bin_count" in r:
            for b, (value, count) in enumerate(zip(r[name], r["bin_count"])):
                if value is not None and count:
                    total[b] += value * count
                    weight[b] += count
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def _band(ax, x, ys, colour, label, marker=None):
    """Mean of the runs, and their min–max band when there are several."""
    ys = np.asarray(ys, dtype=float)
    with warnings.catch_warnings():  # a bin no run sampled stays empty (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
        ax.plot(x, mean, color=colour, label=label, marker=marker, ms=3)
        if len(ys) > 1:
            ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=colour, alpha=0.15)


def _aligned(logs, name, window=1):
    """The runs' series of `name` on their common steps (runs of one configuration log the same steps)."""
    pairs = [series(log, name) for log in logs]
    if not all(len(x) for x, _ in pairs):
        return None, None
    n = min(len(x) for x, _ in pairs)
    return pairs[0][0][:n], [smooth(y[:n], window) for _, y in pairs]


def draw(groups: dict[str, list[str]], out: str, title: str | None = None) -> str:
    """Draw the panels for `groups` (label → run folders, several = seeds of one configuration) into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    deltas, ceilings, highest_of_all = [], [], 0.0  # the δ lines drawn, the highest D of their runs, of all runs
    for (label, runs), colour in zip(groups.items(), COLOURS):
        logs = [read_log(run) for run in runs]
        logs = [log for log in logs if log]
        if not logs:
            continue
        steps = max(len(log) for log in logs)
        window = max(1, steps // 25)
        for ax, name in zip(axes[0][:3], ("loss", "accuracy", "reward_margin")):
            x, ys = _aligned(logs, name, window)
            if x is not None:
                _band(ax, x, ys, colour, label)
        monitor, highest, legend = axes[0][3], 0.0, label
        for name, style in (("divergence", "o-"), ("policy_divergence", "s-"), ("ref_distance", "^--")):
            x, ys = _aligned(logs, name)
            if x is not None:  # one legend entry per run or configuration: the marker says which quantity
                _band(monitor, x, ys, colour, legend, marker=style[0])
                monitor.lines[-1].set_linestyle(style[1:])
                highest, legend = max(highest, float(np.nanmax(ys))), "_"
        highest_of_all = max(highest_of_all, highest)
        for log in logs:
            frozen = next((r["step"] for r in log if r.get("ref_frozen")), None)
            if frozen:
                monitor.axvline(frozen, color=colour, ls=":", lw=1)
        config = read_config(runs[0])
        delta, tau = config.get("delta"), config.get("tau")
        watched = config.get("on_diverge", "freeze") != "ignore"
        if watched and delta is not None and tau and math.isfinite(delta) and delta < 1e6:
            monitor.axhline(delta, color=colour, ls="--", lw=0.8)
            deltas.append(delta)
            ceilings.append(highest)
        centres = (np.arange(NUM_BINS) + 0.5) * 1000 / NUM_BINS
        half = steps // 2
        for ax, name in zip(axes[1], ("bin_accuracy", "bin_reward_magnitude", "bin_model_err", "bin_reward_scale")):
            _band(ax, centres, [bin_profile(log, name, half) for log in logs], colour, label, marker="o")
    if deltas and highest_of_all > 4 * max(max(deltas), *ceilings):
        top = 4 * max(max(deltas), *ceilings)  # a run without the monitor would flatten the others
        axes[0][3].set_ylim(-0.05 * top, top)
    titles = [("loss", "step"), ("implicit accuracy", "step"), ("implicit reward margin r(w) − r(l)", "step"),
              ("monitor: ● D(ref) ■ D(policy) ▲ distance, -- δ", "step"),
              ("implicit accuracy per t-bin (2nd half)", "t"), ("reward magnitude |r(w) − r(l)| per t-bin", "t"),
              ("policy error e_θ per t-bin", "t"), ("λ(t) per t-bin (mean of the pairs')", "t")]
    for ax, (name, xlabel) in zip(axes.flat, titles):
        ax.set(title=name, xlabel=xlabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][1].axhline(0.5, color="k", lw=0.5, ls=":")
    axes[1][0].axhline(0.5, color="k", lw=0.5, ls=":")
    fig.suptitle(title or " vs ".join(groups))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out



def parse_groups(specs: list[str]) -> dict[str, list[str]]:
    """'DIR' or 'LABEL=DIR[,DIR...]' → {label: [dirs]}; every folder must hold a readable log with a record
    (and a readable run.json, if any), else one `error:` line."""
    groups = {}
    for spec in specs:
        label, sep, dirs = spec.partition("=")
        if not sep:
            label, dirs = os.path.basename(os.path.normpath(spec)) or spec, spec
        folders = [d for d in dirs.split(",") if d]
        if not folders:
            raise UsageError(f"{spec!r} names no run folder (LABEL=DIR[,DIR...])")
        for folder in folders:
            check_run(folder)
        groups[label] = folders
    return groups


def check_run(folder: str) -> None:
    """A run folder that plot.py can draw, or one `error:` line saying why not."""
    if not os.path.exists(folder):
        raise UsageError(f"run folder {folder} not found")
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is a file, not a run folder (a run's --output_dir)")
    if not os.path.isfile(os.path.join(folder, "log.jsonl")):
        raise UsageError(f"{folder} holds no log.jsonl (a run's --output_dir?)")
    try:
        log = read_log(folder)
        read_config(folder)
    except LogError as error:
        raise UsageError(str(error))
    if not log:
        raise UsageError(f"{os.path.join(folder, 'log.jsonl')} holds no complete record yet: nothing to draw")


def check_out(out: str) -> None:
    """The figure's path: a format matplotlib writes, in a folder that is or can be made."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    suffix = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasAgg.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UsageError(f"--out {out}: matplotlib writes no .{suffix} files; use one of .{', .'.join(sorted(formats))}")
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a folder; give the figure's file name")


def draw_runs(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (--output_dir), as DIR or LABEL=DIR[,DIR...]")
    p.add_argument("--out", default=None, help="PNG to write (default: curves.png in the only run's folder)")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    groups = parse_groups(args.runs)
    single = len(groups) == 1 and len(next(iter(groups.values()))) == 1
    if args.out is None and not single:
        print("error: several runs: say where the figure goes with --out", file=sys.stderr)
        raise SystemExit(2)
    out = args.out or os.path.join(next(iter(groups.values()))[0], "curves.png")
    check_out(out)
    try:
        draw(groups, out, args.title)
    except OSError as error:
        raise UsageError(f"cannot write {out}: {error.strerror or error}")
    print(out)
    return out



def main(argv=None) -> str:
    """Draw the runs named on the command line. A mistake of the user's ends the process as one `error:` line and
    exit code 2."""
    try:
        return draw_runs(argv)
    except errors.RunError as error:
        raise SystemExit(errors.report(error)) from None

if __name__ == "__main__":
    main()
