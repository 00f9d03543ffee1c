"""The Hydra app: config composition and object builders (``config``), the staged pipeline (``stages``), the run
summary (``summary``)."""
