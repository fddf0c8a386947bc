"""The FLUX block kernels (kernels/csrc/flux_ops.cu) against their references (kernels/reference.py, ComfyUI's own
ops): the modulated LayerNorm, the attention preparation (QKNorm + RoPE + txt ‖ img concatenation) and the single
block's row concatenation with its MLP GELU,
on fresh random inputs with outlier channels, poisoned output buffers, strided sources, B = 1 and 2, pe broadcast
and per sample, bf16 and fp16. q and k: the kernel rounds where ComfyUI's ops round (RMSNorm's output, RoPE's
output) but computes inside in fp32 with its own operation order, so elements agree within two output ulps; v and
the concatenation are copies, bitwise."""
import pytest
import torch
import torch._dynamo

from comfyui_svdquant.kernels import _lib, flux_ops, reference

from test_kernels_gpu import DEV, sync_check

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_lib")]

ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
D = 128


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _sources(b, lens, heads, dtype, g, pad):
    """qkv rows (B, L_i, 3·H·D) as column slices of wider rows (strided), outlier channels, and per-source scales."""
    out = []
    for i, n in enumerate(lens):
        wide = torch.randn(b, n, 3 * heads * D + pad, generator=g, device=DEV)
        wide[..., 5::97] *= 30.0  # outlier channels
        x = wide.to(dtype)[..., pad:]
        qs = (1 + 0.5 * torch.randn(D, generator=g, device=DEV)).to(dtype)
        ks = (1 + 0.5 * torch.randn(D, generator=g, device=DEV)).to(dtype)
        out.append((x, qs, ks))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,lens,heads,pe_batch,pad", [
    (1, (512, 4096), 24, 1, 0),    # FLUX double block at 1024²: txt then img
    (1, (4608,), 24, 1, 12288),  # single block: qkv columns of linear1's (M, 21504) output
    (2, (77, 333), 3, 2, 64),      # ragged lengths, per-sample pe
    (2, (13,), 5, 1, 8),
])
def test_qk_norm_rope_matches_the_reference(dtype, b, lens, heads, pe_batch, pad):
    g = torch.Generator(device=DEV).manual_seed(sum(lens) + heads)
    src = _sources(b, lens, heads, dtype, g, pad)
    L = sum(lens)
    angles = torch.rand(pe_batch, 1, L, D // 2, generator=g, device=DEV) * 6.3
    c, s = torch.cos(angles), torch.sin(angles)
    pe = torch.stack([c, -s, s, c], dim=-1).view(pe_batch, 1, L, D // 2, 2, 2).contiguous()
    args = [t for x in src for t in x] + [None] * (6 - 3 * len(src))
    assert flux_ops._qk_fits(*args, pe, heads)
    out = tuple(_poisoned((b, heads, L, D), dtype) for _ in range(3))
    q, k, v = flux_ops._qk_cuda(*args, pe, heads, 1e-6, out=out)
    sync_check()
    wq, wk, wv = reference.qk_norm_rope(src, pe, heads)
    assert torch.equal(v, wv)
    for got, want, name in ((q, wq, "q"), (k, wk, "k")):
        assert torch.isfinite(got).all(), name
        diff = (got.float() - want.float()).abs()
        bad = diff > 2 * ULP[dtype] * want.float().abs() + 1e-3
        assert not bad.any(), (name, float(diff.max()), int(bad.sum()))
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert rel < ULP[dtype], (name, rel)


def test_qk_norm_rope_falls_back_where_the_kernel_does_not_fit():
    """Head dim 64 (the kernel's lanes hold 128) and fp32 take the reference: same results as calling it."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(1, 9, 3 * 2 * 64, generator=g, device=DEV, dtype=torch.bfloat16)
    sc = torch.ones(64, device=DEV, dtype=torch.bfloat16)
    pe = torch.randn(1, 1, 9, 32, 2, 2, generator=g, device=DEV)
    assert not flux_ops._qk_fits(x, sc, sc, None, None, None, pe, 2)
    got = flux_ops.qk_norm_rope([(x, sc, sc)], pe, 2)
    want = reference.qk_norm_rope([(x, sc, sc)], pe, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,l,c", [(1, 4608, 3072), (2, 77, 3072), (3, 5, 264)])
def test_ln_modulate_matches_the_reference(dtype, b, l, c):
    """One pass of LayerNorm · (1 + scale) + shift against ComfyUI's two (layer_norm, addcmul): the kernel rounds
    where they round, its mean and variance are two-pass (torch: Welford), so within an ulp of the result and of the
rounded LayerNorm output (scaled) per element, and far closer in norm.
    shift/scale are column slices of one modulation output (row stride 6·C), as FLUX's Modulation.chunk gives."""
    g = torch.Generator(device=DEV).manual_seed(b * l + c)
    x = (torch.randn(b, l, c, generator=g, device=DEV) * 3 + 0.5)
    x[..., 7::61] *= 40.0  # outlier channels
    x = x.to(dtype)
    mod = (torch.randn(b, 1, 6 * c, generator=g, device=DEV) * 0.5).to(dtype)
    shift, scale = mod[..., :c], mod[..., c:2 * c]
    assert flux_ops._ln_fits(x, shift, scale)
    out = _poisoned((b, l, c), dtype)
    got = flux_ops._ln_any(x, shift, scale, 1e-6, out=out)
    sync_check()
    assert got.data_ptr() == out.data_ptr()
    want = reference.ln_modulate(x, shift, scale, 1e-6)
    assert torch.isfinite(got).all()
    diff = (got.float() - want.float()).abs()
    # one ulp of the result, plus one ulp of the rounded LayerNorm output times its factor (where the two normalisations
    # round a value near a rounding boundary differently)
    ln = torch.nn.functional.layer_norm(x, (c,), eps=1e-6).float()
    allowed = 2 * ULP[dtype] * (want.float().abs() + (1 + scale.float()).abs() * ln.abs()) * 1.01 + 1e-6
    bad = diff > allowed
    assert not bad.any(), (float(diff.max()), int(bad.sum()))
    assert float((got.float() - want.float()).norm() / want.float().norm()) < ULP[dtype] / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gelu_b", [False, True])
@pytest.mark.parametrize("lead,ka,kb,lda_pad", [((1, 4608), 3072, 12288, 9216), ((2, 77), 64, 200, 8), ((333,), 8, 8, 0)])
def test_concat_rows_matches_the_reference(dtype, gelu_b, lead, ka, kb, lda_pad):
    """[a | b] (b a column slice: strided rows) bitwise torch.cat's; with gelu_b, b's part within an output ulp of
    torch's GELU (tanh form; the kernel uses its formula in fp32, with tanhf) and a's part bitwise."""
    g = torch.Generator(device=DEV).manual_seed(ka + kb)
    a = torch.randn(*lead, ka, generator=g, device=DEV).to(dtype)
    wide = (torch.randn(*lead, kb + lda_pad, generator=g, device=DEV) * 3).to(dtype)
    b = wide[..., lda_pad:]
    m = a.numel() // ka
    out = _poisoned((m, ka + kb), dtype)
    got = flux_ops._concat_any(a, b, gelu_b, out=out)
    sync_check()
    assert got.data_ptr() == out.data_ptr(), "the kernel did not run (fell back to torch)"
    want = reference.concat_rows(a, b, gelu_b)
    if not gelu_b:
        assert torch.equal(got, want)
        return
    assert torch.equal(got[..., :ka], want[..., :ka])
    diff = (got[..., ka:].float() - want[..., ka:].float()).abs()
    bad = diff > 2 * ULP[dtype] * want[..., ka:].float().abs() + 1e-6
    assert not bad.any(), (float(diff.max()), int(bad.sum()))


def test_custom_ops_compile_without_graph_breaks():
    """torch.compile keeps both ops in one graph (their fake implementations give the shapes) and matches eager."""
    g = torch.Generator(device=DEV).manual_seed(1)
    src = _sources(1, (16, 48), 2, torch.bfloat16, g, 0)
    pe = torch.randn(1, 1, 64, D // 2, 2, 2, generator=g, device=DEV)
    mlp = torch.randn(1, 64, 256, generator=g, device=DEV, dtype=torch.bfloat16)

    def f(x0, x1, pe, mlp):
        q, k, v = flux_ops.qk_norm_rope([(x0, src[0][1], src[0][2]), (x1, src[1][1], src[1][2])], pe, 2)
        att = q.transpose(1, 2).reshape(1, 64, 2 * D)
        return flux_ops.concat_rows(att, mlp, gelu_b=True), k, v

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(src[0][0], src[1][0], pe, mlp)
    assert explain.graph_break_count == 0, explain.break_reasons
    got = torch.compile(f, fullgraph=True)(src[0][0], src[1][0], pe, mlp)
    want = f(src[0][0], src[1][0], pe, mlp)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_library_has_the_flux_kernels():
    assert _lib.has_flux_ops(), "kernels/_build predates kernels/csrc/flux_ops.cu"
