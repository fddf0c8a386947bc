"""Where the harness finds things. Every location can be overridden by env so CI,
a developer's own ComfyUI checkout and this repo's defaults all work."""
import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-SVDQuant"  # the folder name our pack gets under custom_nodes/


def comfyui_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui" / "ComfyUI")


def venv_python() -> pathlib.Path:
    """Python that runs the server and the model builder (needs ComfyUI's requirements).

    Falls back to the running interpreter so a user who runs pytest from their
    own ComfyUI environment needs no extra venv."""
    venv = pathlib.Path(os.environ.get("SVDQ_VENV") or REPO_ROOT / ".venv")
    py = venv / "bin" / "python"
    return py if py.exists() else pathlib.Path(sys.executable)


def tiny_models_cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SVDQ_TINY_MODELS_CACHE") or REPO_ROOT / ".comfyui" / "tiny_models")


def comfyui_missing_reason() -> str | None:
    """None when a usable ComfyUI tree is there, else why not (for skip messages)."""
    root = comfyui_path()
    if not (root / "main.py").is_file():
        return f"no ComfyUI tree at {root} (run scripts/setup_comfyui.sh or set COMFYUI_PATH)"
    if not (root / "comfy" / "model_detection.py").is_file():
        return f"{root} does not look like a ComfyUI tree (comfy/model_detection.py missing)"
    return None
