#!/usr/bin/env bash
# Paired seed sweeps of the LeNet recipes on one H200 (bench/experiments/seed_sweep.py; 8 seeds per recipe, all
# processes side by side, one CPU thread each): is a recipe change better than seed-to-seed noise? Same setup as
# gpu_recipes.sh (wheels in .whl/, Fashion-MNIST in .carry/fashion-mnist). Tables land in $OUT/<recipe>/sweep.md (+ .csv/.json).
#     bash bench/gpu/gpu_lenet_sweeps.sh        (SEEDS="0 1 2 3 4 5 6 7", LIMIT=540 s per sweep, SMOKE=1: CPU dry run)
#     SET=2 SEEDS="0 1 2 3 4 5 6 7 8 9" bash bench/gpu/gpu_lenet_sweeps.sh   (LeNet-5: denser conv2 paid by 4-bit ip1)
#     SET=3 SEEDS="0 1 2 3 4 5 6 7 8 9" bash bench/gpu/gpu_lenet_sweeps.sh   (LeNet-5: denser ip2, with and without conv2)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; R=${RUNS:-/tmp/sweep_runs}; LIMIT=${LIMIT:-540}; mkdir -p "$OUT" "$R"
source bench/gpu/device_env.sh   # carried wheels, PYTHONPATH, kernels link; sets PY
DATA=${DATA:-$PWD/.carry/fashion-mnist}
SEEDS=${SEEDS:-0 1 2 3 4 5 6 7}
njobs=$(wc -w <<< "$SEEDS")
COMMON=(data.root="$DATA" trainer.enable_progress_bar=false)
[ "${SMOKE:-0}" = 1 ] && COMMON+=(trainer.accelerator=cpu trainer.limit_train_batches=2 trainer.limit_val_batches=1
  trainer.limit_test_batches=1 pipeline.baseline.epochs=1 pipeline.prune.epochs=2 pipeline.prune.callback.rounds=1
  pipeline.quantize.epochs=1)
# LeNet-5 settings spelled out (the recipe has changed since these sweeps ran; their reference "recipe" rows are
# Table 3's, now the variant table3). A dict override replaces the recipe's bits only after deleting them (~ then +).
dens() { echo "pipeline.prune.callback.densities={model.conv1:0.66,model.conv2:$1,model.ip1:0.08,model.ip2:$2}"; }
bits() { echo "~pipeline.quantize.callback.bits;+pipeline.quantize.callback.bits={model.conv1:8,model.conv2:8,model.ip1:$1,model.ip2:5}"; }
table3="table3=$(dens 0.12 0.19);$(bits 5)"
lenet5() {  # lenet5 NAME VARIANT...: one LeNet-5 sweep in the background
  local name=$1; shift
  local args=()
  for v in "$@"; do args+=(--variant "$v"); done
  timeout "$LIMIT" "$PY" -m bench.experiments.seed_sweep --recipe lenet5 --seeds $SEEDS --jobs "$njobs" --out "$OUT/$name" \
    --runs "$R/$name" "${args[@]}" -- "${COMMON[@]}" > "$OUT/$name.log" 2>&1 &
}
if [ "${SET:-1}" = 1 ]; then
  # LeNet-5: 16 retraining epochs vs 32 (the validation loss still falls at the end of retraining)
  lenet5 lenet5 "$table3" "long=$(dens 0.12 0.19);$(bits 5);pipeline.prune.epochs=32"
  # LeNet-300-100: Table 2's ip1 8 % at 6 bits (the recipe) vs ip1 10 % at 5 bits (same file size)
  timeout "$LIMIT" "$PY" -m bench.experiments.seed_sweep --recipe lenet300 --seeds $SEEDS --jobs "$njobs" --out "$OUT/lenet300" \
    --runs "$R/lenet300" --variant recipe \
    --variant "ip1_10pct_5bit=pipeline.prune.callback.densities={model.ip1:0.10,model.ip2:0.09,model.ip3:0.26};pipeline.quantize.callback.bits=5" \
    -- "${COMMON[@]}" > "$OUT/lenet300.log" 2>&1 &
elif [ "${SET}" = 2 ]; then
  # LeNet-5: conv2 (the layer the sensitivity sweep blames with ip1) at 20 / 25 % instead of 12 %, paid for by 4-bit
  # instead of 5-bit ip1 codes
  lenet5 lenet5_conv2 "$table3" "conv2_20_ip1_4bit=$(dens 0.20 0.19);$(bits 4)" "conv2_25_ip1_4bit=$(dens 0.25 0.19);$(bits 4)"
else
  # LeNet-5: ip2 (19 %: -0.9 points before retraining, cheap: 5,000 weights) at 50 %, alone and with conv2 at 20 %
  # (the recipe since), paid for by 4-bit ip1 codes
  lenet5 lenet5_ip2 "$table3" "ip2_50_ip1_4bit=$(dens 0.12 0.50);$(bits 4)" "conv2_20_ip2_50_ip1_4bit=$(dens 0.20 0.50);$(bits 4)"
fi
wait
for r in lenet5 lenet300 lenet5_conv2 lenet5_ip2; do [ -e "$OUT/$r.log" ] || continue; echo "== $r"; cat "$OUT/$r/sweep.md" 2>/dev/null || tail -5 "$OUT/$r.log"; done
