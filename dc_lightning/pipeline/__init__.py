"""The Hydra app: config composition and object builders (config.py), the staged pipeline (stages.py), the run summary (summary.py)."""
