"""Input groups at run time (core/input_group.py): layers that share one smoothing vector and proj_down quantize
their common input once, with outputs bitwise those of the layers run alone. CPU (the reference path); the CUDA
path's twin is tests/gpu/test_input_group_gpu.py."""
import logging

import pytest
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.core.calibrate import quantize_layers
from comfyui_svdquant.core.input_group import attach_input_groups
from comfyui_svdquant.core.qlinear import SVDQuantLinear
from test_core_calibration_options import _toy_groups


def _quantized_toy(seed=0):
    """The toy model of two attention blocks with every linear 4-bit, q/k/v and the context k/v quantized as
    groups (one smoothing vector and proj_down per group), and its groups."""
    m, cfg, layers, stats, groups = _toy_groups(seed)
    res = quantize_layers(layers, stats, cfg, groups=groups)
    modules = dict(m.named_modules())
    for name, q in res.items():
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent], leaf, SVDQuantLinear.from_tensors(q.tensors()))
    return m, groups


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 32, 128, generator=g) * 3, torch.randn(2, 16, 192, generator=g)


@pytest.fixture
def count_kernel1(monkeypatch):
    calls = []
    real = kernels.reference.quantize_act_lora_down

    def counted(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)
    monkeypatch.setattr(kernels.reference, "quantize_act_lora_down", counted)
    return calls


def test_groups_quantize_once_and_give_bitwise_the_layers_alone(count_kernel1):
    m, groups = _quantized_toy()
    x, c = _inputs()
    with torch.no_grad():
        alone = m(x, c)
        n_alone = len(count_kernel1)
        assert attach_input_groups(m, groups) == len(groups) == 4
        count_kernel1.clear()
        grouped = m(x, c)
    assert torch.equal(grouped, alone)
    # per block: q/k/v 3 -> 1, context k/v 2 -> 1, out 1; the pair (not a group) 2
    assert n_alone == 2 * 6 + 2 and len(count_kernel1) == 2 * 3 + 2
    for name in ("blocks.0.to_q", "blocks.1.ck"):  # every member read it: nothing kept alive
        assert dict(m.named_modules())[name]._input_group._kept is None


def test_an_input_changed_in_place_or_another_tensor_is_quantized_again(count_kernel1):
    m, groups = _quantized_toy()
    attach_input_groups(m, groups)
    attn = m.blocks[0]
    x, _ = _inputs()
    with torch.no_grad():
        q = attn.to_q(x)
        x.mul_(0.5)                      # a new version of the same tensor object
        k = attn.to_k(x)
        v = attn.to_v(x.clone())         # another object, same values
        assert len(count_kernel1) == 3
        for name in ("to_q", "to_k", "to_v"):
            getattr(attn, name)._input_group = None  # alone, for the expected values
        assert torch.equal(k, attn.to_k(x)) and torch.equal(v, attn.to_v(x))
        assert torch.equal(q, attn.to_q(x * 2))


def test_member_lora_terms_still_apply():
    m, groups = _quantized_toy()
    attach_input_groups(m, groups)
    attn = m.blocks[0]
    g = torch.Generator().manual_seed(3)
    attn.to_k.set_lora((torch.randn(128, 4, generator=g) * 0.1, torch.randn(128, 4, generator=g) * 0.1))
    x, _ = _inputs()
    with torch.no_grad():
        q, k = attn.to_q(x), attn.to_k(x)
        attn.to_k._input_group = None
        k_alone = attn.to_k(x)
    assert torch.equal(k, k_alone)
    assert not torch.equal(k, q)


def test_groups_that_cannot_share_run_ungrouped(caplog):
    m, groups = _quantized_toy()
    attn = m.blocks[0]
    attn.to_v.smooth_factor.data.mul_(1.5)  # no longer one smoothing vector
    with caplog.at_level(logging.WARNING):
        n = attach_input_groups(m, groups + [["blocks.0.out", "nope"]], "test.safetensors")
    assert n == 3
    assert attn.to_q._input_group is None and attn.to_v._input_group is None
    text = caplog.text
    assert "test.safetensors" in text and "smooth_factor or proj_down differ" in text and "not all of them" in text


def test_compiled_members_run_alone_without_graph_breaks():
    m, groups = _quantized_toy()
    attach_input_groups(m, groups)
    attn = m.blocks[0]
    x, _ = _inputs()
    f = torch.compile(lambda t: attn.to_q(t) + attn.to_k(t) + attn.to_v(t), backend="eager", fullgraph=True)
    with torch.no_grad():
        y = f(x)
        for name in ("to_q", "to_k", "to_v"):
            getattr(attn, name)._input_group = None
        y_alone = attn.to_q(x) + attn.to_k(x) + attn.to_v(x)
    assert torch.allclose(y, y_alone, rtol=1e-5, atol=1e-5)


def test_fused_group_runs_one_gemm_and_gives_column_views(count_kernel1, monkeypatch):
    """The one-GEMM form (kernels.fuse_prepared; on the CPU only with FUSE_REFERENCE, since the reference path would
    hold a second copy of the weights): one kernel-1 pass and one GEMM per group, each member a column view of its
    output, equal to the layers alone up to fp32 summation order (one matrix product instead of three)."""
    gemms = []
    real = kernels.reference.w4a4_gemm
    monkeypatch.setattr(kernels.reference, "w4a4_gemm", lambda *a, **k: gemms.append(a[2].shape[0]) or real(*a, **k))
    monkeypatch.setattr(kernels, "FUSE_REFERENCE", True)
    m, groups = _quantized_toy()
    x, c = _inputs()
    with torch.no_grad():
        alone = m(x, c)
        attach_input_groups(m, groups)
        count_kernel1.clear()
        gemms.clear()
        fused = m(x, c)
        n_kernel1, n_gemms = len(count_kernel1), sorted(gemms)
        attn = m.blocks[0]
        q, k = attn.to_q(x), attn.to_k(x)
    assert torch.allclose(fused, alone, rtol=1e-5, atol=1e-5), float((fused - alone).abs().max())
    assert n_kernel1 == 2 * 3 + 2
    assert n_gemms == sorted([384, 256, 128] * 2 + [128, 128])  # q/k/v as one, context k/v as one, out; the pair
    assert not q.is_contiguous() and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    attn.to_q.cpu()  # a member moved: the group forgets its fused layer
    assert attn.to_q._input_group._fused is None
