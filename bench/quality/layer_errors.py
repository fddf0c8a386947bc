"""Per-layer report of several methods on one trained reference model: the relative output error on
the calibration rows and how many SVDs refinement kept (the pack's calibration report, no sampling).

  python bench/quality/layer_errors.py flux svdq_r32_refine4 svdq_r32_gptq svdq_r32_refine4_gptq
"""
import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from quality import comfy_env, methods as M  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=("sd15", "sdxl", "flux"))
    ap.add_argument("methods", nargs="+", choices=list(M.METHODS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    layers = {}
    for name in args.methods:
        _, report, seconds = M.quantize_trained(args.family, M.METHODS[name])
        layers[name] = report["layers"]
        print(f"{name}: mean error {report['summary']['mean_error']:.5f}, {seconds:.1f} s")
    print(f"\n{'layer':40s} " + " ".join(f"{n + ' err / SVDs':>32s}" for n in args.methods))
    for layer in layers[args.methods[0]]:
        cells = [f"{layers[n][layer]['error']:.5f} / {layers[n][layer].get('lowrank_iters_used', 1)}" for n in args.methods]
        print(f"{layer:40s} " + " ".join(f"{c:>32s}" for c in cells))


if __name__ == "__main__":
    main()
