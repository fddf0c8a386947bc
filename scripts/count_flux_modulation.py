"""How much of FLUX.1-dev the adaLN modulation linears are (docs/FORMAT.md §3: they are W4A16 in
Nunchaku's files and 16-bit after the import). Builds ComfyUI's own Flux class with the FLUX.1-dev
config on the meta device (no memory, no weights) and counts parameters.

    .venv/bin/python scripts/count_flux_modulation.py
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_inprocess  # noqa: E402

FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}


def main():
    comfy_inprocess.import_comfy()
    import torch
    import comfy.ldm.flux.model
    import comfy.ops
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **FLUX_DEV)
    total = sum(p.numel() for p in model.parameters())
    mod = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("_mod.lin.weight", "modulation.lin.weight")))
    print(f"FLUX.1-dev parameters: {total:,}")
    print(f"adaLN modulation weights: {mod:,} ({mod / total:.1%})")
    print(f"  16-bit: {mod * 2 / 1e9:.2f} GB; AWQ 4-bit + 16-bit scale and zero per 64: {mod * (0.5 + 4 / 64) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
