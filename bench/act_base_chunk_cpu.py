"""Quality cost of a longer activation-base chunk for int_ratio layers (CPU; docs/KERNELS.md §6c).

int_ratio activations carry one fp32 base per token and chunk of ACT_CHUNK_GROUPS groups (256 channels); the Hopper
GEMM must promote every chunk's integer sum to fp32. With one base per token for the whole row (kernel 2e) the GEMM
sums all of K in int32 and promotes nothing, at the price of coarser steps for groups far below the row's maximum.
This quantizes synthetic layers (tests/synthetic.py: outlier channels; realistic correlated, heavy-tailed
activations) with the full SVDQuant pipeline (smoothing search, rank-32 branch, GPTQ) for chunk = 4 groups, 16
groups and the whole row, and prints each one's relative output error (the quantizer's own report, activations
quantized as the chunk says). Random layers, not trained ones: a relative comparison of the chunk choices only.

  python bench/act_base_chunk_cpu.py --json bench/results/act_base_chunk_cpu.json
"""
import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (the comfyui_svdquant alias)
from synthetic import outlier_layer, realistic_activations  # noqa: E402

from comfyui_svdquant.core.config import QuantConfig  # noqa: E402
from comfyui_svdquant.core.layer_quant import quantize_linear  # noqa: E402
from comfyui_svdquant.kernels import reference as ref  # noqa: E402


def layer(kind: str, k: int, seed: int):
    if kind == "outlier":
        return outlier_layer(n=256, k=k, rows=512, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = realistic_activations(512, k, g)
    return torch.randn(256, k, generator=g) / k ** 0.5, x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", nargs="+", type=int, default=[1280, 3072])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    default = ref.ACT_CHUNK_GROUPS
    rows = []
    try:
        for kind in ("outlier", "realistic"):
            for k in args.k:
                errs = {}
                for chunk in (default, 16, k // 64):
                    ref.ACT_CHUNK_GROUPS = chunk  # read at call time by the reference quantizer and the error report
                    tot = 0.0
                    for seed in range(args.seeds):
                        w, x = layer(kind, k, seed)
                        cfg = QuantConfig(scale_mode="int_ratio", alpha_grid=(0.3, 0.5, 0.7))
                        tot += quantize_linear(w, None, x.abs().amax(0), x, cfg, rank=32).report["error"]
                    errs["row" if chunk == k // 64 else str(chunk)] = tot / args.seeds
                rows.append({"kind": kind, "K": k, "error": errs})
    finally:
        ref.ACT_CHUNK_GROUPS = default
    print(f"relative output error, rank 32, int_ratio, GPTQ; mean of {args.seeds} seeds; chunk in groups of 64")
    print(f"{'layer':10s} {'K':>6s} | {'chunk 4':>8s} {'chunk 16':>9s} {'row':>8s} | {'16/4':>6s} {'row/4':>6s}")
    for r in rows:
        e = r["error"]
        print(f"{r['kind']:10s} {r['K']:6d} | {e[str(default)]:8.5f} {e['16']:9.5f} {e['row']:8.5f} | "
              f"{e['16'] / e[str(default)]:6.3f} {e['row'] / e[str(default)]:6.3f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "seeds": args.seeds}, indent=1))


if __name__ == "__main__":
    main()
