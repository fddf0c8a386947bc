"""Times the 4-bit linear against cuBLAS bf16 and cuBLAS fp8 (torch._scaled_mm) on FLUX / SDXL / SD1.5 shapes.

Each timing: a CUDA graph of REPS back-to-back calls on the same buffers, replayed; median over replays
of (graph time / REPS). "ours" = the whole 4-bit linear (quantize + LoRA-down, GEMM + LoRA-up + bias),
rank 32, bias, through kernels.linear (the path ComfyUI uses), for both scale modes: "int" = int_ratio
scales (Hopper: s8 wgmma, the default of new files), "flt" = float scales (Hopper: e4m3 wgmma with
per-group promotion); "quant" and "gemm" are the two kernels alone. gemm_v7_1/2/3 = the int_ratio tile
shapes 192x128 / 128x192 / 128x128 on the same inputs (the default picks one by a cost model); 2e.* = kernel 2e's
tiles (one activation base per row); "row" = the whole linear with row bases (row-base pass + kernel 1b + 2e),
"given" = the same with the bases already written by the op producing x (AF_I8_ROW_GIVEN), "codes" = with the codes
written there too (AF_I8_ROW_CODES: kernel 1 does the LoRA-down alone); the producers' own times (FLUX's
ln_modulate, concat_rows, GELU, plain and writing bases / bases and codes) follow in a second table. Ratios are bf16
time / method time (>1 = faster than bf16), from the same run.
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
from _layers import make_layer, make_ratio_layer, make_x  # noqa: E402

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


def time_producers(dev, dtype):
    """The FLUX ops that produce a linear's input, alone and also writing its row bases (kernels/flux_ops.py
    ln_modulate_rowbase / concat_rows_rowbase): what the row-base pass of kernel 1 is traded for."""
    from comfyui_svdquant.kernels import _lib, flux_ops, ops
    if not _lib.has_row_base_producers():
        return []
    g = torch.Generator(device=dev).manual_seed(0)

    def slot(lead, k, codes):
        act, stream, index = ops._act_buffer(lead, lead[0] * lead[1], k, 32, _lib.FMT_I8_ROW, dev, fresh=True)
        return ops.RowBaseSlot(act, stream, index, 0.5 + torch.rand(k, generator=g, device=dev), k, codes)

    def both(lead, k, fn):  # (bases only, bases and codes)
        return tuple(time_graph(lambda s=slot(lead, k, codes): fn(s)) for codes in (False, True))

    out = []
    x = torch.randn(1, 4608, 3072, generator=g, device=dev).to(dtype)
    mod = torch.randn(1, 1, 6 * 3072, generator=g, device=dev).to(dtype)
    shift, scale = mod[..., :3072], mod[..., 3072:6144]
    out.append(("ln_modulate 4608x3072", time_graph(lambda: flux_ops._ln_any(x, shift, scale, 1e-6)),
                *both((1, 4608), 3072, lambda s: flux_ops.ln_modulate_rowbase(x, shift, scale, 1e-6, s))))
    a = torch.randn(1, 4608, 3072, generator=g, device=dev).to(dtype)
    h = torch.randn(1, 4608, 21504, generator=g, device=dev).to(dtype)
    b = h[..., 9216:]
    out.append(("concat+GELU 4608x15360", time_graph(lambda: flux_ops._concat_any(a, b, True)),
                *both((1, 4608), 15360, lambda s: flux_ops.concat_rows_rowbase(a, b, True, s))))
    f = torch.randn(1, 4096, 12288, generator=g, device=dev).to(dtype)
    out.append(("GELU 4096x12288", time_graph(lambda: F.gelu(f, approximate="tanh")),
                *both((1, 4096), 12288, lambda s: flux_ops.concat_rows_rowbase(None, f, True, s))))
    return [{"op": name, "plain_us": t0, "with_row_bases_us": t1, "with_bases_and_codes_us": t2}
            for name, t0, t1, t2 in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    backend = f"{kernels.backend_name(dev, 'int_ratio')} / {kernels.backend_name(dev)}"
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
        row = {"label": label, "M": m, "K": k, "N": n, "bf16_us": t_bf16, "fp8_us": t_fp8, "ratio_fp8": t_bf16 / t_fp8}
        for mode, make in (("int", make_ratio_layer), ("flt", make_layer)):
            p = kernels.prepare_weights(make(n, k, args.rank, dtype, dev, seed=1), dev)
            if not p["_path"]:
                continue
            fmt = p["_afmt"]
            qa, sa, la = ops.quantize_act_lora_down(x, p["_smooth_rcp"], p["_proj_down"], p["_rp"], fmt)
            t_ours = time_graph(lambda: kernels.linear(x, p))
            t_q = time_graph(lambda: ops.quantize_act_lora_down(x, p["_smooth_rcp"], p["_proj_down"], p["_rp"], fmt))
            t_g = time_graph(lambda: ops.w4a4_gemm(qa, sa, p["_qw"], p["_wscales"], la, p["_proj_up"], p["_bias"],
                                                   dtype, p["_path"]))
            row.update({f"{mode}_path": p["_path"], f"{mode}_us": t_ours, f"{mode}_quant_us": t_q,
                        f"{mode}_gemm_us": t_g, f"{mode}_gemm_tflops": 2.0 * m * n * k / t_g / 1e6,
                        f"{mode}_ratio": t_bf16 / t_ours, f"{mode}_ratio_gemm": t_bf16 / t_g})
            if mode == "int":
                row["int_eager_us"] = time_eager(lambda: kernels.linear(x, p))
                if p["_path"] == 91:
                    outb = torch.empty((m, n), dtype=dtype, device=dev)
                    for v in (1, 2, 3):
                        row[f"gemm_v7_{v}_us"] = time_graph(lambda: ops.gemm_into(
                            qa, sa, p["_qw"], p["_wscales"], la, p["_proj_up"], p["_bias"], outb, 91, variant=v))
                    # kernel 2e (one activation base per token; docs/KERNELS.md §6c): timed on the same int8 codes
                    # with the first chunk's bases standing in for row bases (the time does not depend on them)
                    sa_row = sa[:1].contiguous()
                    for v in (21, 22, 23, 24):
                        row[f"gemm_2e_{v}_us"] = time_graph(lambda: ops.gemm_into(
                            qa, sa_row, p["_qw"], p["_wscales"], la, p["_proj_up"], p["_bias"], outb, 91, variant=v))
                    # the whole linear with row bases, kernel 2e with the cost model's tile (variant 20) after kernel 1
                    # in: "row" AF_I8_ROW (row-base pass + kernel 1b); "given" AF_I8_ROW_GIVEN (the bases already
                    # written by the op producing x: no row pass); "codes" AF_I8_ROW_CODES (codes written there too:
                    # kernel 1 does the LoRA-down alone). "row" runs first: its bases and codes serve the other two.
                    qr, sr, lr = (torch.empty_like(qa), torch.empty((1, sa.shape[1]), device=dev), torch.empty_like(la))
                    for name, fmt in (("row", _lib.FMT_I8_ROW), ("given", _lib.FMT_I8_ROW_GIVEN),
                                      ("codes", _lib.FMT_I8_ROW_CODES)):
                        quant = lambda fmt=fmt: ops.quantize_into(x, p["_smooth_rcp"], p["_proj_down"], qr, sr, lr, fmt)
                        row[f"{name}_quant_us"] = time_graph(quant)
                        row[f"{name}_us"] = time_graph(lambda: (quant(), ops.gemm_into(
                            qr, sr, p["_qw"], p["_wscales"], lr, p["_proj_up"], p["_bias"], outb, 91, variant=20)))
                        row[f"{name}_ratio"] = t_bf16 / row[f"{name}_us"]
            del p, qa, sa, la
        rows.append(row)
        del x, w, xf8, wf8
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(dev)
    print(f"GPU: {gpu}  torch {torch.__version__}  backend {backend}  rank {args.rank}  (times in us, CUDA-graph median)")
    cols = [("bf16", "bf16_us"), ("fp8", "fp8_us"), ("int", "int_us"), ("i.quant", "int_quant_us"),
            ("i.gemm", "int_gemm_us"), ("i.eager", "int_eager_us"), ("flt", "flt_us"), ("f.gemm", "flt_gemm_us"),
            ("fp8x", "ratio_fp8"), ("intx", "int_ratio"), ("i.gemmx", "int_ratio_gemm"), ("fltx", "flt_ratio"),
            ("i.TF", "int_gemm_tflops"), ("v7_1", "gemm_v7_1_us"), ("v7_2", "gemm_v7_2_us"), ("v7_3", "gemm_v7_3_us"),
            ("2e.n256", "gemm_2e_21_us"), ("2e.m192", "gemm_2e_22_us"), ("2e.n192", "gemm_2e_23_us"),
            ("2e.128", "gemm_2e_24_us"), ("row", "row_us"), ("r.quant", "row_quant_us"), ("rowx", "row_ratio"),
            ("given", "given_us"), ("g.quant", "given_quant_us"), ("givenx", "given_ratio"),
            ("codes", "codes_us"), ("c.lora", "codes_quant_us"), ("codesx", "codes_ratio")]
    print(f"{'shape':14s} {'M':>5s} {'K':>6s} {'N':>6s} | " + " ".join(f"{c:>7s}" for c, _ in cols))
    for r in rows:
        vals = []
        for c, key in cols:
            v = r.get(key)
            ratio = key.startswith(("ratio", "int_ratio", "flt_ratio", "row_ratio", "given_ratio", "codes_ratio"))
            vals.append(f"{v:7.2f}" if isinstance(v, float) and ratio
                        else (f"{v:7.1f}" if isinstance(v, float) else f"{'-':>7s}"))
        print(f"{r['label']:14s} {r['M']:5d} {r['K']:6d} {r['N']:6d} | " + " ".join(vals))
    producers = time_producers(dev, dtype)
    if producers:
        print("producers of a linear's input (us; 'plain' GELU = torch's F.gelu):")
        for r in producers:
            print(f"  {r['op']:24s} plain {r['plain_us']:7.1f}  with row bases {r['with_row_bases_us']:7.1f}"
                  f"  with bases and codes {r['with_bases_and_codes_us']:7.1f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "backend": backend,
                                                       "rank": args.rank, "rows": rows, "producers": producers},
                                                      indent=1))


if __name__ == "__main__":
    main()
