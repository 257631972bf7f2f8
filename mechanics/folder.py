"""The run's output folder: one run per folder (a lock that dies with its process), every file appears complete
or not at all (written aside, fsync'ed, renamed), and what dead processes left half-written is removed."""
import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager

from filelock import FileLock, Timeout

from mechanics.errors import DiskFull, UsageError
from offline import cache

logger = logging.getLogger("train")

RUN_FILES = ("log.jsonl", "final", "final_lora", "heldout", "samples")  # heldout/: the --tiny demo's comparison
_locks: dict[str, object] = {}  # output folder → the open lock file this process holds


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine). On Windows os.kill(pid, 0) would end it: ask the kernel."""
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(final_dir: str, pid: int | None = None, needed_bytes: int | None = None):
    """Yield a temporary sibling folder to write into, then fsync it and rename it to `final_dir`: a crash,
    even of the machine, never leaves a folder that looks done, and an earlier `final_dir` is replaced only by
    a complete one. A full disk raises errors.DiskFull naming the folder (and `needed_bytes`, when the caller
    knows them); the temporary folder is removed. pid: whose temporary folder it is (under FSDP every rank
    writes into rank 0's)."""
    tmp = final_dir + f".tmp-{pid or os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        cache.fsync_tree(tmp)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise DiskFull(no_space_message(final_dir, needed_bytes)) from None
        raise
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    cache.fsync(os.path.dirname(os.path.abspath(final_dir)))


RESUME = "continue with --resume latest (the last checkpoint is kept)"
RERUN = "run the same command again (what it stored is kept)"  # eval.py: its stored images are reused


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.0f} MB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.0f} KB"


def no_space_message(path: str, needed_bytes: int | None = None, then: str = RESUME) -> str:
    """The one line of a full disk: what could not be written, where, how much it needs, how much is free, and
    `then`, the step after freeing space."""
    where = os.path.dirname(os.path.abspath(path))
    need = f"it needs about {_size(needed_bytes)}, " if needed_bytes else ""
    return (f"no space left on the device for {path}: {need}{_size(shutil.disk_usage(where).free)} are free "
            f"in {where}; free some space, then {then}")


def write_bytes(path: str, data: bytes, then: str = RESUME) -> None:
    """A file (a log, an image, a table) written aside as PATH.tmp-PID, fsync'ed and renamed into place: a crash
    leaves the earlier file or none, never a truncated one. A full disk raises DiskFull (no_space_message, with
    `then` the step after freeing space)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if error.errno == errno.ENOSPC:
            raise DiskFull(no_space_message(path, len(data), then)) from None
        raise


def write_text(path: str, text: str, then: str = RESUME) -> None:
    write_bytes(path, text.encode("utf-8"), then)


def acquire(folder: str):
    """An exclusive lock on FOLDER/.lock for this process, which goes with the process however it ends (filelock:
    flock on POSIX, msvcrt on Windows): (the lock, None), or (None, who holds it) when another holder has it.
    The file names its holder."""
    path = os.path.join(folder, ".lock")
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            with open(path) as f:
                owner = f.read().strip()
        except OSError:  # Windows: the holder's byte lock keeps others from reading the file
            owner = ""
        return None, owner or "another process"
    with open(path, "w") as f:
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    return lock, None


def lock_folder(folder: str, flag: str = "--output_dir", reentrant: bool = True) -> None:
    """Hold `folder`'s lock for this process; a folder another live process holds is refused in one line, and so
    is, with reentrant=False, one this process holds already (flock locks conflict across open files)."""
    key = os.path.realpath(folder)
    if key in _locks and reentrant:
        return
    lock, owner = acquire(folder)
    if lock is None:
        raise UsageError(f"{flag} {folder} is in use by another run ({owner}); wait for it, or choose another folder")
    _locks[key] = lock


def release(folder: str | None = None) -> None:
    """Give the folder's lock back, or (None) every lock this process holds; they also go when it ends."""
    for key in list(_locks) if folder is None else [os.path.realpath(folder)]:
        lock = _locks.pop(key, None)
        if lock is not None:
            lock.release()


def prepare_output(args, is_main: bool) -> None:
    """Before any model loads: the output folder exists and is writable, no other process uses it, the
    temporary files of dead processes are gone, and a fresh run does not mix with an earlier run's files."""
    out = args.output_dir
    check_writable(out)
    if not is_main:
        return
    lock_folder(out)
    remove_stale(out)
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    earlier += sorted(d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d))
    if earlier and args.overwrite:
        logger.info("--overwrite: removing the earlier run in %s (%s)", out, ", ".join(earlier))
        for name in earlier:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif earlier and args.resume is None:
        raise UsageError(f"--output_dir {out} holds an earlier run ({', '.join(earlier[:4])}); continue it with "
                         "--resume latest, start over with --overwrite, or choose another folder")


def check_writable(path: str, flag: str = "--output_dir") -> None:
    """`path` is a folder, made if missing, that this process can write into; else one UsageError line."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written: {error.strerror or error}") from None


def remove_stale(path: str, patterns=("*.tmp-*",)) -> None:
    """Remove what processes that died while writing left aside (NAME.tmp-PID of a dead PID, a file or a folder)
    among the globs `patterns` of `path`. Only while holding the folder's lock: then no live run is writing them."""
    for pattern in patterns:
        for stale in glob.glob(os.path.join(path, pattern)):
            pid = stale.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                logger.info("removing %s, left by a process that died while writing it", stale)
                shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


@contextmanager
def held(path: str, flag: str = "--output_dir", stale=("*.tmp-*",)):
    """For the block: `path` is writable (check_writable), locked by this process (lock_folder: a folder another
    run holds is refused in one line, this process's own too), and rid of dead processes' temporaries
    (remove_stale with the globs `stale`). The lock goes at the block's end, or with the process however it
    ends, so a killed run never blocks the next."""
    check_writable(path, flag)
    lock_folder(path, flag, reentrant=False)
    try:
        remove_stale(path, stale)
        yield path
    finally:
        release(path)
