#!/usr/bin/env bash
# Create/refresh .venv, install dc-lightning with its dev extra, run the test suite (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch/torchvision pinned: these builds are the ones this project is tested with
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
export WANDB_MODE=disabled WANDB_SILENT=true PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
