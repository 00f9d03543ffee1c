# Sourced by the bench/gpu/gpu_*.sh scripts on the device machine (torch/Lightning/Triton preinstalled): install the
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
# for the scripts that set OUT (results), R (run folders) and BUDGET (s): pack R's logs and reports into
# $OUT/results.tgz; `step NAME LIMIT_S CMD...` runs CMD with a timeout if the budget allows, logs to $R/NAME.log
pack() { tar czf "$OUT/results.tgz" -C "$R" --exclude='*.ckpt' --exclude='*.dcz' --exclude='*.safetensors' \
  --exclude='wandb' . 2>/dev/null; }
step() {
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > BUDGET )); then echo "$name skipped (budget)" | tee -a "$R/status.txt"; return 1; fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "$name exit $rc in $(( SECONDS - t0 )) s" | tee -a "$R/status.txt"
  pack
  return $rc
}
