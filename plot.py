"""The paper's panels for any run, drawn from its log.jsonl (PAPER.md §6; Fig. 1b and Fig. 2).

    python plot.py out/sd15                                   # → out/sd15/curves.png
    python plot.py dpo=out/sd15-dpo ours=out/sd15 --out cmp.png    # several runs on one figure
    python plot.py ours=out/s0,out/s1,out/s2 dpo=out/d0,out/d1     # seeds of one configuration: mean and band
    python plot.py out/sd15 --smooth 1 --heldout out/eval-sd15     # raw curves; eval.py's result at the end

Top row, over optimizer steps: the loss, the implicit accuracy, the implicit reward margin r(w) − r(l)
(trailing means: --smooth), and the monitor (§2): D(p_ref, p_init) at each reference update (and D of the
policy where --divergence_every logged it), with δ and the freeze step marked. Middle row: the held-out result,
the same-seed win rate over the base model with its 95 % interval and the mean reward of both (the log's
heldout_* fields, written by the trainers' --eval_every), with eval.py's result at the last step where the run
folder holds heldout/summary.json (or --heldout names one); the gradient norm and the learning rate. Bottom
row, per t-bin over the second half of training (Fig. 2): implicit accuracy (with the binomial interval its
pair count allows), reward magnitude |r(w) − r(l)|, the policy's error, and λ(t). With several runs the title
names the flags they differ in (run.json), and a note says which curves are on different scales. The trainers
draw it at the end of every run (OUTPUT_DIR/curves.png; --no-plot to skip).
"""
import argparse
import json
import math
import os
import sys
import textwrap
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


def read_json(path):
    """The JSON value in file `path`; LogError if it cannot be read or is not JSON text."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as error:
        raise LogError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise LogError(f"{path} is not JSON text ({error})") from error


def read_config(run_dir) -> dict:
    """The flags the run was started with (OUTPUT_DIR/run.json, written by the trainers), or {}; LogError if
    that file is there but not a JSON object."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise LogError(f"{path} holds a JSON {type(config).__name__}, not the run's flags")
    return config


# Flags that differ between runs without changing what is trained: never named as a difference between runs.
BOOKKEEPING = {"output_dir", "run_name", "resume", "overwrite", "device", "cpu_threads", "dataloader_workers",
               "plot", "report_to", "config", "tracker_project"}
# Flags that put loss, accuracy and margin on another scale (scale_note): what the margin is measured against
# (§2), and what multiplies it inside the loss, −log σ(−(β/2)·λ(t)·Δ), and at which t (§3).
REFERENCE_RULE = ("method", "tau", "on_diverge")
LOSS_SCALE = ("beta", "no_reward_scale", "reward_scale_norm", "gamma")
EVAL_MARKERS = "DsP^vX<>"  # one per (baseline, reward column) of eval.py's summary.json


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (NaN-aware) over `window` steps."""
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = chunk.mean() if len(chunk) else np.nan
    return out


def smoothing_window(steps: int, smooth_steps: int | None = None) -> int:
    """--smooth's window: as given (1 = the raw values), or by default a 25th of the run's steps."""
    return smooth_steps if smooth_steps else max(1, steps // 25)


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


def bin_pairs(log, from_step: int = 0) -> np.ndarray:
    """The pairs each t-bin held over the records from `from_step` on: what bin_profile's values rest on."""
    total = np.zeros(NUM_BINS)
    for r in log:
        if r["step"] >= from_step and "bin_count" in r:
            total += np.asarray(r["bin_count"], dtype=float)
    return total


def binomial_interval(share, n, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's 95 % interval of a share measured on n pairs (NaN where n is 0). Wilson rather than share ± z·SE:
    a bin of a few pairs, all ranked right, still gets an interval of some width, and it stays inside [0, 1].
    Each (pair, t) drawn in a step counts as one trial, so the interval is of the sampling of pairs and t."""
    p, n = np.asarray(share, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return np.where(n > 0, centre - half, np.nan), np.where(n > 0, centre + half, np.nan)


# The held-out result: the log's heldout_* fields (--eval_every) and eval.py's summary.json


def heldout_rows(log) -> dict[str, np.ndarray]:
    """The log's held-out records (step 0 holds nothing else): step, win rate with its interval, the mean reward
    of the policy and of the base model on the same prompts and seeds."""
    rows = [r for r in log if isinstance(r.get("heldout_win_rate"), (int, float))]
    names = ("step", "heldout_win_rate", "heldout_win_low", "heldout_win_high", "heldout_reward", "heldout_base_reward")
    return {name: np.array([r[name] if isinstance(r.get(name), (int, float)) else np.nan for r in rows], dtype=float)
            for name in names}


def read_summary(path) -> tuple[str, list[tuple]]:
    """eval.py's summary.json: the model's label and its win rate over each baseline per reward column with the
    95 % bootstrap interval, as fractions: (model, [(baseline, column, rate, low, high)]); low and high are None
    where the summary has no interval. LogError if the file is not such a summary."""
    summary = read_json(path)
    try:
        intervals, points = summary.get("win_rate_intervals_percent", {}), []
        for baseline, row in summary["win_rates_percent"].items():
            for column, rate in row.items():
                if column == "Avg":  # the mean of the columns' rates, with no interval of its own
                    continue
                low, high = intervals.get(baseline, {}).get(column, (None, None))
                points.append((baseline, column, rate / 100, None if low is None else low / 100,
                               None if high is None else high / 100))
        return str(summary.get("model", "model")), points
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise LogError(f"{path} is not a summary.json written by eval.py (no win rates)") from error


def run_summary(run_dir) -> str | None:
    """The run folder's heldout/summary.json (the --tiny demo's eval.py comparison of final/), unless it is older
    than the log: then the run went on after it (--resume) and it compares an earlier model."""
    path, log = os.path.join(run_dir, "heldout", "summary.json"), os.path.join(run_dir, "log.jsonl")
    return path if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(log) else None


# What the compared runs differ in (run.json)


def shared_flags(configs: list[dict]) -> dict:
    """The flags that all runs of one configuration share (its seeds differ in --seed); {} without run.json."""
    configs = [c for c in configs if c]
    return {k: v for k, v in configs[0].items() if all(k in c and c[k] == v for c in configs[1:])} if configs else {}


def differing_flags(shared: dict[str, dict]) -> list[str]:
    """The flags in which the configurations (label → shared_flags) differ, in run.json's order. Left out: the
    bookkeeping flags, a flag that varies within a configuration (seeds), and one some run.json lacks (written
    by an older version) or a configuration without run.json."""
    known = [c for c in shared.values() if c]
    if len(known) < 2:
        return []
    return [k for k in known[0] if k not in BOOKKEEPING and all(k in c for c in known)
            and any(c[k] != known[0][k] for c in known)]


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def flags_line(shared: dict[str, dict], keys: list[str]) -> str:
    """'label: flag=value, …  |  label: …' for the differing flags `keys`."""
    return "  |  ".join(f"{label}: " + (", ".join(f"{k}={_value(c[k])}" for k in keys) if c else "no run.json")
                        for label, c in shared.items())


def scale_note(shared: dict[str, dict]) -> str | None:
    """One line where the runs' loss, accuracy and margin are not on one scale, saying why; None where they are."""
    different = differing_flags(shared)
    rule, scale = [k for k in REFERENCE_RULE if k in different], [k for k in LOSS_SCALE if k in different]
    if not rule and not scale:
        return None
    differ = lambda keys: f"{', '.join(keys)} differ{'s' if len(keys) == 1 else ''}"
    why = []
    if rule:
        why.append(f"{differ(rule)}: a reference re-copied every τ steps is a recent copy of the policy, so the margin "
                   "restarts near 0 after each update and the loss stays nearer log 2 (not a worse model)")
    if scale:
        why.append(f"{differ(scale)}: λ(t) multiplies β·Δ in the loss −log σ(−(β/2)·λ(t)·Δ)"
                   + (", γ changes which t are drawn" if "gamma" in scale else ""))
    return "Loss, accuracy, margin not comparable across these runs: " + "; ".join(why) + "."


def smoothing_text(windows: dict[str, int]) -> str:
    """What the smoothed panels show, for the figure's title."""
    what = "loss, accuracy, margin, gradient norm"
    if set(windows.values()) <= {1}:
        return f"{what}: raw values, one per step"
    if len(set(windows.values())) == 1:
        return f"{what}: trailing mean over {next(iter(windows.values()))} steps (--smooth)"
    return f"{what}: trailing mean over " + ", ".join(f"{w} steps ({label})" for label, w in windows.items())


# The figure


def _band(ax, x, ys, colour, label, marker=None):
    """Mean of the runs, and their min–max band when there are several; returns the mean."""
    ys = np.asarray(ys, dtype=float)
    with warnings.catch_warnings():  # a bin no run sampled stays empty (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
        ax.plot(x, mean, color=colour, label=label, marker=marker, ms=3)
        if len(ys) > 1:
            ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=colour, alpha=0.15)
    return mean


def _aligned(logs, name, window=1):
    """The runs' series of `name` on their common steps (runs of one configuration log the same steps)."""
    pairs = [series(log, name) for log in logs]
    if not all(len(x) for x, _ in pairs):
        return None, None
    n = min(len(x) for x, _ in pairs)
    return pairs[0][0][:n], [smooth(y[:n], window) for _, y in pairs]


def _heldout_panels(win_ax, reward_ax, label, colour, runs, summaries, x_span, several):
    """One configuration's held-out result: per run the log's win rate (band: its 95 % interval) and mean
    rewards; eval.py's win rates per baseline and reward column at the run's last step. Returns the reward
    names and prompt counts it drew."""
    names, prompts, first = set(), set(), True
    for _, log in runs:
        rows = heldout_rows(log)
        if len(rows["step"]):
            x = rows["step"]
            win_ax.plot(x, rows["heldout_win_rate"], "o-", color=colour, ms=3,
                        label=f"{label}: win rate over the base (band: 95 % interval)" if first else "_")
            win_ax.fill_between(x, rows["heldout_win_low"], rows["heldout_win_high"], color=colour, alpha=0.15)
            reward_ax.plot(x, rows["heldout_reward"], "o-", color=colour, ms=3, label=f"{label}: policy" if first else "_")
            reward_ax.plot(x, rows["heldout_base_reward"], "--", color=colour,
                           label=f"{label}: base model, same prompts and seeds" if first else "_")
            names.update(str(r["heldout_reward_name"]) for r in log if "heldout_reward_name" in r)
            prompts.update(r["heldout_prompts"] for r in log if "heldout_prompts" in r)
            first = False
    for path, last in summaries:
        model, points = read_summary(path)
        for k, (baseline, column, rate, low, high) in enumerate(points):
            x = last + (k - (len(points) - 1) / 2) * 0.012 * x_span  # side by side, not on top of each other
            yerr = None if low is None else [[rate - low], [high - rate]]
            win_ax.errorbar([x], [rate], yerr=yerr, fmt=EVAL_MARKERS[k % len(EVAL_MARKERS)], color=colour, mec="k",
                            ms=6, capsize=3, label=f"{label + ': ' if several else ''}eval.py at the end: {model} vs "
                                                   f"{baseline}, {column} (95 % interval)")
    return names, prompts


def figure(groups: dict[str, list[str]], title: str | None = None, smooth_steps: int | None = None,
           heldout: dict[str, str] | None = None):
    """The figure of `groups` (label → run folders, several = seeds of one configuration): 3 × 4 panels (the
    module's docstring). smooth_steps: --smooth; heldout: label → an eval.py summary.json drawn at that
    configuration's last step instead of its run folders' heldout/summary.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs_of = {label: [(run, log) for run in runs if (log := read_log(run))] for label, runs in groups.items()}
    x_span = max([max(r["step"] for r in log) for runs in runs_of.values() for _, log in runs] + [1])
    fig, axes = plt.subplots(3, 4, figsize=(18, 12))
    (loss_ax, acc_ax, margin_ax, monitor), (win_ax, reward_ax, grad_ax, lr_ax), bin_axes = axes
    deltas, ceilings, highest_of_all = [], [], 0.0  # the δ lines drawn, the highest D of their runs, of all runs
    windows, shared, names, prompts, monitor_keys, group_handles = {}, {}, set(), set(), [], []
    for group_index, ((label, runs), colour) in enumerate(zip(runs_of.items(), COLOURS)):
        shared[label] = shared_flags([read_config(run) for run in groups[label]])
        if not runs:
            continue
        logs = [log for _, log in runs]
        steps = max(len(series(log, "loss")[0]) for log in logs)  # a step-0 held-out record has no loss
        window = windows[label] = smoothing_window(steps, smooth_steps)
        for ax, name in zip((loss_ax, acc_ax, margin_ax, grad_ax), ("loss", "accuracy", "reward_margin", "grad_norm")):
            x, ys = _aligned(logs, name, window)
            if x is not None:
                _band(ax, x, ys, colour, label)
        x, ys = _aligned(logs, "lr")  # never smoothed: it is what the schedule set
        if x is not None:
            _band(lr_ax, x, ys, colour, label)
        highest = 0.0
        for name, style in (("divergence", "o-"), ("policy_divergence", "s-"), ("ref_distance", "^--")):
            x, ys = _aligned(logs, name)
            if x is not None:  # the legend says in words which marker is which quantity
                _band(monitor, x, ys, colour, "_", marker=style[0])
                monitor.lines[-1].set_linestyle(style[1:])
                highest = max(highest, float(np.nanmax(ys)))
                monitor_keys.append(name)
        highest_of_all = max(highest_of_all, highest)
        for log in logs:
            frozen = next((r["step"] for r in log if r.get("ref_frozen")), None)
            if frozen:
                monitor.axvline(frozen, color=colour, ls=":", lw=1)
                monitor_keys.append("frozen")
        config = read_config(groups[label][0])
        delta, tau = config.get("delta"), config.get("tau")
        watched = config.get("on_diverge", "freeze") != "ignore"
        if watched and delta is not None and tau and math.isfinite(delta) and delta < 1e6:
            monitor.axhline(delta, color=colour, ls="--", lw=0.8)
            deltas.append(delta)
            ceilings.append(highest)
            monitor_keys.append("delta")
        group_handles.append(Line2D([], [], color=colour, label=label))
        last = {run: max(r["step"] for r in log) for run, log in runs}
        summaries = ([(heldout[label], max(last.values()))] if heldout and label in heldout else
                     [(path, last[run]) for run, _ in runs if (path := run_summary(run))])
        found = _heldout_panels(win_ax, reward_ax, label, colour, runs, summaries, x_span, len(groups) > 1)
        names, prompts = names | found[0], prompts | found[1]
        centres = (np.arange(NUM_BINS) + 0.5) * 1000 / NUM_BINS
        half = max(series(log, "loss")[0].max(initial=0) for log in logs) // 2
        for ax, name in zip(bin_axes, ("bin_accuracy", "bin_reward_magnitude", "bin_model_err", "bin_reward_scale")):
            mean = _band(ax, centres, [bin_profile(log, name, half) for log in logs], colour, label, marker="o")
            if name == "bin_accuracy":  # the pairs each point rests on: its interval, and the count by it
                n = sum(bin_pairs(log, half) for log in logs)
                low, high = binomial_interval(mean, n)
                ax.errorbar(centres, mean, yerr=[mean - low, high - mean], fmt="none", ecolor=colour, capsize=2, lw=0.8)
                for c, m, count in zip(centres, mean, n):
                    if np.isfinite(m):
                        ax.annotate(f"{count:.0f}", (c, m), xytext=(0, -10 - 7 * group_index),
                                    textcoords="offset points", ha="center", fontsize=6, color=colour)
    if deltas and highest_of_all > 4 * max(max(deltas), *ceilings):
        top = 4 * max(max(deltas), *ceilings)  # a run without the monitor would flatten the others
        monitor.set_ylim(-0.05 * top, top)
    tag = " (raw)" if set(windows.values()) <= {1} else " (trailing mean)"
    reward = ", ".join(sorted(names)) or "reward"
    held = f" ({reward}; {', '.join(map(str, sorted(prompts)))} prompts)" if prompts else f" ({reward})"
    titles = [("loss" + tag, "step"), ("implicit accuracy" + tag, "step"),
              ("implicit reward margin r(w) − r(l)" + tag, "step"), ("monitor (§2): D and δ of the reference", "step"),
              ("held-out win rate over the base model" + held, "step"), (f"held-out mean {reward}: policy vs base", "step"),
              ("gradient norm, before clipping" + tag, "step"), ("learning rate", "step"),
              ("implicit accuracy per t-bin (2nd half)\nbars: 95 % binomial interval from the n pairs written below",
               "t"), ("reward magnitude |r(w) − r(l)| per t-bin", "t"), ("policy error e_θ per t-bin", "t"),
              ("λ(t) per t-bin (mean of the pairs')", "t")]
    for ax, (name, xlabel) in zip(axes.flat, titles):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        if ax is not monitor and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    words = {"divergence": ("o", "-", "D(ref, init) at each reference update"),
             "policy_divergence": ("s", "-", "D(policy, init), every --divergence_every steps"),
             "ref_distance": ("^", "--", "output distance ‖ε_ref − ε_init‖² at each update"),
             "delta": ("", "--", "δ, the threshold D must stay under"),
             "frozen": ("", ":", "the step the reference froze (D > δ)")}
    monitor.legend(handles=group_handles + [Line2D([], [], color="k", marker=m, ls=ls, ms=4, label=text)
                                            for key, (m, ls, text) in words.items() if key in monitor_keys],
                   fontsize=6)
    acc_ax.axhline(0.5, color="k", lw=0.5, ls=":")
    bin_axes[0].axhline(0.5, color="k", lw=0.5, ls=":")
    if win_ax.has_data():
        win_ax.axhline(0.5, color="k", lw=0.8, ls=":", label="50 %: better than the base as often as worse")
        win_ax.set_ylim(-0.02, 1.02)
        win_ax.legend(fontsize=6)
    else:
        for ax in (win_ax, reward_ax):
            ax.text(0.5, 0.5, "no held-out result in these runs: train with\n--eval_every N, or run eval.py into "
                    "OUTPUT_DIR/heldout (or --heldout)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    keys = differing_flags(shared)
    lines = [title or " vs ".join(groups), smoothing_text(windows)]
    if keys:
        # wrapped: with several configurations the line runs past the figure's edges
        lines += textwrap.wrap("runs differ in " + ", ".join(keys) + ":  " + flags_line(shared, keys), 190)
    fig.suptitle("\n".join(lines), fontsize=10)
    note = scale_note(shared)
    if note:
        fig.text(0.5, 0.004, note, ha="center", va="bottom", fontsize=6.5, color="darkred", wrap=True,
                 gid="scale_note")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    return fig


def draw(groups: dict[str, list[str]], out: str, title: str | None = None, smooth_steps: int | None = None,
         heldout: dict[str, str] | None = None) -> str:
    """Draw the panels for `groups` (label → run folders, several = seeds of one configuration) into `out`."""
    import matplotlib.pyplot as plt

    fig = figure(groups, title, smooth_steps, heldout)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=90)
    finally:
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


def parse_heldout(specs: list[str], groups: dict[str, list[str]]) -> dict[str, str]:
    """--heldout '[LABEL=]PATH' → {label: summary.json}: PATH is eval.py's summary.json or its --output_dir, LABEL
    the configuration it evaluated (not needed with one on the figure); else one `error:` line."""
    chosen = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not (sep and label in groups):
            if len(groups) > 1:
                raise UsageError(f"--heldout {spec}: several runs on the figure; say whose result it is as "
                                 f"LABEL=PATH (labels: {', '.join(groups)})")
            label, path = next(iter(groups)), spec
        if os.path.isdir(path):
            path = os.path.join(path, "summary.json")
        if not os.path.isfile(path):
            raise UsageError(f"--heldout {spec}: {path} not found (eval.py's summary.json, or its --output_dir)")
        try:
            read_summary(path)
        except LogError as error:
            raise UsageError(f"--heldout {spec}: {error}")
        chosen[label] = path
    return chosen


def draw_runs(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (--output_dir), as DIR or LABEL=DIR[,DIR...]")
    p.add_argument("--out", default=None, help="PNG to write (default: curves.png in the only run's folder)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--smooth", type=int, default=None, metavar="N",
                   help="trailing mean over N steps of loss, accuracy, margin and gradient norm; 1 = the raw values "
                        "(default: a 25th of the run's steps)")
    p.add_argument("--heldout", action="append", default=[], metavar="[LABEL=]PATH",
                   help="eval.py's summary.json (or its --output_dir) to draw at the run's last step, in place of "
                        "the run folder's heldout/summary.json; LABEL= says whose, with several runs (repeatable)")
    args = p.parse_args(argv)
    if args.smooth is not None and args.smooth < 1:
        raise UsageError(f"--smooth {args.smooth}: the window is at least 1 step (1 = the raw values)")
    groups = parse_groups(args.runs)
    heldout = parse_heldout(args.heldout, groups)
    single = len(groups) == 1 and len(next(iter(groups.values()))) == 1
    if args.out is None and not single:
        print("error: several runs: say where the figure goes with --out", file=sys.stderr)
        raise SystemExit(2)
    out = args.out or os.path.join(next(iter(groups.values()))[0], "curves.png")
    check_out(out)
    try:
        draw(groups, out, args.title, smooth_steps=args.smooth, heldout=heldout)
    except LogError as error:  # a run folder's heldout/summary.json that is not eval.py's
        raise UsageError(str(error))
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
