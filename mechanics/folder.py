"""The run's output folder: one run per folder (a lock that dies with its process), every file appears complete
or not at all (written aside, fsync'ed, renamed), and what dead processes left half-written is removed."""
import errno
import fcntl
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager

from mechanics.flags import fail

logger = logging.getLogger("train")

RUN_FILES = ("log.jsonl", "final", "final_lora")
_locks: dict[str, object] = {}  # output folder → the open lock file this process holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final_dir: str, pid: int | None = None):
    """Yield a temporary sibling folder to write into, then fsync it and rename it to `final_dir`: a crash,
    even of the machine, never leaves a folder that looks done. A full disk ends the run in one line.
    pid: whose temporary folder it is (under FSDP every rank writes into rank 0's)."""
    tmp = final_dir + f".tmp-{pid or os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(folder, name))
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            fail(f"no space left on the device writing {final_dir} "
                 f"({shutil.disk_usage(os.path.dirname(final_dir) or '.').free / 2**20:.0f} MB free)")
        raise
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    _fsync(os.path.dirname(os.path.abspath(final_dir)))


def acquire(folder: str):
    """An exclusive lock on FOLDER/.lock for this process, which goes with the process however it ends:
    (the open lock file, None), or (None, who holds it) when another live process does."""
    lock = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        return None, owner
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock, None


def lock_folder(folder: str, flag: str = "--output_dir") -> None:
    """Hold `folder`'s lock for this process; a folder another live process holds is refused in one line."""
    key = os.path.realpath(folder)
    if key in _locks:
        return
    lock, owner = acquire(folder)
    if lock is None:
        fail(f"{flag} {folder} is in use by another run ({owner}); wait for it, or choose another folder")
    _locks[key] = lock


def release(folder: str) -> None:
    """Give the folder's lock back (it also goes when the process ends)."""
    lock = _locks.pop(os.path.realpath(folder), None)
    if lock is not None:
        lock.close()


def prepare_output(args, is_main: bool) -> None:
    """Before any model loads: the output folder exists and is writable, no other process uses it, the
    temporary files of dead processes are gone, and a fresh run does not mix with an earlier run's files."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--output_dir {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        fail(f"--output_dir {out} cannot be written: {error.strerror or error}")
    if not is_main:
        return
    lock_folder(out)
    for stale in glob.glob(os.path.join(out, "*.tmp-*")):
        pid = stale.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by a process that died while writing it", stale)
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    earlier += sorted(d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d))
    if earlier and args.overwrite:
        logger.info("--overwrite: removing the earlier run in %s (%s)", out, ", ".join(earlier))
        for name in earlier:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif earlier and args.resume is None:
        fail(f"--output_dir {out} holds an earlier run ({', '.join(earlier[:4])}); continue it with --resume "
             "latest, start over with --overwrite, or choose another folder")
