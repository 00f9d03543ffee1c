#!/usr/bin/env bash
# One H200 session: the AlexNet/VGG-16 Fashion-MNIST recipes end to end, their whole-network latency (EIE kernels vs
# dense fp16, CUDA graphs), the storage reproduction on their trained weights, the GPU k-means and pruning-overhead
# benchmarks and the EIE module tests (tests/gpu: torch.compile, CUDA graphs). Run from the repository root on the
# device machine (torch/Lightning/Triton preinstalled; Hydra, omegaconf, rich, safetensors carried as wheels in .whl/;
# Fashion-MNIST carried in .carry/fashion-mnist):
#     bash bench/gpu/gpu_recipes.sh   (RECIPES="vgg16 alexnet"; BUDGET=570 s; BENCH=0 skips the benchmarks; SMOKE=1: CPU dry run;
#      LATENCY_ONLY="vgg16=<file.dcz>" times a file written by an earlier call; LLOYD=1 adds a Lloyd k-means quantize
#      stage from the same pruned checkpoint; LATENCY=0 skips the recipe's own latency step)
# Steps run in priority order while the time budget lasts; $OUT/results.tgz is refreshed after every step (run logs,
# summaries, reports, benchmark CSV/JSON; no checkpoints), so a run cut short still returns what it finished.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; R=${RUNS:-/tmp/runs}; BUDGET=${BUDGET:-570}; mkdir -p "$OUT" "$R"
source bench/gpu/device_env.sh   # carried wheels, PYTHONPATH, kernels link; sets PY
DATA=${DATA:-$PWD/.carry/fashion-mnist}
EXTRA=()
if [ "${SMOKE:-0}" = 1 ]; then
  EXTRA=(trainer=cpu trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.limit_test_batches=1
         pipeline.baseline.epochs=1 pipeline.prune.epochs=2 pipeline.prune.callback.rounds=1 pipeline.quantize.epochs=1
         data.batch_size=16 data.eval_batch_size=16)
fi
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch, triton, lightning;
print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__)") > "$R/machine.txt" 2>&1
declare -A SIZE=([alexnet]=64 [vgg16]=32) LIMIT=([alexnet]=240 [vgg16]=480) LAT=([alexnet]=120 [vgg16]=240)
# storage reproduction on a trained dense baseline (magnitude pruning to the table's densities, no retraining)
storage() {
  local recipe=$1
  [ -f "$R/$recipe/checkpoints/baseline.ckpt" ] || return 0
  step "storage_trained_$recipe" 75 "$PY" -m bench.storage.bench_storage --nets "$recipe" \
    --state-dict "$R/$recipe/checkpoints/baseline.ckpt" --out "$R/storage_trained_$recipe"
  # the same with uniform quantization (no Lloyd iterations): the entropy-coding trade-off
  step "storage_trained_${recipe}_uniform" 75 "$PY" -m bench.storage.bench_storage --nets "$recipe" \
    --state-dict "$R/$recipe/checkpoints/baseline.ckpt" --kmeans-iters 0 --out "$R/storage_trained_${recipe}_uniform"
}
for recipe in ${RECIPES:-vgg16 alexnet}; do
  step "$recipe" "${LIMIT[$recipe]}" python3 train.py recipe="$recipe" logger=csv data.root="$DATA" \
    output_dir="$R/$recipe" hydra.run.dir="$R/$recipe/hydra" "${EXTRA[@]}"
  [ -f "$R/$recipe/model.dcz" ] || continue
  mkdir -p "$OUT/dcz" && cp "$R/$recipe/model.dcz" "$OUT/dcz/$recipe.dcz"   # for a later latency-only call
  # LLOYD=1: the quantize stage again from the same pruned checkpoint with Lloyd k-means (the paper's clustering)
  [ "${LLOYD:-0}" = 1 ] && step "${recipe}_lloyd" 120 python3 train.py recipe="$recipe" logger=csv data.root="$DATA" \
    stage=quantize pruned_ckpt="$R/$recipe/checkpoints/prune.ckpt" pipeline.quantize.callback.max_iter=300 \
    output_dir="$R/${recipe}_lloyd" hydra.run.dir="$R/${recipe}_lloyd/hydra" "${EXTRA[@]}"
  [ "${SMOKE:-0}" = 1 ] || storage "$recipe"
  [ "${SMOKE:-0}" = 1 ] || [ "${LATENCY:-1}" = 0 ] || step "latency_$recipe" "${LAT[$recipe]}" "$PY" -m bench.kernels.bench_network_latency \
    "$R/$recipe/model.dcz" --image-size "${SIZE[$recipe]}" --channels 3 --data-root "$DATA" --out "$R/latency_$recipe"
done
# latency of files written by an earlier call (LATENCY_ONLY="vgg16=path/to/vgg16.dcz ...")
for item in ${LATENCY_ONLY:-}; do
  recipe=${item%%=*}
  step "latency_$recipe" "${LAT[$recipe]}" "$PY" -m bench.kernels.bench_network_latency "${item#*=}" \
    --image-size "${SIZE[$recipe]}" --channels 3 --data-root "$DATA" --out "$R/latency_$recipe"
done
if [ "${SMOKE:-0}" != 1 ] && [ "${BENCH:-1}" = 1 ]; then
  step kmeans_cuda 60 "$PY" -m bench.kernels.bench_kmeans --device cuda --no-sklearn --out "$R/kmeans_cuda"
  step prune_cuda 90 "$PY" -m bench.training.bench_pruning_overhead --device cuda --model vgg16 --batch-size 256 \
    --out "$R/prune_cuda"
  # the GPU correctness tests of the EIE modules (torch.compile, CUDA graphs): tests/gpu, pytest's JUnit XML as record
  mkdir -p "$R/eie_module"
  step eie_module 60 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_eie_suite.py -k module \
    --junitxml "$R/eie_module/junit.xml"
fi
pack; ls -la "$OUT"; cat "$R/status.txt"
