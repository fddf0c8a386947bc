"""The FLUX blocks' kernels (kernels/csrc/flux_ops.cu) with their references: what wrappers/flux_blocks.py runs
between a block's linears.

`ln_modulate`: a linear's modulated input, LayerNorm · (1 + scale) + shift (`ln_modulate_rowbase`: also the linear's
activation row bases, kernels.row_base_slot; `concat_rows_rowbase` likewise); `qk_norm_rope`: the attention's q, k, v
(B, H, L, D) from qkv projection rows (QKNorm, RoPE, the double block's txt ‖ img concatenation); `concat_rows`: the
single block's [attention | GELU(MLP)] input of linear2. Each is one pass; each runs its CUDA kernel where the library
has it and the inputs fit (CUDA, bf16/fp16, strides and alignment; head dim 128 for qk_norm_rope), else its reference
(kernels/reference.py), which is ComfyUI's own ops. Registered as custom ops (`svdquant::ln_modulate`,
`svdquant::qk_norm_rope`, `svdquant::concat_rows`) with fake implementations, so a compiled FLUX model keeps them in
its graph; eager calls skip the op dispatch.
"""
from typing import Optional

import torch

from . import _device_path, _lib, reference  # _device_path: the package's backend choice
from .ops import _dt, _raw_stream

HEAD_DIM = 128  # the kernel's warp layout (4 elements per lane)


def _kernel_ok(device: torch.device) -> bool:
    """The library is loaded, has these kernels and serves the device (not forced to the reference)."""
    return device.type == "cuda" and _device_path(device) != 0 and _lib.has_flux_ops()


def _rows_ok(x: Optional[torch.Tensor]) -> bool:
    """x (B, L, C) with unit last stride, element strides and address (8-byte aligned) the kernel can take."""
    if x is None:
        return True
    return (x.dim() == 3 and x.stride(2) == 1 and x.stride(1) % 4 == 0 and x.stride(0) % 4 == 0
            and x.data_ptr() % 8 == 0)


def _qk_fits(x0, qs0, ks0, x1, qs1, ks1, pe, heads) -> bool:
    b, l0 = x0.shape[:2]
    l1 = 0 if x1 is None else x1.shape[1]
    dt, dev = x0.dtype, x0.device
    scales = [qs0, ks0] + ([] if x1 is None else [qs1, ks1])
    return (dt in (torch.bfloat16, torch.float16) and qs0.shape[0] == HEAD_DIM and _kernel_ok(dev)
            and all(s.dtype == dt and s.device == dev and s.is_contiguous() and s.data_ptr() % 8 == 0 for s in scales)
            and _rows_ok(x0) and _rows_ok(x1) and (x1 is None or (x1.dtype == dt and x1.shape[0] == b))
            and x0.shape[2] >= 3 * heads * HEAD_DIM and (x1 is None or x1.shape[2] >= 3 * heads * HEAD_DIM)
            and pe.dtype == torch.float32 and pe.device == dev and pe.is_contiguous() and pe.data_ptr() % 16 == 0
            and pe.dim() == 6 and pe.shape[0] in (1, b) and tuple(pe.shape[1:]) == (1, l0 + l1, HEAD_DIM // 2, 2, 2)
            and b <= 65535)


def _qk_cuda(x0, qs0, ks0, x1, qs1, ks1, pe, heads: int, eps: float, out=None):
    """The kernel; out: (q, k, v) buffers to write (tests poison them), else new ones."""
    b, l0 = x0.shape[:2]
    l1 = 0 if x1 is None else x1.shape[1]
    shape = (b, heads, l0 + l1, HEAD_DIM)
    q, k, v = out or (torch.empty(shape, dtype=x0.dtype, device=x0.device) for _ in range(3))
    assert all(t.shape == shape and t.is_contiguous() for t in (q, k, v))
    index = x0.device.index
    none = (None, 0, 0, 0, None, None)
    second = none if x1 is None else (x1.data_ptr(), x1.stride(0), x1.stride(1), l1, qs1.data_ptr(), ks1.data_ptr())
    pe_bs = 0 if pe.shape[0] == 1 else pe.stride(0)
    code = _lib.load().svdq_qk_norm_rope(x0.data_ptr(), x0.stride(0), x0.stride(1), l0, qs0.data_ptr(), ks0.data_ptr(),
                                         *second, pe.data_ptr(), pe_bs, q.data_ptr(), k.data_ptr(), v.data_ptr(), b,
                                         heads, eps, _dt(x0.dtype), index, _raw_stream(index))
    _lib.check(code, "svdq_qk_norm_rope")
    return q, k, v


def _qk_any(x0, qs0, ks0, x1, qs1, ks1, pe, heads: int, eps: float):
    if _qk_fits(x0, qs0, ks0, x1, qs1, ks1, pe, heads):
        return _qk_cuda(x0, qs0, ks0, x1, qs1, ks1, pe, heads, eps)
    sources = [(x0, qs0, ks0)] + ([] if x1 is None else [(x1, qs1, ks1)])
    return reference.qk_norm_rope(sources, pe, heads, eps)


def qk_norm_rope(sources, pe: torch.Tensor, heads: int, eps: float = 1e-6):
    """q, k, v (B, H, L, D) for attention from one or two qkv sources [(qkv (B, L_i, >= 3·H·D), q_scale, k_scale)]
    concatenated along L; pe fp32 (1 or B, 1, L, D/2, 2, 2). Scales are cast to the qkv dtype here."""
    (x0, qs0, ks0), rest = sources[0], sources[1:]
    x1, qs1, ks1 = rest[0] if rest else (None, None, None)
    qs0, ks0 = qs0.to(x0.dtype), ks0.to(x0.dtype)
    if x1 is not None:
        qs1, ks1 = qs1.to(x0.dtype), ks1.to(x0.dtype)
    if torch.compiler.is_compiling():
        return torch.ops.svdquant.qk_norm_rope.default(x0, qs0, ks0, x1, qs1, ks1, pe, heads, eps)
    return _qk_any(x0, qs0, ks0, x1, qs1, ks1, pe, heads, eps)


def _concat_fits(a2, b2) -> bool:
    return (a2.dtype == b2.dtype and a2.dtype in (torch.bfloat16, torch.float16) and a2.device == b2.device
            and a2.shape[0] == b2.shape[0] and a2.stride(1) == 1 and b2.stride(1) == 1
            and a2.shape[1] % 8 == 0 and b2.shape[1] % 8 == 0 and a2.stride(0) % 8 == 0 and b2.stride(0) % 8 == 0
            and a2.data_ptr() % 16 == 0 and b2.data_ptr() % 16 == 0 and a2.shape[0] < 2 ** 31
            and _kernel_ok(a2.device))


def _concat_any(a: torch.Tensor, b: torch.Tensor, gelu_b: bool = False, out: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """The kernel where the inputs fit (out: a contiguous (M, Ka + Kb) buffer to write, for tests), else torch."""
    lead = a.shape[:-1]
    a2, b2 = a.flatten(0, -2) if a.dim() > 2 else a, b.flatten(0, -2) if b.dim() > 2 else b
    if a.shape[:-1] != b.shape[:-1] or a2.dim() != 2 or not _concat_fits(a2, b2):
        return reference.concat_rows(a, b, gelu_b)
    m, ka, kb = a2.shape[0], a2.shape[1], b2.shape[1]
    if out is None:
        out = torch.empty((m, ka + kb), dtype=a.dtype, device=a.device)
    index = a.device.index
    code = _lib.load().svdq_concat_rows(a2.data_ptr(), a2.stride(0), ka, b2.data_ptr(), b2.stride(0), kb, int(gelu_b),
                                        out.data_ptr(), m, _dt(a.dtype), index, _raw_stream(index))
    _lib.check(code, "svdq_concat_rows")
    return out.view(*lead, ka + kb)


def concat_rows(a: torch.Tensor, b: torch.Tensor, gelu_b: bool = False) -> torch.Tensor:
    """torch.cat((a, b), -1) for (..., Ka) and (..., Kb) with equal leading shapes and any row strides, b through
    GELU (tanh form) first when gelu_b: the FLUX single block's linear2 input. Its MLP part is a column slice of
    linear1's output, on which torch's GELU takes a slow non-vectorised path (~150 µs per block at 1024², H200)."""
    if torch.compiler.is_compiling():
        return torch.ops.svdquant.concat_rows.default(a, b, gelu_b)
    return _concat_any(a, b, gelu_b)


LN_MAX_C = 4096  # flux_ops.cu: 128 threads x 4 vectors of 8 channels held per row


def _ln_fits(x, shift, scale) -> bool:
    b, l, c = x.shape
    return (x.dtype in (torch.bfloat16, torch.float16) and shift.dtype == x.dtype and scale.dtype == x.dtype
            and c % 8 == 0 and c <= LN_MAX_C and x.stride(2) == 1 and x.stride(0) == l * x.stride(1)
            and x.stride(1) % 8 == 0 and x.data_ptr() % 16 == 0
            and all(t.shape == (b, 1, c) and t.stride(2) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0
                    and t.device == x.device for t in (shift, scale))
            and _kernel_ok(x.device))


def _ln_any(x, shift, scale, eps: float, out: Optional[torch.Tensor] = None):
    """The kernel where the inputs fit (out: a contiguous (B, L, C) buffer to write, for tests), else the reference."""
    if x.dim() != 3 or not _ln_fits(x, shift, scale):
        return reference.ln_modulate(x, shift, scale, eps)
    b, l, c = x.shape
    if out is None:
        out = torch.empty((b, l, c), dtype=x.dtype, device=x.device)
    index = x.device.index
    code = _lib.load().svdq_ln_modulate(x.data_ptr(), x.stride(1), shift.data_ptr(), scale.data_ptr(), shift.stride(0),
                                        out.data_ptr(), b * l, c, l, eps, _dt(x.dtype), index, _raw_stream(index))
    _lib.check(code, "svdq_ln_modulate")
    return out


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) · (1 + scale) + shift (x (B, L, C); shift, scale (B, 1, C)) in one pass: a FLUX block's
    modulated input of a linear, as ComfyUI computes it with two."""
    if torch.compiler.is_compiling():
        return torch.ops.svdquant.ln_modulate.default(x, shift, scale, eps)
    return _ln_any(x, shift, scale, eps)


CONCAT_ROWBASE_MAX_K = 16384  # flux_ops.cu: 256 threads x 8 pieces of 8 columns held per row


def _slot_fits(slot, lead, k: int, device) -> bool:
    """The slot (kernels/ops.py RowBaseSlot) is for an input of this leading shape and width on this device."""
    return (tuple(slot.act[6]) == tuple(lead) and slot.k == k and slot.smooth.device == device
            and slot.smooth.dtype == torch.float32 and slot.smooth.data_ptr() % 16 == 0)


def ln_modulate_rowbase(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, slot
                        ) -> Optional[torch.Tensor]:
    """`ln_modulate`, also writing the next linear's row bases and (slot.codes) int8 codes where `slot`
    (kernels.row_base_slot) says: the kernel holds each row, so its base costs no extra pass, and that linear's
    kernel 1 is left only the LoRA-down. None where the kernel does not take these inputs: call `ln_modulate` and
    the linear without the slot."""
    if x.dim() != 3 or not _ln_fits(x, shift, scale) or not _slot_fits(slot, x.shape[:-1], x.shape[2], x.device):
        return None
    b, l, c = x.shape
    out = torch.empty((b, l, c), dtype=x.dtype, device=x.device)
    index = x.device.index
    code = _lib.load().svdq_ln_modulate_rowbase(x.data_ptr(), x.stride(1), shift.data_ptr(), scale.data_ptr(),
                                                shift.stride(0), out.data_ptr(), b * l, c, l, eps,
                                                slot.smooth.data_ptr(), slot.rowbase, slot.qact if slot.codes else None,
                                                slot.mp, _dt(x.dtype), index, _raw_stream(index))
    _lib.check(code, "svdq_ln_modulate_rowbase")
    return out


def concat_rows_rowbase(a: Optional[torch.Tensor], b: torch.Tensor, gelu_b: bool, slot) -> Optional[torch.Tensor]:
    """`concat_rows` (a None: b alone, through GELU when gelu_b), also writing the next linear's row bases where
    `slot` says, as `ln_modulate_rowbase` (K = Ka + Kb at most CONCAT_ROWBASE_MAX_K); None where the kernel does
    not take these inputs."""
    b2 = b.flatten(0, -2) if b.dim() > 2 else b
    a2 = b2[:, :0] if a is None else a.flatten(0, -2) if a.dim() > 2 else a
    if b2.dim() != 2 or (a is not None and a.shape[:-1] != b.shape[:-1]):
        return None
    m, ka, kb = b2.shape[0], a2.shape[1], b2.shape[1]
    if a is not None and (ka == 0 or not _concat_fits(a2, b2)):
        return None
    if a is None and not (b2.dtype in (torch.bfloat16, torch.float16) and b2.stride(1) == 1 and kb % 8 == 0
                          and b2.stride(0) % 8 == 0 and b2.data_ptr() % 16 == 0 and _kernel_ok(b2.device)):
        return None
    if ka + kb > CONCAT_ROWBASE_MAX_K or not _slot_fits(slot, b.shape[:-1], ka + kb, b.device):
        return None
    out = torch.empty((*b.shape[:-1], ka + kb), dtype=b.dtype, device=b.device)
    index = b.device.index
    code = _lib.load().svdq_concat_rows_rowbase(None if a is None else a2.data_ptr(), a2.stride(0) if ka else 0, ka,
                                                b2.data_ptr(), b2.stride(0), kb, int(gelu_b), out.data_ptr(), m,
                                                slot.smooth.data_ptr(), slot.rowbase, slot.qact if slot.codes else None,
                                                slot.mp, _dt(b.dtype), index, _raw_stream(index))
    _lib.check(code, "svdq_concat_rows_rowbase")
    return out


_DEF = torch.library.Library("svdquant", "FRAGMENT")
_DEF.define("ln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor")
_DEF.impl("ln_modulate", _ln_any, "CompositeExplicitAutograd")
_DEF.define("qk_norm_rope(Tensor x0, Tensor qs0, Tensor ks0, Tensor? x1, Tensor? qs1, Tensor? ks1, Tensor pe, "
            "int heads, float eps) -> (Tensor, Tensor, Tensor)")
_DEF.impl("qk_norm_rope", _qk_any, "CompositeExplicitAutograd")
_DEF.define("concat_rows(Tensor a, Tensor b, bool gelu_b) -> Tensor")
_DEF.impl("concat_rows", _concat_any, "CompositeExplicitAutograd")


@torch.library.register_fake("svdquant::qk_norm_rope")
def _(x0, qs0, ks0, x1, qs1, ks1, pe, heads, eps):
    l1 = 0 if x1 is None else x1.shape[1]
    shape = (x0.shape[0], heads, x0.shape[1] + l1, qs0.shape[0])
    return x0.new_empty(shape), x0.new_empty(shape), x0.new_empty(shape)


@torch.library.register_fake("svdquant::concat_rows")
def _(a, b, gelu_b):
    return a.new_empty((*a.shape[:-1], a.shape[-1] + b.shape[-1]))


@torch.library.register_fake("svdquant::ln_modulate")
def _(x, shift, scale, eps):
    return x.new_empty(x.shape)
