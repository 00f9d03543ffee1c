#!/usr/bin/env bash
# Issue 24's GPU measurements, one device call per part (each within the 10-minute limit), from the repository root
# on the device machine (torch/Lightning/Triton preinstalled; carry .whl and .carry, see bench/gpu/device_env.sh):
#     bash bench/gpu/gpu_session_24.sh A   # weight-kind GPU suite: eager, CUDA graphs with masks, converted-then-cast,
#                                          # and torch.compile(fullgraph=True) of every model in fp16/fp32/bf16
#     bash bench/gpu/gpu_session_24.sh B   # decode benchmark: tokens/s, compressed vs dense fp16, batch 1 and 16
#                                          # (AUTOTUNE=1: the compressed kernels' configurations timed first)
#     bash bench/gpu/gpu_session_24.sh C   # training-step overhead: VGG-16 and transformer_lm, 5 rotating repeats
# Part B uses the recipes' files when present (.carry/dcz/lstm_lm.dcz, .carry/dcz/transformer_lm.dcz: what
# bench/gpu/gpu_lm_recipes.sh leaves in $OUT/dcz), else random weights at the recipes' sizes (the output says which).
# Everything goes under $OUT/<part>/ (logs, JUnit XML, CSV/JSON) and $OUT/status.txt; SMOKE=1: a CPU dry run.
set -uo pipefail
PART=${1:?usage: gpu_session_24.sh A|B|C}
OUT=${OUT:-/tmp/gpu_out}; R="$OUT/$PART"; BUDGET=${BUDGET:-570}; mkdir -p "$R"
source bench/gpu/device_env.sh   # carried wheels, PYTHONPATH, kernels link; sets PY
SMOKE=${SMOKE:-0}
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch, triton, lightning;
print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__)") > "$R/machine.txt" 2>&1
# `step` (device_env.sh) runs a command with a timeout while the budget lasts, logs to $R/NAME.log, status to
# $R/status.txt, and packs $R into $OUT/results.tgz
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEsxX)
case "$PART" in
A)
  SUITE=tests/gpu/test_gpu_compressed_modules.py
  # the CPU checks of the same property (fake-CUDA host-sync check, aot_eager fullgraph, decode steps), SMOKE only
  [ "$SMOKE" = 1 ] && step cpu_checks 300 "${PYTEST[@]}" tests/test_compile_converted.py tests/test_decode.py &
  # eager / graphs / cast / memory in one process, the compile tests split by dtype into three more processes side
  # by side (inductor + Triton compile on the CPU cores; each skips what would start after DC_GPU_COMPILE_BUDGET_S)
  step suite 540 "${PYTEST[@]}" "$SUITE" -k "not test_compile_fullgraph" --junitxml="$R/suite.xml" &
  for dt in float16 float32 bfloat16; do
    sel="test_compile_fullgraph and $dt"; [ "$dt" = float16 ] && sel="$sel and not bfloat16"
    DC_GPU_COMPILE_BUDGET_S=${DC_GPU_COMPILE_BUDGET_S:-420} TORCHINDUCTOR_COMPILE_THREADS=4 \
      step "compile_$dt" 540 "${PYTEST[@]}" tests/gpu/test_gpu_compressed_modules.py -k "$sel" \
      --junitxml="$R/compile_$dt.xml" &
  done
  wait
  ;;
B)
  CK=()
  for m in lstm_lm transformer_lm; do [ -f ".carry/dcz/$m.dcz" ] && CK+=(--ckpt "$m=.carry/dcz/$m.dcz"); done
  SM=(); [ "$SMOKE" = 1 ] && SM=(--smoke); [ "${AUTOTUNE:-0}" = 1 ] && SM+=(--autotune)
  step decode 560 "$PY" -m bench.gpu.bench_decode "${CK[@]}" "${SM[@]}" --out "$R/decode"
  ;;
C)
  if [ "$SMOKE" = 1 ]; then
    step overhead_transformer_lm 300 "$PY" -m bench.training.bench_pruning_overhead --smoke --model transformer_lm \
      --out "$R/overhead"
  else
    # start no new fit after --budget seconds; each model gets half the call
    step overhead_vgg16 280 "$PY" -m bench.training.bench_pruning_overhead --device cuda --model vgg16 --repeats 5 \
      --budget 230 --out "$R/overhead"
    step overhead_transformer_lm 280 "$PY" -m bench.training.bench_pruning_overhead --device cuda \
      --model transformer_lm --repeats 5 --budget 230 --out "$R/overhead"
  fi
  ;;
*) echo "unknown part $PART: A, B or C" >&2; exit 2 ;;
esac
pack
cat "$R/status.txt"; tail -n 25 "$R"/*.log
