"""torch.library custom ops over the CUDA library, with fake (meta) implementations.

`svdquant::quantize_act_lora_down` and `svdquant::w4a4_gemm` are opaque to torch.compile (the fake
implementations give it shapes and dtypes) and run on the current CUDA stream, so they can be
captured in CUDA graphs. `*_into` variants write into caller-given buffers (tests poison them).
Layouts: see kernels/csrc/svdq.cu (header) and docs/KERNELS.md.
"""
from typing import Optional, Tuple

import torch

from . import _lib

GROUP = 64


def _dt(dtype) -> int:
    if dtype == torch.bfloat16:
        return _lib.DT_BF16
    if dtype == torch.float16:
        return _lib.DT_F16
    raise TypeError(f"svdquant CUDA kernels take bf16/fp16, got {dtype}")


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def padded_rows(m: int) -> int:
    return (m + 3) // 4 * 4


def act_shapes(m: int, k: int, fmt: int):
    """(qact shape, ascales shape) kernel 1 writes for activation format `fmt` (svdq.cu AF_*)."""
    byte_codes = fmt in (_lib.FMT_E4M3, _lib.FMT_I8_RATIO)  # one byte per code, else two per byte
    groups = k // GROUP
    rows = -(-groups // _lib.RATIO_CHUNK) if fmt == _lib.FMT_I8_RATIO else groups  # bases per chunk / scales per group
    return (m, k if byte_codes else k // 2), (rows, padded_rows(m))


def _act_buffers(x, fmt, rank_padded, new):
    m, k = x.shape
    qshape, sshape = act_shapes(m, k, fmt)
    return (new(qshape, dtype=torch.uint8), new(sshape, dtype=torch.float32),
            new((m, rank_padded), dtype=torch.float32))


def quantize_into(x, smooth_rcp, proj_down, qact, ascales, lora, fmt: int) -> None:
    """Kernel 1 into given buffers. smooth_rcp = 1/smooth_factor (fp32); every element of lora (M, rp) is
    written (no zeroing needed). The K-split LoRA-down partials go to a workspace allocated here through
    torch (caching allocator: fine under CUDA-graph capture) and are summed in a fixed order: the result
    is bitwise reproducible."""
    lib = _lib.load()
    m, k = x.shape
    rp = lora.shape[1]
    dev = x.device
    n_part, n_cnt = _lib.quant_workspace(m, k, rp, dev.index) if rp else (0, 0)
    part = cnt = None
    if n_part:
        part = torch.empty(n_part, dtype=torch.float32, device=dev)
        cnt = torch.zeros(n_cnt, dtype=torch.int32, device=dev)
    code = lib.svdq_quantize_act_lora_down(
        _ptr(x), _ptr(smooth_rcp), _ptr(proj_down) if rp else None, _ptr(qact), _ptr(ascales), _ptr(lora),
        _ptr(part), _ptr(cnt), m, k, ascales.shape[1], rp, _dt(x.dtype), fmt, dev.index,
        torch.cuda.current_stream(dev).cuda_stream)
    _lib.check(code, "svdq_quantize_act_lora_down")


def gemm_into(qact, ascales, qweight, wscales, lora, proj_up, bias, out, path: int, variant: int = 0) -> None:
    """Kernel 2 into a given output buffer (M, N). Path 91 (int_ratio on Hopper): qact/qweight int8 codes x
    multipliers, ascales the activation bases, wscales the weight bases (N,)."""
    lib = _lib.load()
    m, n = out.shape
    k = qweight.shape[1] if path == 91 else wscales.shape[0] * GROUP
    rp = lora.shape[1] if lora is not None else 0
    code = lib.svdq_w4a4_gemm(
        _ptr(qact), _ptr(ascales), _ptr(qweight), _ptr(wscales), _ptr(lora) if rp else None,
        _ptr(proj_up) if rp else None, _ptr(bias), _ptr(out), m, n, k, ascales.shape[1], rp,
        _dt(out.dtype), path, variant, out.device.index, torch.cuda.current_stream(out.device).cuda_stream)
    _lib.check(code, "svdq_w4a4_gemm")


@torch.library.custom_op("svdquant::quantize_act_lora_down", mutates_args=(), device_types="cuda")
def quantize_act_lora_down(x: torch.Tensor, smooth_rcp: torch.Tensor, proj_down: Optional[torch.Tensor],
                           rank_padded: int, fmt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.data_ptr() % 16 or not x.is_contiguous():  # the kernel reads 16-byte vectors
        x = x.contiguous().clone()
    qact, ascales, lora = _act_buffers(x, fmt, rank_padded, lambda shape, dtype: torch.empty(shape, dtype=dtype, device=x.device))
    quantize_into(x, smooth_rcp, proj_down, qact, ascales, lora, fmt)
    return qact, ascales, lora


@quantize_act_lora_down.register_fake
def _(x, smooth_rcp, proj_down, rank_padded, fmt):
    return _act_buffers(x, fmt, rank_padded, lambda shape, dtype: x.new_empty(shape, dtype=dtype))


@torch.library.custom_op("svdquant::w4a4_gemm", mutates_args=(), device_types="cuda")
def w4a4_gemm(qact: torch.Tensor, ascales: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
              lora: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
              path: int) -> torch.Tensor:
    out = torch.empty((qact.shape[0], qweight.shape[0]), dtype=out_dtype, device=qact.device)
    gemm_into(qact, ascales, qweight, wscales, lora, proj_up, bias, out, path)
    return out


@w4a4_gemm.register_fake
def _(qact, ascales, qweight, wscales, lora, proj_up, bias, out_dtype, path):
    return qact.new_empty((qact.shape[0], qweight.shape[0]), dtype=out_dtype)


def _proj_down(p, dtype):
    pd = p["_proj_down"]
    return pd.to(dtype) if pd is not None and pd.dtype != dtype else pd


def linear_direct(x2: torch.Tensor, p: dict) -> torch.Tensor:
    """Eager fast path: the same two kernels without the custom-op dispatch (tens of microseconds less
    host time per call; still capturable in CUDA graphs)."""
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    dev = x2.device
    qact, ascales, lora = _act_buffers(x2, p["_afmt"], p["_rp"], lambda shape, dtype: torch.empty(shape, dtype=dtype, device=dev))
    quantize_into(x2, p["_smooth_rcp"], _proj_down(p, x2.dtype), qact, ascales, lora, p["_afmt"])
    out = torch.empty((x2.shape[0], p["_qw"].shape[0]), dtype=x2.dtype, device=dev)
    gemm_into(qact, ascales, p["_qw"], p["_wscales"], lora, p["_proj_up"], p["_bias"], out, p["_path"])
    return out


def linear(x2: torch.Tensor, p: dict) -> torch.Tensor:
    """The whole 4-bit linear on the CUDA path for x2 (M, K) with tensors from prepare_weights."""
    if not torch.compiler.is_compiling():
        return linear_direct(x2, p)
    qact, ascales, lora = quantize_act_lora_down(x2, p["_smooth_rcp"], _proj_down(p, x2.dtype), p["_rp"], p["_afmt"])
    return w4a4_gemm(qact, ascales, p["_qw"], p["_wscales"], lora, p["_proj_up"], p["_bias"], x2.dtype, p["_path"])
