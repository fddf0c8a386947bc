#!/usr/bin/env bash
# SASS instruction mix of the library's kernels (sm_90a cubin): bench/sass_mix.sh [lib.so]
# Uses cuobjdump from PATH, else the one shipped with Triton.
set -euo pipefail
LIB="${1:-kernels/_build/libsvdq_kernels.so}"
CO="$(command -v cuobjdump || true)"
[[ -z "$CO" ]] && CO="$(python3 -c 'import triton, pathlib; print(pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")' 2>/dev/null || true)"
[[ -z "$CO" || ! -x "$CO" ]] && CO="$(ls .venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)"
"$CO" -sass -arch sm_90a "$LIB" > /tmp/svdq_sass.txt
for fn in gemm_sm90_i8_kernelILi128ELi5ELi3E13__nv_bfloat16E gemm_sm90_i8_kernelILi128ELi6ELi2E13__nv_bfloat16E gemm_sm90_ws6_kernelILi5E13__nv_bfloat16E gemm_sm90_ws_kernelILi128ELi5E13__nv_bfloat16E quant_lora_down_kernelI13__nv_bfloat16Li2ELi32ELb1E quant_lora_down_kernelI13__nv_bfloat16Li1ELi32ELb0E; do
  echo "== $fn"
  awk -v f="$fn" '$0 ~ "Function : .*"f {p=1; next} /Function : /{p=0} p' /tmp/svdq_sass.txt \
    | grep -oE '^\s+/\*[0-9a-f]{4,5}\*/\s+(@!?U?P[0-9T] )?[A-Z][A-Z0-9_]*(\.[A-Z0-9_x]+)*' \
    | awk '{print $NF}' | sed -E 's/^(QGMMA|HGMMA|IGMMA)(.*)$/\1\2/; s/^([A-Z0-9_]+)\..*/\1/' \
    | sort | uniq -c | sort -rn | head -25
  echo "   tensor-core instructions:"
  awk -v f="$fn" '$0 ~ "Function : .*"f {p=1; next} /Function : /{p=0} p' /tmp/svdq_sass.txt \
    | grep -oE '(QGMMA|HGMMA|IGMMA|HMMA|IMMA)\.[A-Za-z0-9_.]+' | sort | uniq -c
  echo "   local-memory (spill) instructions: $(awk -v f="$fn" '$0 ~ "Function : .*"f {p=1; next} /Function : /{p=0} p' /tmp/svdq_sass.txt | grep -cE ' (LDL|STL)' || true)"
done
