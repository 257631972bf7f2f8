"""What can go wrong that is not a bug, as typed errors, and the one way an entry point reports them.

The mechanics raise these and never end the process; each entry point's `main` catches `RunError` in one
place, prints `report(error)`'s single `error:` line and returns its exit code (README, "Exit codes").
"""
import sys

EXIT_USAGE, EXIT_DIVERGED, EXIT_DISK_FULL = 2, 3, 4  # 0 done; 128 + N stopped by signal N


class RunError(Exception):
    """A run cannot go on for a reason its user can act on; the message is the whole `error:` line."""
    exit_code = EXIT_USAGE


class UsageError(RunError):
    """A flag, folder, model or dataset the user gave cannot be used (found before or while the run starts)."""


class DataError(RunError):
    """The training data cannot be read on (raised while the loop reads the loader, too)."""


class DiskFull(RunError):
    """No space left while writing a checkpoint, the final model or the log: what was written before stays
    intact (the previous checkpoint resumes); the message names the folder and the space needed."""
    exit_code = EXIT_DISK_FULL


def report(error: RunError) -> int:
    """Print `error: …` as the last line (under no progress bar) and return the error's exit code."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {error}", file=sys.stderr, flush=True)
    return error.exit_code
