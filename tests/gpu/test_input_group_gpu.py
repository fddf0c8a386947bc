"""Input groups on the CUDA path (core/input_group.py): one kernel-1 pass for layers sharing smoothing and proj_down,
outputs bitwise those of the layers run alone (the same kernel-1 output read by each layer's GEMM)."""
import pytest
import torch

from comfyui_svdquant.core.input_group import attach_input_groups
from comfyui_svdquant.core.qlinear import SVDQuantLinear
from comfyui_svdquant.kernels import ops

from _layers import make_layer, make_ratio_layer, make_x

pytestmark = pytest.mark.gpu


def _group(ns, k, rank, dtype, ratio, packed):
    """Layers of widths `ns` on one input of width k, with the first one's smoothing and proj_down."""
    make = make_ratio_layer if ratio else make_layer
    mods = torch.nn.ModuleDict()
    first = None
    for i, n in enumerate(ns):
        t = make(n, k, rank, dtype, "cuda", bias=i != 1, seed=10 + i)
        if first is None:
            first = t
        else:
            t["smooth_factor"], t["proj_down"] = first["smooth_factor"].clone(), first["proj_down"].clone()
        m = SVDQuantLinear.from_tensors(t)
        m.set_packed_weights(packed)
        mods[f"l{i}"] = m
    return mods


@pytest.mark.parametrize("ratio,packed", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 77, 333, 4096 + 13])
def test_group_is_bitwise_the_layers_alone(cuda_lib, monkeypatch, ratio, packed, dtype, m):
    """Hopper's int8 path (int_ratio, weights not packed) runs the group as one GEMM over the members' weights side
    by side (svdq_linear with both kernels, once); the other paths one kernel-1 pass (svdq_linear without out) and a
    GEMM per member (without x). Either way each member's output is bitwise its own alone: every output element is
    the same integer sums, promotions and LoRA-up terms in the same order, whatever N and tile the GEMM has."""
    k, ns = 640, (640, 640, 1280)
    mods = _group(ns, k, 32, dtype, ratio, packed)
    x = make_x(m, k, dtype, "cuda", seed=m)
    with torch.no_grad():
        alone = [mods[f"l{i}"](x) for i in range(len(ns))]
        assert attach_input_groups(mods, [[f"l{i}" for i in range(len(ns))]]) == 1
        calls = []
        real = ops._invoke
        monkeypatch.setattr(ops, "_invoke", lambda a, ref, xp, *r: calls.append((xp is not None, r[3] is not None))
                            or real(a, ref, xp, *r))
        grouped = [mods[f"l{i}"](x) for i in range(len(ns))]
        torch.cuda.synchronize()
    fused = ratio and not packed
    assert calls == ([(True, True)] if fused else [(True, False)] + [(False, True)] * len(ns)), calls
    for i, (a, g) in enumerate(zip(alone, grouped)):
        assert torch.isfinite(a).all() and a.abs().max() > 0
        assert g.shape == a.shape and torch.equal(a, g), (i, float((a.float() - g.float()).abs().max()))


@pytest.mark.parametrize("packed", [True, False], ids=["shared kernel 1", "one GEMM"])
def test_another_layer_between_members_leaves_the_shared_input_intact(cuda_lib, packed):
    """Eager layers run alone reuse one kept kernel-1 buffer per stream (ops._act_scratch); a group's shared input
    (or its fused output) has its own, so a layer called between two members (as an attention patch may) cannot
    overwrite it."""
    dtype = torch.bfloat16
    mods = _group((640, 640), 640, 32, dtype, True, packed)
    other = SVDQuantLinear.from_tensors(make_ratio_layer(640, 640, 32, dtype, "cuda", seed=99))
    x, y = make_x(4096, 640, dtype, "cuda", seed=5), make_x(4096, 640, dtype, "cuda", seed=6)
    with torch.no_grad():
        want = [mods["l0"](x), mods["l1"](x)]
        want_other = other(y)
        attach_input_groups(mods, [["l0", "l1"]])
        a = mods["l0"](x)
        o = other(y)  # kernel 1 into the stream's kept buffer
        b = mods["l1"](x)
        torch.cuda.synchronize()
    assert torch.equal(a, want[0]) and torch.equal(b, want[1]) and torch.equal(o, want_other)
    assert ops._act_bufs, "the eager layer ran through the kept buffer"
