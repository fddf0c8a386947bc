"""Host (CPU) time per call of the eager 4-bit linear and of its pieces, against cuBLAS bf16 (issue 5).

In an eager ComfyUI step every linear costs its Python/ctypes time on the host; when that exceeds the GPU time
the step becomes host-bound. This times N back-to-back calls with perf_counter (no sync inside the loop; the
GPU work of the small shape is shorter than the host time, so the loop measures the host) and prints µs/call.

  python3 bench/bench_host.py --json host.json            # on the GPU machine
"""
import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)


def per_call_us(fn, iters=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return host


def behind_queued_work_us(fn, calls=20):
    """Host µs per call of `fn` issued right after ~2 ms of queued GPU work and a non-blocking host-to-device copy
    queued behind it (as a sampler step's timestep or conditioning copies are). An API call that waits for in-flight
    copies (cudaFuncSetAttribute does: oneapi-src/unified-runtime#2678) waits for the GPU here, so a layer making
    one shows a per-call time near the queued work's instead of its usual host time."""
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(1024, pin_memory=True)
    dst = torch.empty(1024, device="cuda")
    fn()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(5):
        big @ big  # ~1.5 ms of GPU work on an H100/H200
        dst.copy_(src, non_blocking=True)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        total += time.perf_counter() - t0
        torch.cuda.synchronize()
    return total / (5 * calls) * 1e6


def main():
    from _layers import make_ratio_layer, make_x
    from comfyui_svdquant import kernels
    from comfyui_svdquant.kernels import _lib, ops
    from comfyui_svdquant.core.qlinear import SVDQuantLinear

    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    lay = make_ratio_layer(a.n, a.k, 32, dt, dev)
    x = make_x(a.m, a.k, dt, dev)
    lin = torch.nn.Linear(a.k, a.n, device=dev, dtype=dt)
    q = SVDQuantLinear.from_tensors({k: (v.cpu() if v is not None else None) for k, v in lay.items()}).to(dev)
    p = q.kernel_tensors(dt, dev)
    lib = _lib.load()
    qact, ascales, lora = ops._act_buffers(x, p["_afmt"], p["_rp"], lambda s, dtype: torch.empty(s, dtype=dtype, device=dev))
    out = torch.empty(a.m, a.n, dtype=dt, device=dev)
    x3 = x.view(1, a.m, a.k)  # what a model's linears get
    n_part, n_cnt = _lib.quant_workspace(a.m, a.k, p["_rp"], 0)
    part = torch.empty(max(n_part, 1), dtype=torch.float32, device=dev)
    cnt = torch.zeros(max(n_cnt, 1), dtype=torch.int32, device=dev)

    def raw_quant():
        cnt.zero_()
        lib.svdq_quantize_act_lora_down(x.data_ptr(), p["_smooth_rcp"].data_ptr(), p["_proj_down"].data_ptr(),
                                        qact.data_ptr(), ascales.data_ptr(), lora.data_ptr(), part.data_ptr(),
                                        cnt.data_ptr(), a.m, a.k, ascales.shape[1], p["_rp"], _lib.DT_BF16,
                                        p["_afmt"], 0, torch.cuda.current_stream().cuda_stream)

    rows = {
        "cuBLAS bf16 nn.Linear": lambda: lin(x),
        "4-bit module forward (SVDQuantLinear)": lambda: q(x),
        "cuBLAS bf16 nn.Linear, 3-D input (1, M, K)": lambda: lin(x3),
        "4-bit module forward, 3-D input (1, M, K)": lambda: q(x3),
        "kernels.linear (prepared dict)": lambda: kernels.linear(x, p),
        "ops.linear_direct": lambda: ops.linear_direct(x, p),
        "ops._run_linear (two library calls)": lambda: ops._run_linear(x, *ops._direct(p, dt)[1:]),
        "ops.quantize_into": lambda: ops.quantize_into(x, p["_smooth_rcp"], p["_proj_down"], qact, ascales, lora, p["_afmt"]),
        "ops.gemm_into": lambda: ops.gemm_into(qact, ascales, p["_qw"], p["_wscales"], lora, p["_proj_up"], p["_bias"], out, p["_path"]),
        "raw ctypes quantize + counter zero_": raw_quant,
        "torch.empty (one buffer)": lambda: torch.empty(a.m, a.n, dtype=dt, device=dev),
        "torch.zeros (counters)": lambda: torch.zeros(64, dtype=torch.int32, device=dev),
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream(dev).cuda_stream,
    }
    res = {name: per_call_us(fn) for name, fn in rows.items()}
    res["cuBLAS bf16 nn.Linear, behind queued work + copy"] = behind_queued_work_us(lambda: lin(x3))
    res["4-bit module forward, behind queued work + copy"] = behind_queued_work_us(lambda: q(x3))
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}  torch {torch.__version__}  shape M={a.m} K={a.k} N={a.n}  (host µs per call; "
          f"linear_direct makes {'one library call (svdq_linear)' if _lib.has_linear_call() else 'two library calls'})")
    for name, us in res.items():
        print(f"  {name:46s} {us:8.1f}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "m": a.m, "k": a.k, "n": a.n,
                                                    "host_us_per_call": res}, indent=1))


if __name__ == "__main__":
    main()
