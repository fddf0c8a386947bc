import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
_p = types.ModuleType("comfyui_svdquant")
_p.__path__ = [str(ROOT)]
sys.modules.setdefault("comfyui_svdquant", _p)

import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cuda_lib():
    """GPU test modules use this: skip without a GPU, fail without the built library (unless
    SVDQ_ALLOW_NO_LIB=1), and register the custom ops."""
    import torch
    from comfyui_svdquant.kernels import _lib
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _lib.load() is None:
        if os.environ.get("SVDQ_ALLOW_NO_LIB") == "1":
            pytest.skip(f"CUDA library absent: {_lib.load_error()}")
        pytest.fail(f"CUDA library absent (run kernels/build.sh): {_lib.load_error()}")
    from comfyui_svdquant.kernels import ops  # noqa: F401  registers the custom ops
