#!/usr/bin/env bash
# Create/refresh .venv, install dc-lightning (+ Fashion-MNIST via apt where possible), run the default job:
# the LeNet-300-100 Deep Compression pipeline on Fashion-MNIST (CPU). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "warning: could not install dataset-fashion-mnist; pass data.root=<folder with the IDX files>"
fi
if [ ! -f /usr/share/games/fortunes/fortunes ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes) >/dev/null 2>&1 \
    || echo "warning: could not install fortunes (the language-model recipes' corpus); pass data.root=<folder>"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python train.py "$@"
