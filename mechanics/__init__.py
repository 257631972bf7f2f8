"""The run's mechanics, below the method: flags, runtime, loading, the output folder, checkpoints, the log.

Each module is one concept; none imports losses, reference, schedule, tiny, miniature or plot. They record and
serve: the train script decides every step (whether to take it, when to stop, what exit code to return).
"""
