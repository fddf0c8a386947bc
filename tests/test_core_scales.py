"""int_ratio scales (docs/FORMAT.md §1): the bounds the Hopper kernels rely on, exactness of the integer
form, and the weight-scale search."""
import pytest
import torch

from comfyui_svdquant.core.config import QuantConfig
from comfyui_svdquant.core.layer_quant import quantize_linear
from comfyui_svdquant.core.weight_quant import quantize_weight
from comfyui_svdquant.kernels import reference as ref
from synthetic import outlier_activations, outlier_layer

G = 64


def _acts(rows=96, k=640, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = outlier_activations(rows, k, n_outliers=6, gen=g) * torch.exp(torch.randn(rows, 1, generator=g))
    x[3] = 0.0                       # an all-zero token
    x[5, 64:128] = 0.0               # an all-zero group
    return x


def test_ratio_codes_fit_int8_and_never_clip():
    x = _acts()
    codes, mult, base = ref.quantize_groups_ratio(x, G, ref.ACT_CHUNK_GROUPS)
    assert codes.abs().max() <= 7 and 1 <= int(mult.min()) and int(mult.max()) <= ref.RATIO_MAX
    assert (codes.int() * mult.int().repeat_interleave(G, 1)).abs().max() <= 126
    assert base.shape == (x.shape[0], -(-x.shape[1] // (G * ref.ACT_CHUNK_GROUPS)))
    steps = ref.ratio_steps(mult, base, ref.ACT_CHUNK_GROUPS)
    amax = x.reshape(x.shape[0], -1, G).abs().amax(-1)
    # the step covers the group's absmax (no clipping) and is at most one base above absmax/7
    assert (steps * 7 >= amax * (1 - 1e-6)).all()
    assert (steps - amax / 7 <= ref.ratio_steps(torch.ones_like(mult), base, ref.ACT_CHUNK_GROUPS) * (1 + 1e-6)).all()
    deq = ref.dequantize_ratio(codes, mult, base, G, ref.ACT_CHUNK_GROUPS)
    err = (deq - x).abs().reshape(x.shape[0], -1, G).amax(-1)
    assert (err <= steps / 2 * (1 + 1e-5) + 1e-30).all()
    # the largest group of every non-zero chunk uses the whole int8 range
    nz = base > 0
    chunk_max_mult = torch.nn.functional.pad(mult.float(), (0, (-mult.shape[1]) % 4)).reshape(mult.shape[0], -1, 4).amax(-1)
    assert (chunk_max_mult[nz] == ref.RATIO_MAX).all()
    assert (codes[3] == 0).all() and (base[3] == 0).all() and (codes[5, 64:128] == 0).all()


def test_integer_form_equals_reference_gemm():
    """Σ_chunks a_base·w_base·Σ (qa·fa)(qw·fw) in exact integers = the reference's dequantized product."""
    torch.manual_seed(0)
    m, k, n = 33, 640, 48
    x = _acts(m, k)
    qa, fa, ba = ref.quantize_groups_ratio(x, G, ref.ACT_CHUNK_GROUPS)
    wq = quantize_weight(torch.randn(n, k) * 0.02, G, "int_ratio")
    fw, bw = wq.file_tensors["wscale_mult"], wq.file_tensors["wscale_base"]
    ia = (qa.long() * fa.long().repeat_interleave(G, 1))              # what the tensor core reads (int8)
    iw = (wq.codes.long() * fw.t().long().repeat_interleave(G, 1))
    cw = G * ref.ACT_CHUNK_GROUPS
    y = torch.zeros(m, n, dtype=torch.float64)
    for c in range(ba.shape[1]):
        s = ia[:, c * cw:(c + 1) * cw] @ iw[:, c * cw:(c + 1) * cw].t()
        assert s.abs().max() < 2 ** 22                                   # the kernel's exact int->float bound
        y += s.double() * ba[:, c:c + 1].double()
    y *= bw.double()
    y_ref = ref.w4a4_gemm(ref.pack_int4(qa), (fa, ba), ref.pack_int4(wq.codes), (fw, bw), None, None, None,
                          torch.float32)
    assert float((y_ref.double() - y).norm() / y.norm()) < 1e-6


@pytest.mark.parametrize("mode", ["float", "int_ratio"])
def test_weight_scale_search_never_hurts(mode):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(96, 512, generator=g)
    r[:, torch.randperm(512, generator=g)[:8]] *= 6
    imp = torch.rand(512, generator=g) + 0.1
    def err(q):
        return ((q.dequantize(G) - r).pow(2) * imp).sum(1)
    plain, searched = quantize_weight(r, G, mode, imp, search=False), quantize_weight(r, G, mode, imp, search=True)
    assert (err(searched) <= err(plain) * (1 + 1e-6)).all()
    assert float(err(searched).sum()) < 0.97 * float(err(plain).sum())


def test_int_ratio_layer_error_close_to_float():
    """The whole SVDQuant layer with int_ratio scales (what the Hopper path runs) loses little against
    float scales with the same search (measured +2.7% relative output error here, GPTQ on)."""
    errs = {}
    for mode in ("float", "int_ratio"):
        tot = 0.0
        for seed in range(3):
            w, x = outlier_layer(n=192, k=512, rows=384, seed=seed)
            q = quantize_linear(w, None, x.abs().amax(0), x, QuantConfig(scale_mode=mode, alpha_grid=(0.3, 0.5, 0.7)),
                                rank=16)
            tot += q.report["error"]
        errs[mode] = tot / 3
    assert errs["float"] <= errs["int_ratio"] < 1.08 * errs["float"], errs


def test_row_base_is_one_chunk_covering_the_row():
    """reference.ROW (kernel 2e's activations): one base per row = the row's absmax · fp32(1/126), the same numbers as
    a chunk covering the row, and every code × multiplier an int8 within ±126."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(33, 1280, generator=g) * torch.exp(torch.randn(1, 1280, generator=g))
    codes, mult, base = ref.quantize_groups_ratio(x, G, ref.ROW)
    assert base.shape == (33, 1)
    for cg in (1280 // G, 10 * 1280 // G):
        c2, m2, b2 = ref.quantize_groups_ratio(x, G, cg)
        assert torch.equal(codes, c2) and torch.equal(mult, m2) and torch.equal(base, b2)
    assert torch.equal(base[:, 0], x.abs().amax(1) * torch.tensor(1 / 126, dtype=torch.float32))
    assert int((codes.int() * mult.int().repeat_interleave(G, 1)).abs().max()) <= 126
    deq = ref.dequantize_ratio(codes, mult, base, G, ref.ROW)
    chunked = ref.dequantize_ratio(*ref.quantize_groups_ratio(x, G, ref.ACT_CHUNK_GROUPS), G, ref.ACT_CHUNK_GROUPS)
    err_row, err_chunk = (deq - x).norm() / x.norm(), (chunked - x).norm() / x.norm()
    assert err_chunk <= err_row < 1.5 * err_chunk, (err_chunk, err_row)
