"""The set-up train(cfg) reads as a recipe over (stale/train.py): checks that span nodes (checks.py), the config
resolved against its frozen parts (resolve.py), building the system, callbacks, loggers and trainer (build.py),
and the final samples and report (report.py)."""
