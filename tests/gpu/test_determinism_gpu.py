"""Bitwise run-to-run determinism of the CUDA kernels: the same input gives the same output bits.

Each case draws a fresh random layer and input (outlier channels, see _layers.py; seed printed on
failure), then calls each op and the whole linear 10 times and compares every result with the first
by `torch.equal` (no tolerance). Shapes include many K-splits of the LoRA-down sum (large K = 12288,
tiny M = 1, FLUX-sized M = 4608) and ragged M (not a multiple of the 64-row block).
"""
import random

import pytest
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import _lib

from _layers import make_layer, make_x

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_lib")]
DEV = "cuda"
REPS = 10

# (M, K, N, rank)
CASES = [(4608, 3072, 3072, 32), (333, 12288, 3072, 32), (1, 12288, 640, 128), (77, 640, 1280, 64),
         (4109, 3072, 576, 128), (130, 1280, 320, 0)]


def _paths():
    p = _lib.device_path(torch.cuda.current_device())
    return [90, 80] if p == 90 else [p]


def _fresh(m, k, n, r, dtype):
    seed = random.SystemRandom().randrange(1 << 30)
    lay = make_layer(n, k, r, dtype, DEV, seed=seed)
    x = make_x(m, k, dtype, DEV, seed=seed + 1)
    return seed, lay, x


def _ndiff(a, b):
    if a.dtype == torch.uint8:
        return (a != b).sum().item()
    return (a.view(torch.int32 if a.element_size() == 4 else torch.int16) != b.view(
        torch.int32 if b.element_size() == 4 else torch.int16)).sum().item()


def _assert_same(ref, got, what, seed, i):
    assert torch.equal(ref, got) or _ndiff(ref, got) == 0, (
        f"{what}: call {i} differs from call 0 in {_ndiff(ref, got)} of {ref.numel()} elements "
        f"(max |diff| {(ref.double() - got.double()).abs().max().item():.3g}; seed {seed})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r", CASES)
def test_ops_bitwise_deterministic(m, k, n, r, dtype):
    from comfyui_svdquant.kernels import ops

    seed, lay, x = _fresh(m, k, n, r, dtype)
    rp = (r + 31) // 32 * 32
    smooth_rcp = (1.0 / lay["smooth_factor"].float()).contiguous()
    pd = torch.nn.functional.pad(lay["proj_down"], (0, rp - r)).contiguous() if r else None
    pu = torch.nn.functional.pad(lay["proj_up"].float(), (0, rp - r)).contiguous()
    ws = lay["wscales"].float().contiguous()
    bias = lay["bias"].float()
    for path in _paths():
        fmt = _lib.FMT_E4M3 if path == 90 else _lib.FMT_INT4
        qw = kernels._e4m3_from_packed(lay["qweight"]) if path == 90 else lay["qweight"].view(torch.uint8)
        first = None
        for i in range(REPS):
            qa, sa, la = ops.quantize_act_lora_down(x, smooth_rcp, pd, rp, fmt)
            y = ops.w4a4_gemm(qa, sa, qw, ws, la, pu, bias, dtype, path)
            torch.cuda.synchronize()
            got = (qa, sa[:, :m], la, y)
            if first is None:
                first = [t.clone() for t in got]
                assert torch.isfinite(la).all() and torch.isfinite(y).all()
                # the GEMM alone on identical inputs, REPS times
                for j in range(1, REPS):
                    _assert_same(first[3], ops.w4a4_gemm(qa, sa, qw, ws, la, pu, bias, dtype, path),
                                 f"path {path} gemm", seed, j)
                continue
            for name, a, b in zip(("qact", "ascales", "lora_act", "out"), first, got):
                _assert_same(a, b, f"path {path} {name}", seed, i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r", CASES)
def test_linear_bitwise_deterministic(m, k, n, r, dtype):
    seed, lay, x = _fresh(m, k, n, r, dtype)
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    assert prepared["_path"] in (80, 90)
    x = x.reshape(1, m, k)
    y0 = kernels.linear(x, prepared).clone()
    assert torch.isfinite(y0).all()
    for i in range(1, REPS):
        junk = torch.randn(m, max(n, k) * 2, device=DEV)  # reshuffles the caching allocator between calls
        y = kernels.linear(x, prepared)
        del junk
        _assert_same(y0, y, "linear", seed, i)
