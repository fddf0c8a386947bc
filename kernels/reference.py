"""Pure-torch reference of every kernel: the oracle for the CUDA kernels and the CPU fallback.

Numeric contract (docs/FORMAT.md):
- INT4 codes are symmetric, in [-7, 7] as this pack quantizes; float-scale layers imported from Nunchaku
  files may also hold -8 (docs/FORMAT.md §3). Packed two per byte, low nibble = even column.
- Two scale modes per layer (docs/FORMAT.md §1):
  "float":     per-group scale `absmax / 7` over `group_size` consecutive input channels (K).
  "int_ratio": per-group scale = base × integer multiplier f in [1, 18], the base shared by a chunk of
               groups (activations: ACT_CHUNK_GROUPS groups; weights: the whole row). code × f fits int8
               (|7·18| = 126), so 8-bit integer tensor cores sum whole chunks exactly (the Hopper path).
- Activation scales are fp32; products of codes are summed per group exactly, then scaled in fp32.
- Unsigned activations (reference only, no CUDA kernel): a layer with an `act_shift` c reads X + c,
  which is >= 0 for inputs that come out of a GELU (its minimum, -0.17004, lies above -c); its smoothed activations get
  codes in [0, 15] with a per-group fp32 step max / 15 whatever the layer's weight scale mode.
"""
import torch

QMAX = 7
UQMAX = 15                # unsigned activation codes: [0, 15]
RATIO_MAX = 18            # 7 · 18 = 126 <= 127: code × multiplier is an int8
ACT_CHUNK_GROUPS = 4      # 4 · 64 · 126² < 2²²: a chunk's integer sum converts to fp32 exactly by the magic-number trick
ROW = 0                   # as a chunk size: one base for the whole row (kernel 2e's activations, docs/KERNELS.md §6c)
SCALE_MODES = ("float", "int_ratio")
_INV_RATIO_UNIT = 1.0 / (QMAX * RATIO_MAX)  # base = chunk absmax × this (fp32 multiply, as the kernel does)


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
    """Symmetric per-group INT4 along the last dim ("float" scales).

    Returns (codes int8 (..., K), scales fp32 (..., K/G)). All-zero groups get scale 0, codes 0.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"input channels {k} are not a multiple of group size {group_size}")
    scale = x.float().reshape(*lead, k // group_size, group_size).abs().amax(dim=-1) / QMAX
    return quantize_with_steps(x, scale, group_size), scale


def quantize_groups_unsigned(x: torch.Tensor, group_size: int):
    """Unsigned per-group INT4 along the last dim: (codes int8 (..., K) in [0, 15], scales fp32 (..., K/G)).

    step = max(group) / 15 (values below 0 clip to code 0); a group with no positive value gets
    step 0 and codes 0.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"input channels {k} are not a multiple of group size {group_size}")
    scale = x.float().reshape(*lead, k // group_size, group_size).amax(dim=-1).clamp_min(0) / UQMAX
    return quantize_with_steps(x, scale, group_size, 0, UQMAX), scale


def _span(chunk_groups: int, ng: int) -> int:
    """Groups per base: chunk_groups, or all ng where it is ROW (0) or covers the row anyway (same numbers)."""
    return ng if chunk_groups <= 0 or chunk_groups > ng else chunk_groups


def ratio_scales(amax: torch.Tensor, chunk_groups: int):
    """int_ratio scales from per-group absmax (..., ng) fp32: (mult fp32 integers in [1, 18] (..., ng),
    base fp32 (..., ceil(ng / chunk_groups))). base = chunk absmax / 126; f = ceil(absmax / (7·base)).

    Each op is one IEEE fp32 operation in the order the CUDA kernel performs it (multiply by the
    fp32 constant 1/126, multiply by 7, true division, ceil), so both sides get the same bits.
    """
    *lead, ng = amax.shape
    chunk_groups = _span(chunk_groups, ng)
    nch = -(-ng // chunk_groups)
    pad = nch * chunk_groups - ng
    padded = torch.nn.functional.pad(amax.float(), (0, pad)) if pad else amax.float()
    cmax = padded.reshape(*lead, nch, chunk_groups).amax(dim=-1)
    base = cmax * torch.tensor(_INV_RATIO_UNIT, dtype=torch.float32, device=amax.device)
    unit = (base * QMAX).repeat_interleave(chunk_groups, dim=-1)[..., :ng]
    safe = torch.where(unit > 0, unit, torch.ones_like(unit))
    mult = torch.where(unit > 0, torch.ceil(amax.float() / safe), torch.ones_like(unit)).clamp_(1, RATIO_MAX)
    return mult, base


def ratio_steps(mult: torch.Tensor, base: torch.Tensor, chunk_groups: int) -> torch.Tensor:
    """Per-group step base × f (..., ng) fp32 from an int_ratio (mult, base) pair."""
    ng = mult.shape[-1]
    return base.float().repeat_interleave(_span(chunk_groups, ng), dim=-1)[..., :ng] * mult.float()


def unpack_uint4(p: torch.Tensor) -> torch.Tensor:
    """int8 (..., K/2) -> int8 codes (..., K) in [0, 15] (no sign extension: unsigned activations)."""
    p = p.to(torch.int8)
    lo = p & 0x0F
    hi = (p >> 4) & 0x0F
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_with_steps(x: torch.Tensor, steps: torch.Tensor, group_size: int, qmin: int = -QMAX,
                        qmax: int = QMAX) -> torch.Tensor:
    """codes int8 (..., K) = clamp(round(x / step), qmin, qmax) per group; a step of 0 gives codes 0."""
    *lead, k = x.shape
    xg = x.float().reshape(*lead, k // group_size, group_size)
    safe = torch.where(steps > 0, steps, torch.ones_like(steps)).unsqueeze(-1)
    q = torch.round(xg / safe).clamp_(qmin, qmax)
    q = torch.where((steps > 0).unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.int8).reshape(*lead, k)


def quantize_groups_ratio(x: torch.Tensor, group_size: int, chunk_groups: int = ACT_CHUNK_GROUPS):
    """int_ratio INT4 along the last dim: (codes int8 (..., K), mult uint8 (..., K/G), base fp32 (..., chunks))."""
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"input channels {k} are not a multiple of group size {group_size}")
    amax = x.float().reshape(*lead, k // group_size, group_size).abs().amax(dim=-1)
    mult, base = ratio_scales(amax, chunk_groups)
    codes = quantize_with_steps(x, ratio_steps(mult, base, chunk_groups), group_size)
    return codes, mult.to(torch.uint8), base


def dequantize_ratio(codes, mult, base, group_size: int, chunk_groups: int) -> torch.Tensor:
    """fp32 (..., K) = (code × f) × base: the integer the tensor core multiplies, times the chunk base."""
    *lead, k = codes.shape
    ng = k // group_size
    qf = codes.float().reshape(*lead, ng, group_size) * mult.float().unsqueeze(-1)
    b = base.float().repeat_interleave(_span(chunk_groups, ng), dim=-1)[..., :ng].unsqueeze(-1)
    return (qf * b).reshape(*lead, k)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (..., K) int8, scales (..., K/G) -> fp32 (..., K)."""
    *lead, k = codes.shape
    xg = codes.float().reshape(*lead, k // group_size, group_size) * scales.float().unsqueeze(-1)
    return xg.reshape(*lead, k)


def weight_scales_for_gemm(tensors: dict):
    """The layer's weight scales in the form w4a4_gemm takes: a (K/G, N) tensor (float mode) or the
    (mult (K/G, N), base (N,)) pair (int_ratio mode)."""
    if "wscale_mult" in tensors:
        return (tensors["wscale_mult"], tensors["wscale_base"])
    return tensors["wscales"]


def quantize_act_lora_down(x, smooth_factor, proj_down, group_size: int = 64, scale_mode: str = "float",
                           act_shift=None):
    """Kernel 1: one pass over X.

    x (M, K); smooth_factor (K,); proj_down (K, r) (1/λ folded in) or None.
    Returns (qact int8 packed (M, K/2), ascales, lora_act fp32 (M, r)); ascales is fp32 (M, K/G) in
    float mode, the pair (mult uint8 (M, K/G), base fp32 (M, K/(G·ACT_CHUNK_GROUPS))) in int_ratio mode.
    act_shift (a (1,) tensor, reference only): both branches read X + act_shift and the codes are
    unsigned ([0, 15], fp32 scales (M, K/G)) whatever `scale_mode` says.
    """
    x = x.float() if act_shift is None else x.float() + act_shift.float()
    xs = x / smooth_factor.float()
    if act_shift is not None:
        codes, ascales = quantize_groups_unsigned(xs, group_size)
    elif scale_mode == "int_ratio":
        codes, mult, base = quantize_groups_ratio(xs, group_size, ACT_CHUNK_GROUPS)
        ascales = (mult, base)
    elif scale_mode == "float":
        codes, ascales = quantize_groups(xs, group_size)
    else:
        raise ValueError(f"unknown scale mode {scale_mode!r} (expected one of {SCALE_MODES})")
    if proj_down is None or proj_down.shape[-1] == 0:
        lora_act = x.new_zeros((x.shape[0], 0), dtype=torch.float32)
    else:
        lora_act = x.float() @ proj_down.float()
    return pack_int4(codes), ascales, lora_act


def _dequant_act(qact, ascales, group_size, unsigned=False):
    if unsigned:
        return dequantize_groups(unpack_uint4(qact), ascales, group_size)
    codes = unpack_int4(qact)
    if isinstance(ascales, tuple):
        return dequantize_ratio(codes, *ascales, group_size, ACT_CHUNK_GROUPS)
    return dequantize_groups(codes, ascales, group_size)


def _dequant_weight(qweight, wscales, group_size):
    codes = unpack_int4(qweight)
    if isinstance(wscales, tuple):  # (mult (K/G, N), base (N,)): one base per row = one chunk of all groups
        mult, base = wscales
        return dequantize_ratio(codes, mult.t(), base.reshape(-1, 1), group_size, mult.shape[0])
    return dequantize_groups(codes, wscales.t(), group_size)


def w4a4_gemm(qact, ascales, qweight, wscales, lora_act, proj_up, bias, out_dtype, group_size: int = 64,
              unsigned_act: bool = False):
    """Kernel 2: Y = Σ_g a[m,g]·w[g,n]·(qa_g · qw_gᵀ) + lora_act·proj_upᵀ + bias.

    qact (M, K/2) int8, ascales (from quantize_act_lora_down), qweight (N, K/2) int8, wscales (K/G, N)
    or the int_ratio pair (see weight_scales_for_gemm), lora_act (M, r) fp32, proj_up (N, r), bias (N,) or None.
    Computed as deq(qa) · deq(qw)ᵀ in fp32: equal to the per-group integer form up to fp32
    summation order, and it needs no (G, M, N) intermediate, so it also serves as the CPU path.
    unsigned_act: qact holds unsigned codes with fp32 (M, K/G) scales (layers with an act_shift).
    """
    a = _dequant_act(qact, ascales, group_size, unsigned_act)
    w = _dequant_weight(qweight, wscales, group_size)
    y = a @ w.t()
    if lora_act is not None and lora_act.shape[-1] > 0:
        y = y + lora_act.float() @ proj_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def svdquant_linear_act16(x, qweight, wscales, smooth_factor, proj_down, proj_up, bias, group_size: int = 64):
    """A layer declared with 16-bit activations: the same stored weights (4-bit residual + branch) and
    X̂ = X / λ not quantized: Y = X̂ · deq(R)ᵀ + (X · proj_down) · proj_upᵀ + b, in fp32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = (x2 / smooth_factor.float()) @ _dequant_weight(qweight, wscales, group_size).t()
    if proj_down is not None and proj_down.shape[-1] > 0:
        y = y + (x2 @ proj_down.float()) @ proj_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def svdquant_linear(x, qweight, wscales, smooth_factor, proj_down, proj_up, bias, group_size: int = 64,
                    act_shift=None):
    """The whole 4-bit linear (kernel 1 then kernel 2) for x (..., K); wscales as in w4a4_gemm (its
    form picks the scale mode of the activations too, unless act_shift makes them unsigned)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mode = "int_ratio" if isinstance(wscales, tuple) else "float"
    qact, ascales, lora_act = quantize_act_lora_down(x2, smooth_factor, proj_down, group_size, mode, act_shift)
    y = w4a4_gemm(qact, ascales, qweight, wscales, lora_act, proj_up, bias, x.dtype, group_size,
                  unsigned_act=act_shift is not None)
    return y.reshape(*lead, qweight.shape[0])


def qk_norm_rope(sources, pe, heads: int, eps: float = 1e-6):
    """The attention's q, k, v (B, H, L, D) from qkv rows, as ComfyUI's FLUX blocks make them (comfy/ldm/flux:
    QKNorm, then math.apply_rope, the double block's concatenation along L): kernels/csrc/flux_ops.cu's reference.
    sources: [(qkv (B, L_i, >= 3·H·D) with rows [3, H, D], q_scale (D,), k_scale (D,))], concatenated in order;
    pe: fp32 (1 or B, 1, L, D/2, 2, 2). Same torch ops as ComfyUI, so on the CPU the output is bitwise its own."""
    qs, ks, vs = [], [], []
    for qkv, q_scale, k_scale in sources:
        b, l, _ = qkv.shape
        d = q_scale.shape[0]
        q, k, v = qkv[..., :3 * heads * d].view(b, l, 3, heads, d).permute(2, 0, 3, 1, 4)
        qs.append(torch.nn.functional.rms_norm(q, (d,), weight=q_scale.to(q.dtype), eps=eps))
        ks.append(torch.nn.functional.rms_norm(k, (d,), weight=k_scale.to(k.dtype), eps=eps))
        vs.append(v)
    q, k, v = (torch.cat(t, dim=2) if len(t) > 1 else t[0] for t in (qs, ks, vs))
    return _rope(q, pe), _rope(k, pe), v.contiguous()


def _rope(x, freqs_cis):
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    x_out = freqs_cis[..., 0] * x_[..., 0]
    x_out.addcmul_(freqs_cis[..., 1], x_[..., 1])
    return x_out.reshape(*x.shape).type_as(x)


def concat_rows(a, b, gelu_b: bool = False):
    """[a | b] along the last dimension, b through GELU (tanh form) when gelu_b, as the FLUX single block makes the
    input of its linear2 (mlp_act, then torch.cat): kernels/csrc/flux_ops.cu's reference."""
    return torch.cat((a, torch.nn.functional.gelu(b, approximate="tanh") if gelu_b else b), dim=-1)


def ln_modulate(x, shift, scale, eps: float = 1e-6):
    """LayerNorm(x) (no affine) · (1 + scale) + shift, as ComfyUI's FLUX blocks compute a linear's modulated input
    (an affine-free nn.LayerNorm, then flux/layers.py apply_mod's addcmul): flux_ops.cu ln_modulate's reference.
    x (B, L, C); shift, scale (B, 1, C)."""
    return torch.addcmul(shift, torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)
