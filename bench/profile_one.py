"""One FLUX-shaped 4-bit linear, run a few times (for ncu): python3 bench/profile_one.py [M K N]"""
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa: E402,F401

from comfyui_svdquant import kernels  # noqa: E402
from _layers import make_layer, make_x  # noqa: E402

m, k, n = (int(v) for v in sys.argv[1:4]) if len(sys.argv) > 3 else (4608, 3072, 3072)
lay = make_layer(n, k, 32, torch.bfloat16, "cuda")
p = kernels.prepare_weights(lay, torch.device("cuda"))
x = make_x(m, k, torch.bfloat16, "cuda")
for _ in range(4):
    y = kernels.linear(x, p)
torch.cuda.synchronize()
print("ok", y.shape)
