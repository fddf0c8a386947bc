"""Microbenchmark: achieved e4m3 wgmma rate (SS, m64nNk32) vs issue pattern. python3 bench/wgmma_rate.py"""
import ctypes
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa: E402,F401
from comfyui_svdquant.kernels import _lib  # noqa: E402

lib = _lib.load()
lib.svdq_bench_wgmma.restype = ctypes.c_int
lib.svdq_bench_wgmma.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
sink = torch.zeros(256, device="cuda")
sms = torch.cuda.get_device_properties(0).multi_processor_count
stream = torch.cuda.current_stream().cuda_stream
for bn in (128, 256):
    for wgs in (1, 2):
        for per_wait in (2, 4, 8):
            iters = 4096 // per_wait
            def run():
                rc = lib.svdq_bench_wgmma(bn, wgs, iters, per_wait, sms, sink.data_ptr(), 0, stream)
                assert rc == 0, rc
            run()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            us = a.elapsed_time(b) * 1000
            flop = 2.0 * 64 * bn * 32 * iters * per_wait * wgs * sms
            print(f"n{bn} wgs={wgs} per_wait={per_wait}: {flop / us / 1e6:7.0f} TFLOP/s", flush=True)
