"""Benchmark of the 16-bit-activation layers (FLUX's modulation linears): the W4A16 GEMV (kernels/csrc/w4a16.cu)
against cuBLAS bf16 on a resident 16-bit weight and against the torch form that makes the 16-bit weight per call.
Prints a table and writes JSON; times are CUDA-graph medians (µs), ratios against cuBLAS bf16 of the same run.

    python3 bench/bench_gemv.py --json gemv.json
"""
import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "gpu"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)

from bench_kernels import time_graph  # noqa: E402
from comfyui_svdquant import kernels  # noqa: E402
from comfyui_svdquant.kernels import _lib  # noqa: E402
from comfyui_svdquant.kernels import reference as ref  # noqa: E402
from _layers import make_ratio_layer, make_x  # noqa: E402

# (label, K, N, layers per FLUX.1 step): double blocks' img_mod/txt_mod (6·3072 outputs), single blocks' modulation
SHAPES = [("flux double mod", 3072, 18432, 38), ("flux single mod", 3072, 9216, 38)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not _lib.has_gemv():
        sys.exit(f"needs a CUDA GPU and the library with the GEMV ({_lib.load_error() or 'built before w4a16.cu'})")
    dtype, dev = torch.bfloat16, torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    rows = []
    for label, k, n, per_step in SHAPES:
        lay = make_ratio_layer(n, k, args.rank, dtype, "cuda", seed=n)
        p = kernels.prepare_weights({**lay, "act16": True}, dev)
        torch_form = {key: v for key, v in p.items() if not key.startswith("_gv_")}  # no GEMV: weight made per call
        w16 = ref._dequant_weight(lay["qweight"], ref.weight_scales_for_gemm(lay), 64).to(dtype)
        for m in (1, 2, 4, 8):
            x = make_x(m, k, dtype, "cuda", seed=m)
            t_bf16 = time_graph(lambda: torch.nn.functional.linear(x, w16, lay["bias"]))
            t_gemv = time_graph(lambda: kernels.linear(x, p))
            t_torch = time_graph(lambda: kernels.linear(x, torch_form))
            gbs = n * k / 2 / (t_gemv * 1e-6) / 1e9  # packed-weight bytes per second
            rows.append({"label": label, "M": m, "K": k, "N": n, "per_step": per_step, "bf16_us": t_bf16,
                         "gemv_us": t_gemv, "torch_form_us": t_torch, "gemv_weight_GBps": gbs})
            del x
    print(f"GPU: {gpu}  torch {torch.__version__}  rank {args.rank}  bf16  (µs, CUDA-graph median)")
    print(f"{'layer':16s} {'M':>3s} {'K':>5s} {'N':>6s} | {'bf16':>7s} {'gemv':>7s} {'torch':>8s} | "
          f"{'bf16/gemv':>9s} {'GB/s':>6s}")
    for r in rows:
        print(f"{r['label']:16s} {r['M']:3d} {r['K']:5d} {r['N']:6d} | {r['bf16_us']:7.1f} {r['gemv_us']:7.1f} "
              f"{r['torch_form_us']:8.1f} | {r['bf16_us'] / r['gemv_us']:9.2f} {r['gemv_weight_GBps']:6.0f}")
    for m in (1, 2, 4, 8):
        per = {c: sum(r[c] * r["per_step"] for r in rows if r["M"] == m) / 1000 for c in ("bf16_us", "gemv_us", "torch_form_us")}
        print(f"FLUX.1 step, 76 modulation linears, M={m}: bf16 {per['bf16_us']:.2f} ms, gemv {per['gemv_us']:.2f} ms, "
              f"torch form {per['torch_form_us']:.2f} ms")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rank": args.rank,
                                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
