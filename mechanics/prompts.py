"""The prompt sets an evaluation samples: the paper's three (Pick-a-Pic v2 test_unique, PartiPrompts, the HPSv2
benchmark) from the hub, or a text file with one prompt per line. A prompt's index in its whole set is its key,
so images made for the first N prompts are reused by a later run over more of them."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mechanics import folder
from mechanics.errors import UsageError
from mechanics.loading import OFFLINE_HINT, go_offline_unless_reachable, read_json

# Prompt sets: (description, default number of seeds per prompt).
PROMPT_SETS = {
    "pickapic": ("Pick-a-Pic v2 test_unique (500 prompts)", 5),
    "parti": ("PartiPrompts (1,632 prompts)", 1),
    "hpsv2": ("HPSv2 benchmark (anime, concept-art, paintings, photo: 4 x 800 prompts)", 1),
}
FILE_SET_SEEDS = 1
# The captions of Pick-a-Pic v2 without its images (the full dataset is ~335 GB; its test_unique split has
# the same 500 captions). A mirror or local copy (a folder load_dataset reads) can be given instead.
PICKAPIC_DATASET = "yuvalkirstain/pickapic_v2_no_images"
PARTI_DATASET = "nateraw/parti-prompts"
HPSV2_BENCHMARK = ("zhwang/HPDv2", ("anime", "concept-art", "paintings", "photo"))


@dataclass
class PromptSet:
    name: str                # "pickapic", "parti", "hpsv2" or "file:<name>"
    description: str
    prompts: list[str]       # the whole set; a prompt's index in this list is its key
    groups: list[str] | None = None  # HPSv2 style of each prompt
    default_seeds: int = 1


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line, UTF-8; blank lines are skipped. An empty or unreadable file is an error."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--prompts {path} is a folder, not a text file with one prompt per line")
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the prompt file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UsageError(f"prompt file {path} is not UTF-8 text (line {line}, byte {exc.start}); "
                         f"save it as UTF-8, one prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file is empty: {path}")
    return prompts


def load_prompt_set(spec: str, pickapic_dataset: str = PICKAPIC_DATASET, cache_dir: Path | None = None) -> PromptSet:
    """A prompt set by name (pickapic, parti, hpsv2; toy: the toy world's held-out prompts) or a text file path.

    Hub sets are loaded with datasets / huggingface_hub and saved to cache_dir/prompts.json, so that
    a rerun in the same output folder (resume, re-scoring) needs no network."""
    if spec == "toy":  # the toy world's held-out prompts: never used to make training pairs (offline/toy.py)
        from offline import toy
        return PromptSet("toy", f"the toy world's held-out prompts ({len(toy.EVAL_PROMPTS)})", list(toy.EVAL_PROMPTS),
                         None, FILE_SET_SEEDS)
    if spec not in PROMPT_SETS:
        if os.path.isfile(spec) or os.path.isdir(spec):
            prompts = read_prompt_file(spec)
            description = f"{spec} ({len(prompts)} prompts)"
            return PromptSet(f"file:{Path(spec).name}", description, prompts, None, FILE_SET_SEEDS)
        if os.sep in spec or "." in spec:
            raise UsageError(f"prompt file not found: {spec}")
        raise UsageError(f"unknown prompt set {spec!r}; use one of {', '.join(PROMPT_SETS)}, toy or a text file")
    description, seeds = PROMPT_SETS[spec]
    cached = cache_dir / "prompts.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            data = read_json(cached, "the prompt set saved by an earlier run")
            if data.get("name") == spec:
                return PromptSet(spec, description, _prompt_list(data), data.get("groups"), seeds)
        except UsageError as exc:  # damaged: loaded again from the hub, which rewrites it
            print(f"note: ignoring {cached} ({exc})", file=sys.stderr)
    loader = {"pickapic": lambda: _load_pickapic(pickapic_dataset), "parti": _load_parti, "hpsv2": _load_hpsv2}[spec]
    online = go_offline_unless_reachable()
    try:
        prompts, groups = loader()
    except UsageError:
        raise
    except Exception as exc:  # datasets / hub errors vary by version; the message is what matters
        why = "the hub is offline and it is not in the local cache" if not online else f"{type(exc).__name__}: {exc}"
        raise UsageError(f"cannot load prompt set {spec!r} ({why}); pass a text file with one prompt per line "
                         f"instead, or {OFFLINE_HINT}") from exc
    if not prompts:
        raise UsageError(f"prompt set {spec!r} loaded empty")
    if cached is not None:
        text = json.dumps({"name": spec, "prompts": prompts, "groups": groups}, indent=1)
        folder.write_text(str(cached), text, then=folder.RERUN)
    return PromptSet(spec, description, prompts, groups, seeds)


def _prompt_list(data: dict) -> list[str]:
    prompts, groups = data.get("prompts"), data.get("groups")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts) or \
            (groups is not None and (not isinstance(groups, list) or len(groups) != len(prompts))):
        raise UsageError("no list of prompts (with one group per prompt, if any) in it")
    return prompts


def _load_pickapic(dataset: str) -> tuple[list[str], None]:
    from datasets import load_dataset

    if go_offline_unless_reachable() and not os.path.exists(dataset):
        # Streaming reads only this split's captions instead of preparing every split of the dataset.
        rows = load_dataset(dataset, split="test_unique", streaming=True)
    else:
        rows = load_dataset(dataset, split="test_unique")
    prompts = list(dict.fromkeys(str(row["caption"]).strip() for row in rows))  # unique, in order
    if len(prompts) != 500:
        print(f"note: {dataset} test_unique has {len(prompts)} unique captions (the paper's set has 500)",
              file=sys.stderr)
    return prompts, None


def _load_parti() -> tuple[list[str], None]:
    from datasets import load_dataset

    rows = load_dataset(PARTI_DATASET, split="train")
    return [str(p).strip() for p in rows["Prompt"]], None


def _load_hpsv2() -> tuple[list[str], list[str]]:
    from huggingface_hub import hf_hub_download

    repo, styles = HPSV2_BENCHMARK
    prompts, groups = [], []
    for style in styles:
        path = hf_hub_download(repo, f"benchmark/{style}.json", repo_type="dataset",
                               local_files_only=not go_offline_unless_reachable())
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        prompts += [str(p).strip() for p in items]
        groups += [style] * len(items)
    return prompts, groups


def select_prompts(prompt_set: PromptSet, limit: int | None) -> list[int]:
    """Indices to evaluate: all, or the first `limit` (of each HPSv2 style). Indices stay those of the
    whole set, so images made with --limit are reused by a later full run."""
    n = len(prompt_set.prompts)
    if limit is None:
        return list(range(n))
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if prompt_set.groups is None:
        return list(range(min(limit, n)))
    seen: dict[str, int] = {}
    chosen = []
    for i, group in enumerate(prompt_set.groups):
        if seen.get(group, 0) < limit:
            seen[group] = seen.get(group, 0) + 1
            chosen.append(i)
    return chosen
