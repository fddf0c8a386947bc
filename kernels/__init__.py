"""Kernel entry points for the 4-bit linear.

Callers use `prepare_weights` once per device (any re-layout a kernel wants happens here, from the
natural layout of docs/FORMAT.md) and `linear` on every forward. The backend is chosen here, never
by callers: the compiled CUDA library when it is present and supports the device, else the
pure-torch reference (CPU included).
"""
from . import reference

_BACKEND_LOGGED = set()


def backend_name(device) -> str:
    """Name of the backend that `linear` will use on `device`."""
    return "reference"


def prepare_weights(tensors: dict, device) -> dict:
    """Per-device weight preparation; the reference path reads the natural layout as is."""
    return dict(tensors)


def linear(x, prepared: dict, group_size: int = 64):
    """Y = 4-bit linear of x (..., K) with the layer tensors from `prepare_weights`."""
    return reference.svdquant_linear(
        x,
        prepared["qweight"],
        prepared["wscales"],
        prepared["smooth_factor"],
        prepared.get("proj_down"),
        prepared.get("proj_up"),
        prepared.get("bias"),
        group_size,
    )
