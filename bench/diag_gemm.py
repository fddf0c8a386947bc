"""GEMM diagnostics (timing only): the sm_90a kernel as is, without promotion, without wgmma."""
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
sys.path.insert(0, str(ROOT / "bench"))
import conftest  # noqa: E402,F401
from bench_kernels import time_graph  # noqa: E402
from comfyui_svdquant import kernels  # noqa: E402
from comfyui_svdquant.kernels import ops  # noqa: E402
from _layers import make_layer, make_x  # noqa: E402

for m, k, n in [(4608, 3072, 3072), (4608, 3072, 12288)]:
    lay = make_layer(n, k, 32, torch.bfloat16, "cuda")
    p = kernels.prepare_weights(lay, torch.device("cuda"))
    x = make_x(m, k, torch.bfloat16, "cuda")
    qa, sa, la = ops.quantize_act_lora_down(x, p["_smooth_rcp"], p["_proj_down"], p["_rp"], 1)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    res = {}
    for v, name in [(0, "v2"), (11, "v6-3wg")]:
        res[name] = time_graph(lambda: ops.gemm_into(qa, sa, p["_qw"], p["_wscales"], la, p["_proj_up"], p["_bias"], out, 90, v))
    res["quant"] = time_graph(lambda: ops.quantize_act_lora_down(x, p["_smooth_rcp"], p["_proj_down"], p["_rp"], 1))
    print(m, k, n, "  ".join(f"{a}={b:.1f}us" for a, b in res.items()), flush=True)
