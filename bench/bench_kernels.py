"""Times the 4-bit linear against cuBLAS bf16 and cuBLAS fp8 (torch._scaled_mm) on FLUX / SDXL / SD1.5 shapes.

Each timing: a CUDA graph of REPS back-to-back calls on the same buffers, replayed; median over replays
of (graph time / REPS). "ours" = the whole 4-bit linear (quantize + LoRA-down, GEMM + LoRA-up + bias),
rank 32, bias, through kernels.linear (the path ComfyUI uses); "quant" and "gemm" are its two kernels
alone. Ratios are bf16 time / method time (>1 = faster than bf16), from the same run.
Usage: python3 bench/bench_kernels.py [--json out.json] [--quick]
"""
import argparse
import json
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)

from comfyui_svdquant import kernels  # noqa: E402
from _layers import make_layer, make_x  # noqa: E402

SHAPES = [  # (label, M, K, N)
    ("flux qkv/proj", 4608, 3072, 3072), ("flux fc1", 4608, 3072, 12288), ("flux fc2", 4608, 12288, 3072),
    ("flux qkv/proj", 256, 3072, 3072), ("flux fc1", 256, 3072, 12288), ("flux fc2", 256, 12288, 3072),
    ("sdxl attn", 4096, 640, 640), ("sdxl ff1", 4096, 640, 5120),
    ("sdxl attn", 1024, 1280, 1280), ("sdxl ff1", 1024, 1280, 10240),
    ("sd15 attn", 4096, 320, 320), ("sd15 ff2", 4096, 1280, 320),
]


def time_graph(fn, reps=10, replays=15):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / reps)
    return statistics.median(ts)


def time_eager(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000.0 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    backend = kernels.backend_name(dev)
    from comfyui_svdquant.kernels import ops, _lib
    rows = []
    shapes = SHAPES[:3] + SHAPES[3:6] if args.quick else SHAPES
    for label, m, k, n in shapes:
        torch.manual_seed(0)
        x = make_x(m, k, dtype, dev, seed=m + k)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dtype)
        bias = torch.randn(n, device=dev, dtype=dtype)
        t_bf16 = time_graph(lambda: F.linear(x, w, bias))
        xf8 = x.to(torch.float8_e4m3fn)
        wf8 = w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        t_fp8 = time_graph(lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=one, scale_b=one, bias=bias,
                                                    out_dtype=dtype))
        lay = make_layer(n, k, args.rank, dtype, dev, seed=1)
        p = kernels.prepare_weights(lay, dev)
        row = {"label": label, "M": m, "K": k, "N": n, "bf16_us": t_bf16, "fp8_us": t_fp8}
        if p["_path"]:
            t_ours = time_graph(lambda: kernels.linear(x, p))
            fmt = _lib.FMT_E4M3 if p["_path"] == 90 else _lib.FMT_INT4
            qa, sa, la = ops.quantize_act_lora_down(x, p["_smooth_rcp"], p["_proj_down"], p["_rp"], fmt)
            t_q = time_graph(lambda: ops.quantize_act_lora_down(x, p["_smooth_rcp"], p["_proj_down"], p["_rp"], fmt))
            t_g = time_graph(lambda: ops.w4a4_gemm(qa, sa, p["_qw"], p["_wscales"], la, p["_proj_up"], p["_bias"],
                                                   dtype, p["_path"]))
            t_eager = time_eager(lambda: kernels.linear(x, p))
            if p["_path"] == 90:  # earlier GEMM versions on the same inputs: v1 (cp.async), v2 (TMA, 2 consumer WGs)
                outb = torch.empty((m, n), dtype=dtype, device=dev)
                for v, key in ((1, "gemm_v1_us"), (12, "gemm_v2_us")):
                    row[key] = time_graph(lambda: ops.gemm_into(qa, sa, p["_qw"], p["_wscales"], la, p["_proj_up"],
                                                                p["_bias"], outb, 90, variant=v))
            flop = 2.0 * m * n * k
            row.update(ours_us=t_ours, quant_us=t_q, gemm_us=t_g, ours_eager_us=t_eager,
                       gemm_tflops=flop / t_g / 1e6, ratio_ours=t_bf16 / t_ours, ratio_fp8=t_bf16 / t_fp8,
                       ratio_gemm=t_bf16 / t_g)
        rows.append(row)
        del p, lay, x, w, xf8, wf8
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(dev)
    print(f"GPU: {gpu}  torch {torch.__version__}  backend {backend}  rank {args.rank}  (times in us, CUDA-graph median)")
    hdr = f"{'shape':14s} {'M':>5s} {'K':>6s} {'N':>6s} | {'bf16':>7s} {'fp8':>7s} {'ours':>7s} {'quant':>6s} {'gemm':>7s} {'eager':>7s} | {'fp8x':>5s} {'oursx':>5s} {'gemmx':>5s} {'gemmTF':>6s} {'gemm_v1':>7s} {'gemm_v2':>7s}"
    print(hdr)
    for r in rows:
        if "ours_us" in r:
            print(f"{r['label']:14s} {r['M']:5d} {r['K']:6d} {r['N']:6d} | {r['bf16_us']:7.1f} {r['fp8_us']:7.1f} "
                  f"{r['ours_us']:7.1f} {r['quant_us']:6.1f} {r['gemm_us']:7.1f} {r['ours_eager_us']:7.1f} | "
                  f"{r['ratio_fp8']:5.2f} {r['ratio_ours']:5.2f} {r['ratio_gemm']:5.2f} {r['gemm_tflops']:6.0f} {r.get('gemm_v1_us', float('nan')):7.1f} {r.get('gemm_v2_us', float('nan')):7.1f}")
        else:
            print(f"{r['label']:14s} {r['M']:5d} {r['K']:6d} {r['N']:6d} | {r['bf16_us']:7.1f} {r['fp8_us']:7.1f} (no CUDA path)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "backend": backend,
                                                       "rank": args.rank, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
