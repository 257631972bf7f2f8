"""Preference pairs for Diffusion-DPO (PAPER.md §1): preference data → batches of [winners; losers].

A Pick-a-Pic v2 row holds `caption, jpg_0, jpg_1, label_0, label_1` (jpg_* are encoded image bytes).
§1: a row with label_0 == 0.5 is a tie and is dropped; label_0 == 0 means the second image won. Every
pair is put winner first, and a batch is `pixel_values = [x_w(1..B); x_l(1..B)]` so the trainer can run
policy and reference on one 2B batch and split the per-sample errors in halves.

Other layouts are detected from their columns and normalised to these columns (`FORMATS`, `_normalise`):
TRL's `prompt, chosen, rejected` (images as bytes, `datasets` Image structs or file paths; also the
open-image-preferences layout), a folder of chosen/ and rejected/ images (`folder_pairs`), HPDv2's train.json
(`hpdv2_pairs`), and any table whose columns `load_pairs`' caption/chosen/rejected/label_column name. Labels may
be vote shares in [0, 1]: the image with p > 0.5 wins, and |p - 0.5| <= tie_margin is a tie.

    pairs  = load_pairs(DEFAULT_DATASET, streaming=True)        # or a local file / folder, see load_pairs
    loader = PairLoader(pairs, PairTransform(512), batch_size=1, rank=r, world_size=w, num_workers=4)
    for batch in loader: ...                                     # forever; loader.state_dict() to resume

Fatal problems (an unknown layout, no pairs left, an unreachable hub) raise `DataError` with a one-line
message; a bad row (undecodable image, label outside [0, 1]) is skipped, counted and logged, so a run
neither crashes on one bad row nor trains silently on wrong data. This module does not import diffusers.
"""
from __future__ import annotations

import inspect
import io
import json
import logging
import os
from typing import Any, Iterator

import datasets
import datasets.distributed
import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Pick-a-Pic v2 was published as `yuvalkirstain/pickapic_v2`; that hub repository was removed in 2025 (it
# answers 404/401: PickScore issue #36, SalesforceAIResearch/DiffusionDPO issue #22). `liuhuohuo2/pick-a-pic-v2`
# is a public full copy in the same parquet row format (caption, jpg_0, jpg_1, label_0, label_1, ...; ~335 GB,
# 1,001,352 rows over train / validation / test) that follow-up works load by this id.
DEFAULT_DATASET = "liuhuohuo2/pick-a-pic-v2"
ORIGINAL_DATASET = "yuvalkirstain/pickapic_v2"
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
_LABELS = ("label_0", "label_1")


class DataError(Exception):
    """A fatal data problem; the message is one line. Trainers print `error: <message>` and exit with code 2."""


class Interrupted(Exception):
    """A stop was requested (a signal) while the loader was still looking for a decodable pair."""


# A bad row is reported this many times one by one, then once every WARN_EVERY rows: a dataset of bad
# images must not fill the disk with warnings.
WARN_FIRST, WARN_EVERY = 5, 1000
_warned: dict[str, int] = {}


def _warn(kind: str, message: str, *args) -> None:
    count = _warned[kind] = _warned.get(kind, 0) + 1
    if count <= WARN_FIRST or count % WARN_EVERY == 0:
        more = f" ({count} so far; further ones are counted, one warning every {WARN_EVERY})" if count >= WARN_FIRST else ""
        logger.warning(message + more, *args)


# Loading


def load_pairs(source: Any = DEFAULT_DATASET, split: str = "train", streaming: bool = False,
               max_samples: int | None = None, cache_dir: str | None = None, *, caption_column: str | None = None,
               chosen_column: str | None = None, rejected_column: str | None = None,
               label_column: str | None = None, tie_margin: float = 0.0) -> "PairDataset | PairStream":
    """Open preference data in any of the layouts of FORMATS and return a `PairDataset` (map-style) or a
    `PairStream`; which layout was found is logged (info) as the run's data line.

    source: a hub dataset id, a local parquet / csv / json(l) / arrow file, a local folder (parquet files, split
    inferred from the file names as on the hub; a `save_to_disk` folder; a folder of chosen/ and rejected/
    images; or a folder holding HPDv2's `{split}.json`), HPDv2's train.json itself, or a `datasets.Dataset` /
    `IterableDataset` object. A string is a local path if it exists. streaming=True reads rows lazily (hub or
    local files), so training starts without the full ~335 GB download of Pick-a-Pic. max_samples keeps only the
    first N rows of the split (before ties are dropped; for HPDv2, the first N pairs it gives). The layout is
    detected from the columns; caption_column, chosen_column, rejected_column and label_column map the columns
    of any other table (label_column: image A's preference in [0, 1], as Pick-a-Pic's label_0; then chosen and
    rejected are images A and B). tie_margin: a pair whose preference p has |p - 0.5| <= tie_margin is a tie
    and is dropped (0: only p = 0.5, Pick-a-Pic's ties). Images given as relative file paths are found under the
    local file's folder (a folder source: that folder; a hub id or an object: the working directory). In
    map-style mode the labels (only those: no image is decoded) are checked at once: ties dropped, bad labels
    skipped and counted.
    """
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"max_samples must be positive, got {max_samples}")
    if not 0.0 <= tie_margin < 0.5:
        raise DataError(f"tie_margin must be in [0, 0.5), got {tie_margin}")
    name = source if isinstance(source, str) else type(source).__name__
    name = f"{name} [{split}]"
    given = {"caption": caption_column, "chosen": chosen_column, "rejected": rejected_column, "label": label_column}
    hf, root, built = _open(source, split, streaming, cache_dir)
    if built is not None and any(given.values()):
        flags = " ".join(f"--{role}_column {col}" for role, col in given.items() if col)
        raise DataError(f"{name} is {built}, whose columns are fixed: drop {flags} (they map the columns of a "
                        "table: parquet, csv, json lines)")
    if streaming and isinstance(hf, datasets.Dataset):
        hf = hf.to_iterable_dataset()
    streaming = isinstance(hf, datasets.IterableDataset)
    hf, labels, description = _normalise(hf, name, given, built)
    logger.info("%s: %s", name, description)
    if tie_margin > 0 and not labels:
        logger.warning("%s: tie_margin %g has no effect: these pairs have no labels (the chosen image wins)",
                       name, tie_margin)
    if max_samples is not None:
        hf = hf.take(max_samples) if streaming else hf.select(range(min(max_samples, len(hf))))
    if streaming:
        return PairStream(hf, name=name, labels=labels, tie_margin=tie_margin, image_root=root)
    return PairDataset(hf, name=name, labels=labels, tie_margin=tie_margin, image_root=root)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# The builders `datasets` reads a local file with, by the file's ending (anything else: parquet, as before).
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def _open(source, split, streaming, cache_dir):
    """Source → (a `datasets.Dataset` or `datasets.IterableDataset` for `split`, the folder that relative image
    paths are resolved against (None: the working directory), and for a source this module built into
    Pick-a-Pic's columns itself, its description (a folder of chosen/ and rejected/ images, HPDv2's json),
    else None)."""
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise DataError(f"split '{split}' not found; splits: {', '.join(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return (source.to_iterable_dataset() if streaming else source), None, None
    if isinstance(source, datasets.IterableDataset):
        return source, None, None
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"unsupported data source of type {type(source).__name__}")
    source = os.path.expanduser(os.fspath(source))
    if not os.path.exists(source) and (source.startswith((".", "/", "~")) or
                                       source.endswith(tuple(_FILE_BUILDERS))):
        raise DataError(f"no such file or folder: {source}")  # a path, not a hub id: don't ask the hub
    try:
        if os.path.isfile(source):
            root = os.path.dirname(os.path.abspath(source))
            if _is_hpdv2(source):
                return hpdv2_pairs(source), root, "HPDv2's json (prompt, image_path, human_preference)"
            builder = _FILE_BUILDERS.get(os.path.splitext(source)[1].lower(), "parquet")
            return datasets.load_dataset(builder, data_files={split: source}, split=split, streaming=streaming,
                                         cache_dir=cache_dir), root, None
        if os.path.isdir(source):
            root = os.path.abspath(source)
            spelling = _folder_spelling(source)
            if spelling is not None:
                return folder_pairs(source), root, \
                    f"a folder of {spelling[0]}/ and {spelling[1]}/ images paired by file stem"
            hpd = os.path.join(source, f"{split}.json")
            if os.path.isfile(hpd) and _is_hpdv2(hpd):
                return hpdv2_pairs(hpd), root, "HPDv2's json (prompt, image_path, human_preference)"
            if os.path.exists(os.path.join(source, "dataset_dict.json")) or \
                    os.path.exists(os.path.join(source, "state.json")):
                ds, _, _ = _open(datasets.load_from_disk(source), split, streaming, cache_dir)
                return ds, root, None
            return datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir), root, None
    except DataError:
        raise
    except Exception as err:  # one line, never a traceback, for a bad local source (PAPER.md: fail clearly)
        raise DataError(f"cannot read local dataset '{source}' (split '{split}'): {_first_line(err)}") from err
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir), None, None
    except Exception as err:
        raise DataError(
            f"cannot load dataset '{source}' (split '{split}'): it is not a local file or folder and the hub "
            f"failed ({_first_line(err)}); download it (e.g. `hf download {source} --repo-type dataset`) and "
            f"pass the local folder, or use the built-in pairs offline (offline/tiny.py, builtin_pairs)") from err


# Layouts. Every one is normalised to Pick-a-Pic's columns — caption, jpg_0, jpg_1 and the labels label_0
# (image 0's preference) and label_1 — by selecting and renaming columns (no row is copied), so that
# PairDataset, PairStream, PairLoader and the latent cache read every layout by one code path. A layout
# without labels has none: the chosen image (jpg_0) wins every pair; with label_0 alone, label_1 = 1 - label_0.
FORMATS = {  # name → (columns that identify it, role → column, description)
    "Pick-a-Pic": (REQUIRED_COLUMNS,
                   {"caption": "caption", "chosen": "jpg_0", "rejected": "jpg_1", "label": "label_0",
                    "label_1": "label_1"},
                   "Pick-a-Pic rows (caption, jpg_0, jpg_1, label_0, label_1)"),
    "open-image-preferences": (("prompt", "chosen", "rejected", "chosen_model", "rejected_model"),
                               {"caption": "prompt", "chosen": "chosen", "rejected": "rejected"},
                               "open-image-preferences pairs (prompt, chosen, rejected; chosen_model and "
                               "rejected_model ignored)"),
    "TRL": (("prompt", "chosen", "rejected"), {"caption": "prompt", "chosen": "chosen", "rejected": "rejected"},
            "TRL prompt/chosen/rejected pairs"),
}
_ROLE_COLUMN = {"caption": "caption", "chosen": "jpg_0", "rejected": "jpg_1", "label": "label_0",
                "label_1": "label_1"}


def _columns(hf) -> tuple[list[str], dict]:
    """(column names, features or {}) of a dataset; a stream whose features are unknown: from one row."""
    cols, features = hf.column_names, dict(hf.features or {})
    if cols is None:
        first = next(iter(hf), None)
        cols = list(first) if first is not None else []
    return list(cols), features


def _normalise(hf, name: str, given: dict, built: str | None):
    """hf in a detected (or flag-mapped) layout → (hf with Pick-a-Pic's columns, its label columns, the log's
    description of the layout); an unknown layout raises DataError with the flags that would map it."""
    cols, features = _columns(hf)
    if built is not None:
        roles = {role: col for role, col in _ROLE_COLUMN.items() if col in cols}
        description = built
    else:
        detected = next((key for key, (needed, _, _) in FORMATS.items() if all(c in cols for c in needed)), None)
        roles = dict(FORMATS[detected][1]) if detected else {}
        description = FORMATS[detected][2] if detected else "columns"
        if any(given.values()):
            if given["chosen"] or given["rejected"] or given["label"]:
                for role in ("label", "label_1"):  # images named by flags: labels only if named too
                    roles.pop(role, None)
            roles.update({role: col for role, col in given.items() if col})
            description = "columns mapped by flags: " + ", ".join(
                f"{role} = {roles[role]}" for role in ("caption", "chosen", "rejected", "label") if role in roles)
        missing = [role for role in ("caption", "chosen", "rejected") if role not in roles]
        unknown = [(role, col) for role, col in roles.items() if col not in cols]
        if missing or unknown:
            raise DataError(_layout_advice(hf, name, cols, features, given, unknown))
        if len({roles["caption"], roles["chosen"], roles["rejected"], roles.get("label")} - {None}) < \
                len([r for r in ("caption", "chosen", "rejected", "label") if r in roles]):
            raise DataError(f"{name}: the caption, chosen, rejected and label columns must be different columns "
                            f"(got {', '.join(f'{r} = {c}' for r, c in roles.items())})")
        if roles.get("label") and "label_1" not in roles:
            description += f" ({roles['label']} = {roles['chosen']}'s preference)"
    kind = _image_kind(features.get(roles["chosen"])) if built is None else None
    description += f", images as {kind}" if kind else ""
    if "label" not in roles:
        description += "; the chosen image wins every pair"
    hf = hf.select_columns(list(roles.values()))
    renames = {col: _ROLE_COLUMN[role] for role, col in roles.items() if col != _ROLE_COLUMN[role]}
    if renames:
        if isinstance(hf, datasets.IterableDataset):  # a stream refuses a rename onto an existing name: two steps
            hf = hf.rename_columns({c: f"__pair_{t}" for c, t in renames.items()})
            hf = hf.rename_columns({f"__pair_{t}": t for t in renames.values()})
        else:
            hf = hf.rename_columns(renames)
    features = hf.features or {}
    for col in ("jpg_0", "jpg_1"):
        if isinstance(features.get(col), datasets.Image):  # an Image feature: keep the bytes (or the path)
            hf = hf.cast_column(col, datasets.Image(decode=False))
    labels = tuple(_ROLE_COLUMN[r] for r in ("label", "label_1") if r in roles)
    return hf, labels, description


def _image_kind(feature) -> str | None:
    """How a column stores its images, from its feature: for the log's line."""
    if isinstance(feature, datasets.Image):
        return "a datasets Image feature"
    if isinstance(feature, dict) and ("bytes" in feature or "path" in feature):
        return "Image structs {bytes, path}"
    if isinstance(feature, datasets.Value):
        if "binary" in feature.dtype:
            return "encoded bytes"
        if "string" in feature.dtype:
            return "file paths"
    return None


def _value_kind(feature, value) -> str:
    """'image', 'text', 'number' or '' for a column, from its feature or else from one value of it."""
    kind = _image_kind(feature)
    if kind is not None:
        return "text" if kind == "file paths" else "image"
    if isinstance(feature, datasets.Value):
        return "number" if feature.dtype.startswith(("float", "int", "uint")) else ""
    if isinstance(value, (bytes, bytearray, Image.Image)) or (isinstance(value, dict) and
                                                               ("bytes" in value or "path" in value)):
        return "image"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return ""


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _layout_advice(hf, name, cols, features, given, unknown) -> str:
    """The one line for a layout that is not recognised: the columns found, the flags that would map them
    (guessed from the columns' types and names), and the layouts that are read without flags."""
    if unknown:
        role, col = unknown[0]
        return (f"{name}: --{role}_column {col}: no such column; columns found: {', '.join(cols) or '(none)'}")
    try:
        first = next(iter(hf), None) or {}
    except Exception:  # the advice must not fail on a row it cannot read
        first = {}
    kinds = {c: _value_kind(features.get(c), first.get(c)) for c in cols}
    for c, v in first.items():  # text columns that hold file names of images are image columns
        if kinds.get(c) == "text" and isinstance(v, str) and v.lower().endswith(_IMAGE_EXTENSIONS):
            kinds[c] = "image"
    taken = {c for c in given.values() if c}
    def pick(kind, hints, n=1):
        pool = [c for c in cols if kinds[c] == kind and c not in taken]
        pool.sort(key=lambda c: not any(h in c.lower() for h in hints))  # stable: hinted names first
        return pool[:n]
    images = [given["chosen"]] if given["chosen"] else []
    images += [given["rejected"]] if given["rejected"] else []
    images += pick("image", ("img", "image", "jpg", "png", "chosen", "rejected", "win", "los"), 2 - len(images))
    caption = given["caption"] or next(iter(pick("text", ("caption", "prompt", "text"))), "CAPTION_COLUMN")
    label = given["label"] or next(iter(pick("number", ("label", "pref", "choice", "score", "vote"))), None)
    a, b = (images + ["IMAGE_A_COLUMN", "IMAGE_B_COLUMN"])[:2]
    near = ""
    for key, (needed, _, _) in FORMATS.items():
        have = [c for c in needed if c in cols]
        if len(have) >= 2 and len(have) < len(needed):
            near = f" ({key} rows also need {', '.join(c for c in needed if c not in cols)})"
            break
    flags = f"--caption_column {caption} --chosen_column {a} --rejected_column {b}"
    alternative = (f" (or, if {label} is {a}'s preference in [0, 1] as Pick-a-Pic's label_0, add --label_column "
                   f"{label})") if label else ""
    return (f"{name}: no known preference layout{near}; columns found: {', '.join(cols) or '(none)'}; map them "
            f"with {flags}{alternative}; read without flags: Pick-a-Pic (caption, jpg_0, jpg_1, label_0, label_1), "
            "TRL (prompt, chosen, rejected), a folder of chosen/ and rejected/ images, HPDv2's train.json")


def _folder_spelling(folder: str) -> tuple[str, str] | None:
    """The (winner, loser) sub-folder names of a folder of image pairs, or None."""
    return next((s for s in FOLDER_SPELLINGS if all(os.path.isdir(os.path.join(folder, d)) for d in s)), None)


FOLDER_SPELLINGS = (("chosen", "rejected"), ("w", "l"), ("win", "lose"))
CAPTION_KEYS = ("caption", "text", "prompt")


def folder_pairs(folder: str) -> datasets.Dataset:
    """A folder with chosen/ and rejected/ (or w/ and l/, win/ and lose/) sub-folders → a `datasets.Dataset`
    of Pick-a-Pic's columns caption, jpg_0 (the chosen image's path), jpg_1 as `Image(decode=False)`: pairs
    matched by file stem, in stem order. A pair's caption is STEM.txt beside the chosen image, else the
    `caption` (or `text`, `prompt`) of its `file_name` in a metadata.jsonl in the folder or in chosen/."""
    spelling = _folder_spelling(folder)
    if spelling is None:
        raise DataError(f"{folder} has no chosen/ and rejected/ sub-folders (nor w/ and l/, win/ and lose/)")
    sides = []
    for sub in spelling:
        by_stem: dict[str, str] = {}
        for entry in sorted(os.listdir(os.path.join(folder, sub))):
            stem, ext = os.path.splitext(entry)
            if ext.lower() not in _IMAGE_EXTENSIONS:
                continue
            if stem in by_stem:
                raise DataError(f"{folder}: {sub}/{os.path.basename(by_stem[stem])} and {sub}/{entry} share the stem "
                                f"'{stem}', and pairs are matched by stem: keep one")
            by_stem[stem] = os.path.join(os.path.abspath(folder), sub, entry)
        sides.append(by_stem)
    chosen, rejected = sides
    stems = sorted(set(chosen) & set(rejected))
    alone = len(chosen) + len(rejected) - 2 * len(stems)
    if alone:
        logger.warning("%s: %d image(s) without a partner of the same stem in the other sub-folder are left out",
                       folder, alone)
    if not stems:
        raise DataError(f"{folder}: no image in {spelling[0]}/ has a partner of the same file stem in {spelling[1]}/ "
                        f"({len(chosen)} and {len(rejected)} images)")
    meta = {}
    for path in (os.path.join(folder, "metadata.jsonl"), os.path.join(folder, spelling[0], "metadata.jsonl")):
        if os.path.isfile(path):
            meta.update(_read_metadata(path))
    captions, uncaptioned = [], 0
    for stem in stems:
        txt = os.path.splitext(chosen[stem])[0] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                captions.append(f.read().strip())
        elif stem in meta:
            captions.append(meta[stem])
        else:
            captions.append("")
            uncaptioned += 1
    if uncaptioned == len(stems):
        raise DataError(f"{folder}: no captions: put STEM.txt beside each image in {spelling[0]}/, or a "
                        "metadata.jsonl with lines {\"file_name\": \"STEM.png\", \"caption\": \"...\"} in the folder")
    if uncaptioned:
        logger.warning("%s: %d of %d pair(s) have no caption (no STEM.txt, not in metadata.jsonl): they train with "
                       "the empty prompt", folder, uncaptioned, len(stems))
    ds = datasets.Dataset.from_dict({"caption": captions, "jpg_0": [chosen[s] for s in stems],
                                     "jpg_1": [rejected[s] for s in stems]})
    return ds.cast_column("jpg_0", datasets.Image(decode=False)).cast_column("jpg_1", datasets.Image(decode=False))


def _read_metadata(path: str) -> dict[str, str]:
    """metadata.jsonl → {file stem: caption}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path} line {number} is not JSON ({err})") from None
            caption = next((entry[k] for k in CAPTION_KEYS if isinstance(entry, dict) and k in entry), None)
            if not isinstance(entry, dict) or "file_name" not in entry or caption is None:
                raise DataError(f"{path} line {number} needs \"file_name\" and one of \"caption\", \"text\", "
                                "\"prompt\"")
            out[os.path.splitext(os.path.basename(str(entry["file_name"])))[0]] = str(caption)
    return out


def _is_hpdv2(path: str) -> bool:
    """Whether a .json file is HPDv2's annotation list (a JSON list whose entries hold human_preference)."""
    if not path.lower().endswith(".json"):
        return False
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head.lstrip()[:1] == b"[" and b'"human_preference"' in head


def hpdv2_pairs(path: str) -> datasets.Dataset:
    """HPDv2's train.json (a JSON list of {"prompt", "image_path" or "file_path": [images], "human_preference":
    [1, 0, ...]}) → a `datasets.Dataset` of Pick-a-Pic's columns caption, jpg_0, jpg_1 (paths, as
    `Image(decode=False)`) and label_0 (1: jpg_0 preferred, 0: jpg_1, 0.5: a tie, NaN: an entry that cannot be
    read, a bad label). Images are found beside the json, or in its train/ sub-folder if that is where they are.

    [choice: an entry gives its preferred image against each other image, in the entry's order; HPDv2's
    training entries hold two images, so that is their one pair, and a ranked entry of k images keeps all of
    its annotation (k - 1 pairs sharing the winner) instead of its first pair only. Images the entry ranks as
    high as its preferred one give ties, which are dropped as Pick-a-Pic's.]
    """
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {_first_line(err)}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path} holds a JSON {type(entries).__name__}, not HPDv2's list of entries")
    folder = os.path.dirname(os.path.abspath(path))
    root, unreadable = None, 0
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}

    def add(caption, a, b, label):
        for key, value in zip(rows, (caption, a, b, label)):
            rows[key].append(value)

    for entry in entries:
        images = (entry.get("image_path") or entry.get("file_path")) if isinstance(entry, dict) else None
        prefs = entry.get("human_preference") if isinstance(entry, dict) else None
        caption = str(entry.get("prompt") or "") if isinstance(entry, dict) else ""
        try:
            prefs = [float(p) for p in prefs]
            ok = isinstance(images, list) and len(images) == len(prefs) >= 2 and np.isfinite(prefs).all()
        except (TypeError, ValueError):
            ok = False
        if not ok:
            add(caption, "", "", float("nan"))  # a bad label: counted, never decoded
            unreadable += 1
            continue
        if root is None:
            root = next((r for r in (folder, os.path.join(folder, "train"))
                         if os.path.exists(os.path.join(r, str(images[0])))), None)
            if root is None:
                raise DataError(f"{path}: its first image {images[0]} is neither in {folder} nor in "
                                f"{os.path.join(folder, 'train')}: put HPDv2's images beside the json or in its "
                                "train/ folder")
        top = int(np.argmax(prefs))
        for other in range(len(images)):
            if other == top:
                continue
            label = 0.5 if prefs[other] == prefs[top] else (1.0 if top < other else 0.0)
            a, b = sorted((top, other))
            add(caption, os.path.join(root, str(images[a])), os.path.join(root, str(images[b])), label)
    if not rows["caption"]:
        raise DataError(f"{path} holds no entries")
    if unreadable:
        logger.warning("%s: %d entry(ies) without two or more images and as many numbers in human_preference: "
                       "counted as bad labels", path, unreadable)
    ds = datasets.Dataset.from_dict(rows)
    return ds.cast_column("jpg_0", datasets.Image(decode=False)).cast_column("jpg_1", datasets.Image(decode=False))


def _label_values(values) -> np.ndarray:
    """Labels as float64; None or non-numbers become NaN (and so count as bad labels)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                pass
        return out


# Labels stored as float32 (0.6 → 0.6000000238) still meet the bounds: [0, 1], and a tie margin, hold within this.
LABEL_TOLERANCE = 1e-6


def _classify_labels(l0: np.ndarray, l1: np.ndarray | None = None,
                     tie_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(valid, tie) masks: valid iff label_0 (image 0's preference, or vote share) and label_1 (None: 1 - label_0)
    are in [0, 1] and sum to 1; tie iff valid and |label_0 - 0.5| <= tie_margin (0: Pick-a-Pic's label_0 == 0.5)."""
    if l1 is None:
        l1 = 1.0 - l0
    def inside(x):
        return (x >= -LABEL_TOLERANCE) & (x <= 1.0 + LABEL_TOLERANCE)
    valid = inside(l0) & inside(l1) & np.isclose(l0 + l1, 1.0)
    return valid, valid & (np.abs(l0 - 0.5) <= tie_margin + LABEL_TOLERANCE)


def _resolve(value, root: str | None):
    """An image that is a relative file path (a string, or an Image struct without bytes) → under `root`."""
    if root is None:
        return value
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(root, value)
    if isinstance(value, dict) and not value.get("bytes") and isinstance(value.get("path"), str) and \
            value["path"] and not os.path.isabs(value["path"]):
        return {**value, "path": os.path.join(root, value["path"])}
    return value


def _raw_pair(row: dict, winner_col: int, index: int, root: str | None = None) -> dict:
    """A row → {caption, jpg_w, jpg_l, winner_col, row}: winner first, images still encoded (or paths)."""
    caption = row["caption"]
    return {"caption": "" if caption is None else str(caption),
            "jpg_w": _resolve(row[f"jpg_{winner_col}"], root), "jpg_l": _resolve(row[f"jpg_{1 - winner_col}"], root),
            "winner_col": winner_col, "row": index}


class PairDataset:
    """Map-style preference pairs: index i → the raw (still encoded) pair, winner first.

    Built from the label columns alone: ties (|label_0 - 0.5| <= tie_margin) are dropped (§1) and rows with
    labels outside [0, 1] (or label_0 + label_1 != 1) are skipped and counted in `num_bad_labels`; without
    label columns every row is a pair that jpg_0 wins. `rows[i]` is pair i's row in the split.
    """

    def __init__(self, hf: datasets.Dataset, name: str = "dataset", labels: tuple[str, ...] | None = None,
                 tie_margin: float = 0.0, image_root: str | None = None):
        self.hf, self.name, self.image_root = hf, name, image_root
        self.labels = tuple(c for c in _LABELS if c in hf.column_names) if labels is None else tuple(labels)
        if self.labels:
            table = hf.select_columns(list(self.labels)).with_format("arrow")[:]  # the label columns only
            l0, *l1 = (_label_values(table.column(c).to_numpy(zero_copy_only=False)) for c in self.labels)
            valid, tie = _classify_labels(l0, l1[0] if l1 else None, tie_margin)
        else:
            l0 = np.ones(len(hf))
            valid, tie = np.ones(len(hf), np.bool_), np.zeros(len(hf), np.bool_)
        keep = valid & ~tie
        self.rows = np.nonzero(keep)[0].astype(np.int64)
        self.winner_is_0 = l0[self.rows] > 0.5
        self.num_rows, self.num_ties, self.num_bad_labels = len(l0), int(tie.sum()), int((~valid).sum())
        if self.num_bad_labels:
            bad = np.nonzero(~valid)[0]
            logger.warning("%s: skipped %d row(s) with labels outside [0, 1] or not summing to 1 "
                           "(rows %s%s)", name, self.num_bad_labels, ", ".join(map(str, bad[:10])),
                           ", ..." if len(bad) > 10 else "")
        if len(self.rows) == 0:
            raise DataError(f"no preference pairs in {name}: {self.num_rows} row(s), {self.num_ties} tie(s) "
                            f"dropped, {self.num_bad_labels} with bad labels")
        logger.info("%s: %d rows -> %d pairs (%d ties dropped, %d bad labels skipped)", name, self.num_rows,
                    len(self.rows), self.num_ties, self.num_bad_labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        return _raw_pair(self.hf[row], 0 if self.winner_is_0[i] else 1, row, self.image_root)


class PairStream:
    """Streamed preference rows (a `datasets.IterableDataset`): read lazily, labels checked as rows arrive."""

    def __init__(self, hf: datasets.IterableDataset, name: str = "stream", labels: tuple[str, ...] | None = None,
                 tie_margin: float = 0.0, image_root: str | None = None):
        self.hf, self.name, self.tie_margin, self.image_root = hf, name, tie_margin, image_root
        self.labels = _LABELS if labels is None else tuple(labels)

    def iter_rows(self, epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  buffer_size: int = 1000) -> Iterator[tuple[str, int, dict | None]]:
        """Yield (kind, position, pair) for this rank's rows of `epoch`: kind is "pair", "tie" or "bad".

        Shuffled with a seeded buffer (plus shard order; `set_epoch` varies both per epoch) and split across
        ranks with `datasets.distributed.split_dataset_by_node`. position counts this rank's rows in the epoch.
        """
        kwargs = {}
        if "max_buffer_input_shards" in inspect.signature(self.hf.shuffle).parameters:
            # datasets >= 5 feeds the buffer from up to 10 shards through threads and then sleeps 5 s at the end
            # of every pass (an Arrow shutdown workaround): pointless, and slow, for a single-file dataset
            kwargs["max_buffer_input_shards"] = max(1, min(10, self.hf.num_shards))
        hf = self.hf.shuffle(seed=seed, buffer_size=buffer_size, **kwargs)
        if world_size > 1:
            hf = datasets.distributed.split_dataset_by_node(hf, rank=rank, world_size=world_size)
        hf.set_epoch(epoch)
        for pos, row in enumerate(hf):
            if not self.labels:  # no labels: the chosen image (jpg_0) wins
                yield "pair", pos, _raw_pair(row, 0, pos, self.image_root)
                continue
            values = [row[c] for c in self.labels]
            l0 = _label_values(values[:1])
            valid, tie = _classify_labels(l0, _label_values(values[1:]) if len(values) > 1 else None,
                                          self.tie_margin)
            if not valid[0]:
                _warn("label", "%s: skipping row %d of epoch %d on rank %d: bad labels %r", self.name,
                      pos, epoch, rank, tuple(values))
                yield "bad", pos, None
            elif tie[0]:
                yield "tie", pos, None
            else:
                yield "pair", pos, _raw_pair(row, 0 if l0[0] > 0.5 else 1, pos, self.image_root)


# Transforms


def decode_image(value: Any) -> Image.Image:
    """Encoded bytes (or an `Image` feature dict / PIL image) → an RGB PIL image; raises on corrupt data."""
    if isinstance(value, dict):  # datasets.Image(decode=False) gives {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise ValueError(f"no image data ({type(value).__name__})")
    image.load()  # decode now, inside the caller's try: truncated files fail here, not later
    if image.mode.startswith("I"):  # 16-bit grayscale (I;16, I;16B, or I as Pillow widens it): convert() clips at 255
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative ints (NumPy SeedSequence), the same on every machine."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & ((1 << 63) - 1)


class PairTransform:
    """Decode a raw pair and apply the training transforms, identically to both images.

    Resize the shortest side to `resolution` (bilinear, as the Diffusion-DPO scripts), crop a
    resolution×resolution square (random or center), optionally flip horizontally, map to [-1, 1]; replace
    the caption by "" with probability `caption_dropout` (0.2 is the official Diffusion-DPO default,
    PAPER.md §5). Randomness comes from (seed, epoch, key) only — not from worker RNG — so an item is the
    same for any num_workers and after a resume. The two images share the crop and the flip: with equal
    sizes (the Pick-a-Pic case) the crop offsets are identical; with different sizes the crop sits at the
    same relative position. Each image reports its true original size (h, w) and crop top-left (top, left)
    in the resized (and, if flipped, flipped-then-cropped, as diffusers' SDXL script) image: the SDXL
    micro-conditioning.
    """

    def __init__(self, resolution: int, random_crop: bool = False, random_flip: bool = False,
                 caption_dropout: float = 0.2, seed: int = 0):
        if resolution <= 0 or not 0.0 <= caption_dropout <= 1.0 or seed < 0:
            raise ValueError("need resolution > 0, 0 <= caption_dropout <= 1 and seed >= 0")
        self.resolution, self.random_crop, self.random_flip = int(resolution), random_crop, random_flip
        self.caption_dropout, self.seed = float(caption_dropout), int(seed)

    def draws(self, epoch: int, key: int) -> dict:
        """The per-item random choices for (epoch, key): crop position in [0, 1)², flip, caption drop."""
        u = np.random.default_rng(_seed(self.seed, epoch, key)).random(4)  # always 4 draws: fixed stream
        return {"u_top": float(u[0]), "u_left": float(u[1]),
                "flip": bool(self.random_flip and u[2] < 0.5), "drop_caption": bool(u[3] < self.caption_dropout)}

    def _offset(self, size: int, u: float) -> int:
        room = size - self.resolution
        if not self.random_crop:
            return max(0, int(round(room / 2.0)))  # center crop, rounded as torchvision / diffusers
        return min(int(u * (room + 1)), room)       # uniform over 0..room, like RandomCrop

    def _image(self, image: Image.Image, d: dict) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        w, h = image.size
        res = self.resolution
        scale = res / min(h, w)
        nh, nw = max(res, round(h * scale)), max(res, round(w * scale))
        if (nh, nw) != (h, w):
            image = image.resize((nw, nh), Image.BILINEAR)
        if d["flip"]:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        top, left = self._offset(nh, d["u_top"]), self._offset(nw, d["u_left"])
        image = image.crop((left, top, left + res, top + res))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div_(127.5).sub_(1.0), (h, w), (top, left)

    def __call__(self, pair: dict, epoch: int, key: int) -> dict | None:
        """Raw pair → item {pixels (w, l), caption, original_sizes, crop_top_lefts, row}, or None if undecodable."""
        images = []
        for field, col in (("jpg_w", pair.get("winner_col", 0)), ("jpg_l", 1 - pair.get("winner_col", 0))):
            try:
                images.append(decode_image(pair[field]))
            except Exception as err:  # a corrupt image skips the pair (counted by the collate), never a crash
                _warn("decode", "skipping pair at row %s: cannot decode jpg_%d: %s", pair.get("row"), col,
                      _first_line(err))
                return None
        d = self.draws(epoch, key)
        (pw, sw, cw), (pl, sl, cl) = (self._image(im, d) for im in images)
        return {"pixels": (pw, pl), "caption": "" if d["drop_caption"] else pair["caption"],
                "original_sizes": (sw, sl), "crop_top_lefts": (cw, cl), "row": pair.get("row", -1)}


def collate_pairs(items: list[dict | None]) -> dict:
    """Items (None = skipped) → {pixel_values [2B,3,H,W] in [-1, 1] = winners then losers, captions [B],
    original_sizes [2B,2] and crop_top_lefts [2B,2] (long, (h, w) and (top, left), same order as pixel_values),
    rows [B] (each pair's row in the split; for streams its position in the rank's epoch), num_skipped}."""
    ok = [it for it in items if it is not None]
    batch = {"num_skipped": len(items) - len(ok), "captions": [it["caption"] for it in ok],
             "rows": torch.tensor([int(it["row"]) for it in ok], dtype=torch.long)}
    if not ok:
        empty = torch.empty(0, 2, dtype=torch.long)
        return {**batch, "pixel_values": torch.empty(0, 3, 0, 0), "original_sizes": empty, "crop_top_lefts": empty}
    halves = [[it[k][j] for j in (0, 1) for it in ok] for k in ("pixels", "original_sizes", "crop_top_lefts")]
    batch["pixel_values"] = torch.stack(halves[0])
    batch["original_sizes"] = torch.tensor(halves[1], dtype=torch.long)
    batch["crop_top_lefts"] = torch.tensor(halves[2], dtype=torch.long)
    return batch


# Loading loop


class _Keyed(torch.utils.data.Dataset):
    """Worker side: a key (epoch, batch, extra_skipped, what) → ((epoch, batch, extra_skipped), item).

    `what` is a pair index (map-style: the worker reads the row) or the raw pair itself (streams: the main
    process reads the stream in order, the workers only decode), so the order never depends on num_workers.
    """

    def __init__(self, pairs, transform):
        self.pairs, self.transform = pairs, transform

    def __getitem__(self, key):
        epoch, batch, extra, what = key
        pair = self.pairs[what] if isinstance(what, int) else what
        return (epoch, batch, extra), self.transform(pair, epoch, pair["row"])


def _collate_keyed(samples):
    (epoch, batch_in_epoch, _), _ = samples[0]
    batch = collate_pairs([item for _, item in samples])
    batch["num_skipped"] += sum(extra for (_, _, extra), _ in samples)
    return epoch, batch_in_epoch, batch


class _Plan:
    """A re-iterable batch sampler over a generator function (DataLoader iterates it in the main process)."""

    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self.fn()


class PairLoader:
    """Micro-batches of `batch_size` pairs for one rank, forever (epoch after epoch), resumable.

    Map-style data: each epoch a permutation from a torch.Generator seeded with (seed, epoch); the rank's
    shard is permutation[:n // world_size * world_size][rank::world_size] — equal length on every rank (the
    remainder, different each epoch, is dropped) so DDP ranks stay in step; a final partial batch is dropped
    if drop_last. Streams: `split_dataset_by_node` shards, a seeded shuffle buffer, per-rank lengths may differ
    (the loader never ends, so ranks still take the same number of batches). A torch DataLoader with
    `num_workers` workers decodes; per-item randomness is keyed by (epoch, row) (streams: (epoch, position
    in the rank's stream)), so batches are identical for any num_workers. A batch whose pairs were all skipped
    is not yielded; its count is added to the next batch's `num_skipped`, as are (on rank 0, once per epoch)
    the rows a map-style dataset dropped for bad labels. Data that cannot yield a batch fails fast: after
    `max_bad_in_a_row` pairs in a row that did not decode (default: a whole epoch of this rank, at most 1000)
    iteration raises DataError; `stop_requested()`, when given, is polled meanwhile and raises Interrupted.

    `state_dict()` = {"epoch", "batch_in_epoch"} of the batches yielded so far; after `load_state_dict()` the
    next batch is exactly the one an uninterrupted loader would give. Map-style resume jumps there without
    decoding; stream resume re-reads the epoch's consumed rows (labels only, no decoding, but they are
    downloaded again when streaming from the hub).
    """

    def __init__(self, dataset, transform: PairTransform, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = True, shuffle_buffer: int = 1000,
                 max_bad_in_a_row: int | None = None, stop_requested=None):
        if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            dataset = load_pairs(dataset)
        if not isinstance(dataset, (PairDataset, PairStream)):
            raise TypeError("dataset must come from load_pairs (PairDataset or PairStream)")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or seed < 0:
            raise ValueError("need batch_size > 0, 0 <= rank < world_size and seed >= 0")
        self.dataset, self.transform, self.batch_size = dataset, transform, int(batch_size)
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, int(seed)
        self.drop_last, self.shuffle_buffer = drop_last, shuffle_buffer
        self.stop_requested = stop_requested
        self.streaming = isinstance(dataset, PairStream)
        self.max_bad_in_a_row = max_bad_in_a_row or (1000 if self.streaming else
                                                     max(1, min(1000, len(dataset) // world_size)))
        self.epoch, self.batch_in_epoch = 0, 0
        self.batches_per_epoch = None  # unknown for streams
        if not self.streaming:
            per_rank = len(dataset) // world_size
            self.batches_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
            if self.batches_per_epoch == 0:
                raise DataError(f"{dataset.name}: {len(dataset)} pair(s) give no full batch of {batch_size} "
                                f"on each of {world_size} rank(s)")

    # -- state
    def state_dict(self) -> dict:
        """{"epoch", "batch_in_epoch"}: where the next batch comes from."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at exactly the batch after the one `state` was taken at."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or batch < 0:
            raise DataError(f"bad loader state {state}")
        if self.batches_per_epoch is not None:
            if batch > self.batches_per_epoch:
                raise DataError(f"loader state {state} does not fit {self.batches_per_epoch} batches per epoch "
                                f"(was the dataset, batch size or world size changed?)")
            if batch == self.batches_per_epoch:
                epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, batch

    # -- order
    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's pair indices for `epoch`, in order (map-style data only)."""
        n = len(self.dataset)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch))
        perm = torch.randperm(n, generator=g)[: n // self.world_size * self.world_size]
        return perm[self.rank::self.world_size].tolist()

    def _map_plan(self, epoch, start):
        b = self.batch_size
        while True:
            shard = self.epoch_indices(epoch)
            for bi in range(start, self.batches_per_epoch):
                yield [(epoch, bi, 0, i) for i in shard[bi * b:(bi + 1) * b]]
            epoch, start = epoch + 1, 0

    def _stream_plan(self, epoch, start):
        b = self.batch_size
        while True:
            to_skip, bi, keys, bad, pairs = start * b, start, [], 0, 0
            for kind, _, pair in self.dataset.iter_rows(epoch, self.rank, self.world_size, self.seed,
                                                        self.shuffle_buffer):
                if kind == "tie":
                    continue
                if kind == "bad":
                    bad += 0 if to_skip else 1  # counted where the rows are first read, not on resume
                    continue
                pairs += 1
                if to_skip:  # resume: rows already consumed are re-read, never decoded
                    to_skip -= 1
                    continue
                keys.append((epoch, bi, bad, pair))
                bad = 0
                if len(keys) == b:
                    yield keys
                    keys, bi = [], bi + 1
            if keys and not self.drop_last:
                yield keys
                bi += 1
            if pairs == 0:
                raise DataError(f"{self.dataset.name}: no preference pairs on rank {self.rank} in epoch {epoch} "
                                f"(all rows are ties or have bad labels, or the stream is empty)")
            if bi == 0:
                raise DataError(f"{self.dataset.name}: {pairs} pair(s) on rank {self.rank} give no full batch "
                                f"of {b}")
            epoch, start = epoch + 1, 0

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        plan = self._stream_plan if self.streaming else self._map_plan
        start_epoch, start_batch = self.epoch, self.batch_in_epoch
        loader = torch.utils.data.DataLoader(
            _Keyed(self.dataset, self.transform), batch_sampler=_Plan(lambda: plan(start_epoch, start_batch)),
            num_workers=self.num_workers, collate_fn=_collate_keyed)
        yield from self._trainable(loader)

    def _trainable(self, batches) -> Iterator[dict]:
        """(epoch, batch_in_epoch, batch) → the batches that hold a pair, with the loader's position updated,
        the skipped pairs carried into the next batch's count, and the fail-fast and stop checks."""
        carried, bad_in_a_row = 0, 0
        bad_labels = getattr(self.dataset, "num_bad_labels", 0) if self.rank == 0 else 0
        for epoch, batch_in_epoch, batch in batches:
            if batch_in_epoch == 0:
                carried += bad_labels  # the epoch passes over its bad-label rows again
            self.epoch, self.batch_in_epoch = epoch, batch_in_epoch + 1
            if self.batches_per_epoch is not None and self.batch_in_epoch == self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = epoch + 1, 0
            if not batch["captions"]:  # every pair skipped: nothing to train on, carry the count
                carried += batch["num_skipped"]
                bad_in_a_row += batch["num_skipped"]
                if bad_in_a_row >= self.max_bad_in_a_row:
                    raise DataError(f"{self.dataset.name}: no pair could be decoded in {bad_in_a_row} pairs in a row "
                                    f"(rank {self.rank}, epoch {epoch}); the images are corrupt or not images")
                if self.stop_requested is not None and self.stop_requested():
                    raise Interrupted
                continue
            bad_in_a_row = 0
            batch["num_skipped"] += carried
            carried = 0
            yield batch
