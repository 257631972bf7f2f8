"""The comparison of the paper's evaluation (PAPER.md §6): the same-seed win rate of one model over another and its
bootstrap interval; eval.py's tables and the trainers' --eval_every use the same two functions."""
from __future__ import annotations

import math
from typing import Mapping


def win_rate(scores_a: Mapping, scores_b: Mapping) -> float:
    """Share of keys (prompt index, seed) where A's score beats B's; ties count 1/2. Returns a fraction.

    The two tables must hold exactly the same keys: an image without its same-seed partner is an error,
    never silently dropped (dropping would bias the rate toward whichever images happened to exist)."""
    if not isinstance(scores_a, Mapping) or not isinstance(scores_b, Mapping):
        raise TypeError("win_rate takes two mappings {(prompt_idx, seed): score}, so that images pair by key")
    only_a, only_b = set(scores_a) - set(scores_b), set(scores_b) - set(scores_a)
    if only_a or only_b:
        missing = sorted(only_a)[:3] + sorted(only_b)[:3]
        raise ValueError(
            f"same-seed pairing broken: {len(only_a)} keys only in A, {len(only_b)} only in B (e.g. {missing})"
        )
    if not scores_a:
        raise ValueError("win_rate of two empty score tables")
    total = 0.0
    for key, a in scores_a.items():
        b = scores_b[key]
        if math.isnan(a) or math.isnan(b):
            raise ValueError(f"NaN score at {key}")
        total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / len(scores_a)


def win_rate_interval(scores_a: Mapping, scores_b: Mapping, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """A `level` bootstrap interval of win_rate(scores_a, scores_b), resampling prompts (with all their seeds):
    the images of one prompt are not independent, so the prompt is the unit. A fraction pair (low, high)."""
    import numpy as np

    by_prompt: dict = {}
    for key, a in scores_a.items():
        b = scores_b[key]
        by_prompt.setdefault(key[0], []).append(1.0 if a > b else 0.5 if a == b else 0.0)
    sums = np.array([sum(v) for v in by_prompt.values()])
    counts = np.array([len(v) for v in by_prompt.values()])
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    rates = sums[picks].sum(1) / counts[picks].sum(1)
    tail = (1 - level) / 2
    return float(np.quantile(rates, tail)), float(np.quantile(rates, 1 - tail))
