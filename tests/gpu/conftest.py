import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
_p = types.ModuleType("comfyui_svdquant")
_p.__path__ = [str(ROOT)]
sys.modules.setdefault("comfyui_svdquant", _p)
