"""Import ComfyUI (CPU unless SVDQ_COMFY_DEVICE=cuda) and this pack as `comfyui_svdquant`, for the
scripts under bench/ that run outside pytest. The repo root itself is never put on sys.path: the
pack's `kernels/` would shadow the PyPI `kernels` module that transformers imports."""
import os
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]


def comfyui_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui" / "ComfyUI")


def import_comfy():
    root = str(comfyui_path())
    if not os.path.isfile(os.path.join(root, "comfy", "model_base.py")):
        raise FileNotFoundError(f"no ComfyUI tree at {root} (run scripts/setup_comfyui.sh or set COMFYUI_PATH)")
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = os.environ.get("SVDQ_COMFY_DEVICE", "cpu") != "cuda"
    import comfy.model_management  # noqa: F401
    if "comfyui_svdquant" not in sys.modules:
        pkg = types.ModuleType("comfyui_svdquant")
        pkg.__path__ = [str(ROOT)]
        sys.modules["comfyui_svdquant"] = pkg
