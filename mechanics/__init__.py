"""The run's mechanics, below the method: errors, flags, runtime, loading (with the latent cache and LoRA), the
output folder, checkpoints, the log.

Each module is one concept; none imports losses, reference, schedule, miniature, speed or plot (they may import
data.py and offline/). They record and serve: the entry point decides every step (whether to take it, when to
stop, what exit code to return), and a mechanic that cannot go on raises a typed error (errors.py), never exits.
"""
