import sys, types, pathlib
ROOT = pathlib.Path(__file__).resolve().parents[1]
if "comfyui_svdquant" not in sys.modules:
    _pkg = types.ModuleType("comfyui_svdquant"); _pkg.__path__ = [str(ROOT)]
    sys.modules["comfyui_svdquant"] = _pkg
