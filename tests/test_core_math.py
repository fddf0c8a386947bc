"""Core math: packing, quantizers, and the error ordering that justifies SVDQuant."""
import torch
import pytest

from comfyui_svdquant.kernels import reference as ref
from comfyui_svdquant.core.config import QuantConfig
from comfyui_svdquant.core.layer_quant import LayerProblem, smoothing_factor, quantize_linear
from comfyui_svdquant.core.qlinear import SVDQuantLinear
from synthetic import outlier_layer


def test_pack_unpack_roundtrip_exact():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (37, 256), generator=g, dtype=torch.int8)
    p = ref.pack_int4(q)
    assert p.shape == (37, 128) and p.dtype == torch.int8
    assert torch.equal(ref.unpack_int4(p), q)
    # low nibble = even column
    assert int(p[0, 0]) & 0x0F == int(q[0, 0]) & 0x0F
    assert (int(p[0, 0]) >> 4) & 0x0F == int(q[0, 1]) & 0x0F


def test_group_quantizer_range_and_error():
    x = torch.randn(16, 128) * torch.logspace(-2, 2, 128)
    x[3, :64] = 0  # an all-zero group
    codes, scales = ref.quantize_groups(x, 64)
    assert codes.abs().max() <= 7 and scales.shape == (16, 2)
    assert scales[3, 0] == 0 and torch.all(codes[3, :64] == 0)
    err = (ref.dequantize_groups(codes, scales, 64) - x).abs()
    # round-to-nearest: error at most half a step per group
    assert torch.all(err.reshape(16, 2, 64) <= scales.unsqueeze(-1) / 2 + 1e-6)


def _errors(rank_list=(0, 8, 16, 32, 64)):
    w, x = outlier_layer()
    p = LayerProblem(w, x.abs().amax(0), x, QuantConfig())
    naive, _ = p.error(smoothing_factor(p.x_absmax, p.w_absmax, None), 0)
    _, smooth_only, _ = p.search_alpha(0)
    alpha, svdq, _ = p.search_alpha(32)
    return naive, smooth_only, svdq, p.rank_curve(alpha, rank_list)


def test_error_ordering_svdquant_beats_smoothing_beats_naive():
    naive, smooth_only, svdq, _ = _errors()
    # Measured on this synthetic layer (seed 0, default settings incl. GPTQ): naive ≈ 0.14, smooth-only ≈ 0.07,
    # SVDQuant r32 ≈ 0.02.
    assert naive > 0.10
    assert smooth_only < 0.6 * naive
    assert svdq < 0.5 * smooth_only
    assert svdq < 0.04


def test_error_falls_as_rank_grows():
    *_, curve = _errors()
    ranks = sorted(curve)
    errs = [curve[r] for r in ranks]
    assert all(b <= a * 1.001 for a, b in zip(errs, errs[1:])), curve
    assert curve[64] < 0.5 * curve[0]


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
def test_stored_layout_reproduces_simulated_output(scales):
    """The module built from stored tensors (natural layout, 1/λ folded into proj_down) computes
    exactly what the quantizer scored."""
    w, x = outlier_layer(n=128, k=256, rows=256)
    b = torch.randn(128)
    q = quantize_linear(w, b, x.abs().amax(0), x, QuantConfig(scale_mode=scales), rank=16, out_dtype=torch.float32)
    assert q.qweight.shape == (128, 128)
    if scales == "float":
        assert q.scales["wscales"].shape == (4, 128)
    else:
        assert q.scales["wscale_mult"].shape == (4, 128) and q.scales["wscale_base"].shape == (128,)
    assert q.proj_down.shape == (256, 16) and q.proj_up.shape == (128, 16)
    mod = SVDQuantLinear.from_tensors(q.tensors())
    y = mod(x)
    y_ref = x @ w.t() + b
    rel = float((y - y_ref).norm() / (x @ w.t()).norm())
    assert abs(rel - q.report["error"]) < 1e-3 * max(1.0, q.report["error"]) + 1e-5
    assert q.report["bytes_4bit"] < q.report["bytes_16bit"] / 2


def test_fp16_and_bf16_outputs_follow_input_dtype():
    w, x = outlier_layer(n=64, k=128, rows=64)
    q = quantize_linear(w, None, x.abs().amax(0), x, QuantConfig(alpha_grid=(0.5,)), rank=8, out_dtype=torch.bfloat16)
    mod = SVDQuantLinear.from_tensors(q.tensors())
    for dt in (torch.bfloat16, torch.float32):
        y = mod(x.to(dt))
        assert y.dtype == dt and torch.isfinite(y).all()


def test_rank_too_large_is_refused_with_layer_name():
    w, x = outlier_layer(n=64, k=128, rows=32)
    with pytest.raises(ValueError, match="layer blocks.0.fc.*larger than the layer allows"):
        quantize_linear(w, None, x.abs().amax(0), x, QuantConfig(), rank=65, name="blocks.0.fc")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="group size"):
        QuantConfig(group_size=32)
    with pytest.raises(ValueError, match="alphas"):
        QuantConfig(alpha_grid=(1.5,))


def test_state_dict_sizes_include_the_kernels_prepared_copy(monkeypatch):
    """ComfyUI sizes modules by their state dicts (model_management.module_size) to plan full or partial
    loads; on a GPU whose kernels prepare an N×K weight copy, that copy must be in the size."""
    from comfyui_svdquant import kernels
    from comfyui_svdquant.core.qlinear import KERNEL_CACHE
    w, x = outlier_layer(n=128, k=256, rows=256)
    q = SVDQuantLinear.from_tensors(quantize_linear(w, None, x.abs().amax(0), x, QuantConfig(), rank=16).tensors())

    def size(m):  # comfy.model_management.module_size
        return sum(t.nelement() * t.element_size() for t in m.state_dict().values())
    own = sum(p.nelement() * p.element_size() for p in q.parameters())
    if not torch.cuda.is_available():  # no CUDA: nothing prepared, nothing counted
        assert KERNEL_CACHE not in q.state_dict() and size(q) == own
    monkeypatch.setattr(kernels, "_device_path", lambda device: 90)  # as on a Hopper GPU
    extra = q.kernel_cache_bytes(torch.device("cuda", 0))
    assert extra >= 128 * 256  # the int8 weight copy at least
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sd = q.state_dict()
    assert sd[KERNEL_CACHE].is_meta and size(q) == own + extra
    monkeypatch.setattr(kernels, "_device_path", lambda device: 0)  # reference backend: no copy
    assert KERNEL_CACHE not in q.state_dict()


def test_int8_weight_copy_is_code_times_multiplier():
    """The Hopper int_ratio path's weight copy (kernels._int8_from_ratio, computed in int8 in place so that a
    low-VRAM load preparing offloaded layers per call needs no wider temporaries) is code × multiplier exactly."""
    from comfyui_svdquant import kernels
    g = torch.Generator().manual_seed(3)
    n, k, group = 96, 512, 64
    codes = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)  # int_ratio codes: |q| ≤ 7
    mult = torch.randint(1, ref.RATIO_MAX + 1, (k // group, n), generator=g).to(torch.uint8)  # stored (K/G, N)
    want = codes.int() * mult.t().int().repeat_interleave(group, dim=1)
    got = kernels._int8_from_ratio(ref.pack_int4(codes), mult)
    assert got.dtype == torch.int8 and got.shape == (n, k)
    assert torch.equal(got.int(), want) and want.abs().max() > 100  # products beyond the int4 range are kept


def test_activation_weighted_branch_fits_what_the_activations_see():
    """core.lowrank.activation_weighted_top: with H = I it is the plain truncated SVD; with the Gram matrix of
    outlier-heavy activations its output error ‖X(D − L)ᵀ‖ is below the SVD's (the SVD is one of its candidates);
    from the rows themselves (thin SVD, no K×K matrix) it is the same split as from H = XᵀX."""
    from comfyui_svdquant.core.lowrank import activation_weighted_top, top_svd
    g = torch.Generator().manual_seed(0)
    d = torch.randn(96, 256, generator=g)
    x = torch.randn(40, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    x[:, :8] *= 20.0

    def err(up, down):
        return float((x @ (d - up @ down).t()).norm() / (x @ d.t()).norm())
    u0, v0 = top_svd(d, 16)
    ui, vi = activation_weighted_top(d, 16, damp=0.0, h=torch.eye(256))
    assert torch.allclose(ui @ vi, u0 @ v0, atol=1e-4)
    u, v = activation_weighted_top(d, 16, h=x.t() @ x)
    assert u.shape == (96, 16) and v.shape == (16, 256)
    assert err(u, v) < 0.5 * err(u0, v0)
    ur, vr = activation_weighted_top(d, 16, rows=x)  # 40 rows < K = 256: H is singular, the damping decides
    assert torch.allclose(ur @ vr, u @ v, rtol=1e-3, atol=1e-3 * float((u @ v).abs().max()))


def test_lowrank_refit_is_kept_only_where_it_lowers_the_error():
    w, x = outlier_layer(n=128, k=256, rows=256)
    base = quantize_linear(w, None, x.abs().amax(0), x, QuantConfig(), rank=16)
    refit = quantize_linear(w, None, x.abs().amax(0), x, QuantConfig(lowrank_refit=True), rank=16)
    assert refit.report["error"] <= base.report["error"]
    assert refit.report["lowrank_refit"] == (refit.report["error"] < base.report["error"])
    assert not base.report["lowrank_refit"]
