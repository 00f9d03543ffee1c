# Sourced by the bench/gpu_*.sh scripts on the device machine (torch/Lightning/Triton preinstalled): install the
# carried wheels (.whl/: hydra-core, omegaconf, antlr4, rich, safetensors, ...) when they are missing, put the
# checkout on PYTHONPATH, link kernels/ as dc_lightning.kernels (no editable install there). Sets PY (default python3).
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import hydra, omegaconf, safetensors, rich" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHON="$PY"
[ -e dc_lightning/kernels ] || ln -sfn ../kernels dc_lightning/kernels
