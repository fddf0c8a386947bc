#!/usr/bin/env bash
# On a CUDA machine (the device tool): the in-process ComfyUI tests with ComfyUI on the GPU, in
# bf16, so the CUDA kernels serve the 4-bit layers and ComfyUI's model management moves them
# between GPU and CPU (full and low-VRAM loads). Needs the ComfyUI tree (.comfyui/ComfyUI) and,
# where pip cannot reach PyPI, the pure-Python wheels ComfyUI imports in .whl/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -e kernels/_build/libsvdq_kernels.so ] || bash kernels/build.sh --fast
SVDQ_COMFY_DEVICE=cuda python3 -m pytest -q -s tests/test_wrappers_inprocess.py "$@"
