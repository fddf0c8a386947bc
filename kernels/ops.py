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
    """Kernel 2 into a given output buffer (M, N)."""
    lib = _lib.load()
    m, n = out.shape
    k = wscales.shape[0] * GROUP
    rp = lora.shape[1] if lora is not None else 0
    code = lib.svdq_w4a4_gemm(
        _ptr(qact), _ptr(ascales), _ptr(qweight), _ptr(wscales), _ptr(lora) if rp else None,
        _ptr(proj_up) if rp else None, _ptr(bias), _ptr(out), m, n, k, ascales.shape[1], rp,
        _dt(out.dtype), path, variant, out.device.index, torch.cuda.current_stream(out.device).cuda_stream)
    _lib.check(code, "svdq_w4a4_gemm")


@torch.library.custom_op("svdquant::quantize_act_lora_down", mutates_args=(), device_types="cuda")
def quantize_act_lora_down(x: torch.Tensor, smooth_rcp: torch.Tensor, proj_down: Optional[torch.Tensor],
                           rank_padded: int, fmt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    if x.data_ptr() % 16 or not x.is_contiguous():  # the kernel reads 16-byte vectors
        x = x.contiguous().clone()
    qact = torch.empty((m, k if fmt == _lib.FMT_E4M3 else k // 2), dtype=torch.uint8, device=x.device)
    ascales = torch.empty((k // GROUP, padded_rows(m)), dtype=torch.float32, device=x.device)
    lora = torch.empty((m, rank_padded), dtype=torch.float32, device=x.device)
    quantize_into(x, smooth_rcp, proj_down, qact, ascales, lora, fmt)
    return qact, ascales, lora


@quantize_act_lora_down.register_fake
def _(x, smooth_rcp, proj_down, rank_padded, fmt):
    m, k = x.shape
    qact = x.new_empty((m, k if fmt == _lib.FMT_E4M3 else k // 2), dtype=torch.uint8)
    ascales = x.new_empty((k // GROUP, padded_rows(m)), dtype=torch.float32)
    lora = x.new_empty((m, rank_padded), dtype=torch.float32)
    return qact, ascales, lora


@torch.library.custom_op("svdquant::w4a4_gemm", mutates_args=(), device_types="cuda")
def w4a4_gemm(qact: torch.Tensor, ascales: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
              lora: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
              path: int) -> torch.Tensor:
    out = torch.empty((qact.shape[0], wscales.shape[1]), dtype=out_dtype, device=qact.device)
    gemm_into(qact, ascales, qweight, wscales, lora, proj_up, bias, out, path)
    return out


@w4a4_gemm.register_fake
def _(qact, ascales, qweight, wscales, lora, proj_up, bias, out_dtype, path):
    return qact.new_empty((qact.shape[0], wscales.shape[1]), dtype=out_dtype)


def linear_direct(x2: torch.Tensor, p: dict) -> torch.Tensor:
    """Eager fast path: the same two kernels without the custom-op dispatch (tens of microseconds less
    host time per call; still capturable in CUDA graphs)."""
    path = p["_path"]
    fmt = _lib.FMT_E4M3 if path == 90 else _lib.FMT_INT4
    pd = p["_proj_down"]
    if pd is not None and pd.dtype != x2.dtype:
        pd = pd.to(x2.dtype)
    m, k = x2.shape
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    dev = x2.device
    qact = torch.empty((m, k if fmt == _lib.FMT_E4M3 else k // 2), dtype=torch.uint8, device=dev)
    ascales = torch.empty((k // GROUP, padded_rows(m)), dtype=torch.float32, device=dev)
    lora = torch.empty((m, p["_rp"]), dtype=torch.float32, device=dev)
    quantize_into(x2, p["_smooth_rcp"], pd, qact, ascales, lora, fmt)
    out = torch.empty((m, p["_qw"].shape[0]), dtype=x2.dtype, device=dev)
    gemm_into(qact, ascales, p["_qw"], p["_wscales"], lora, p["_proj_up"], p["_bias"], out, path)
    return out


def linear(x2: torch.Tensor, p: dict) -> torch.Tensor:
    """The whole 4-bit linear on the CUDA path for x2 (M, K) with tensors from prepare_weights."""
    if not torch.compiler.is_compiling():
        return linear_direct(x2, p)
    path = p["_path"]
    fmt = _lib.FMT_E4M3 if path == 90 else _lib.FMT_INT4
    pd = p["_proj_down"]
    if pd is not None and pd.dtype != x2.dtype:
        pd = pd.to(x2.dtype)
    qact, ascales, lora = quantize_act_lora_down(x2, p["_smooth_rcp"], pd, p["_rp"], fmt)
    return w4a4_gemm(qact, ascales, p["_qw"], p["_wscales"], lora, p["_proj_up"], p["_bias"], x2.dtype, path)
