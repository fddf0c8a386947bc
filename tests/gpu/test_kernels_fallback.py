"""CPU-only (CI): the kernels package imports without the CUDA library or a GPU and falls back to the reference."""
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import _lib
from comfyui_svdquant.kernels import reference as ref

from _layers import make_layer, make_x


def test_cpu_uses_reference_and_matches():
    assert kernels.backend_name("cpu") == "reference"
    lay = make_layer(128, 256, 16, torch.float32, "cpu")
    p = kernels.prepare_weights(lay, torch.device("cpu"))
    x = make_x(5, 256, torch.float32, "cpu").reshape(1, 5, 256)
    y = kernels.linear(x, p)
    y_ref = ref.svdquant_linear(x, lay["qweight"], lay["wscales"], lay["smooth_factor"], lay["proj_down"],
                                lay["proj_up"], lay["bias"])
    assert torch.equal(y, y_ref)


def test_missing_library_is_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDQ_KERNELS_LIB", str(tmp_path / "nope.so"))
    monkeypatch.setattr(_lib, "_tried", False)
    monkeypatch.setattr(_lib, "_lib", None)
    monkeypatch.setattr(_lib, "_candidates", lambda: iter([tmp_path / "nope.so"]))
    assert _lib.load() is None
    assert "not found" in _lib.load_error()
    assert _lib.device_path(0) == 0
    monkeypatch.setattr(_lib, "_tried", False)  # let the next user load the real one


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("SVDQ_BACKEND", "reference")
    assert kernels.backend_name("cuda") == "reference"
