"""The cache of everything built once (tiny pipelines, the tiny CLIP, toy pairs) and the one way to build it:
aside, fsync'ed, then renamed into place, so that a file or folder that exists is complete."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def root() -> Path:
    """$RDPO_CACHE, else ~/.cache/rethinking-dpo (the tests point it at a private folder)."""
    return Path(os.environ.get("RDPO_CACHE") or "~/.cache/rethinking-dpo").expanduser()


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file below `path` (or `path` itself when it is a file), then its folders."""
    if os.path.isfile(path):
        fsync(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


def build_aside(final: str | os.PathLike, build: Callable[[Path], object], folder: bool = True) -> Path:
    """Make `final` (a folder, or a file with folder=False) once: `build(tmp)` writes a temporary sibling,
    which is fsync'ed and renamed into place in one step. Concurrent builders (torchrun ranks, test workers)
    each build their own copy and the first rename wins; a process killed mid-build leaves at most a stray
    `.NAME.tmp-*` sibling, never a `final` that looks done. Returns `final`."""
    final = Path(final)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes the folder private; the cache is readable like any other folder
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=final.suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)
    try:
        build(tmp)
        fsync_tree(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():  # not another builder's rename: a real failure
                raise
        fsync(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return final
