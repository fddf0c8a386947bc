"""Host time of calling one Python-bodied op through torch.library, CPU only: the same body called directly, as a
`torch.library.custom_op`, and registered with the low-level `Library.define` + `impl`. A compiled model pays this per
4-bit linear (kernels/ops.py registers its per-layer ops the low-level way on this evidence).

    OMP_NUM_THREADS=1 python3 bench/bench_op_dispatch.py [--json out.json]
"""
import argparse
import json
import pathlib
import platform
import time
from typing import Optional

import torch


def body(x, w):  # stands for an op's Python body: allocate the output (the kernel launch is not timed here)
    return torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype)


@torch.library.custom_op("svdq_bench::high", mutates_args=(), device_types="cpu")
def high(x: torch.Tensor, w: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor], n: int) -> torch.Tensor:
    return body(x, w)


_LIB = torch.library.Library("svdq_bench", "FRAGMENT")
_LIB.define("low(Tensor x, Tensor w, Tensor? a, Tensor? b, int n) -> Tensor")
_LIB.impl("low", lambda x, w, a, b, n: body(x, w), "CPU")


def per_call_us(fn, n=20000):
    for _ in range(500):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    rows = {"direct call": per_call_us(lambda: body(x, w)),
            "torch.library.custom_op": per_call_us(lambda: torch.ops.svdq_bench.high.default(x, w, None, None, 3)),
            "Library.define + impl": per_call_us(lambda: torch.ops.svdq_bench.low.default(x, w, None, None, 3))}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}: host µs per call (mean of 20000)")
    for name, us in rows.items():
        print(f"  {name:26s} {us:6.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"torch": torch.__version__, "us_per_call": rows}, indent=1))


if __name__ == "__main__":
    main()
