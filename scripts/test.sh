#!/usr/bin/env bash
# The test command (CI runs exactly this): prepare venv + ComfyUI, then every CPU test,
# ComfyUI server tests included (SVDQ_REQUIRE_COMFY=1 turns a missing ComfyUI into a failure).
# GPU tests (marker gpu) run on a CUDA machine: see bench/ and docs/KERNELS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_comfyui.sh"
cd "$ROOT"
# Temporary files (ComfyUI base dirs with quantized outputs, a FLUX one is ~0.4 GB) go on the
# repo's disk, beside the venv and the tiny-model cache, not to /tmp: a CI machine's /tmp can be
# far smaller (CI once ran out of space there). SVDQ_TEST_TMP moves them elsewhere.
TEST_TMP="${SVDQ_TEST_TMP:-$ROOT/.test-tmp}"
mkdir -p "$TEST_TMP"
export TMPDIR="$TEST_TMP"
df -h "$ROOT" "$TEST_TMP" /tmp 2>/dev/null | sed 's/^/[test] /' || true
SVDQ_REQUIRE_COMFY=1 exec "${SVDQ_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -m "not gpu" \
    --basetemp "$TEST_TMP/pytest" "$@"
