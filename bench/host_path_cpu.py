"""Host time of the eager 4-bit linear's Python path on the CPU, the library replaced by a C++ stand-in (no GPU).

What a GPU run's `bench_host.py` measures includes the driver's launch costs; this isolates the Python and ctypes
part, which is what kernels/ops.py controls, so its variants can be compared on any machine: the one-call path
(svdq_linear with a per-layer struct), the two-call path, and the two-call path with fresh kernel-1 buffers (what
every eager call did before 2026-12-05). CPU tensors stand in for CUDA ones; the kept kernel-1 buffer is a CPU
tensor too. Allocation costs therefore are the CPU allocator's, not the CUDA caching allocator's (~2.9 µs each on
the H200's host).

  python bench/host_path_cpu.py      (each row: the best of 7 timings of 20 000 calls)
"""
import ctypes
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (the comfyui_svdquant alias)

STAND_IN = r"""
#include <string.h>
#include <stdint.h>
#include "svdq_abi.h"
SVDQ_API int svdq_linear_args_layout(long long* out, int n) { return svdq_linear_args_layout_of(out, n); }
SVDQ_API int svdq_linear(const SvdqLinearArgs* a) { return a ? 0 : 1; }
SVDQ_API int svdq_quantize_act_lora_down(const void* x, const float* s, const void* pd, void* q, float* as, float* l,
    float* part, int* cnt, int M, int K, int Mp, int rp, int dt, int fmt, int dev, void* st) { return 0; }
SVDQ_API int svdq_w4a4_gemm(const void* q, const float* as, const void* w, const float* ws, const float* l,
    const float* pu, const float* b, void* out, int M, int N, int K, int Mp, int rp, int dt, int path, int var,
    int dev, void* st) { return 0; }
SVDQ_API int svdq_quant_workspace(int m, int k, int rp, int dev, long long* partials, int* counters)
{ *partials = 0; *counters = 0; return 0; }
SVDQ_API const char* svdq_error_string(int code) { return "stand-in"; }
SVDQ_API int svdq_abi_version() { return 0; }
SVDQ_API int svdq_device_path(int dev) { return 0; }
SVDQ_API int svdq_w4a4_gemm_packed() { return 1; }
"""


def stand_in_library(tmp):
    src = pathlib.Path(tmp) / "stand_in.cpp"
    src.write_text(STAND_IN)
    so = pathlib.Path(tmp) / "libstand_in.so"
    subprocess.run(["c++", "-shared", "-fPIC", "-O2", "-w", f"-I{ROOT / 'kernels' / 'csrc'}", "-o", str(so), str(src)],
                   check=True)
    from comfyui_svdquant.kernels import _lib
    return _lib._bind(ctypes.CDLL(str(so)))


def per_call_us(fn, n=20000, repeats=7):
    """Host µs per call: the best of `repeats` timings of n calls (the machine's other load only adds time)."""
    for _ in range(1000):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main():
    from comfyui_svdquant import kernels
    from comfyui_svdquant.core.qlinear import SVDQuantLinear
    from comfyui_svdquant.kernels import _lib, ops
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from _layers import make_ratio_layer

    with tempfile.TemporaryDirectory() as tmp:
        lib = stand_in_library(tmp)
    _lib._lib, _lib._tried = lib, True
    ops._raw_stream = lambda index: 1
    kept = torch.empty(1 << 22, dtype=torch.uint8)
    ops._act_scratch = lambda index, stream, size: kept
    n = k = 640
    rp = 32
    t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
    p = {"_smooth_rcp": t(k), "_proj_down": t(k, rp, dt=torch.bfloat16), "_qw": t(n, k, dt=torch.uint8),
         "_wscales": t(n), "_proj_up": t(n, rp), "_bias": t(n), "_rp": rp, "_afmt": _lib.FMT_I8_RATIO, "_path": 91}
    x = torch.zeros(2, 64, k, dtype=torch.bfloat16)
    q = SVDQuantLinear.from_tensors(make_ratio_layer(n, k, rp, torch.bfloat16, "cpu"))
    q._prepared = ((x.device, x.dtype), p)
    kernels._use_cuda = lambda x, prepared: True
    rows = {}
    with torch.no_grad():
        assert _lib.has_linear_call()
        rows["module forward, one library call"] = per_call_us(lambda: q(x))  # the layer's kept call (core/qlinear.py)
        direct_call = kernels.direct_call
        kernels.direct_call = lambda *a: None  # every call through kernels.linear, as before the kept call
        q._direct = None
        rows["module forward, through kernels.linear"] = per_call_us(lambda: q(x))
        kernels.direct_call = direct_call
        rows["ops.linear_direct, one library call"] = per_call_us(lambda: ops.linear_direct(x, p))
        d = ops._direct(p, x.dtype)[1:]
        rows["ops._run_linear, two library calls"] = per_call_us(lambda: ops._run_linear(x, *d))
        rows["ops._run_linear, two calls, fresh buffers"] = per_call_us(lambda: ops._run_linear(x, *d, keep_scratch=False))
        rows["torch.empty of the output (CPU)"] = per_call_us(lambda: torch.empty((2, 64, n), dtype=torch.bfloat16))
    print(f"host µs per call, library stubbed (C++ stand-in), x {tuple(x.shape)} bf16, N {n}, rank {rp}:")
    for name, us in rows.items():
        print(f"  {name:46s} {us:6.2f}")


if __name__ == "__main__":
    main()
