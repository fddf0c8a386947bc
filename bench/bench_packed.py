"""Hopper int_ratio 4-bit linear on the packed weights (kernel 2d; the loader's weights_in_vram=compact: no int8 copy
in VRAM) against the resident int8 copy (kernel 2c) and cuBLAS bf16, whole linear (quantize + GEMM + rank-32 branch), CUDA-graph
medians in µs, ratios against bf16 of the same run; prints a table and writes JSON.

    python3 bench/bench_packed.py --json packed.json
"""
import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "gpu"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)

from bench_kernels import SHAPES, time_graph  # noqa: E402
from comfyui_svdquant import kernels  # noqa: E402
from comfyui_svdquant.kernels import _lib  # noqa: E402
from comfyui_svdquant.kernels import reference as ref  # noqa: E402
from _layers import make_ratio_layer, make_x  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or _lib.device_path(0) != 90 or not _lib.has_packed_gemm():
        sys.exit("needs a Hopper GPU and the library with kernel 2d")
    dtype = torch.bfloat16
    rows = []
    for label, m, k, n in SHAPES:
        lay = make_ratio_layer(n, k, args.rank, dtype, "cuda", seed=n + k)
        p_int8 = kernels.prepare_weights(lay, dev)
        p_packed = kernels.prepare_weights({**lay, "packed_weights": True}, dev)
        x = make_x(m, k, dtype, "cuda", seed=m)
        w16 = ref._dequant_weight(lay["qweight"], ref.weight_scales_for_gemm(lay), 64).to(dtype)
        t16 = time_graph(lambda: torch.nn.functional.linear(x, w16, lay["bias"]))
        t_int8 = time_graph(lambda: kernels.linear(x, p_int8))
        t_packed = time_graph(lambda: kernels.linear(x, p_packed))
        same = bool(torch.equal(kernels.linear(x, p_int8), kernels.linear(x, p_packed)))
        rows.append({"label": label, "M": m, "K": k, "N": n, "bf16_us": t16, "int8_copy_us": t_int8,
                     "packed_us": t_packed, "weight_bytes_int8_copy": n * k, "weight_bytes_packed": n * k // 2,
                     "outputs_equal": same})
        del w16, p_int8, p_packed, x
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  rank {args.rank}  bf16  (µs, CUDA-graph median)")
    print(f"{'shape':14s} {'M':>5s} {'K':>6s} {'N':>6s} | {'bf16':>7s} {'int8':>7s} {'packed':>7s} | "
          f"{'bf16/int8':>9s} {'bf16/pk':>8s} equal")
    for r in rows:
        print(f"{r['label']:14s} {r['M']:5d} {r['K']:6d} {r['N']:6d} | {r['bf16_us']:7.1f} {r['int8_copy_us']:7.1f} "
              f"{r['packed_us']:7.1f} | {r['bf16_us'] / r['int8_copy_us']:9.2f} {r['bf16_us'] / r['packed_us']:8.2f} "
              f"{r['outputs_equal']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                       "rank": args.rank, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
