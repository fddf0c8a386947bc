"""One FLUX-shaped 4-bit linear, run a few times (for ncu): python3 bench/profile_one.py [M K N [LAYOUT]]
LAYOUT: float (float scales, e4m3 path 90; default), int8 (int_ratio, kernel 2c on the int8 copy) or packed
(int_ratio, kernel 2d on the packed codes)."""
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa: E402,F401

from comfyui_svdquant import kernels  # noqa: E402
from _layers import make_layer, make_ratio_layer, make_x  # noqa: E402

m, k, n = (int(v) for v in sys.argv[1:4]) if len(sys.argv) > 3 else (4608, 3072, 3072)
layout = sys.argv[4] if len(sys.argv) > 4 else "float"
if layout not in ("float", "int8", "packed"):
    sys.exit(f"layout must be float, int8 or packed, not {layout!r}")
lay = (make_layer if layout == "float" else make_ratio_layer)(n, k, 32, torch.bfloat16, "cuda")
p = kernels.prepare_weights({**lay, "packed_weights": layout == "packed"}, torch.device("cuda"))
x = make_x(m, k, torch.bfloat16, "cuda")
for _ in range(4):
    y = kernels.linear(x, p)
torch.cuda.synchronize()
print("ok", layout, p["_path"], y.shape)
