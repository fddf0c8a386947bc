"""Row bases written by the op that produces a linear's input (kernels/csrc/flux_ops.cu `ln_modulate_rowbase`,
`concat_rows_rowbase`; svdq.cu AF_I8_ROW_GIVEN): the producers' outputs bitwise their plain kernels', the bases
bitwise what kernel 1's own row-base pass (AF_I8_ROW) computes from those outputs (same float operations), padded
rows 0; and a row-base layer called with the producer's slot gives bitwise the output of the same layer computing
its bases itself. Fresh random inputs with outlier channels; base buffers poisoned (NaN) before each run."""
import math

import pytest
import torch

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import _lib, flux_ops

from _layers import make_ratio_layer
from test_kernels_gpu import DEV, sync_check

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_lib")]


def _ops():
    from comfyui_svdquant.kernels import ops
    return ops


@pytest.fixture(autouse=True)
def _hopper_and_producers():
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("row bases (kernel 2e) are Hopper's int8 path")
    assert _lib.has_row_base_producers(), "kernels/_build predates the row-base producers"


def _slot(lead, k, g):
    """A slot on a fresh kernel-1 buffer, with a 1/λ of outlier channels; its bases poisoned."""
    ops = _ops()
    smooth = 0.25 + torch.rand(k, generator=g, device=DEV)
    smooth[3::50] *= 16.0
    act, stream, index = ops._act_buffer(tuple(lead), math.prod(lead), k, 32, _lib.FMT_I8_ROW, torch.device(DEV),
                                         fresh=True)
    slot = ops.RowBaseSlot(act, stream, index, smooth.contiguous(), k)
    _bases(slot).fill_(float("nan"))
    return slot


def _bases(slot):
    """The slot's base vector (Mp fp32) as a tensor view of its kernel-1 buffer."""
    buf, base = slot.act[0], slot.act[1]
    off = slot.rowbase - base
    return buf[off: off + 4 * slot.mp].view(torch.float32)


def _kernel1_bases(y, smooth):
    """What kernel 1's own row-base pass writes for y (..., K) in AF_I8_ROW (rank 0): ascales (Mp,)."""
    ops = _ops()
    y2 = y.reshape(-1, y.shape[-1])
    m, k = y2.shape
    qshape, sshape = ops.act_shapes(m, k, _lib.FMT_I8_ROW)
    qact = torch.empty(qshape, dtype=torch.uint8, device=DEV)
    ascales = torch.full(sshape, float("nan"), device=DEV)
    lora = torch.empty((m, 0), dtype=torch.float32, device=DEV)
    ops.quantize_into(y2.contiguous(), smooth, None, qact, ascales, lora, _lib.FMT_I8_ROW)
    sync_check()
    return ascales[0]


def _check_bases(slot, y, m):
    got, want = _bases(slot), _kernel1_bases(y, slot.smooth)
    assert torch.isfinite(got).all(), "bases left unwritten"
    assert torch.equal(got[:m], want[:m]), f"{int((got[:m] != want[:m]).sum())} of {m} row bases differ"
    assert torch.all(got[m:] == 0), "padded rows' bases are not 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,l,c", [(1, 4608, 3072), (2, 77, 3072), (1, 5, 264), (3, 513, 1024)])
def test_ln_modulate_writes_kernel1s_row_bases(dtype, b, l, c):
    g = torch.Generator(device=DEV).manual_seed(b * l + c + 5)
    x = torch.randn(b, l, c, generator=g, device=DEV) * 3 + 0.5
    x[..., 7::61] *= 40.0
    x = x.to(dtype)
    mod = (torch.randn(b, 1, 6 * c, generator=g, device=DEV) * 0.5).to(dtype)
    shift, scale = mod[..., :c], mod[..., c:2 * c]
    slot = _slot((b, l), c, g)
    y = flux_ops.ln_modulate_rowbase(x, shift, scale, 1e-6, slot)
    sync_check()
    assert y is not None, "the kernel did not take these inputs"
    assert torch.equal(y, flux_ops._ln_any(x, shift, scale, 1e-6))
    _check_bases(slot, y, b * l)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gelu_b", [False, True])
@pytest.mark.parametrize("lead,ka,kb,ldb_pad", [((1, 4608), 3072, 12288, 9216), ((2, 77), 64, 200, 8),
                                                ((333,), 0, 3072, 0), ((1, 4096), 0, 12288, 0), ((7,), 8, 8, 0)])
def test_concat_rows_writes_kernel1s_row_bases(dtype, gelu_b, lead, ka, kb, ldb_pad):
    """[a | b] (b a strided column slice; ka = 0: b alone, the double block's MLP GELU) with the next linear's bases."""
    g = torch.Generator(device=DEV).manual_seed(ka + kb + ldb_pad)
    a = torch.randn(*lead, max(ka, 8), generator=g, device=DEV).to(dtype)
    wide = torch.randn(*lead, kb + ldb_pad, generator=g, device=DEV) * 3
    wide[..., 11::97] *= 25.0
    b = wide.to(dtype)[..., ldb_pad:]
    slot = _slot(lead, ka + kb, g)
    y = flux_ops.concat_rows_rowbase(a if ka else None, b, gelu_b, slot)
    sync_check()
    assert y is not None, "the kernel did not take these inputs"
    plain = flux_ops._concat_any(a, b, gelu_b)  # the grid-stride kernel (a of 8 columns where ka = 0)
    assert torch.equal(y, plain if ka else plain[..., 8:])
    _check_bases(slot, y, math.prod(lead))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", [((1, 4608), 3072, 1152), ((2, 77), 3072, 1152), ((1, 333), 15360, 256)])
def test_linear_on_given_row_bases_equals_its_own(dtype, lead, k, n, monkeypatch):
    """A row-base layer (SVDQ_ROW_BASE=1, weights above the threshold) on a producer's slot: kernel 1 skips its row
    pass and the output is bitwise the layer's output when it computes the bases itself."""
    ops = _ops()
    monkeypatch.setenv("SVDQ_ROW_BASE", "1")
    monkeypatch.setattr(kernels, "ROW_BASE_MIN_WEIGHTS", 0)
    lay = make_ratio_layer(n, k, 32, dtype, DEV, seed=n + k)
    p = kernels.prepare_weights(lay, torch.device(DEV))
    assert p["_afmt"] == _lib.FMT_I8_ROW
    g = torch.Generator(device=DEV).manual_seed(k + 1)
    m = math.prod(lead)
    slot = kernels.row_base_slot(p, lead, m, dtype, torch.device(DEV))
    assert slot is not None and slot.k == k
    a = torch.randn(*lead, 3072, generator=g, device=DEV).to(dtype)
    wide = torch.randn(*lead, k - 3072 + 64, generator=g, device=DEV) * 2
    b = wide.to(dtype)[..., 64:] if k > 3072 else None
    _bases(slot).fill_(float("nan"))
    x = flux_ops.concat_rows_rowbase(a, b, True, slot) if b is not None else \
        flux_ops.concat_rows_rowbase(None, a, True, slot)
    assert x is not None and x.shape == (*lead, k)
    y_given = ops.linear_direct(x, p, slot)
    y_own = ops.linear_direct(x.clone(), p)
    sync_check()
    assert torch.isfinite(y_own).all()
    assert torch.equal(y_given, y_own)
    # the slot is for this shape only: another input runs the layer's own row pass
    x2 = x[..., :1, :].contiguous() if len(lead) == 2 else x[:1]
    assert torch.equal(ops.linear_direct(x2, p, slot), ops.linear_direct(x2, p))
