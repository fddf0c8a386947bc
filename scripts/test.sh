#!/usr/bin/env bash
# The test command (CI runs exactly this): prepare venv + ComfyUI, then every CPU test,
# ComfyUI server tests included (SVDQ_REQUIRE_COMFY=1 turns a missing ComfyUI into a failure).
# GPU tests (marker gpu) run on a CUDA machine: see bench/ and docs/KERNELS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_comfyui.sh"
cd "$ROOT"
SVDQ_REQUIRE_COMFY=1 exec "${SVDQ_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -m "not gpu" "$@"
