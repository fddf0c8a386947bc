"""Programmatic dependent launch (SVDQ_PDL=1, kernels/csrc/svdq.cu launch_pdl): kernels 1b and 2c/2e of a linear may
start while the kernel before them finishes and wait (griddepcontrol.wait) before reading its outputs. Scheduling
only, so every output must be bitwise the one without PDL: eager, back to back with other layers and torch ops, and
replayed from a CUDA graph. The library reads SVDQ_PDL once per process, hence one subprocess per setting."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from comfyui_svdquant.kernels import _lib

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_lib")]

HERE = pathlib.Path(__file__).resolve().parent

SCRIPT = r"""
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
import conftest  # the comfyui_svdquant alias
from comfyui_svdquant import kernels
from _layers import make_ratio_layer, make_x
dev = torch.device("cuda")
outs = {}
for row in (False, True):
    if row:
        import os
        os.environ["SVDQ_ROW_BASE"] = "1"
        kernels.ROW_BASE_MIN_WEIGHTS = 0
    for (m, k, n, r) in ((4608, 3072, 3072, 32), (77, 640, 1280, 32), (333, 12288, 256, 128)):
        lay = make_ratio_layer(n, k, r, torch.bfloat16, dev, seed=n + k)
        p = kernels.prepare_weights(lay, dev)
        x = make_x(m, k, torch.bfloat16, dev, seed=m)
        ys = []
        for _ in range(3):  # back to back, with a torch op between layers
            ys.append(kernels.linear(x, p))
            x = (x * 1.0001).contiguous()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kernels.linear(x, p)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            yg = kernels.linear(x, p)
        g.replay()
        torch.cuda.synchronize()
        key = f"{'row' if row else 'chunk'}_{m}_{k}_{n}"
        for i, y in enumerate(ys + [yg]):  # three eager calls, then the graph replay
            outs[f"{key}_{i}"] = y.float().cpu().contiguous()
save_file(outs, sys.argv[1])
"""


def _run(tmp_path, pdl: str):
    out = tmp_path / f"pdl{pdl}.safetensors"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, SVDQ_PDL=pdl)
    env.pop("SVDQ_ROW_BASE", None)
    subprocess.run([sys.executable, str(script), str(out), str(HERE)], check=True, env=env, timeout=600)
    return load_file(out)  # tensors only: no pickle


def test_pdl_changes_no_output_bit(tmp_path):
    if _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("PDL launches are on Hopper's int8 path")
    off, on = _run(tmp_path, "0"), _run(tmp_path, "1")
    assert off.keys() == on.keys() and len(off) == 2 * 3 * 4
    bad = {k: int((off[k] != on[k]).sum()) for k in off if not torch.equal(off[k], on[k])}
    assert not bad, json.dumps(bad)
    assert all(torch.isfinite(t).all() for t in on.values())
