#!/bin/bash
# One device call: tests on the GPU, then the benchmark table. Usage (repo root): bash benchmarks/gpu_run.sh
# Logs and the JSON go to $OUT (or ./gpu_out). flash-linear-attention is installed from .whl/ when present.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/ops/test_ttt_linear_triton.py "$@" 2>&1 | tee "$OUT/tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_ttt_linear.py --json "$OUT/bench.json" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log"
