#!/usr/bin/env bash
# Main job: prepare venv + ComfyUI (first run: a few minutes), then quantize and sample a tiny
# SD1.5 model on a real ComfyUI server. Prints the PNG and 4-bit file paths.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_comfyui.sh"
exec "${SVDQ_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/demo.py"
