#!/usr/bin/env bash
# Create/refresh .venv, install dc-lightning with its dev extra, install the data the real-data tests read
# (Fashion-MNIST, the fortunes corpus) through apt-get where missing and root, run the test suite (idempotent).
# Those tests skip with a reason when their data is missing, except under CI=true, where they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_HINT="its tests will skip (fail under CI=true)"
source scripts/data.sh
install_data
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch/torchvision pinned: these builds are the ones this project is tested with
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
export WANDB_MODE=disabled WANDB_SILENT=true PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
