"""CUDA kernels vs the reference for int_ratio scales (docs/FORMAT.md §1; kernels/csrc/svdq.cu kernel 2c).

Bounds as in test_kernels_gpu.py: kernel 1 codes x multipliers equal to the reference's except on rare
rounding ties (a code off by one), bases within 2 ulp (x*(1/lambda) vs x/lambda), lora_act within 1e-5 of
fp64; GEMM / whole linear within bf16 6e-3 / fp16 1.5e-3 relative Frobenius error of the fp32 reference,
every element finite (outputs are poisoned first). torch.compile / CUDA-graph capture of int_ratio layers:
test_kernels_gpu.py::test_torch_compile_and_cuda_graph[int_ratio].
"""
import pytest
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import _lib
from comfyui_svdquant.kernels import reference as ref

from _layers import make_ratio_layer, make_x
from test_kernels_gpu import BOUND, DEV, QUANT_CASES, GEMM_CASES, LINEAR_CASES, rel, sync_check

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_lib")]


def _ops():
    from comfyui_svdquant.kernels import ops
    return ops


def _fmts():
    return [_lib.FMT_I8_RATIO, _lib.FMT_INT4_RATIO] if _lib.device_path(torch.cuda.current_device()) == 90 \
        else [_lib.FMT_INT4_RATIO]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", QUANT_CASES)
def test_quantize_ratio(m, k, r, dtype):
    ops = _ops()
    lay = make_ratio_layer(64, k, r, dtype, DEV, seed=m + k + r)
    x = make_x(m, k, dtype, DEV, seed=m * 7 + k)
    x[min(2, m - 1), : min(k, 128)] = 0  # a zero chunk/row part
    # The kernel smooths by x * (1/lambda), at most 1 ulp from the reference's x / lambda; a multiplier
    # ceil(amax / (7 base)) sitting on an integer can flip on that ulp (seen once in 2e5 groups). So the
    # codes are compared with the reference quantizer applied to the kernel's own smoothing; the production
    # reference (x / lambda) is checked against it within those ulps.
    smooth_rcp = (1.0 / lay["smooth_factor"].float()).contiguous()
    xs = x.float() * smooth_rcp
    assert rel(xs, x.float() / lay["smooth_factor"].float()) < 1e-7
    codes_ref, f_ref, b_ref = ref.quantize_groups_ratio(xs, 64, ref.ACT_CHUNK_GROUPS)
    codes_ref = codes_ref.to(torch.int32)
    fx = f_ref.to(torch.int32).repeat_interleave(64, dim=1)
    rp = (r + 31) // 32 * 32
    pd = torch.nn.functional.pad(lay["proj_down"], (0, rp - r)).contiguous() if r else None
    for fmt in _fmts():
        qshape, sshape = ops.act_shapes(m, k, fmt)
        qact = torch.full(qshape, 0x5A, dtype=torch.uint8, device=DEV)
        ascales = torch.full(sshape, float("nan"), device=DEV)
        lora = torch.full((m, rp), float("nan"), device=DEV)
        ops.quantize_into(x, smooth_rcp, pd, qact, ascales, lora, fmt)
        sync_check()
        if fmt == _lib.FMT_I8_RATIO:
            got = qact.view(torch.int8).to(torch.int32)          # code x multiplier
            diff = (got - codes_ref * fx).abs()
            assert bool((diff % fx == 0).all()), "int8 values are not multiples of the reference multiplier"
            diff = diff // fx
            sc = ascales[:, :m].t()
            assert ((sc - b_ref).abs() <= 2.5e-7 * b_ref.abs()).all(), "activation bases differ"
        else:
            diff = (ref.unpack_int4(qact.view(torch.int8)).to(torch.int32) - codes_ref).abs()
            steps = ref.ratio_steps(f_ref, b_ref, ref.ACT_CHUNK_GROUPS)
            sc = ascales[:, :m].t()
            assert ((sc - steps).abs() <= 5e-7 * steps.abs()).all(), "activation steps differ"
        assert diff.max().item() <= 1 and diff.float().mean().item() <= 1e-4, f"fmt {fmt}: {(diff > 0).sum().item()} codes differ"
        if r:
            assert rel(lora[:, :r], x.double() @ lay["proj_down"].double()) < 1e-5
            assert torch.all(lora[:, r:] == 0)


# Kernel 1b (quant_i8_ratio_kernel, smem-staged chunks) must emit the same bytes and bases as kernel 1
# (SVDQ_I8_QUANT_KERNEL1=1 forces kernel 1): same float operations per element, only the max over a chunk's
# group maxima is taken in another (exact) order. lora_act is summed in another fixed order: close, not equal,
# and bitwise equal from one kernel-1b call to the next.
KERNEL1B_CASES = QUANT_CASES + [(4608, 3072, 32), (256, 12288, 32), (4096 + 13, 640, 96), (77, 256, 0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", KERNEL1B_CASES)
def test_quantize_i8_kernel1b_matches_kernel1(m, k, r, dtype, monkeypatch):
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("FMT_I8_RATIO is the Hopper path")
    ops = _ops()
    lay = make_ratio_layer(64, k, r, dtype, DEV, seed=m + k + r + 1)
    x = make_x(m, k, dtype, DEV, seed=m * 5 + k)
    x[min(2, m - 1), : min(k, 128)] = 0
    smooth_rcp = (1.0 / lay["smooth_factor"].float()).contiguous()
    rp = (r + 31) // 32 * 32
    pd = torch.nn.functional.pad(lay["proj_down"], (0, rp - r)).contiguous() if r else None
    qshape, sshape = ops.act_shapes(m, k, _lib.FMT_I8_RATIO)
    outs = []
    for legacy in ("1", "0", "0"):
        monkeypatch.setenv("SVDQ_I8_QUANT_KERNEL1", legacy)
        qact = torch.full(qshape, 0x5A, dtype=torch.uint8, device=DEV)
        ascales = torch.full(sshape, float("nan"), device=DEV)
        lora = torch.full((m, rp), float("nan"), device=DEV)
        ops.quantize_into(x, smooth_rcp, pd, qact, ascales, lora, _lib.FMT_I8_RATIO)
        sync_check()
        outs.append((qact, ascales[:, :m], lora))
    (q1, s1, l1), (q2, s2, l2), (q3, s3, l3) = outs
    assert torch.equal(q2, q3) and torch.equal(s2.view(torch.int32), s3.view(torch.int32)), "kernel 1b not deterministic"
    assert torch.equal(l2.view(torch.int32), l3.view(torch.int32)), "kernel 1b lora_act not bitwise deterministic"
    assert torch.equal(q1, q2), f"{(q1 != q2).sum().item()} code bytes differ from kernel 1"
    assert torch.equal(s1.view(torch.int32), s2.view(torch.int32)), "bases differ from kernel 1"
    if r:
        assert bool(torch.isfinite(l2).all()), "lora_act not fully written"
        assert rel(l2, l1) < 1e-6
        assert rel(l2[:, :r], x.double() @ lay["proj_down"].double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,r,bias", GEMM_CASES)
def test_gemm_ratio(m, n, k, r, bias, dtype):
    """Kernel 2 on the reference's own quantized activations: path 91 (0 = shape chosen by the cost model,
    1 = 192x128, 2 = 128x192, 3 = 128x128 tiles) and the INT4 path."""
    ops = _ops()
    lay = make_ratio_layer(n, k, r, dtype, DEV, bias=bias, seed=n + k + r)
    x = make_x(m, k, dtype, DEV, seed=m * 3 + k)
    qa, (fa, ba), la = ref.quantize_act_lora_down(x, lay["smooth_factor"], lay["proj_down"], scale_mode="int_ratio")
    wsc = (lay["wscale_mult"], lay["wscale_base"])
    y_ref = ref.w4a4_gemm(qa, (fa, ba), lay["qweight"], wsc, la, lay["proj_up"], lay["bias"], torch.float32)
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    rp = prepared["_rp"]
    mp = ops.padded_rows(m)
    lora = torch.nn.functional.pad(la, (0, rp - r)).contiguous()
    codes = ref.unpack_int4(qa).to(torch.int32)
    runs = []
    if prepared["_path"] == 91:
        qa8 = (codes * fa.to(torch.int32).repeat_interleave(64, 1)).to(torch.int8).view(torch.uint8).contiguous()
        sa = torch.zeros((ba.shape[1], mp), device=DEV)
        sa[:, :m] = ba.t()
        runs += [(qa8, sa, prepared["_qw"], prepared["_wscales"], 91, v) for v in (0, 1, 2, 3)]
        steps_w = (lay["wscale_base"].unsqueeze(0) * lay["wscale_mult"].float()).contiguous()
        qw4 = lay["qweight"].view(torch.uint8)
    else:
        steps_w, qw4 = prepared["_wscales"], prepared["_qw"]
    steps_a = torch.zeros((k // 64, mp), device=DEV)
    steps_a[:, :m] = ref.ratio_steps(fa, ba, ref.ACT_CHUNK_GROUPS).t()
    runs.append((qa.view(torch.uint8), steps_a, qw4, steps_w, 80, 0))
    for qa_i, sa_i, qw_i, ws_i, path, variant in runs:
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        ops.gemm_into(qa_i, sa_i, qw_i, ws_i, lora, prepared["_proj_up"], prepared["_bias"], out, path, variant)
        sync_check()
        tag = f"path {path} variant {variant}"
        assert torch.isfinite(out).all(), f"{tag}: {(~torch.isfinite(out)).sum().item()} non-finite"
        e = rel(out, y_ref)
        assert e < BOUND[dtype], f"{tag}: rel err {e:.2e}"


ROW_BASE_VARIANTS = (21, 22, 23, 24)  # kernel 2e: 128x256, 192x128, 128x192, 128x128 tiles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,r,bias", GEMM_CASES + [(4608, 3072, 3072, 32, True)])
def test_gemm_row_base(m, n, k, r, bias, dtype):
    """Kernel 2e (one activation base per token over all of K, int32 sums over the whole row) against the
    reference on activations quantized that way (reference chunk = the whole row), every tile shape."""
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("kernel 2e is Hopper's int8 path")
    ops = _ops()
    lay = make_ratio_layer(n, k, r, dtype, DEV, bias=bias, seed=n + k + r + 5)
    x = make_x(m, k, dtype, DEV, seed=m * 3 + k + 1)
    xs = x.float() / lay["smooth_factor"].float()
    codes, fa, ba = ref.quantize_groups_ratio(xs, 64, k // 64)   # ba (M, 1): the row bases
    la = x.float() @ lay["proj_down"].float() if r else x.new_zeros((m, 0), dtype=torch.float32)
    wsc = (lay["wscale_mult"], lay["wscale_base"])
    y_ref = ref.dequantize_ratio(codes, fa, ba, 64, k // 64) @ ref._dequant_weight(lay["qweight"], wsc, 64).t()
    if r:
        y_ref += la @ lay["proj_up"].float().t()
    if bias:
        y_ref += lay["bias"].float()
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    rp, mp = prepared["_rp"], ops.padded_rows(m)
    lora = torch.nn.functional.pad(la, (0, rp - r)).contiguous()
    qa8 = (codes.to(torch.int32) * fa.to(torch.int32).repeat_interleave(64, 1)).to(torch.int8).view(torch.uint8)
    sa = torch.zeros((1, mp), device=DEV)
    sa[0, :m] = ba[:, 0]
    for variant in ROW_BASE_VARIANTS:
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        ops.gemm_into(qa8.contiguous(), sa, prepared["_qw"], prepared["_wscales"], lora, prepared["_proj_up"],
                      prepared["_bias"], out, 91, variant)
        sync_check()
        assert torch.isfinite(out).all(), f"variant {variant}: {(~torch.isfinite(out)).sum().item()} non-finite"
        e = rel(out, y_ref)
        assert e < BOUND[dtype], f"variant {variant}: rel err {e:.2e}"


def _row_base_quantize(x, lay, r):
    """Kernel 1b in the AF_I8_ROW format (row bases by row_base_kernel): (qact, ascales (1, Mp), lora)."""
    ops = _ops()
    m, k = x.shape
    smooth_rcp = (1.0 / lay["smooth_factor"].float()).contiguous()
    rp = (r + 31) // 32 * 32
    pd = torch.nn.functional.pad(lay["proj_down"], (0, rp - r)).contiguous() if r else None
    qshape, sshape = ops.act_shapes(m, k, _lib.FMT_I8_ROW)
    assert sshape[0] == 1
    qact = torch.full(qshape, 0x5A, dtype=torch.uint8, device=DEV)
    ascales = torch.full(sshape, float("nan"), device=DEV)
    lora = torch.full((m, rp), float("nan"), device=DEV)
    ops.quantize_into(x, smooth_rcp, pd, qact, ascales, lora, _lib.FMT_I8_ROW)
    sync_check()
    return qact, ascales, lora, smooth_rcp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", QUANT_CASES + [(4608, 3072, 32), (256, 12288, 32)])
def test_quantize_row_base(m, k, r, dtype):
    """Kernel 1 in the AF_I8_ROW format against the reference quantizer with one chunk per row (same criteria as
    test_quantize_ratio: codes off by one only on rare ties, bases within 2 ulp), padded rows' bases 0."""
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("AF_I8_ROW is the Hopper path")
    lay = make_ratio_layer(64, k, r, dtype, DEV, seed=m + k + r + 2)
    x = make_x(m, k, dtype, DEV, seed=m * 7 + k + 2)
    x[min(2, m - 1), : min(k, 128)] = 0
    qact, ascales, lora, smooth_rcp = _row_base_quantize(x, lay, r)
    codes_ref, f_ref, b_ref = ref.quantize_groups_ratio(x.float() * smooth_rcp, 64, k // 64)
    fx = f_ref.to(torch.int32).repeat_interleave(64, dim=1)
    got = qact.view(torch.int8).to(torch.int32)
    diff = (got - codes_ref.to(torch.int32) * fx).abs()
    assert bool((diff % fx == 0).all()), "int8 values are not multiples of the reference multiplier"
    diff = diff // fx
    assert diff.max().item() <= 1 and diff.float().mean().item() <= 1e-4, f"{(diff > 0).sum().item()} codes differ"
    sc = ascales[0, :m].unsqueeze(1)
    assert ((sc - b_ref).abs() <= 2.5e-7 * b_ref.abs()).all(), "row bases differ"
    assert torch.all(ascales[0, m:] == 0)
    if r:
        assert rel(lora[:, :r], x.double() @ lay["proj_down"].double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r", LINEAR_CASES + [(4608, 3072, 3072, 32)])
def test_linear_row_base(m, k, n, r, dtype):
    """Kernel 1 (AF_I8_ROW) + kernel 2e (variant 20, the cost model's tile, and 21, 128x256) against the reference
    with row-chunk activations."""
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("kernel 2e is Hopper's int8 path")
    ops = _ops()
    lay = make_ratio_layer(n, k, r, dtype, DEV, seed=3 + n + k)
    x = make_x(m, k, dtype, DEV, seed=4 + m + k)
    qact, ascales, lora, _ = _row_base_quantize(x, lay, r)
    xs = x.float() / lay["smooth_factor"].float()
    codes, fa, ba = ref.quantize_groups_ratio(xs, 64, k // 64)
    wsc = (lay["wscale_mult"], lay["wscale_base"])
    y_ref = ref.dequantize_ratio(codes, fa, ba, 64, k // 64) @ ref._dequant_weight(lay["qweight"], wsc, 64).t()
    if r:
        y_ref += (x.float() @ lay["proj_down"].float()) @ lay["proj_up"].float().t()
    y_ref += lay["bias"].float()
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    for variant in (20, 21):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        ops.gemm_into(qact, ascales, prepared["_qw"], prepared["_wscales"], lora, prepared["_proj_up"],
                      prepared["_bias"], out, 91, variant)
        sync_check()
        assert torch.isfinite(out).all(), f"variant {variant}: non-finite outputs"
        e = rel(out, y_ref)
        assert e < BOUND[dtype], f"variant {variant}: rel err {e:.2e}"


@pytest.mark.parametrize("m,k,n,r", [(77, 640, 5120, 32), (4109, 3072, 1152, 128)])
def test_row_base_layers_through_the_model_path(m, k, n, r, monkeypatch):
    """SVDQ_ROW_BASE=1: prepare_weights picks FMT_I8_ROW for a layer of at least ROW_BASE_MIN_WEIGHTS weights (a
    smaller one keeps chunk bases) and every eager form (one library call, two calls, the compiled op) runs kernel 2e,
    within the bound of the reference with row-chunk activations."""
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("kernel 2e is Hopper's int8 path")
    ops = _ops()
    monkeypatch.setenv("SVDQ_ROW_BASE", "1")
    dtype = torch.bfloat16
    small = kernels.prepare_weights(make_ratio_layer(640, 640, 32, dtype, DEV, seed=1), torch.device(DEV))
    assert small["_afmt"] == _lib.FMT_I8_RATIO
    lay = make_ratio_layer(n, k, r, dtype, DEV, seed=11 + n)
    x = make_x(m, k, dtype, DEV, seed=12 + m)
    p = kernels.prepare_weights(lay, torch.device(DEV))
    assert n * k >= kernels.ROW_BASE_MIN_WEIGHTS and p["_afmt"] == _lib.FMT_I8_ROW
    codes, fa, ba = ref.quantize_groups_ratio(x.float() / lay["smooth_factor"].float(), 64, k // 64)
    wsc = (lay["wscale_mult"], lay["wscale_base"])
    y_ref = ref.dequantize_ratio(codes, fa, ba, 64, k // 64) @ ref._dequant_weight(lay["qweight"], wsc, 64).t()
    y_ref += (x.float() @ lay["proj_down"].float()) @ lay["proj_up"].float().t() + lay["bias"].float()
    outs = {"one call": ops.linear_direct(x, p), "two calls": ops._run_linear(x, *ops._direct(p, dtype)[1:]),
            "op": torch.ops.svdquant.linear.default(x, p["_smooth_rcp"], p["_proj_down"], p["_qw"], p["_wscales"],
                                                    p["_proj_up"], p["_bias"], p["_rp"], p["_afmt"], p["_path"], None)}
    sync_check()
    for tag, y in outs.items():
        assert rel(y, y_ref) < BOUND[dtype], f"{tag}: rel err {rel(y, y_ref):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r", LINEAR_CASES)
def test_linear_ratio_end_to_end(m, k, n, r, dtype):
    lay = make_ratio_layer(n, k, r, dtype, DEV, seed=3 + n)
    x = make_x(m, k, dtype, DEV, seed=4 + m).reshape(1, m, k)
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    assert prepared["_path"] in (80, 91)
    assert kernels.backend_name(DEV, "int_ratio") in ("cuda-sm90a-int8", "cuda-mma-int4")
    y = kernels.linear(x, prepared)
    sync_check()
    y_ref = ref.svdquant_linear(x.float(), lay["qweight"], (lay["wscale_mult"], lay["wscale_base"]),
                                lay["smooth_factor"].float(), lay["proj_down"].float(), lay["proj_up"].float(),
                                None if lay["bias"] is None else lay["bias"].float())
    assert y.shape == (1, m, n) and y.dtype == dtype and torch.isfinite(y).all()
    e = rel(y, y_ref)
    assert e < BOUND[dtype], f"rel err {e:.2e}"
    for _ in range(3):  # bitwise deterministic run to run
        assert torch.equal(kernels.linear(x, prepared), y)



def test_moving_a_layer_to_the_gpu_prepares_the_kernel_copy():
    """ComfyUI plans a second load from the memory in use plus what it has loaded (kernel_cache entries
    included), so the prepared copy must exist once the layer is on the GPU, not only after its first call."""
    from comfyui_svdquant.core.qlinear import SVDQuantLinear
    lay = make_ratio_layer(1024, 3072, 32, torch.bfloat16, "cpu")
    q = SVDQuantLinear.from_tensors(lay)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    q.to(DEV)
    own = sum(p.nelement() * p.element_size() for p in q.parameters())
    assert q._prepared is not None
    assert torch.cuda.memory_allocated() - before >= own + 1024 * 3072  # the int8 weight copy is allocated
    x = make_x(77, 3072, torch.bfloat16, DEV)
    prepared = q._prepared[1]
    assert torch.equal(q(x), kernels.linear(x, prepared)) and q._prepared[1] is prepared  # no re-preparation


def test_eager_linear_on_two_streams_and_growing_shapes_is_bitwise_stable():
    """The eager path keeps kernel 1's K-split workspace per (device, stream) and grows it for larger shapes:
    results on a side stream, and after a larger call grew the workspace, equal the first ones bit for bit."""
    lay = make_ratio_layer(3072, 3072, 32, torch.bfloat16, DEV)
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    xs = [make_x(m, 3072, torch.bfloat16, DEV, seed=m) for m in (64, 4096 + 13)]
    first = [kernels.linear(x, prepared) for x in xs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = [kernels.linear(x, prepared) for x in reversed(xs)][::-1]
    torch.cuda.current_stream().wait_stream(side)
    again = [kernels.linear(x, prepared) for x in reversed(xs)][::-1]
    for a, b, c in zip(first, on_side, again):
        assert torch.isfinite(a).all() and torch.equal(a, b) and torch.equal(a, c)


def test_cuda_graph_keeps_its_workspace_when_eager_calls_outgrow_it():
    """A graph captured on a stream whose workspace was made eagerly holds that workspace's raw pointer; a later
    eager call with a larger shape grows the stream's workspace, and the old one must stay allocated (a freed one
    would be handed to the next allocation while the graph still writes into it)."""
    from comfyui_svdquant.kernels import _lib
    lay = make_ratio_layer(3072, 3072, 32, torch.bfloat16, DEV)
    prepared = kernels.prepare_weights(lay, torch.device(DEV))
    small, big = make_x(64, 3072, torch.bfloat16, DEV, seed=5), make_x(4096 + 13, 3072, torch.bfloat16, DEV, seed=6)
    assert _lib.quant_workspace(64, 3072, 32, torch.cuda.current_device())[0] > 0  # the K-split workspace is used
    want = kernels.linear(small, prepared)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernels.linear(small, prepared)  # the stream's workspace, made eagerly
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        static_y = kernels.linear(small, prepared)
    with torch.cuda.stream(s):
        kernels.linear(big, prepared)  # outgrows the workspace the graph points at
        filler = torch.full((1 << 22,), 7, dtype=torch.int32, device=DEV)  # would reuse a freed workspace
    torch.cuda.current_stream().wait_stream(s)
    static_y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, want) and int(filler[0]) == 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_activation_layer_on_the_gpu_matches_the_reference(dtype):
    """A layer declared with 16-bit activations (FLUX modulation) on the GPU makes its 16-bit weight from the
    packed codes per call (no prepared copy); against the fp32 reference on the same stored tensors, within the
    whole linear's bound (bf16 2x: X/λ is rounded to bf16 before the product here)."""
    lay = make_ratio_layer(3072, 3072, 32, dtype, DEV)
    prepared = kernels.prepare_weights({**lay, "act16": True}, torch.device(DEV))
    assert "_qw" not in prepared
    for m in (1, 2, 77):
        x = make_x(m, 3072, dtype, DEV, seed=m)
        y = kernels.linear(x, prepared)
        want = ref.svdquant_linear_act16(x.float(), lay["qweight"], ref.weight_scales_for_gemm(lay),
                                         lay["smooth_factor"], lay["proj_down"], lay["proj_up"], lay["bias"])
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert rel(y, want) < 2 * BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_imported_awq_modulation_layer_on_the_gpu(dtype):
    """A Nunchaku AWQ modulation linear as imported (float scales, codes − 8, zero points as a rank-48 branch:
    core/nunchaku_import.awq_as_act16_layer) at FLUX.1's single-block shape: on the GPU within the whole linear's
    bound of the fp32 reference, which equals code·s + z exactly (tests/test_nunchaku_import.py)."""
    from comfyui_svdquant.core.nunchaku_import import awq_as_act16_layer
    g = torch.Generator().manual_seed(3)
    n, k = 9216, 3072
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // 64, generator=g) * 0.002 + 0.0005).to(dtype)
    z = (-8 * s.float() + torch.randn(n, k // 64, generator=g) * 0.002).to(dtype)
    t = awq_as_act16_layer(codes, s, z, torch.randn(n, generator=g) * 0.1)
    lay = {key: (v.to(DEV, dtype) if v.is_floating_point() and key != "bias" else v.to(DEV)) for key, v in t.items()}
    prepared = kernels.prepare_weights({**lay, "act16": True}, torch.device(DEV))
    assert "_qw" not in prepared
    for m in (1, 2):
        x = make_x(m, k, dtype, DEV, seed=m)
        y = kernels.linear(x, prepared)
        want = ref.svdquant_linear_act16(x.float(), lay["qweight"], lay["wscales"], lay["smooth_factor"],
                                         lay["proj_down"], lay["proj_up"], lay["bias"])
        sync_check()
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert rel(y, want) < 2 * BOUND[dtype]


# (M, N, K, rank): FLUX shapes at both token counts, SD shapes, ragged M, N a multiple of 64 but not of the 128-wide
# tile, K with an odd number of groups (a half-empty last stage) and one group only.
PACKED_CASES = [(4608, 3072, 3072, 32), (256, 12288, 3072, 32), (256, 3072, 12288, 32), (4096 + 13, 320, 1280, 16),
                (333, 1280, 640, 128), (77, 192, 192, 0), (1, 64, 64, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,r", PACKED_CASES)
def test_packed_weight_gemm_equals_the_int8_copy(m, n, k, r, dtype):
    """Kernel 2d (packed_weights: the loader's weights_in_vram=compact) expands the packed codes x multipliers in shared memory into exactly the
    operand kernel 2c reads from its resident int8 copy: with the same 128x128 tiles the outputs are bitwise equal.
    The packed layer keeps no N x K copy, and its whole linear is within the usual bound of the reference."""
    if _lib.device_path(torch.cuda.current_device()) != 90 or not _lib.has_packed_gemm():
        pytest.skip("kernel 2d is Hopper's")
    ops = _ops()
    lay = make_ratio_layer(n, k, r, dtype, DEV, seed=m + n + k)
    dev = torch.device(DEV)
    p91 = kernels.prepare_weights(lay, dev)
    p92 = kernels.prepare_weights({**lay, "packed_weights": True}, dev)
    assert p91["_path"] == 91 and p92["_path"] == 92 and p92["_qw"].numel() == n * k // 2
    assert kernels.backend_name(dev, "int_ratio", packed=True) == "cuda-sm90a-int8-packed"
    assert (kernels.prepared_extra_bytes(n, k, r, dev, ratio=True)
            - kernels.prepared_extra_bytes(n, k, r, dev, ratio=True, packed=True)) == n * k  # no int8 copy counted
    x = make_x(m, k, dtype, DEV, seed=m + 1)
    qa, sa, la = ops.quantize_act_lora_down(x, p91["_smooth_rcp"], p91["_proj_down"], p91["_rp"], _lib.FMT_I8_RATIO)
    y91 = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    y92 = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    ops.gemm_into(qa, sa, p91["_qw"], p91["_wscales"], la, p91["_proj_up"], p91["_bias"], y91, 91, variant=3)
    ops.gemm_into(qa, sa, p92["_qw"], p92["_wscales"], la, p92["_proj_up"], p92["_bias"], y92, 92,
                  wmult=p92["_wmult"])
    sync_check()
    assert torch.isfinite(y92).all() and torch.equal(y91, y92)
    y = kernels.linear(x, p92)
    want = ref.svdquant_linear(x.float(), lay["qweight"], (lay["wscale_mult"], lay["wscale_base"]),
                               lay["smooth_factor"].float(), lay["proj_down"].float(), lay["proj_up"].float(),
                               lay["bias"].float())
    sync_check()
    assert rel(y, want) < BOUND[dtype]
    if m == 333:  # the compiled path's custom op passes the multipliers too
        assert torch.equal(torch.compile(lambda t: kernels.linear(t, p92), fullgraph=True)(x), y)
