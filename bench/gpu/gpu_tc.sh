#!/usr/bin/env bash
# One device call for issue 23 (tensor-core LUT layout): the GPU correctness suite of kernels/tc, the benchmark
# (bench.kernels.bench_tc) and, with PROBE=1, the design memo's P0 probe (copied to .carry/probe/lut_probe.py from
# ../shared/reference/kernels-batch.md Appendix A; carry .carry/probe). Run from the repository root:
#     bash bench/gpu/gpu_tc.sh    # BENCH_ARGS="..." passes options to bench_tc; TESTS=0 / IR=0 skip the suite / IR
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
source bench/gpu/device_env.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; "$PY" -c "import torch, triton;
print('torch', torch.__version__, 'triton', triton.__version__)") > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${IR:-1}" = 1 ]; then
  timeout 120 "$PY" -m bench.gpu.tc_ir > "$OUT/tc_ir.log" 2>&1; echo "ir exit $?"; cat "$OUT/tc_ir.log" | cut -c1-600
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TESTS_S:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_tc.py > "$OUT/gpu_tc_tests.log" 2>&1
  echo "tests exit $?"; tail -3 "$OUT/gpu_tc_tests.log"
fi
# shellcheck disable=SC2086
timeout "${BENCH_S:-240}" "$PY" -m bench.kernels.bench_tc --out "$OUT/tc" ${BENCH_ARGS:-} > "$OUT/bench_tc.log" 2>&1
echo "bench exit $?"; tail -30 "$OUT/bench_tc.log"
if [ "${PROBE:-0}" = 1 ]; then
  (cd .carry/probe && timeout "${PROBE_S:-200}" "$PY" lut_probe.py) > "$OUT/probe.log" 2>&1
  echo "probe exit $?"; grep -v "^    IR" "$OUT/probe.log" | tail -40
fi
