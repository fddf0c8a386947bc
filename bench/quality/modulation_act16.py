"""Where the FLUX-style model's 4-bit loss sits: its modulation (adaLN) layers with 16-bit activations.

Quantizes the trained FLUX-style fixture with a method of quality/methods.py (default: rank 32 + GPTQ), samples
the bench_quality protocol (10 classes x 10 seeds, 20 euler steps, cfg 3) and scores PSNR against the 16-bit
model; then swaps the forward of the modulation layers (`*_mod.lin`, `*modulation.lin`) for one that keeps their
stored 4-bit weights and low-rank branch but reads 16-bit activations (X̂ = X/λ unquantized), samples again,
and reports the paired difference. An experiment on the reference path, not a runtime mode of the pack.

  python bench/quality/modulation_act16.py [METHOD] --json out.json
"""
import argparse
import fnmatch
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from quality import comfy_env, methods as M, metrics, reference_models as rm  # noqa: E402

MODULATION = ("*_mod.lin", "*modulation.lin")


def forward_act16(self, x):
    """The layer's stored weights (4-bit residual + branch), activations not quantized."""
    from comfyui_svdquant.kernels import reference as ref
    p = self.kernel_tensors(x.dtype, x.device)
    codes = ref.unpack_int4(p["qweight"]).float()
    steps = p["wscale_base"].float().unsqueeze(0) * p["wscale_mult"].float()  # (K/G, N)
    w = codes * steps.t().repeat_interleave(self.group_size, dim=1)
    xf = x.float()
    y = (xf / p["smooth_factor"].float()) @ w.t() + (xf @ p["proj_down"].float()) @ p["proj_up"].float().t()
    if p.get("bias") is not None:
        y = y + p["bias"].float()
    return y.to(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?", default="svdq_r32_gptq", choices=list(M.METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    comfy_env.import_comfy()
    fam, classes = "flux", [c for c in range(10) for _ in range(10)]
    seeds = list(range(len(classes)))

    def run(model):
        return metrics.psnr(rm.sample(model, fam, classes, seeds, 20, 3.0, "euler", "normal"), img16)
    img16 = rm.sample(rm.load_trained(fam), fam, classes, seeds, 20, 3.0, "euler", "normal")
    qm, _, _ = M.quantize_trained(fam, M.METHODS[a.method])
    base = run(qm)
    layers = [n for n, m in qm.model.diffusion_model.named_modules()
              if getattr(m, "quantized", False) and any(fnmatch.fnmatchcase(n, p) for p in MODULATION)]
    for n in layers:
        m = qm.model.diffusion_model.get_submodule(n)
        m.forward_quantized = forward_act16.__get__(m)
    act16 = run(qm)
    d = act16 - base
    res = {"method": a.method, "layers_act16": layers, "psnr": float(base.mean()), "psnr_act16": float(act16.mean()),
           "delta": float(d.mean()), "delta_ci95": float(1.96 * d.std() / len(d) ** 0.5), "torch": torch.__version__,
           "threads": a.threads}
    print(json.dumps(res, indent=1))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
