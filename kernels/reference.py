"""Pure-torch reference of every kernel: the oracle for the CUDA kernels and the CPU fallback.

Numeric contract (docs/FORMAT.md):
- INT4 codes are symmetric, in [-7, 7]; packed two per byte, low nibble = even column.
- Per-group scales are `absmax / 7` over `group_size` consecutive input channels (K).
- Activation scales are fp32; products of codes are summed per group exactly, then scaled in fp32.
"""
import torch

QMAX = 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int codes (..., K) in [-8, 7] -> int8 (..., K/2); low nibble = even column."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    q = q.to(torch.int8)
    lo = q[..., 0::2] & 0x0F
    hi = (q[..., 1::2] & 0x0F) << 4
    return (lo | hi).to(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """int8 (..., K/2) -> int8 codes (..., K), sign-extended."""
    p = p.to(torch.int8)
    lo = (p << 4) >> 4  # arithmetic shifts sign-extend the low nibble
    hi = p >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_groups(x: torch.Tensor, group_size: int):
    """Symmetric per-group INT4 along the last dim.

    Returns (codes int8 (..., K), scales fp32 (..., K/G)). All-zero groups get scale 0, codes 0.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"input channels {k} are not a multiple of group size {group_size}")
    xg = x.float().reshape(*lead, k // group_size, group_size)
    scale = xg.abs().amax(dim=-1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xg / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8).reshape(*lead, k), scale


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (..., K) int8, scales (..., K/G) -> fp32 (..., K)."""
    *lead, k = codes.shape
    xg = codes.float().reshape(*lead, k // group_size, group_size) * scales.float().unsqueeze(-1)
    return xg.reshape(*lead, k)


def quantize_act_lora_down(x, smooth_factor, proj_down, group_size: int = 64):
    """Kernel 1: one pass over X.

    x (M, K); smooth_factor (K,); proj_down (K, r) (1/λ folded in) or None.
    Returns (qact int8 packed (M, K/2), ascales fp32 (M, K/G), lora_act fp32 (M, r)).
    """
    xs = x.float() / smooth_factor.float()
    codes, ascales = quantize_groups(xs, group_size)
    if proj_down is None or proj_down.shape[-1] == 0:
        lora_act = x.new_zeros((x.shape[0], 0), dtype=torch.float32)
    else:
        lora_act = x.float() @ proj_down.float()
    return pack_int4(codes), ascales, lora_act


def w4a4_gemm(qact, ascales, qweight, wscales, lora_act, proj_up, bias, out_dtype, group_size: int = 64):
    """Kernel 2: Y = Σ_g a[m,g]·w[g,n]·(qa_g · qw_gᵀ) + lora_act·proj_upᵀ + bias.

    qact (M, K/2) int8, ascales (M, K/G) fp32, qweight (N, K/2) int8, wscales (K/G, N),
    lora_act (M, r) fp32, proj_up (N, r), bias (N,) or None.
    Computed as deq(qa) · deq(qw)ᵀ in fp32: equal to the per-group integer form up to fp32
    summation order, and it needs no (G, M, N) intermediate, so it also serves as the CPU path.
    """
    a = dequantize_groups(unpack_int4(qact), ascales, group_size)
    w = dequantize_groups(unpack_int4(qweight), wscales.t(), group_size)
    y = a @ w.t()
    if lora_act is not None and lora_act.shape[-1] > 0:
        y = y + lora_act.float() @ proj_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def svdquant_linear(x, qweight, wscales, smooth_factor, proj_down, proj_up, bias, group_size: int = 64):
    """The whole 4-bit linear (kernel 1 then kernel 2) for x (..., K)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    qact, ascales, lora_act = quantize_act_lora_down(x2, smooth_factor, proj_down, group_size)
    y = w4a4_gemm(qact, ascales, qweight, wscales, lora_act, proj_up, bias, x.dtype, group_size)
    return y.reshape(*lead, qweight.shape[0])
