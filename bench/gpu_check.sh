#!/usr/bin/env bash
# One device call: GPU tests + benchmark (+ ncu profile). Logs and JSON go to $OUT (or ./out).
# Expects kernels/_build/libsvdq_kernels.so (built here with kernels/build.sh, carried).
# Usage: bench/gpu_check.sh [all|test|bench|pdl|prof]...   (pdl: the kernel table without and with SVDQ_PDL=1)
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for MODE in "${@:-all}"; do
if [[ "$MODE" == all || "$MODE" == test ]]; then
  timeout 400 python3 -m pytest -q -rfE --confcutdir=tests/gpu -p no:cacheprovider tests/gpu 2>&1 | grep -v "^DEBUG" | tee "$OUT/pytest.log" | tail -15
fi
if [[ "$MODE" == prof ]]; then
  timeout 200 ncu --clock-control none -k regex:"gemm_sm90_ws|quant_lora" --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    python3 bench/profile_one.py > "$OUT/ncu.txt" 2>&1
  grep -E "^  [a-z_]+.*\(|Duration|Throughput|Busy|Issued|Eligible|No Eligible|Stall|L2 Hit|Active Warps" "$OUT/ncu.txt" | head -70
fi
if [[ "$MODE" == pdl ]]; then
  for PDL in 0 1; do
    SVDQ_PDL=$PDL timeout 300 python3 bench/bench_kernels.py --json "$OUT/bench_pdl$PDL.json" 2>&1 \
      | tee "$OUT/bench_pdl$PDL.log" | tail -16
  done
fi
if [[ "$MODE" == all || "$MODE" == bench ]]; then
  timeout 300 python3 bench/bench_kernels.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -16
  timeout 60 python3 bench/bench_gemv.py --json "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" | tail -14
  timeout 120 python3 bench/bench_packed.py --json "$OUT/packed.json" 2>&1 | tee "$OUT/packed.log" | tail -16
fi
done
