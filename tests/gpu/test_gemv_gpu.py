"""The W4A16 GEMV of 16-bit-activation layers (kernels/csrc/w4a16.cu) vs the fp32 reference
(kernels/reference.py svdquant_linear_act16), on fresh random layers with outlier channels.

Bound: half the whole 4-bit linear's (bf16 3e-3, fp16 7.5e-4 relative Frobenius error): the kernel sums in fp32
and rounds twice, the low-rank activations (X·proj_down, cuBLAS in the compute dtype) and the output. Outputs are
poisoned (NaN) before each run; every element must be written and finite.
"""
import pytest
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import _lib
from comfyui_svdquant.kernels import reference as ref

from _layers import make_layer, make_ratio_layer, make_x
from test_kernels_gpu import BOUND, DEV, rel, sync_check

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_lib")]

# (M, N, K, rank): FLUX's modulation shapes (double block 6·3072 outputs, single 3·3072) at batch 1/2/4, and
# ragged ones: N not a multiple of the kernel's 8 rows, K from one group to 12288 (several chunks per thread),
# M past one 4-row tile, ranks 0 / 16 / 48 (an imported AWQ layer's zero-point branch) / 128.
CASES = [(1, 18432, 3072, 32), (2, 9216, 3072, 32), (4, 9216, 3072, 48), (1, 1000, 640, 16), (3, 517, 12288, 128),
         (7, 64, 64, 0), (13, 300, 1280, 32), (64, 264, 3072, 32)]


def _layer(scales, n, k, r, dtype, bias, seed):
    make = make_ratio_layer if scales == "int_ratio" else make_layer
    return make(n, k, r, dtype, DEV, bias=bias, seed=seed)


def _prepared(lay):
    p = kernels.prepare_weights({**lay, "act16": True}, torch.device(DEV))
    assert p["_gv_qw"] is not None and "_qw" not in p  # the GEMV's operands, no kernel weight copy
    return p


def _reference(x, lay):
    return ref.svdquant_linear_act16(x.float(), lay["qweight"], ref.weight_scales_for_gemm(lay), lay["smooth_factor"],
                                     lay["proj_down"], lay["proj_up"], lay["bias"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scales", ["int_ratio", "float"])
@pytest.mark.parametrize("m,n,k,r", CASES)
def test_gemv_matches_the_reference(m, n, k, r, scales, dtype):
    from comfyui_svdquant.kernels import ops
    lay = _layer(scales, n, k, r, dtype, bias=(m % 2 == 1), seed=m + n + k + r)
    p = _prepared(lay)
    x = make_x(m, k, dtype, DEV, seed=m * 3 + k)
    lora = None if not r else x @ lay["proj_down"]
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    ops.gemv_into(x, p["_smooth_rcp"], p["_gv_qw"], p["_gv_steps"], p["_gv_mult"], p["_gv_base"], lora,
                  None if lora is None else lay["proj_up"], p["_bias"], out)
    sync_check()
    want = _reference(x, lay)
    assert torch.isfinite(out).all()
    assert rel(out, want) < BOUND[dtype] / 2
    again = torch.full_like(out, float("nan"))
    ops.gemv_into(x, p["_smooth_rcp"], p["_gv_qw"], p["_gv_steps"], p["_gv_mult"], p["_gv_base"], lora,
                  None if lora is None else lay["proj_up"], p["_bias"], again)
    assert torch.equal(out, again)  # a fixed summation order: bitwise reproducible


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
def test_linear_routes_small_batches_to_the_gemv(scales):
    """kernels.linear on a prepared 16-bit-activation layer: the GEMV up to GEMV_MAX_M rows (3-D input, as the
    modulation's (B, 1, C)), the torch form past it; both within the bound of the reference."""
    dtype = torch.bfloat16
    lay = _layer(scales, 768, 3072, 32, dtype, bias=True, seed=5)
    p = _prepared(lay)
    for m in (1, 4, kernels.GEMV_MAX_M, kernels.GEMV_MAX_M + 1):
        x = make_x(m, 3072, dtype, DEV, seed=m).reshape(m, 1, 3072)
        y = kernels.linear(x, p)
        sync_check()
        assert y.shape == (m, 1, 768) and torch.isfinite(y).all()
        bound = BOUND[dtype] / 2 if m <= kernels.GEMV_MAX_M else 2 * BOUND[dtype]  # torch form: X/λ rounded to bf16
        assert rel(y, _reference(x, lay)) < bound


def test_gemv_under_torch_compile_and_a_cuda_graph():
    """The custom op traces without a graph break (fullgraph) and replays in a CUDA graph, equal to eager."""
    dtype = torch.bfloat16
    lay = _layer("int_ratio", 1536, 3072, 32, dtype, bias=True, seed=9)
    p = _prepared(lay)
    x = make_x(2, 3072, dtype, DEV, seed=2)
    eager = kernels.linear(x, p)
    compiled = torch.compile(lambda t: kernels.linear(t, p), fullgraph=True)
    assert torch.equal(compiled(x), eager)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernels.linear(static_x, p)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = kernels.linear(static_x, p)
    static_y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager)


def test_gemv_rejects_bad_arguments():
    """A K that is not a whole number of groups, or a misaligned activation pointer, is an error naming the
    kernel, never a wrong result."""
    from comfyui_svdquant.kernels import ops
    dtype = torch.bfloat16
    lay = _layer("float", 64, 128, 0, dtype, bias=False, seed=1)
    p = _prepared(lay)
    out = torch.empty((1, 64), dtype=dtype, device=DEV)
    x = make_x(1, 130, dtype, DEV)
    with pytest.raises(_lib.KernelError, match="svdq_w4a16_gemv"):
        ops.gemv_into(x[:, 1:129], p["_smooth_rcp"], p["_gv_qw"], p["_gv_steps"], None, None, None, None, None, out)
    with pytest.raises(_lib.KernelError, match="svdq_w4a16_gemv"):
        ops.gemv_into(x[:, :96].contiguous(), p["_smooth_rcp"][:96], p["_gv_qw"][:, :48], p["_gv_steps"], None,
                      None, None, None, None, out)
