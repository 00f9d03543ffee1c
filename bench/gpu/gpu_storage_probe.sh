#!/usr/bin/env bash
# Which dense training makes a recipe's weights code small? Trains only the dense baseline of a recipe under several
# override sets, side by side on one GPU, then runs the storage reproduction (bench/storage/bench_storage.py: magnitude
# pruning to the paper's densities without retraining, uniform centroids, Huffman) on each trained model. On the
# trained VGG-16 of the full recipe this proxy gave 47.9x against the end-to-end 47.7x (recipes/vgg16/README.md).
#     PROBES="name|override|override name2|override" RECIPE=vgg16 NET=vgg16 bash bench/gpu/gpu_storage_probe.sh
# e.g. PROBES="px64|data.image_size=64 ep25|pipeline.baseline.epochs=25". Same setup as bench/gpu/gpu_recipes.sh
# (wheels in .whl/, Fashion-MNIST in .carry/fashion-mnist); SMOKE=1: a CPU dry run on a few batches.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; R=${RUNS:-/tmp/probe_runs}; LIMIT=${LIMIT:-420}; mkdir -p "$OUT" "$R"
RECIPE=${RECIPE:-vgg16}; NET=${NET:-$RECIPE}
source bench/gpu/device_env.sh   # carried wheels, PYTHONPATH, kernels link; sets PY
DATA=${DATA:-$PWD/.carry/fashion-mnist}
EXTRA=()
[ "${SMOKE:-0}" = 1 ] && EXTRA=(trainer=cpu trainer.limit_train_batches=2 trainer.limit_val_batches=1
  trainer.limit_test_batches=1 pipeline.baseline.epochs=1 data.batch_size=8 data.eval_batch_size=8)
names=()
for probe in ${PROBES:?set PROBES=\"name|override|... name2|...\"}; do
  IFS='|' read -r -a parts <<< "$probe"
  name=${parts[0]}; names+=("$name")
  timeout "$LIMIT" "$PY" train.py recipe="$RECIPE" logger=csv data.root="$DATA" 'stages=[baseline]' \
    output_dir="$R/$name" hydra.run.dir="$R/$name/hydra" "${parts[@]:1}" "${EXTRA[@]}" > "$R/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  ckpt="$R/$name/checkpoints/baseline.ckpt"
  if [ ! -f "$ckpt" ]; then echo "$name: no baseline checkpoint (see $name.log)" | tee -a "$R/status.txt"; continue; fi
  if [ "${SMOKE:-0}" = 1 ]; then echo "$name: baseline trained (smoke: storage skipped)" | tee -a "$R/status.txt"; continue; fi
  timeout 150 "$PY" -m bench.storage.bench_storage --nets "$NET" --state-dict "$ckpt" \
    --kmeans-iters 0 --out "$R/storage_$name" > "$R/storage_$name.log" 2>&1
  echo "$name: storage exit $? ; $(grep -h '│ baseline\|stage baseline done' "$R/$name.log" | tail -2 | tr '\n' ' ')" \
    | tee -a "$R/status.txt"
  grep -h "total" "$R/storage_$name.log" | tee -a "$R/status.txt"
done
tar czf "$OUT/results.tgz" -C "$R" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.dcz' . 2>/dev/null
cat "$R/status.txt"
