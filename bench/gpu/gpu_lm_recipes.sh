#!/usr/bin/env bash
# One H200 session for issue 18: recipe=lstm_lm and recipe=transformer_lm end to end on the fortunes corpus, the
# transformer's sensitivity sweep on its dense baseline, and a sample from each compressed file (dc-lightning generate,
# compressed inference modules on CUDA). Run from the repository root on the device machine (torch/Lightning/Triton
# preinstalled; Hydra, omegaconf, rich, safetensors carried as wheels in .whl/, see bench/gpu/device_env.sh; no apt there,
# so carry the corpus: here `mkdir -p .carry && cp -r /usr/share/games/fortunes .carry/fortunes`, then carry .whl and
# .carry):
#     bash bench/gpu/gpu_lm_recipes.sh   (RECIPES="lstm_lm transformer_lm"; BUDGET=570 s; SMOKE=1: tiny CPU dry run)
# $OUT/results.tgz is refreshed after every step (logs, summary.json, report.md, the sweep's CSV/JSON; no
# checkpoints, no .dcz), so a run cut short still returns what it finished.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; R=${RUNS:-/tmp/runs}; BUDGET=${BUDGET:-570}; mkdir -p "$OUT" "$R"
source bench/gpu/device_env.sh   # carried wheels, PYTHONPATH, kernels link; sets PY
DATA=${DATA:-$PWD/.carry/fortunes}
EXTRA=(); SWEEP=(--densities 0.5,0.35,0.25,0.15,0.1,0.05); GEN=(--tokens 300)
declare -A TINY=([lstm_lm]="model.embed_dim=32 model.hidden_size=32"
                 [transformer_lm]="model.width=32 model.num_layers=6 model.num_heads=2 model.max_len=64")
if [ "${SMOKE:-0}" = 1 ]; then
  EXTRA=(trainer=cpu trainer.precision=32-true data.max_bytes=40000 data.seq_len=64 pipeline.baseline.epochs=1
         pipeline.prune.epochs=1 pipeline.prune.callback.rounds=1 pipeline.quantize.epochs=1)
  SWEEP=(--densities 0.5 --max-batches 1 --device cpu); GEN=(--tokens 20 --device cpu)
fi
# the console script without an install (timeout runs a command, not a shell function)
CLI=("$PY" -c "import sys; from dc_lightning.cli import main; sys.exit(main(sys.argv[1:]))")
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch, triton, lightning;
print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__)") > "$R/machine.txt" 2>&1
for recipe in ${RECIPES:-lstm_lm transformer_lm}; do
  sizes=(); [ "${SMOKE:-0}" = 1 ] && read -r -a sizes <<< "${TINY[$recipe]}"
  common=(recipe="$recipe" logger=csv data.root="$DATA" "${EXTRA[@]}" "${sizes[@]}")
  # the baseline alone first: the transformer's sensitivity sweep runs on it before the compressing stages
  step "${recipe}_baseline" 300 "$PY" train.py "${common[@]}" stages=[baseline] output_dir="$R/$recipe" \
    hydra.run.dir="$R/$recipe/hydra" || continue
  [ "$recipe" = transformer_lm ] && step "${recipe}_sensitivity" 90 "${CLI[@]}" sensitivity \
    --ckpt "$R/$recipe/checkpoints/baseline.ckpt" --recipe "$recipe" --out "$R/${recipe}_sensitivity" "${SWEEP[@]}" \
    data.root="$DATA" "${EXTRA[@]}" "${sizes[@]}"
  step "$recipe" 420 "$PY" train.py "${common[@]}" stage=prune stages=[prune,quantize,export,evaluate] \
    baseline_ckpt="$R/$recipe/checkpoints/baseline.ckpt" output_dir="$R/$recipe" overwrite=true \
    hydra.run.dir="$R/$recipe/hydra2" || continue
  step "${recipe}_generate" 60 "${CLI[@]}" generate "$R/$recipe/model.dcz" --prompt "The " "${GEN[@]}"
  [ "${SMOKE:-0}" = 1 ] || { mkdir -p "$OUT/dcz" && cp "$R/$recipe/model.dcz" "$OUT/dcz/$recipe.dcz"; }
done
pack; ls -la "$OUT"; cat "$R/status.txt"
