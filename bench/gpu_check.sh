#!/usr/bin/env bash
# One device call: GPU tests + benchmark + SASS dump. Logs and JSON go to $OUT (or ./out).
# Expects kernels/_build/libsvdq_kernels.so (built here with kernels/build.sh, carried).
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
MODE="${1:-all}"
if [[ "$MODE" == all || "$MODE" == test ]]; then
  timeout 400 python3 -m pytest -q -rfE --confcutdir=tests/gpu -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest.log" | tail -40
fi
if [[ "$MODE" == all || "$MODE" == bench ]]; then
  timeout 300 python3 bench/bench_kernels.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
