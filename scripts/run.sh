#!/usr/bin/env bash
# Create/refresh .venv, install dc-lightning (+ Fashion-MNIST via apt where possible), run the default job:
# the LeNet-300-100 Deep Compression pipeline on Fashion-MNIST (CPU). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_HINT="pass data.root=<folder with its files>"
source scripts/data.sh
install_data
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python train.py "$@"
