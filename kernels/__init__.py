"""Kernel entry points for the 4-bit linear.

Callers use `prepare_weights` once per device (any re-layout a kernel wants happens here, from the
natural layout of docs/FORMAT.md) and `linear` on every forward. The backend is chosen here, never
by callers: the compiled CUDA library (kernels/csrc, loaded by ctypes, see _lib.py) when it is
present and supports the device, else the pure-torch reference (CPU included).

Backends: "cuda-sm90a" (Hopper: e4m3 wgmma GEMM with per-group promotion, for float scales),
"cuda-sm90a-int8" (Hopper, int_ratio scales: s8 wgmma, exact integer sums per 256-channel chunk),
"cuda-mma-int4" (sm_80/86/89/120: INT4 mma.sync, either scale mode), "reference".
`SVDQ_BACKEND=reference` forces the reference.
Layers with unsigned activations (an `act_shift` tensor, docs/FORMAT.md §1) have no CUDA kernel:
`prepare_weights` keeps them on the reference whatever the device. Layers with 16-bit activations
(`act_bits`) run the W4A16 GEMV (kernels/csrc/w4a16.cu) on a GPU for up to GEMV_MAX_M rows, else torch ops
in the compute dtype (`_linear_act16`).
"""
import logging
import os

from . import reference
from . import _lib

log = logging.getLogger(__name__)
_BACKEND_LOGGED = set()
_NAMES = {90: "cuda-sm90a", 91: "cuda-sm90a-int8", 92: "cuda-sm90a-int8-packed", 80: "cuda-mma-int4"}
MAX_RANK = 128
GEMV_MAX_M = 16  # rows (images) up to which a 16-bit-activation layer runs the GEMV. It reads the weight once per 4
# rows: at 3072 -> 18432 it took 29.8 / 85.5 / 157.9 µs at M = 1 / 4 / 8 against 519 µs for the per-call 16-bit weight
# (H200, bench/bench_gemv.py), so the two cross near M = 24
_ops = None


def _get_ops():
    global _ops
    if _ops is None:
        from . import ops as _o  # imports torch and registers the custom ops
        _ops = _o
    return _ops


def _forced_reference() -> bool:
    return os.environ.get("SVDQ_BACKEND", "").lower() == "reference"


def _device_path(device) -> int:
    """The CUDA path for `device` (90/80), or 0 for the reference."""
    if _forced_reference():
        return 0
    try:
        import torch

        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return 0
        if _lib.load() is None:
            return 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _lib.device_path(index)
    except Exception as e:  # a broken library must never break the reference path
        log.warning("svdquant: CUDA kernels unavailable (%s); using the reference", e)
        return 0


def _hopper_path(path: int, ratio: bool, packed: bool) -> int:
    """The Hopper kernel of a layer: int_ratio layers run kernel 2c on a resident int8 copy of the weights (91,
    fastest), or with packed=True kernel 2d on the packed codes themselves (92: no copy in VRAM, slower: the weight
    layout a user picks on the loader, "weights in VRAM"); float-scale layers run path 90 on an e4m3 copy."""
    if path != 90 or not ratio:
        return path
    return 92 if packed and _lib.has_packed_gemm() else 91


def backend_name(device, scale_mode: str = "float", packed: bool = False) -> str:
    """Name of the backend that `linear` will use on `device` for layers with `scale_mode` scales."""
    return _NAMES.get(_hopper_path(_device_path(device), scale_mode == "int_ratio", packed), "reference")


def _e4m3_from_packed(qweight):
    """packed int4 (N, K/2) -> e4m3 bytes (N, K) of the same integer codes (exact)."""
    import torch

    codes = reference.unpack_int4(qweight).to(torch.int64)  # (N, K) in [-8, 7]
    lut = torch.tensor([0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E, 0x50], dtype=torch.uint8,
                       device=qweight.device)
    mag = lut[codes.abs()]
    return torch.where(codes < 0, mag | 0x80, mag).contiguous()


def _int8_from_ratio(qweight, mult):
    """packed int4 (N, K/2) and multipliers (K/G, N) -> int8 code x multiplier (N, K), |.| <= 126 (exact)."""
    import torch

    codes = reference.unpack_int4(qweight)  # int8 (N, K): products stay in int8 (no wider temporaries,
    n, k = codes.shape                       # which matter when a low-VRAM load prepares offloaded layers per call)
    groups = mult.shape[0]
    codes.view(n, groups, k // groups).mul_(mult.to(qweight.device).t().to(torch.int8).unsqueeze(-1))
    return codes


def _kernel_rank(n: int, k: int, rank: int):
    """The rank padded to the kernels' multiple of 32, or None for a layer they do not take (stays on the reference)."""
    rp = (rank + 31) // 32 * 32
    return None if k % 64 or n % 64 or rp > MAX_RANK else rp


def prepared_extra_bytes(n: int, k: int, rank: int, device, unsigned: bool = False, act16: bool = False,
                         ratio: bool = False, packed: bool = False) -> int:
    """Device bytes `prepare_weights` adds beside a layer's own tensors on `device` (0 for the reference):
    the Hopper path's int8/e4m3 weight copy (N×K), fp32 proj_up, the padded proj_down, fp32 scales/bias.
    Counted by ComfyUI's memory management (see core/qlinear.py), so that it plans loads with it."""
    if act16:  # the GEMV's fp32 1/λ and bias, its transposed per-group steps (fp32 bound: float scales)
        return 4 * k + 4 * n + 4 * (k // 64) * n if _act16_gemv(device) else 0
    if unsigned:
        return 0  # no kernel (see prepare_weights)
    path = _device_path(device)
    rp = _kernel_rank(n, k, rank)
    if not path or rp is None:
        return 0
    # sm_80 path and Hopper's packed-weight GEMM (int_ratio, kernel 2d) read the packed file layout in place
    weight = n * k if _hopper_path(path, ratio, packed) in (90, 91) else 0
    return weight + 4 * n * rp + 2 * k * rp + 4 * (k // 64) * n + 4 * (n + k)


# SVDQ_ROW_BASE: layers with at least this many weights (N·K) take row bases. On the H200 (docs/KERNELS.md §6c) the
# row-base pass cost more than kernel 2e saved at every measured shape below it (attention, 320²-1280²) and less at
# every one above (SDXL ff1 640x5120 and up, FLUX 3072² and up, at M >= 1024)
ROW_BASE_MIN_WEIGHTS = 3 << 20


def prepare_weights(tensors: dict, device) -> dict:
    """Per-device weight preparation. The natural tensors stay (the reference reads them); the CUDA
    path adds its own: `_qw` (Hopper: e4m3 or int8 bytes (N, K), or with tensors["packed_weights"] the
    int_ratio layers' packed int4 as is (kernel 2d); else the packed int4 as is), fp32 scales, rank padded
    to a multiple of 32."""
    import torch
    import torch.nn.functional as F

    out = dict(tensors)
    out["_path"] = 0
    if tensors.get("act_shift") is not None:
        return out  # unsigned activations: reference only (no kernel reads them)
    if tensors.get("act16"):  # 16-bit activations: the GEMV, or torch ops in the compute dtype on a GPU (decided
        # here, once per device: no environment lookup in a traced forward)
        out["_act16_16bit"] = torch.device(device).type == "cuda" and not _forced_reference()
        if out["_act16_16bit"] and _act16_gemv(device):
            out.update(_prepare_gemv(tensors, torch.device(device)))
        return out
    path = _device_path(device)
    if not path:
        return out
    qweight = tensors["qweight"]
    n, k2 = qweight.shape
    k = 2 * k2
    proj_up, proj_down = tensors.get("proj_up"), tensors.get("proj_down")
    r = 0 if proj_up is None else proj_up.shape[1]
    rp = _kernel_rank(n, k, r)
    if rp is None:
        return out  # stays on the reference
    dev = torch.device(device)
    qweight = qweight.to(dev)
    if "wscale_mult" in tensors:  # int_ratio scales
        mult = tensors["wscale_mult"].to(dev)
        base = tensors["wscale_base"].to(dev, torch.float32)
        path = _hopper_path(path, True, bool(tensors.get("packed_weights")))
        if path in (91, 92):  # the weight bases (N,); the codes as kernel 2c's int8 copy or, 2d, packed as they are
            out["_wscales"] = base.contiguous()
        if path == 92:
            align = (_ops or _get_ops()).aligned16  # TMA reads both from 16-byte-aligned addresses
            out["_qw"] = align(qweight).view(torch.uint8)
            out["_wmult"] = align(mult)
        elif path == 91:
            out["_qw"] = _int8_from_ratio(qweight, mult).view(torch.uint8)
        else:
            out["_qw"] = qweight.contiguous().view(torch.uint8)
            out["_wscales"] = (base.unsqueeze(0) * mult.float()).contiguous()  # per-group steps (K/G, N)
        out["_afmt"] = _lib.FMT_I8_RATIO if path in (91, 92) else _lib.FMT_INT4_RATIO
        if path == 91 and os.environ.get("SVDQ_ROW_BASE") == "1" and n * k >= ROW_BASE_MIN_WEIGHTS:
            # experimental: activations with one base per row, kernel 2e (docs/KERNELS.md §6c); not the reference's
            # numbers (its chunk is 4 groups), so opt-in until that choice is made for every path
            out["_afmt"] = _lib.FMT_I8_ROW
    else:
        out["_qw"] = (_e4m3_from_packed(qweight) if path == 90 else qweight.contiguous()).view(torch.uint8)
        out["_wscales"] = tensors["wscales"].to(dev, torch.float32).contiguous()
        out["_afmt"] = _lib.FMT_E4M3 if path == 90 else _lib.FMT_INT4
    out.update(_fp32_rcp_and_bias(tensors, dev))
    if r:
        out["_proj_down"] = F.pad(proj_down.to(dev), (0, rp - r)).contiguous()
        out["_proj_up"] = F.pad(proj_up.to(dev, torch.float32), (0, rp - r)).contiguous()
    else:
        out["_proj_down"] = None
        out["_proj_up"] = torch.empty((n, 0), dtype=torch.float32, device=dev)
    out["_rp"] = rp
    out["_path"] = path
    return out


class SharedInput:
    """Kernel 1's output for an input tensor (..., K), made with one layer's smoothing and proj_down, which every
    layer sharing those reads (an input group, core/input_group.py): `quantize_input`, then `linear_from_input` per
    layer. `path` is the CUDA path it was made for (0: the reference's (qact, ascales, lora_act))."""
    __slots__ = ("lead", "dtype", "path", "afmt", "payload")

    def __init__(self, lead, dtype, path, afmt, payload):
        self.lead, self.dtype, self.path, self.afmt, self.payload = lead, dtype, path, afmt, payload


def quantize_input(x, prepared: dict, group_size: int = 64):
    """Kernel 1 alone on x (..., K) with this layer's smoothing and proj_down: a SharedInput, or None for a layer
    whose input is not quantized by a kernel-1 pass of its own (16-bit or unsigned activations, no rows); callers
    then run `linear`."""
    if prepared.get("act16") or prepared.get("act_shift") is not None or x.numel() == 0:
        return None
    lead, k = x.shape[:-1], x.shape[-1]
    if group_size == 64 and _use_cuda(x, prepared):
        return SharedInput(lead, x.dtype, prepared["_path"], prepared["_afmt"],
                           (_ops or _get_ops()).quantize_direct(x if x.is_contiguous() else x.contiguous(), prepared))
    x2 = x.reshape(-1, k)
    mode = "int_ratio" if "wscale_mult" in prepared else "float"
    payload = reference.quantize_act_lora_down(x2, prepared["smooth_factor"], prepared.get("proj_down"), group_size,
                                               mode)
    return SharedInput(lead, x.dtype, 0, mode, payload)


def linear_from_input(shared: SharedInput, prepared: dict, group_size: int = 64):
    """This layer's output from a SharedInput made by a layer with the same smoothing and proj_down, or None when
    this layer runs another path than the one the input was made for (then `linear` on the tensor)."""
    if shared.path:
        if prepared.get("_path") != shared.path or prepared.get("_afmt") != shared.afmt or \
                prepared["_qw"].device != shared.payload[0].device:
            return None
        return (_ops or _get_ops()).gemm_direct(shared.payload, shared.dtype, prepared)  # (..., N) already
    if prepared.get("_path") or ("wscale_mult" in prepared) != (shared.afmt == "int_ratio"):
        return None
    qact, ascales, lora_act = shared.payload
    y = reference.w4a4_gemm(qact, ascales, prepared["qweight"], reference.weight_scales_for_gemm(prepared),
                            lora_act, prepared.get("proj_up"), prepared.get("bias"), shared.dtype, group_size)
    return y.view(*shared.lead, y.shape[-1])


FUSE_REFERENCE = False  # the reference path fuses input groups too (a second copy of their weights): tests only


def fuse_prepared(preps: list):
    """One prepared layer computing the members' outputs side by side (N = the sum), for an input group (layers with
    one smoothing vector and proj_down, prepared on one device in one dtype): one GEMM instead of one per member.
    Hopper's int8 path (91) only, where the weights are a prepared copy anyway: the members' copies move into one
    buffer and each member keeps a row view of it (no extra memory; a member called alone reads the same bytes).
    None where the members cannot share one GEMM (other paths, ranks, formats)."""
    import torch

    first = preps[0]
    path = first.get("_path")
    if path == 91 and all(p.get("_path") == 91 and p["_rp"] == first["_rp"] and p["_afmt"] == first["_afmt"]
                          for p in preps):
        rows = [p["_qw"].shape[0] for p in preps]
        bias = None
        if any(p["_bias"] is not None for p in preps):
            dev = first["_qw"].device
            bias = torch.cat([p["_bias"] if p["_bias"] is not None else torch.zeros(n, dtype=torch.float32, device=dev)
                              for p, n in zip(preps, rows)])
        fused = {**{k: first[k] for k in ("_smooth_rcp", "_proj_down", "_rp", "_afmt", "_path")},
                 "_qw": torch.cat([p["_qw"] for p in preps]), "_wscales": torch.cat([p["_wscales"] for p in preps]),
                 "_proj_up": torch.cat([p["_proj_up"] for p in preps]), "_bias": bias, "_wmult": None}
        for k in [k for k in first if k.startswith("_cast:")]:  # proj_down in the compute dtype (one for all)
            fused[k] = first[k]
        a = 0
        for p, n in zip(preps, rows):  # the members read row views of the fused copy; their own copies go
            p["_qw"], p["_wscales"], p["_proj_up"] = (fused[t][a:a + n] for t in ("_qw", "_wscales", "_proj_up"))
            if p["_bias"] is not None:
                p["_bias"] = bias[a:a + n]
            p.pop("_direct", None)  # raw pointers of the old copies
            p.pop("_call", None)
            a += n
        return fused
    if path or not FUSE_REFERENCE or any(p.get("_path") or p.get("act16") or p.get("act_shift") is not None
                                         for p in preps):
        return None
    ratio = "wscale_mult" in first
    cols = ("wscale_mult",) if ratio else ("wscales",)  # (K/G, N): side by side along dim 1
    fused = {"smooth_factor": first["smooth_factor"], "proj_down": first.get("proj_down"), "_path": 0,
             "qweight": torch.cat([p["qweight"] for p in preps]),
             "proj_up": torch.cat([p["proj_up"] for p in preps]) if first.get("proj_up") is not None else None}
    for c in cols:
        fused[c] = torch.cat([p[c] for p in preps], dim=1)
    if ratio:
        fused["wscale_base"] = torch.cat([p["wscale_base"] for p in preps])
    if any(p.get("bias") is not None for p in preps):
        fused["bias"] = torch.cat([p["bias"] if p.get("bias") is not None else p["qweight"].new_zeros(
            p["qweight"].shape[0], dtype=first["smooth_factor"].dtype) for p in preps])
    return fused


def _fp32_rcp_and_bias(tensors: dict, dev) -> dict:
    """What every kernel reads in fp32 beside the weights: 1/λ (`_smooth_rcp`) and the bias (`_bias`, or None)."""
    import torch

    b = tensors.get("bias")
    if b is not None:  # the Hopper epilogue reads it as float4 (the C side checks the alignment)
        b = (_ops or _get_ops()).aligned16(b.to(dev, torch.float32))
    return {"_smooth_rcp": (1.0 / tensors["smooth_factor"].to(dev, torch.float32)).contiguous(), "_bias": b}


def _act16_gemv(device) -> bool:
    """Whether 16-bit-activation layers on `device` run the W4A16 GEMV (any CUDA path of the library has it)."""
    return _device_path(device) != 0 and _lib.has_gemv()


def _prepare_gemv(tensors: dict, dev) -> dict:
    """The GEMV's operands (kernels/csrc/w4a16.cu): the packed codes where they are, steps transposed to
    (N, K/64) so that a row's steps are contiguous (fp32 for float scales; uint8 multipliers and the fp32 row
    bases for int_ratio), fp32 1/λ and bias."""
    import torch

    out = {"_gv_qw": (_ops or _get_ops()).aligned16(tensors["qweight"].to(dev))}
    if "wscale_mult" in tensors:
        out["_gv_mult"] = tensors["wscale_mult"].to(dev).t().contiguous()
        out["_gv_base"] = tensors["wscale_base"].to(dev, torch.float32).contiguous()
        out["_gv_steps"] = None
    else:
        out["_gv_steps"] = tensors["wscales"].to(dev).t().float().contiguous()
        out["_gv_mult"] = out["_gv_base"] = None
    out.update(_fp32_rcp_and_bias(tensors, dev))
    return out


def _linear_gemv(x2, p: dict):
    """A 16-bit-activation layer through the W4A16 GEMV: (X·proj_down) by cuBLAS, the rest in the kernel."""
    import torch

    ops = _ops or _get_ops()
    down, up = ops.cast_cached(p, "proj_down", x2.dtype), ops.cast_cached(p, "proj_up", x2.dtype)
    lora = None if down is None or not down.shape[-1] else x2 @ down
    up = None if lora is None else up
    fn = ops.w4a16_gemv if torch.compiler.is_compiling() else ops.gemv  # the custom op for the tracer only
    return fn(x2, p["_smooth_rcp"], p["_gv_qw"], p["_gv_steps"], p["_gv_mult"], p["_gv_base"], lora, up, p["_bias"])


def _act16_weight(p: dict, dtype, group_size: int):
    """A 16-bit-activation layer's weight as a (N, K) matrix in the compute dtype, made from its packed codes for
    this call (no resident copy: at FLUX.1 size these layers are 3.2 G weights), and the fp32 per-row scale still
    to apply after the product (None when the matrix holds the scales).
    int_ratio: code × multiplier, exact in bf16/fp16 (|.| <= 126), each row's base after the product (fp16: before
    it, since Σ x̂·q·f can pass fp16's 65504; bf16 has the range). float (e.g. Nunchaku's AWQ modulation): codes ×
    each group's step, rounded once to the compute dtype, as a W4A16 GEMV rounds its dequantized weight."""
    import torch

    if "wscale_mult" in p:
        w = _int8_from_ratio(p["qweight"], p["wscale_mult"]).to(dtype)
        base = p["wscale_base"].float()
        if dtype == torch.float16:
            return w.mul_(base.to(dtype).unsqueeze(1)), None
        return w, base
    w = reference.unpack_int4(p["qweight"]).to(dtype)
    n, k = w.shape
    w.view(n, k // group_size, group_size).mul_(p["wscales"].t().to(dtype).unsqueeze(-1))
    return w, None


def _linear_act16(x, p: dict, group_size: int):
    """A layer with 16-bit activations (docs/FORMAT.md §1): Y = X/λ · deq(R)ᵀ + (X·proj_down)·proj_upᵀ + b. These
    layers read one vector per image (M = batch), so reading the weight is their cost: on a GPU the W4A16 GEMV reads
    the packed codes (up to GEMV_MAX_M rows); past that, or without the library, torch ops in the compute dtype with
    the weight made for the call (_act16_weight); elsewhere the fp32 reference."""
    import torch

    shape = x.shape
    half = x.dtype in (torch.bfloat16, torch.float16)
    gv = p.get("_gv_qw")
    if gv is not None and half and x.device == gv.device and group_size == 64 and 0 < x.numel() // shape[-1] <= GEMV_MAX_M:
        return _linear_gemv(x.reshape(-1, shape[-1]), p).reshape(*shape[:-1], gv.shape[0])
    if not (p.get("_act16_16bit") and half and x.device == p["qweight"].device):
        return reference.svdquant_linear_act16(x, p["qweight"], reference.weight_scales_for_gemm(p), p["smooth_factor"],
                                               p.get("proj_down"), p.get("proj_up"), p.get("bias"), group_size)
    x2 = x.reshape(-1, shape[-1])
    w, row_scale = _act16_weight(p, x.dtype, group_size)
    y = ((x2 / p["smooth_factor"].to(x.dtype)) @ w.t()).float()
    if row_scale is not None:
        y = y * row_scale
    down, up = p.get("proj_down"), p.get("proj_up")
    if down is not None and down.shape[-1]:
        y = y + (x2 @ down.to(x.dtype)).float() @ up.float().t()
    if p.get("bias") is not None:
        y = y + p["bias"].float()
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


def _use_cuda(x, prepared) -> bool:
    import torch

    if not prepared.get("_path") or x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return prepared["_qw"].device == x.device


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _log_backend_once(key, msg, *args):
    """One log line per backend and device. Skipped while torch.compile traces: a logger call there
    is a graph break in every 4-bit linear of the compiled model."""
    import torch

    if key in _BACKEND_LOGGED or torch.compiler.is_compiling():
        return
    _BACKEND_LOGGED.add(key)
    log.info(msg, *args)


def gptq_available(device) -> bool:
    """Whether `gptq_block` runs on `device` (a CUDA device the compiled library serves)."""
    return _device_path(device) != 0 and _lib.has_gptq()


def gptq_block(w, steps, hb, q_out, err_out, qmax: float) -> None:
    """GPTQ's column loop over one block on the GPU (kernels/csrc/gptq.cu; core/gptq.py's _column_loop is
    the reference). w, steps, q_out, err_out: fp32 (B, N) contiguous, B <= 128; hb: fp32 (B, >=B) with
    contiguous rows (the H⁻¹ Cholesky rows of the block). Fills q_out (codes) and err_out (scaled errors)."""
    import torch

    if not gptq_available(w.device):
        raise RuntimeError(f"gptq_block: no CUDA kernel serves {w.device}")
    b, n = w.shape
    for name, t in (("w", w), ("steps", steps), ("q_out", q_out), ("err_out", err_out)):
        if t.dtype != torch.float32 or t.shape != (b, n) or not t.is_contiguous() or t.device != w.device:
            raise ValueError(f"gptq_block: {name} must be contiguous fp32 {tuple(w.shape)} on {w.device}")
    if hb.dtype != torch.float32 or hb.shape[0] != b or hb.shape[1] < b or hb.stride(1) != 1 or hb.device != w.device:
        raise ValueError(f"gptq_block: hb must be fp32 ({b}, >={b}) with contiguous rows on {w.device}")
    lib = _lib.load()
    with torch.cuda.device(w.device):
        stream = torch.cuda.current_stream(w.device).cuda_stream
        _lib.check(lib.svdq_gptq_block(w.data_ptr(), steps.data_ptr(), hb.data_ptr(), hb.stride(0), q_out.data_ptr(),
                                       err_out.data_ptr(), b, n, float(qmax), stream), "svdq_gptq_block")


def row_base_slot(prepared: dict, lead, m: int, dtype, device):
    """Where the op producing this layer's input (leading shape `lead`, m rows) can write the layer's row bases and
    int8 codes (kernels/ops.py RowBaseSlot; kernels/flux_ops.py's producers take it), or None: the layer then computes
    them itself, or reads no row bases. Eager CUDA calls only."""
    if prepared.get("_path") != 91 or prepared.get("_afmt") != _lib.FMT_I8_ROW or _compiling() or m == 0 or \
            prepared["_qw"].device != device:
        return None
    return (_ops or _get_ops()).row_base_slot(prepared, lead, m, dtype, device)


def direct_call(x, prepared: dict, group_size: int = 64):
    """What `linear` runs for inputs like x (dtype, device, contiguous, non-empty) when that is the eager CUDA fast
    path (ops.linear_direct, called as fn(x, prepared)), else None. Layers keep it to skip the dispatch below."""
    if prepared.get("act16") or group_size != 64 or not _use_cuda(x, prepared) or _compiling():
        return None
    return (_ops or _get_ops()).linear_direct


def linear(x, prepared: dict, group_size: int = 64, row_base=None):
    """Y = 4-bit linear of x (..., K) with the layer tensors from `prepare_weights`. row_base: `row_base_slot`'s slot
    whose bases x's producer wrote (eager CUDA path only; elsewhere ignored)."""
    if prepared.get("act16"):
        return _linear_act16(x, prepared, group_size)
    if group_size == 64 and _use_cuda(x, prepared):
        if "_logged" not in prepared:  # the log lookup costs as much as the rest of this branch
            _log_backend_once(("cuda", x.device, prepared["_path"]), "svdquant: %s kernels on %s",
                              _NAMES[prepared["_path"]], x.device)
            if not _compiling():
                prepared["_logged"] = True
        if x.numel() == 0:
            return x.new_empty((*x.shape[:-1], prepared["_qw"].shape[0]))
        if not x.is_contiguous():
            x = x.contiguous()
        if row_base is not None and not _compiling():
            return (_ops or _get_ops()).linear_direct(x, prepared, row_base)
        return (_ops or _get_ops()).linear(x, prepared)  # (..., K) as it is: no reshape or view per call
    _log_backend_once(("reference", x.device.type),
                      "svdquant: pure-torch reference path on %s (no CUDA kernel for this device/dtype)", x.device)
    return reference.svdquant_linear(
        x,
        prepared["qweight"],
        reference.weight_scales_for_gemm(prepared),
        prepared["smooth_factor"],
        prepared.get("proj_down"),
        prepared.get("proj_up"),
        prepared.get("bias"),
        group_size,
        act_shift=prepared.get("act_shift"),
    )
