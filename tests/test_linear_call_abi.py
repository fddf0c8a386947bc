"""svdq_linear, the one-call eager linear (kernels/csrc/svdq_abi.h SvdqLinearArgs): the Python mirror
(kernels/_lib.py LinearArgs) and what kernels/ops.py puts into it, checked without CUDA. A stand-in library compiled
by the system C++ compiler from the same header records the struct it receives; the test reads each field back
through C (by name), so a field declared in another order, type or size on either side fails here. What the
kernels compute from it is tested on the GPU (tests/gpu)."""
import ctypes
import pathlib
import shutil
import subprocess

import pytest
import torch

from comfyui_svdquant.kernels import _lib, ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = [f for f, _ in _lib.LinearArgs._fields_]

SHIM = r"""
#include "svdq_abi.h"
static SvdqLinearArgs last;
SVDQ_API int svdq_linear_args_layout(long long* out, int n) { return svdq_linear_args_layout_of(out, n); }
SVDQ_API int svdq_linear(const SvdqLinearArgs* a) { last = *a; return 0; }
SVDQ_API int svdq_quant_workspace(int m, int k, int rp, int dev, long long* partials, int* counters)
{ (void)m; (void)k; (void)rp; (void)dev; *partials = 0; *counters = 0; return 0; }
SVDQ_API const char* svdq_error_string(int code) { (void)code; return "shim"; }
#define F(name) if (!strcmp(field, #name)) return (long long)(uintptr_t)last.name;
#define I(name) if (!strcmp(field, #name)) return (long long)last.name;
SVDQ_API long long last_field(const char* field) {
  F(x) F(smooth) F(pdown) F(qact) F(ascales) F(lora) F(part) F(cnt) F(qweight) F(wscales) F(wmult) F(proj_up)
  F(bias) F(out) F(stream) I(M) I(N) I(K) I(Mp) I(rp) I(dtype) I(fmt) I(path) I(variant) I(device)
  return -1;
}
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler for the stand-in library")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.cpp").write_text("#include <string.h>\n#include <stdint.h>\n" + SHIM)
    so = d / "libshim.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", f"-I{ROOT / 'kernels' / 'csrc'}", "-o", str(so), str(d / "shim.cpp")],
                   check=True)
    lib = ctypes.CDLL(str(so))
    lib.svdq_linear_args_layout.restype = ctypes.c_int
    lib.svdq_linear_args_layout.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
    lib.svdq_linear.restype = ctypes.c_int
    lib.svdq_linear.argtypes = [ctypes.POINTER(_lib.LinearArgs)]
    lib.svdq_quant_workspace.restype = ctypes.c_int
    lib.svdq_quant_workspace.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_longlong),
                                                                ctypes.POINTER(ctypes.c_int)]
    lib.last_field.restype = ctypes.c_longlong
    lib.last_field.argtypes = [ctypes.c_char_p]
    return lib


def test_mirror_has_the_header_layout(shim, monkeypatch):
    assert _lib._linear_args_match(shim)
    fields = [(f, t) for f, t in _lib.LinearArgs._fields_ if f != "pdown"]  # a mirror missing one field
    monkeypatch.setattr(_lib, "LinearArgs", type("Stale", (ctypes.Structure,), {"_fields_": fields}))
    assert not _lib._linear_args_match(shim)  # then linear_direct keeps the two-call path


def test_every_field_reaches_c_under_its_name(shim):
    a = _lib.LinearArgs()
    want = {}
    for i, f in enumerate(FIELDS):
        v = (0x1000 * (i + 1) + 16 * i) if i < 15 else 100 + i  # pointers, then ints: all distinct
        setattr(a, f, v)
        want[f] = v
    assert shim.svdq_linear(ctypes.byref(a)) == 0
    assert {f: shim.last_field(f.encode()) for f in FIELDS} == want


def test_ops_fills_the_per_call_fields(shim, monkeypatch):
    """ops._run_linear_call on CPU tensors through the stand-in: the constant fields come from the prepared layer,
    the per-call ones from this call's input, kernel-1 buffer and output."""
    monkeypatch.setattr(_lib, "_lib", shim)
    monkeypatch.setattr(_lib, "_tried", True)
    monkeypatch.setattr(ops, "_raw_stream", lambda index: 0xABC0)
    kept = []  # the stream's kept kernel-1 buffer (a CPU stand-in), asked for with (device, stream, bytes)
    monkeypatch.setattr(ops, "_act_scratch", lambda index, stream, size: kept.append((index, stream, size)) or
                        kept.append(torch.empty(size, dtype=torch.uint8)) or kept[-1])
    n, k, rp = 192, 256, 32
    t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    p = {"_smooth_rcp": t(k), "_proj_down": t(k, rp, dt=torch.bfloat16), "_qw": t(n, k, dt=torch.uint8),
         "_wscales": t(n), "_proj_up": t(n, rp), "_bias": t(n), "_rp": rp, "_afmt": _lib.FMT_I8_RATIO, "_path": 91}
    x = torch.zeros(2, 7, k, dtype=torch.bfloat16)
    monkeypatch.setattr(_lib, "has_linear_call", lambda: True)
    y = ops.linear_direct(x, p)
    assert y.shape == (2, 7, n) and y.dtype == torch.bfloat16
    got = {f: shim.last_field(f.encode()) for f in FIELDS}
    off_s, off_l, size, mp = ops._act_layout(14, k, _lib.FMT_I8_RATIO, rp)
    assert got["x"] == x.data_ptr() and got["out"] == y.data_ptr() and got["stream"] == 0xABC0
    assert kept[0] == (0, 0xABC0, size) and got["qact"] == kept[1].data_ptr()
    assert got["ascales"] - got["qact"] == off_s and got["lora"] - got["qact"] == off_l
    assert (got["M"], got["N"], got["K"], got["Mp"], got["rp"]) == (14, n, k, mp, rp)
    assert (got["dtype"], got["fmt"], got["path"], got["variant"]) == (_lib.DT_BF16, _lib.FMT_I8_RATIO, 91, 0)
    assert got["smooth"] == p["_smooth_rcp"].data_ptr() and got["qweight"] == p["_qw"].data_ptr()
    assert got["pdown"] == p["_proj_down"].data_ptr() and got["proj_up"] == p["_proj_up"].data_ptr()
    assert got["bias"] == p["_bias"].data_ptr() and got["wscales"] == p["_wscales"].data_ptr()
    assert got["wmult"] == 0 and got["part"] == 0 and got["cnt"] == 0  # no packed weights, no workspace here


def test_group_calls_run_one_kernel_each(shim, monkeypatch):
    """An input group's shared pass (quantize_direct) goes out with a null out (kernel 1 only), a member's GEMM
    (gemm_direct) with a null x on the shared pass's buffer (kernel 2 only)."""
    monkeypatch.setattr(_lib, "_lib", shim)
    monkeypatch.setattr(_lib, "_tried", True)
    monkeypatch.setattr(_lib, "has_linear_call", lambda: True)
    monkeypatch.setattr(ops, "_raw_stream", lambda index: 0xABC0)
    n, k, rp = 128, 320, 32
    t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    p = {"_smooth_rcp": t(k), "_proj_down": t(k, rp, dt=torch.bfloat16), "_qw": t(n, k, dt=torch.uint8),
         "_wscales": t(n), "_proj_up": t(n, rp), "_bias": None, "_rp": rp, "_afmt": _lib.FMT_I8_RATIO, "_path": 91}
    x = torch.zeros(3, 5, k, dtype=torch.bfloat16)
    act = ops.quantize_direct(x, p)
    got = {f: shim.last_field(f.encode()) for f in FIELDS}
    assert got["out"] == 0 and got["x"] == x.data_ptr() and got["qact"] == act[0].data_ptr() == act[1]
    assert act[4] == 15 and act[6] == (3, 5)
    y = ops.gemm_direct(act, torch.bfloat16, p)
    got = {f: shim.last_field(f.encode()) for f in FIELDS}
    assert got["x"] == 0 and got["out"] == y.data_ptr() and y.shape == (3, 5, n)
    assert (got["qact"], got["ascales"], got["lora"], got["M"]) == (act[1], act[2], act[3], 15)
    assert got["bias"] == 0


def test_a_producers_row_bases_reach_the_call(shim, monkeypatch):
    """A row-base layer called with a producer's slot (kernels.row_base_slot): the call goes out as
    FMT_I8_ROW_CODES (the producer wrote bases and codes: kernel 1 computes only the LoRA-down), or FMT_I8_ROW_GIVEN
    for a bases-only slot, on the slot's buffer, whose qact and ascales are where the producer wrote, with kernel 2e's
    variant; the layer's struct is back to FMT_I8_ROW afterwards. An input of another shape ignores the slot; a
    chunk-base layer gets no slot."""
    monkeypatch.setattr(_lib, "_lib", shim)
    monkeypatch.setattr(_lib, "_tried", True)
    monkeypatch.setattr(_lib, "has_linear_call", lambda: True)
    monkeypatch.setattr(_lib, "has_row_base_producers", lambda: True)
    monkeypatch.setattr(ops, "_raw_stream", lambda index: 0xABC0)
    kept = {}
    monkeypatch.setattr(ops, "_act_scratch", lambda index, stream, size: kept.setdefault(
        size, torch.empty(size, dtype=torch.uint8)))
    n, k, rp = 128, 320, 32
    t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    p = {"_smooth_rcp": t(k), "_proj_down": t(k, rp, dt=torch.bfloat16), "_qw": t(n, k, dt=torch.uint8),
         "_wscales": t(n), "_proj_up": t(n, rp), "_bias": None, "_rp": rp, "_afmt": _lib.FMT_I8_ROW, "_path": 91}
    slot = ops.row_base_slot(p, (2, 7), 14, torch.bfloat16, torch.device("cpu"))
    assert slot is not None and slot.smooth is p["_smooth_rcp"] and slot.k == k and slot.mp == 16 and slot.codes
    off_s = ops._act_layout(14, k, _lib.FMT_I8_ROW, rp)[0]
    assert slot.rowbase == slot.act[1] + off_s and slot.qact == slot.act[1]
    x = torch.zeros(2, 7, k, dtype=torch.bfloat16)
    y = ops.linear_direct(x, p, slot)
    got = {f: shim.last_field(f.encode()) for f in FIELDS}
    assert y.shape == (2, 7, n) and got["out"] == y.data_ptr() and got["x"] == x.data_ptr()
    assert (got["fmt"], got["variant"]) == (_lib.FMT_I8_ROW_CODES, 20)
    assert got["ascales"] == slot.rowbase and got["qact"] == slot.qact and (got["M"], got["Mp"]) == (14, 16)
    ops.linear_direct(x, p)  # the layer alone: its own row pass
    assert shim.last_field(b"fmt") == _lib.FMT_I8_ROW
    slot.codes = False  # a producer that wrote the bases only
    ops.linear_direct(x, p, slot)
    assert shim.last_field(b"fmt") == _lib.FMT_I8_ROW_GIVEN and shim.last_field(b"ascales") == slot.rowbase
    x3 = torch.zeros(3, 7, k, dtype=torch.bfloat16)
    ops.linear_direct(x3, p, slot)  # not the slot's shape
    assert shim.last_field(b"fmt") == _lib.FMT_I8_ROW and shim.last_field(b"M") == 21
    chunk = dict(p, _afmt=_lib.FMT_I8_RATIO)
    assert ops.row_base_slot(chunk, (2, 7), 14, torch.bfloat16, torch.device("cpu")) is None


def test_a_layer_keeps_its_eager_call_until_something_changes(shim, monkeypatch):
    """core/qlinear.py's eager fast path: after one call through kernels.linear a 4-bit layer calls ops.linear_direct
    directly (same library call, same buffers); a LoRA, an input group, another dtype or a new preparation (a move:
    _apply drops the cached tensors) sends the call through kernels.linear again."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from _layers import make_ratio_layer
    from comfyui_svdquant import kernels
    from comfyui_svdquant.core.qlinear import SVDQuantLinear
    monkeypatch.setattr(_lib, "_lib", shim)
    monkeypatch.setattr(_lib, "_tried", True)
    monkeypatch.setattr(_lib, "has_linear_call", lambda: True)
    monkeypatch.setattr(ops, "_raw_stream", lambda index: 0xABC0)
    monkeypatch.setattr(kernels, "_use_cuda", lambda x, prepared: prepared.get("_path") == 91)
    monkeypatch.setattr(ops, "_act_scratch", lambda index, stream, size: torch.empty(size, dtype=torch.uint8))
    n, k, rp = 128, 320, 32
    q = SVDQuantLinear.from_tensors(make_ratio_layer(n, k, rp, torch.bfloat16, "cpu"))
    t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    p = {"_smooth_rcp": t(k), "_proj_down": t(k, rp, dt=torch.bfloat16), "_qw": t(n, k, dt=torch.uint8),
         "_wscales": t(n), "_proj_up": t(n, rp), "_bias": None, "_rp": rp, "_afmt": _lib.FMT_I8_RATIO, "_path": 91}
    x = torch.zeros(2, 5, k, dtype=torch.bfloat16)
    q._prepared = ((x.device, x.dtype), p)  # what kernel_tensors caches on a GPU
    slow = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a, **kw: slow.append(1) or real(*a, **kw))

    def call(inp):
        y = q(inp)
        assert shim.last_field(b"x") == inp.data_ptr() and y.shape == (*inp.shape[:-1], n)
        return len(slow)

    assert call(x) == 1 and call(x) == 1 and call(torch.zeros(3, k, dtype=torch.bfloat16)) == 1  # fast from the 2nd
    q.set_lora((torch.zeros(k, 2, dtype=torch.bfloat16), torch.zeros(n, 2, dtype=torch.bfloat16)))
    assert call(x) == 2
    q.set_lora(None)
    assert call(x) == 2
    # an attached input group takes the call first (core/input_group.py; this one declines: kernels.linear runs)
    q._input_group = type("Group", (), {"forward": lambda self, m, x_, p_: None})()
    assert call(x) == 3 and call(x) == 4
    q._input_group = None
    assert call(x) == 4
    q._prepared = ((x.device, x.dtype), dict(p))  # re-prepared (as after a move): the old call is not reused
    assert call(x) == 5 and call(x) == 5
