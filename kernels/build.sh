#!/usr/bin/env bash
# Builds kernels/_build/libsvdq_kernels.so: the C-ABI CUDA library (no libtorch, static cudart).
# Usage: kernels/build.sh [--fast]   (--fast: sm_90a only, for iterating on the H100)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${SVDQ_BUILD_DIR:-$HERE/_build}"
NVCC="${NVCC:-nvcc}"
mkdir -p "$OUT"
python3 "$HERE/csrc/gen_wgmma.py" > "$HERE/csrc/wgmma_gen.h"
if [[ "${1:-}" == "--fast" ]]; then
  ARCHS=(-gencode=arch=compute_90a,code=sm_90a)
else
  ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86
         -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90a,code=sm_90a
         -gencode=arch=compute_120,code=sm_120 -gencode=arch=compute_120,code=compute_120)
fi
"$NVCC" -std=c++17 -O3 -shared -Xcompiler -fPIC,-fvisibility=hidden -cudart static \
  -Xptxas -v "${ARCHS[@]}" -o "$OUT/libsvdq_kernels.so" "$HERE/csrc/svdq.cu" "$HERE/csrc/gptq.cu" "$HERE/csrc/w4a16.cu" "$HERE/csrc/flux_ops.cu" 2> "$OUT/ptxas.log" || { cat "$OUT/ptxas.log"; exit 1; }
grep -E "C75|error|spill stores" "$OUT/ptxas.log" | grep -v " 0 bytes spill stores" | sort | uniq -c || true
echo "built $OUT/libsvdq_kernels.so"
