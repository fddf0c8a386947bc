"""Row bases and codes written by the op that produces a linear's input (kernels/csrc/flux_ops.cu
`ln_modulate_rowbase`, `concat_rows_rowbase`; svdq.cu AF_I8_ROW_GIVEN / AF_I8_ROW_CODES): the producers' outputs
bitwise their plain kernels', the bases and int8 codes bitwise what kernel 1 (AF_I8_ROW: its row-base pass, then
kernel 1b) computes from those outputs (the same float operations, kernels/csrc/ratio_codes.h), padded rows' bases 0;
kernel 1 on given codes (LoRA-down only) bitwise its own LoRA-down; and a row-base layer called with the producer's
slot gives bitwise the output of the same layer computing everything itself. Fresh random inputs with outlier
channels; base and code buffers poisoned before each run."""
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


def _slot(lead, k, g, codes=True):
    """A slot on a fresh kernel-1 buffer, with a 1/λ of outlier channels; its bases and codes poisoned."""
    ops = _ops()
    smooth = 0.25 + torch.rand(k, generator=g, device=DEV)
    smooth[3::50] *= 16.0
    act, stream, index = ops._act_buffer(tuple(lead), math.prod(lead), k, 32, _lib.FMT_I8_ROW, torch.device(DEV),
                                         fresh=True)
    slot = ops.RowBaseSlot(act, stream, index, smooth.contiguous(), k, codes)
    _bases(slot).fill_(float("nan"))
    _codes(slot).fill_(0x5A)
    return slot


def _view(slot, addr, nbytes):
    buf, base = slot.act[0], slot.act[1]
    return buf[addr - base: addr - base + nbytes]


def _bases(slot):
    """The slot's base vector (Mp fp32) as a tensor view of its kernel-1 buffer."""
    return _view(slot, slot.rowbase, 4 * slot.mp).view(torch.float32)


def _codes(slot):
    """The slot's int8 codes (M, K) as a uint8 view of its kernel-1 buffer."""
    return _view(slot, slot.qact, slot.act[4] * slot.k).view(slot.act[4], slot.k)


def _kernel1(y, smooth):
    """What kernel 1 writes for y (..., K) in AF_I8_ROW (rank 0): (bases (Mp,), codes (M, K) uint8)."""
    ops = _ops()
    y2 = y.reshape(-1, y.shape[-1])
    m, k = y2.shape
    qshape, sshape = ops.act_shapes(m, k, _lib.FMT_I8_ROW)
    qact = torch.full(qshape, 0xA5, dtype=torch.uint8, device=DEV)
    ascales = torch.full(sshape, float("nan"), device=DEV)
    lora = torch.empty((m, 0), dtype=torch.float32, device=DEV)
    ops.quantize_into(y2.contiguous(), smooth, None, qact, ascales, lora, _lib.FMT_I8_ROW)
    sync_check()
    return ascales[0], qact


def _check_slot(slot, y, m):
    got, (want, want_codes) = _bases(slot), _kernel1(y, slot.smooth)
    assert torch.isfinite(got).all(), "bases left unwritten"
    assert torch.equal(got[:m], want[:m]), f"{int((got[:m] != want[:m]).sum())} of {m} row bases differ"
    assert torch.all(got[m:] == 0), "padded rows' bases are not 0"
    if slot.codes:
        codes = _codes(slot)
        assert torch.equal(codes, want_codes), f"{int((codes != want_codes).sum())} codes differ from kernel 1b's"
    else:
        assert torch.all(_codes(slot) == 0x5A), "a bases-only producer wrote codes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codes", [True, False])
@pytest.mark.parametrize("b,l,c", [(1, 4608, 3072), (2, 77, 3072), (1, 5, 320), (3, 513, 1024)])
def test_ln_modulate_writes_kernel1s_row_bases(dtype, codes, b, l, c):
    g = torch.Generator(device=DEV).manual_seed(b * l + c + 5)
    x = torch.randn(b, l, c, generator=g, device=DEV) * 3 + 0.5
    x[..., 7::61] *= 40.0
    x = x.to(dtype)
    mod = (torch.randn(b, 1, 6 * c, generator=g, device=DEV) * 0.5).to(dtype)
    shift, scale = mod[..., :c], mod[..., c:2 * c]
    slot = _slot((b, l), c, g, codes)
    y = flux_ops.ln_modulate_rowbase(x, shift, scale, 1e-6, slot)
    sync_check()
    assert y is not None, "the kernel did not take these inputs"
    assert torch.equal(y, flux_ops._ln_any(x, shift, scale, 1e-6))
    _check_slot(slot, y, b * l)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gelu_b", [False, True])
@pytest.mark.parametrize("codes", [True, False])
@pytest.mark.parametrize("lead,ka,kb,ldb_pad", [((1, 4608), 3072, 12288, 9216), ((2, 77), 64, 192, 8),
                                                ((333,), 0, 3072, 0), ((1, 4096), 0, 12288, 0), ((7,), 8, 56, 0)])
def test_concat_rows_writes_kernel1s_row_bases(dtype, gelu_b, codes, lead, ka, kb, ldb_pad):
    """[a | b] (b a strided column slice; ka = 0: b alone, the double block's MLP GELU) with the next linear's bases."""
    g = torch.Generator(device=DEV).manual_seed(ka + kb + ldb_pad)
    a = torch.randn(*lead, max(ka, 8), generator=g, device=DEV).to(dtype)
    wide = torch.randn(*lead, kb + ldb_pad, generator=g, device=DEV) * 3
    wide[..., 11::97] *= 25.0
    b = wide.to(dtype)[..., ldb_pad:]
    slot = _slot(lead, ka + kb, g, codes)
    y = flux_ops.concat_rows_rowbase(a if ka else None, b, gelu_b, slot)
    sync_check()
    assert y is not None, "the kernel did not take these inputs"
    plain = flux_ops._concat_any(a, b, gelu_b)  # the grid-stride kernel (a of 8 columns where ka = 0)
    assert torch.equal(y, plain if ka else plain[..., 8:])
    _check_slot(slot, y, math.prod(lead))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", [(4608, 3072, 32), (77, 3072, 128), (333, 15360, 32), (4109, 12288, 64)])
def test_lora_down_on_given_codes_equals_kernel1s(dtype, m, k, r):
    """AF_I8_ROW_CODES: kernel 1 on codes and bases already in its buffers computes the LoRA-down alone, bitwise
    AF_I8_ROW's (the same kernel and reduction order), and leaves codes and bases as they were."""
    ops = _ops()
    lay = make_ratio_layer(64, k, r, dtype, DEV, seed=m + k)
    g = torch.Generator(device=DEV).manual_seed(m + r)
    x = (torch.randn(m, k, generator=g, device=DEV) * 2).to(dtype)
    smooth = (1.0 / lay["smooth_factor"].float()).contiguous()
    pd = lay["proj_down"].contiguous()
    qshape, sshape = ops.act_shapes(m, k, _lib.FMT_I8_ROW)
    q1, s1, l1 = (torch.empty(qshape, dtype=torch.uint8, device=DEV), torch.empty(sshape, device=DEV),
                  torch.full((m, r), float("nan"), device=DEV))
    ops.quantize_into(x, smooth, pd, q1, s1, l1, _lib.FMT_I8_ROW)
    q2, s2, l2 = q1.clone(), s1.clone(), torch.full((m, r), float("nan"), device=DEV)
    ops.quantize_into(x, smooth, pd, q2, s2, l2, _lib.FMT_I8_ROW_CODES)
    sync_check()
    assert torch.equal(l2, l1) and torch.equal(q2, q1) and torch.equal(s2, s1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codes", [True, False])
@pytest.mark.parametrize("lead,k,n", [((1, 4608), 3072, 1152), ((2, 77), 3072, 1152), ((1, 333), 15360, 256)])
def test_linear_on_given_row_bases_equals_its_own(dtype, codes, lead, k, n, monkeypatch):
    """A row-base layer (SVDQ_ROW_BASE=1, weights above the threshold) on a producer's slot: kernel 1 skips its row
    pass (and, given codes, everything but the LoRA-down) and the output is bitwise the layer's output when it
    computes the bases and codes itself."""
    ops = _ops()
    monkeypatch.setenv("SVDQ_ROW_BASE", "1")
    monkeypatch.setattr(kernels, "ROW_BASE_MIN_WEIGHTS", 0)
    lay = make_ratio_layer(n, k, 32, dtype, DEV, seed=n + k)
    p = kernels.prepare_weights(lay, torch.device(DEV))
    assert p["_afmt"] == _lib.FMT_I8_ROW
    g = torch.Generator(device=DEV).manual_seed(k + 1)
    m = math.prod(lead)
    slot = kernels.row_base_slot(p, lead, m, dtype, torch.device(DEV))
    assert slot is not None and slot.k == k and slot.codes
    slot.codes = codes
    a = torch.randn(*lead, 3072, generator=g, device=DEV).to(dtype)
    wide = torch.randn(*lead, k - 3072 + 64, generator=g, device=DEV) * 2
    b = wide.to(dtype)[..., 64:] if k > 3072 else None
    _bases(slot).fill_(float("nan"))
    _codes(slot).fill_(0x5A)
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
