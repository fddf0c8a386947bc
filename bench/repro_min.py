"""Minimal call sequence of the CUDA library (debug aid for crashes): python3 bench/repro_min.py"""
import faulthandler, pathlib, sys
faulthandler.enable()
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa
import torch
from comfyui_svdquant.kernels import _lib
lib = _lib.load()
print("path", lib.svdq_device_path(0), flush=True)
x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
sm = torch.ones(64, device="cuda")
q = torch.empty(8, 64, dtype=torch.uint8, device="cuda")
s = torch.empty(1, 8, device="cuda")
l = torch.zeros(8, 0, device="cuda")
print("calling", flush=True)
rc = lib.svdq_quantize_act_lora_down(x.data_ptr(), sm.data_ptr(), None, q.data_ptr(), s.data_ptr(), l.data_ptr(),
                                     8, 64, 8, 0, 1, 1, 0, torch.cuda.current_stream().cuda_stream)
print("rc", rc, flush=True)
torch.cuda.synchronize()
print(q[0], s[:, 0], flush=True)
