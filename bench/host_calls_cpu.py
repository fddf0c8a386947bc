"""Which Python calls a 4-bit step makes that a 16-bit step does not, outside the 4-bit layers (CPU, no GPU needed).

On the GPU the SD models are host-bound and the 4-bit step's host time exceeds the 16-bit one's by more than the
4-bit layers' own host time accounts for (docs/E2E.md). This separates the two: the test suite's tiny model of a
family is quantized (Calibrate & Quantize's code, one smoothing strength), the 4-bit layers' forward is stubbed (an
empty output: no compute, no kernel path), and cProfile counts calls per function over a few sampler steps of
the 16-bit and the 4-bit model (ComfyUI's sampler, the KSampler path). Printed: the functions whose calls per step
differ most, then those whose own time differs most (the 16-bit linears' CPU compute shows there, as expected).

  python bench/host_calls_cpu.py --family sd15
"""
import argparse
import cProfile
import os
import pathlib
import pstats
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_e2e as B  # noqa: E402  (tests/ on sys.path, the comfyui_svdquant alias)


def profile_steps(patcher, family, steps):
    """{function: (calls per step, own ms per step, where its code lives)} over `steps` steps after a warm-up."""
    import comfy.sample
    noise, latent, pos, neg = B.sampling_inputs(family, 1, 64, "cpu")
    comfy.sample.sample(patcher, noise, 1, 7.0, "euler", "normal", pos, neg, latent, seed=1, disable_pbar=True)
    prof = cProfile.Profile()
    prof.enable()
    comfy.sample.sample(patcher, noise, steps, 7.0, "euler", "normal", pos, neg, latent, seed=1, disable_pbar=True)
    prof.disable()
    out = {}
    for (path, line, name), (_, ncalls, own, _, _) in pstats.Stats(prof).stats.items():
        key = name if path == "~" else f"{pathlib.Path(path).name}:{line}({name})"
        out[key] = (ncalls / steps, own / steps * 1e3, B._code_place(path))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    from comfy_inprocess import import_comfy
    import_comfy()
    from comfyui_svdquant.core import qlinear
    from comfyui_svdquant.core.config import QuantConfig
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize

    p16 = B.build(a.family, B.tiny(a.family), torch.float32, "cpu")
    s16 = profile_steps(p16, a.family, a.steps)
    pos, neg = B.conds(a.family, 1, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        calibrate_and_quantize(p16, [(pos, neg)], QuantConfig(alpha_grid=(0.5,)), 1, 7.0, "euler", "normal", 0, 64,
                               64, save_path=path)
        q, _ = load_svdquant_model(path, compute_dtype="float32")
    qlinear.QuantizedLinearMixin.forward_quantized = lambda self, x: x.new_zeros((*x.shape[:-1], self.out_features))
    s4 = profile_steps(q, a.family, a.steps)
    rows = []
    for k in set(s16) | set(s4):
        c16, t16, w16 = s16.get(k, (0.0, 0.0, ""))
        c4, t4, w4 = s4.get(k, (0.0, 0.0, ""))
        rows.append((c4 - c16, t4 - t16, c16, c4, t16, t4, w4 or w16, k))
    print(f"{a.family} (tiny), 4-bit layers stubbed; per step, 4-bit minus 16-bit:")
    print("  by calls:")
    for r in sorted(rows, key=lambda r: -abs(r[0]))[:a.top]:
        print(f"    {r[0]:+8.1f} calls ({r[2]:7.1f} -> {r[3]:7.1f})  {r[6]:14s} {r[7]}")
    print("  by own time:")
    for r in sorted(rows, key=lambda r: -abs(r[1]))[:a.top // 2]:
        print(f"    {r[1]:+8.2f} ms ({r[4]:7.2f} -> {r[5]:7.2f})  {r[6]:14s} {r[7]}")


if __name__ == "__main__":
    main()
