"""torch.library custom ops over the CUDA library, with fake (meta) implementations.

`svdquant::quantize_act_lora_down` and `svdquant::w4a4_gemm` (the two kernels, for tests and benchmarks),
`svdquant::linear` (both, what a compiled model calls per 4-bit layer) and `svdquant::w4a16_gemv` are opaque to
torch.compile (the fake implementations give it shapes and dtypes) and run on the current CUDA stream, so they
can be captured in CUDA graphs. `*_into` variants write into caller-given buffers (tests poison them). Eager
calls skip the op dispatch (`linear_direct`, `gemv`).
Layouts: see kernels/csrc/svdq.cu (header) and docs/KERNELS.md.
"""
import ctypes
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
    row = fmt in _lib.FMT_ROW
    byte_codes = row or fmt in (_lib.FMT_E4M3, _lib.FMT_I8_RATIO)  # one byte per code, else two per byte
    groups = k // GROUP
    # bases per chunk / per row / scales per group
    rows = -(-groups // _lib.RATIO_CHUNK) if fmt == _lib.FMT_I8_RATIO else 1 if row else groups
    return (m, k if byte_codes else k // 2), (rows, padded_rows(m))


def _act_buffers(x, fmt, rank_padded, new):
    m, k = x.shape
    qshape, sshape = act_shapes(m, k, fmt)
    return (new(qshape, dtype=torch.uint8), new(sshape, dtype=torch.float32),
            new((m, rank_padded), dtype=torch.float32))


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """t contiguous at a 16-byte-aligned address (the kernels read 16-byte vectors): t itself, else a copy."""
    return t if t.data_ptr() % 16 == 0 and t.is_contiguous() else t.contiguous().clone()


def cast_cached(p: dict, name: str, dtype):
    """p[name] in `dtype`, contiguous; a cast is kept in p for later eager calls (a traced call casts in its graph)."""
    t = p.get(name)
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    key = f"_cast:{name}:{dtype}"  # "_proj_down" and "proj_down" stay apart
    cached = p.get(key)
    if cached is None:
        cached = t.to(dtype).contiguous()
        if not torch.compiler.is_compiling():
            p[key] = cached
    return cached


def _raw_stream(index: int) -> int:
    """The current CUDA stream of device `index` as a raw handle (~0.5 µs; torch.cuda.current_stream builds a
    Python object, ~10 µs on the GPU machine: twice per linear it was a tenth of the eager host time)."""
    return torch._C._cuda_getCurrentRawStream(index)


_scratch = {}  # (device index, raw stream) -> (fp32 partials, int32 counters) of kernel 1
_retired = []  # outgrown workspaces: a captured CUDA graph may still point at one, so none is ever freed


def _quant_scratch(index: int, stream: int, n_part: int, n_cnt: int):
    """Kernel 1's K-split workspace, kept between calls per device and stream. The partials are written and
    read within one launch and the kernel leaves its counters zeroed (svdq.cu lora_split_tree), so calls on
    one stream (ordered) can share it without allocating or zeroing it each time; calls on two streams may run
    at once, hence one per stream. Grown geometrically; outgrown ones are kept (a CUDA graph holds raw pointers)."""
    ws = _scratch.get((index, stream))
    if ws is not None and ws[0].numel() >= n_part and ws[1].numel() >= n_cnt:
        return ws
    dev = torch.device("cuda", index)
    if torch.cuda.is_current_stream_capturing():
        # Made inside a graph capture, the zero-fill only runs at replay: such a buffer belongs to the graph
        # (its private pool, reused in capture order) and must not serve later eager calls.
        return (torch.empty(n_part, dtype=torch.float32, device=dev), torch.zeros(n_cnt, dtype=torch.int32, device=dev))
    have = (0, 0) if ws is None else (ws[0].numel(), ws[1].numel())
    if ws is not None:
        _retired.append(ws)
    ws = _scratch[(index, stream)] = (
        torch.empty(max(n_part, 2 * have[0]), dtype=torch.float32, device=dev),
        torch.zeros(max(n_cnt, 2 * have[1]), dtype=torch.int32, device=dev))
    return ws


_act_bufs = {}  # (device index, raw stream) -> uint8 buffer for kernel 1's outputs of eager layers run alone


def _act_scratch(index: int, stream: int, size: int) -> torch.Tensor:
    """A buffer of >= size bytes for kernel 1's outputs, kept between calls per device and stream: kernel 2 reads
    them right after, on the same stream, so the next layer's kernel 1 (ordered behind it) may overwrite them. One
    allocation per eager linear instead of two (each ~3 µs of host time on the GPU machine). Not for input groups,
    whose kernel-1 output outlives other layers' calls (quantize_direct takes its own). Grown geometrically;
    outgrown buffers are kept (a captured CUDA graph holds raw pointers); made fresh inside a capture, as
    _quant_scratch's."""
    buf = _act_bufs.get((index, stream))
    if buf is not None and buf.numel() >= size:
        return buf
    dev = torch.device("cuda", index)
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=torch.uint8, device=dev)
    if buf is not None:
        _retired.append(buf)
    buf = _act_bufs[(index, stream)] = torch.empty(max(size, 2 * (0 if buf is None else buf.numel())),
                                                   dtype=torch.uint8, device=dev)
    return buf


def _workspace(m, k, rp, index, stream, keep_scratch: bool = True):
    """Addresses of kernel 1's K-split workspace for this call, (None, None) without one, and what holds them (keep
    it alive past the launch). keep_scratch=False (the compiled path's op bodies) takes a fresh workspace per call: a
    CUDA-graph backend runs its warm-up inside the graph's memory pool, where a buffer kept between calls is an
    untracked allocation (cudagraph trees refuse it: "tensor(s) in the cudagraph pool not tracked as outputs")."""
    n_part, n_cnt = _lib.quant_workspace(m, k, rp, index) if rp else (0, 0)
    if not n_part:
        return None, None, None
    if keep_scratch:
        ws = _quant_scratch(index, stream, n_part, n_cnt)
    else:
        dev = torch.device("cuda", index)
        ws = (torch.empty(n_part, dtype=torch.float32, device=dev), torch.zeros(n_cnt, dtype=torch.int32, device=dev))
    return ws[0].data_ptr(), ws[1].data_ptr(), ws


def _launch_quantize(lib, x_ptr, smooth_ptr, pd_ptr, q_ptr, s_ptr, lora_ptr, m, k, mp, rp, dt, fmt, index, stream,
                     keep_scratch: bool = True):
    """Kernel 1 (see _workspace for keep_scratch)."""
    part, cnt, ws = _workspace(m, k, rp, index, stream, keep_scratch)
    code = lib.svdq_quantize_act_lora_down(x_ptr, smooth_ptr, pd_ptr if rp else None, q_ptr, s_ptr, lora_ptr,
                                           part, cnt, m, k, mp, rp, dt, fmt, index, stream)
    _lib.check(code, "svdq_quantize_act_lora_down")


def quantize_into(x, smooth_rcp, proj_down, qact, ascales, lora, fmt: int, keep_scratch: bool = True) -> None:
    """Kernel 1 into given buffers. smooth_rcp = 1/smooth_factor (fp32); every element of lora (M, rp) is
    written (no zeroing needed). The K-split LoRA-down partials are summed in a fixed order (bitwise
    reproducible) in a per-stream workspace (_quant_scratch)."""
    m, k = x.shape
    index = x.device.index
    _launch_quantize(_lib.load(), _ptr(x), _ptr(smooth_rcp), _ptr(proj_down), _ptr(qact), _ptr(ascales), _ptr(lora),
                     m, k, ascales.shape[1], lora.shape[1], _dt(x.dtype), fmt, index, _raw_stream(index), keep_scratch)


def _k_of(path: int, qweight, wscales) -> int:
    """K of a prepared layer: int8 weights (path 91) hold it, packed ones (92) half of it, else the scale rows."""
    return qweight.shape[1] if path == 91 else 2 * qweight.shape[1] if path == 92 else wscales.shape[0] * GROUP


def gemm_variant(fmt: int) -> int:
    """The GEMM variant for kernel 1's format: kernel 2e (20, its cost model's tile) reads FMT_I8_ROW's row bases."""
    return 20 if fmt in _lib.FMT_ROW else 0


def gemm_into(qact, ascales, qweight, wscales, lora, proj_up, bias, out, path: int, variant: int = 0,
              wmult=None) -> None:
    """Kernel 2 into a given output buffer (M, N). Path 91 (int_ratio on Hopper): qact/qweight int8 codes x
    multipliers, ascales the activation bases, wscales the weight bases (N,); one row of bases (FMT_I8_ROW) runs
    kernel 2e. Path 92 (kernel 2d): qweight the packed codes, wmult their multipliers (K/64, N)."""
    if path == 91 and variant == 0 and ascales.shape[0] == 1 and qweight.shape[1] > 256:
        variant = 20  # one base per row (up to K = 256 one chunk is the row: kernel 2c, as before, stays)
    m, n = out.shape
    rp = lora.shape[1] if lora is not None else 0
    index = out.device.index
    _launch_gemm(_lib.load(), _ptr(qact), _ptr(ascales), _ptr(qweight), _ptr(wscales), _ptr(lora) if rp else None,
                 _ptr(proj_up) if rp else None, _ptr(bias), _ptr(out), m, n, _k_of(path, qweight, wscales),
                 ascales.shape[1], rp, _dt(out.dtype), path, variant, _ptr(wmult), index, _raw_stream(index))


def _launch_gemm(lib, qa, sa, qw, ws, lora, pu, bias, out, m, n, k, mp, rp, dt, path, variant, wmult, index, stream):
    """Kernel 2 with raw pointers: svdq_w4a4_gemm, or for path 92 (packed weights) svdq_w4a4_gemm_packed."""
    if path == 92:
        code = lib.svdq_w4a4_gemm_packed(qa, sa, qw, wmult, ws, lora, pu, bias, out, m, n, k, mp, rp, dt, index, stream)
        _lib.check(code, "svdq_w4a4_gemm_packed")
    else:
        code = lib.svdq_w4a4_gemm(qa, sa, qw, ws, lora, pu, bias, out, m, n, k, mp, rp, dt, path, variant, index, stream)
        _lib.check(code, "svdq_w4a4_gemm")


@torch.library.custom_op("svdquant::quantize_act_lora_down", mutates_args=(), device_types="cuda")
def quantize_act_lora_down(x: torch.Tensor, smooth_rcp: torch.Tensor, proj_down: Optional[torch.Tensor],
                           rank_padded: int, fmt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = aligned16(x)
    qact, ascales, lora = _act_buffers(x, fmt, rank_padded, lambda shape, dtype: torch.empty(shape, dtype=dtype, device=x.device))
    quantize_into(x, smooth_rcp, proj_down, qact, ascales, lora, fmt, keep_scratch=False)
    return qact, ascales, lora


@quantize_act_lora_down.register_fake
def _(x, smooth_rcp, proj_down, rank_padded, fmt):
    return _act_buffers(x, fmt, rank_padded, lambda shape, dtype: x.new_empty(shape, dtype=dtype))


@torch.library.custom_op("svdquant::w4a4_gemm", mutates_args=(), device_types="cuda")
def w4a4_gemm(qact: torch.Tensor, ascales: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
              lora: torch.Tensor, proj_up: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
              path: int, wmult: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = torch.empty((qact.shape[0], qweight.shape[0]), dtype=out_dtype, device=qact.device)
    gemm_into(qact, ascales, qweight, wscales, lora, proj_up, bias, out, path, wmult=wmult)
    return out


@w4a4_gemm.register_fake
def _(qact, ascales, qweight, wscales, lora, proj_up, bias, out_dtype, path, wmult=None):
    return qact.new_empty((qact.shape[0], qweight.shape[0]), dtype=out_dtype)


def gemv_into(x2, smooth_rcp, qweight, steps, mult, base, lora, up, bias, out) -> None:
    """The W4A16 GEMV of a 16-bit-activation layer (kernels/csrc/w4a16.cu) into a given output (M, N): steps fp32
    (N, K/64) for float scales, or mult uint8 (N, K/64) and base fp32 (N,) for int_ratio; lora (M, r) and up (N, r)
    in x2's dtype, or both None."""
    lib = _lib.load()
    m, k = x2.shape
    n = qweight.shape[0]
    r = 0 if lora is None else lora.shape[1]
    index = x2.device.index
    code = lib.svdq_w4a16_gemv(_ptr(x2), _ptr(smooth_rcp), _ptr(qweight), _ptr(steps), _ptr(mult), _ptr(base),
                               _ptr(lora) if r else None, _ptr(up) if r else None, _ptr(bias), _ptr(out), m, n, k, r,
                               _dt(x2.dtype), _raw_stream(index))
    _lib.check(code, "svdq_w4a16_gemv")


def gemv(x2, smooth_rcp, qweight, steps, mult, base, lora, up, bias) -> torch.Tensor:
    """The GEMV into a new output; eager callers use it directly (no custom-op dispatch)."""
    x2 = aligned16(x2)
    out = torch.empty((x2.shape[0], qweight.shape[0]), dtype=x2.dtype, device=x2.device)
    gemv_into(x2, smooth_rcp, qweight, steps, mult, base, lora, up, bias, out)
    return out


# The ops a compiled model calls once per layer are registered with the low-level torch.library API: a
# `torch.library.custom_op` call cost 12.4 µs of host time against 5.8 µs for `Library.impl` and 2.2 µs for the
# bare body (bench/bench_op_dispatch.py, CPU, torch 2.14), which a compiled graph pays per 4-bit linear.
_DEF = torch.library.Library("svdquant", "FRAGMENT")
_DEF.define("w4a16_gemv(Tensor x2, Tensor smooth_rcp, Tensor qweight, Tensor? steps, Tensor? mult, Tensor? base, "
            "Tensor? lora, Tensor? up, Tensor? bias) -> Tensor")
_DEF.impl("w4a16_gemv", gemv, "CUDA")
_DEF.define("linear(Tensor x2, Tensor smooth_rcp, Tensor? proj_down, Tensor qweight, Tensor wscales, Tensor proj_up, "
            "Tensor? bias, int rank_padded, int fmt, int path, Tensor? wmult) -> Tensor")


@torch.library.register_fake("svdquant::w4a16_gemv")
def _(x2, smooth_rcp, qweight, steps, mult, base, lora, up, bias):
    return x2.new_empty((x2.shape[0], qweight.shape[0]))


@torch.library.register_fake("svdquant::linear")
def _(x2, smooth_rcp, proj_down, qweight, wscales, proj_up, bias, rank_padded, fmt, path, wmult):
    return x2.new_empty((x2.shape[0], qweight.shape[0]))


w4a16_gemv = torch.ops.svdquant.w4a16_gemv.default


_ALIGN = 256
_layouts = {}  # (M, K, fmt, rp) -> _act_layout's answer


def _act_layout(m: int, k: int, fmt: int, rp: int):
    """Byte offsets of (qact, ascales, lora) in one buffer, its size, and ascales' padded row count."""
    key = (m, k, fmt, rp)
    lay = _layouts.get(key)
    if lay is None:
        (qm, qk), (sr, mp) = act_shapes(m, k, fmt)
        off_s = -(-qm * qk // _ALIGN) * _ALIGN
        off_l = off_s + -(-sr * mp * 4 // _ALIGN) * _ALIGN
        lay = _layouts[key] = (off_s, off_l, off_l + m * rp * 4, mp)
    return lay


def _layer_args(dtype, smooth_rcp, proj_down, qweight, wscales, proj_up, bias, rank_padded, fmt, path, wmult) -> tuple:
    """The raw arguments `_run_linear` takes after x2, from a prepared layer's tensors."""
    return (_dt(dtype), _ptr(smooth_rcp), _ptr(proj_down), _ptr(qweight), _ptr(wscales), _ptr(proj_up), _ptr(bias),
            qweight.shape[0], _k_of(path, qweight, wscales), rank_padded, fmt, path, _ptr(wmult))


def _direct_args(p: dict, dtype) -> tuple:
    """The pointers and sizes of a prepared layer that every eager call passes (its tensors stay alive in `p`;
    the cast proj_down too, in cast_cached's entry)."""
    return (dtype,) + _layer_args(dtype, p["_smooth_rcp"], cast_cached(p, "_proj_down", dtype), p["_qw"], p["_wscales"],
                                  p["_proj_up"], p["_bias"], p["_rp"], p["_afmt"], p["_path"], p.get("_wmult"))


def _act_for(x, k, rp, fmt, stream=None, fresh=False) -> tuple:
    """Kernel 1's output buffer for x (..., K), contiguous: (the act tuple `_gemm_act` reads: buffer, qact address,
    ascales address, lora address or None, M, ascales' padded rows, x's leading shape; x as aligned; the stream;
    the device index). The buffer is the stream's kept one (_act_scratch), or with fresh a new one.
    x keeps its rank: a reshape and a view per call were a third of the eager path's Python time."""
    x = aligned16(x)
    act, stream, index = _act_buffer(x.shape[:-1], x.numel() // k, k, rp, fmt, x.device, stream, fresh)
    return act, x, stream, index


def _act_buffer(lead, m, k, rp, fmt, dev, stream=None, fresh=False) -> tuple:
    """`_act_for`'s act tuple for an input of leading shape `lead` (m rows) on `dev`, the stream, the device index."""
    off_s, off_l, size, mp = _act_layout(m, k, fmt, rp)
    index = dev.index or 0  # None only off CUDA (tests/test_linear_call_abi.py, bench/host_path_cpu.py)
    if stream is None:
        stream = _raw_stream(index)
    buf = torch.empty(size, dtype=torch.uint8, device=dev) if fresh else _act_scratch(index, stream, size)
    base = buf.data_ptr()
    return (buf, base, base + off_s, base + off_l if rp else None, m, mp, lead), stream, index


def _quantize_act(x, dt, smooth, pd, k, rp, fmt, keep_scratch=True, stream=None, own_buffer=False) -> tuple:
    """Kernel 1 on x (..., K), contiguous, into `_act_for`'s buffer (a new one unless keep_scratch and not
    own_buffer): the act tuple `_gemm_act` reads, for one layer or several (an input group: layers that share the
    smoothing and proj_down, core/input_group.py)."""
    act, x, stream, index = _act_for(x, k, rp, fmt, stream, fresh=own_buffer or not keep_scratch)
    _, qa, sa, lora, m, mp, _ = act
    _launch_quantize(_lib.load(), x.data_ptr(), smooth, pd, qa, sa, lora, m, k, mp, rp, dt, fmt, index, stream,
                     keep_scratch)
    return act


def _gemm_act(act, dtype, dt, qw, ws, pu, bias, n, k, rp, path, wmult, stream=None, variant=0) -> torch.Tensor:
    """Kernel 2 (with the LoRA-up and bias) of one layer on kernel 1's output `act` (from `_quantize_act`): (..., N)
    with the input's leading shape."""
    buf, qa, sa, lora, m, mp, lead = act
    index = buf.device.index or 0
    if stream is None:
        stream = _raw_stream(index)
    out = torch.empty((*lead, n), dtype=dtype, device=buf.device)
    _launch_gemm(_lib.load(), qa, sa, qw, ws, lora, pu if rp else None, bias, out.data_ptr(), m, n, k, mp, rp, dt,
                 path, variant, wmult, index, stream)
    return out


def _run_linear(x, dt, smooth, pd, qw, ws, pu, bias, n, k, rp, fmt, path, wmult, keep_scratch=True) -> torch.Tensor:
    """Both kernels on x (..., K), contiguous, with a layer's raw pointers (wmult: path 92's multipliers); one buffer
    for kernel 1's three outputs."""
    stream = _raw_stream(x.device.index)
    act = _quantize_act(x, dt, smooth, pd, k, rp, fmt, keep_scratch, stream)
    return _gemm_act(act, x.dtype, dt, qw, ws, pu, bias, n, k, rp, path, wmult, stream, gemm_variant(fmt))


def _direct(p: dict, dtype) -> tuple:
    d = p.get("_direct")
    if d is None or d[0] != dtype:
        d = p["_direct"] = _direct_args(p, dtype)
    return d


def _linear_call(p: dict, dtype) -> tuple:
    """The layer's svdq_linear arguments with its constant fields filled, and what a call sets around them."""
    _, dt, smooth, pd, qw, ws, pu, bias, n, k, rp, fmt, path, wmult = _direct(p, dtype)
    a = _lib.LinearArgs(smooth=smooth, pdown=pd if rp else None, qweight=qw, wscales=ws, wmult=wmult,
                        proj_up=pu if rp else None, bias=bias, N=n, K=k, rp=rp, dtype=dt, fmt=fmt, path=path,
                        variant=gemm_variant(fmt))
    return dtype, a, ctypes.byref(a), n, k, rp, fmt


def _call(p: dict, dtype) -> tuple:
    """`_linear_call`'s tuple for this layer and dtype, kept in p; its struct is None without svdq_linear."""
    c = p.get("_call")
    if c is None or c[0] != dtype:
        c = p["_call"] = _linear_call(p, dtype) if _lib.has_linear_call() else (dtype, None)
    return c


def _invoke(a, ref, x, qa, sa, lora, out, m, mp, stream, index) -> None:
    """svdq_linear with this call's fields set (the ten that change; the layer's are set once): x None runs only
    kernel 2, out None only kernel 1."""
    a.x, a.qact, a.ascales, a.lora, a.out = x, qa, sa, lora, out
    a.stream, a.M, a.Mp, a.device = stream, m, mp, index
    _lib.check(_lib.load().svdq_linear(ref), "svdq_linear")


def _kernel1_call(x, c, own_buffer: bool):
    """`_act_for` plus the K-split workspace in svdq_linear's struct (the caller sets x and out and calls)."""
    _, a, _, _, k, rp, fmt = c
    act, x, stream, index = _act_for(x, k, rp, fmt, fresh=own_buffer)
    a.part, a.cnt, _ = _workspace(act[4], k, rp, index, stream)  # kept workspace: alive in _scratch
    return act, x, stream, index


def _run_linear_call(x: torch.Tensor, c: tuple) -> torch.Tensor:
    """Both kernels through one library call (svdq_linear): the layer's arguments are a struct built once
    (`_linear_call`), and a call sets the ten that change (ctypes converts 16-18 arguments per call otherwise,
    twice). Kernel 1's outputs go to the stream's kept buffer (_act_scratch): kernel 2 reads them in this call."""
    (buf, qa, sa, lora, m, mp, lead), x, stream, index = _kernel1_call(x, c, own_buffer=False)
    out = torch.empty((*lead, c[3]), dtype=x.dtype, device=x.device)
    _invoke(c[1], c[2], x.data_ptr(), qa, sa, lora, out.data_ptr(), m, mp, stream, index)
    return out


class RowBaseSlot:
    """Where the op that produces a row-base layer's input writes the layer's row bases and, with `codes`, its int8
    codes (FMT_I8_ROW_CODES; else FMT_I8_ROW_GIVEN, bases only): the ascales and qact parts of the layer's kernel-1
    buffer (`act`, which the layer's call then uses); `smooth` the layer's 1/λ (fp32, K) they are taken with, `mp`
    the padded row count. Made by `row_base_slot` for one input shape, used by one call right after the producer
    (the buffer is the stream's kept one)."""
    __slots__ = ("act", "stream", "index", "smooth", "rowbase", "qact", "mp", "k", "codes")

    def __init__(self, act, stream, index, smooth: torch.Tensor, k, codes: bool = True):
        self.act, self.stream, self.index, self.smooth, self.k, self.codes = act, stream, index, smooth, k, codes
        self.qact, self.rowbase, self.mp = act[1], act[2], act[5]  # addresses of qact and ascales, padded row count


def row_base_slot(p: dict, lead, m: int, dtype, device) -> Optional[RowBaseSlot]:
    """A slot for layer p's input of leading shape `lead` (m rows), or None where the layer does not read row bases
    through the one-call path (then the producer writes no bases and the layer computes its own)."""
    if p.get("_afmt") != _lib.FMT_I8_ROW or not _lib.has_row_base_producers():
        return None
    c = _call(p, dtype)
    if c[1] is None:
        return None
    k, rp = c[4], c[5]
    act, stream, index = _act_buffer(tuple(lead), m, k, rp, _lib.FMT_I8_ROW, device)
    return RowBaseSlot(act, stream, index, p["_smooth_rcp"], k)


def _run_linear_given_bases(x: torch.Tensor, c: tuple, slot: RowBaseSlot) -> torch.Tensor:
    """`_run_linear_call` on the slot's buffer, whose row bases (and codes) the producer of x wrote: kernel 1 skips
    its row pass (and its codes: then only the LoRA-down is left to it)."""
    buf, qa, sa, lora, m, mp, lead = slot.act
    a = c[1]
    a.part, a.cnt, _ = _workspace(m, slot.k, c[5], slot.index, slot.stream)
    out = torch.empty((*lead, c[3]), dtype=x.dtype, device=x.device)
    a.fmt = _lib.FMT_I8_ROW_CODES if slot.codes else _lib.FMT_I8_ROW_GIVEN
    try:
        _invoke(a, c[2], x.data_ptr(), qa, sa, lora, out.data_ptr(), m, mp, slot.stream, slot.index)
    finally:
        a.fmt = _lib.FMT_I8_ROW
    return out


def linear_direct(x: torch.Tensor, p: dict, row_base: Optional[RowBaseSlot] = None) -> torch.Tensor:
    """Eager fast path for x (..., K), contiguous: the same two kernels without the custom-op dispatch, with the
    layer's pointers computed once (host time per call is what an eager step pays 300 times; bench/bench_host.py),
    in one library call where the library has svdq_linear. Capturable in CUDA graphs. row_base: the slot whose row
    bases x's producer wrote (`row_base_slot`, for this layer and x's shape)."""
    c = _call(p, x.dtype)
    if c[1] is None:
        return _run_linear(x, *_direct(p, x.dtype)[1:])
    if row_base is not None and row_base.act[6] == x.shape[:-1] and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return _run_linear_given_bases(x, c, row_base)
    return _run_linear_call(x, c)


def quantize_direct(x: torch.Tensor, p: dict) -> tuple:
    """Eager kernel 1 alone on x (..., K), contiguous, with layer p's smoothing and proj_down (an input group's
    shared pass), into a buffer of its own: later calls read it, other layers may run in between."""
    c = _call(p, x.dtype)
    if c[1] is None:
        _, dt, smooth, pd, _, _, _, _, _, k, rp, fmt, _, _ = _direct(p, x.dtype)
        return _quantize_act(x, dt, smooth, pd, k, rp, fmt, own_buffer=True)
    act, x, stream, index = _kernel1_call(x, c, own_buffer=True)
    _, qa, sa, lora, m, mp, _ = act
    _invoke(c[1], c[2], x.data_ptr(), qa, sa, lora, None, m, mp, stream, index)
    return act


def gemm_direct(act: tuple, dtype, p: dict) -> torch.Tensor:
    """Eager kernel 2 of layer p on `quantize_direct`'s output (made with the same smoothing and proj_down)."""
    c = _call(p, dtype)
    if c[1] is None:
        _, dt, _, _, qw, ws, pu, bias, n, k, rp, fmt, path, wmult = _direct(p, dtype)
        return _gemm_act(act, dtype, dt, qw, ws, pu, bias, n, k, rp, path, wmult, variant=gemm_variant(fmt))
    buf, qa, sa, lora, m, mp, lead = act
    index = buf.device.index or 0
    out = torch.empty((*lead, c[3]), dtype=dtype, device=buf.device)
    _invoke(c[1], c[2], None, qa, sa, lora, out.data_ptr(), m, mp, _raw_stream(index), index)
    return out


def _linear_op(x2, smooth_rcp, proj_down, qweight, wscales, proj_up, bias, rank_padded, fmt, path, wmult):
    """svdquant::linear, what a compiled model calls per 4-bit layer: one op (not two) for the whole linear."""
    return _run_linear(x2, *_layer_args(x2.dtype, smooth_rcp, proj_down, qweight, wscales, proj_up, bias, rank_padded,
                                        fmt, path, wmult), keep_scratch=False)


_DEF.impl("linear", _linear_op, "CUDA")


def linear(x: torch.Tensor, p: dict) -> torch.Tensor:
    """The whole 4-bit linear on the CUDA path for x (..., K), contiguous, with tensors from prepare_weights."""
    if not torch.compiler.is_compiling():
        return linear_direct(x, p)
    y = torch.ops.svdquant.linear.default(x.reshape(-1, x.shape[-1]), p["_smooth_rcp"],
                                          cast_cached(p, "_proj_down", x.dtype), p["_qw"], p["_wscales"], p["_proj_up"],
                                          p["_bias"], p["_rp"], p["_afmt"], p["_path"], p.get("_wmult"))
    return y.view(*x.shape[:-1], y.shape[-1])
