"""How much of FLUX.1-dev the adaLN modulation linears are, and what they take after a Nunchaku import
(docs/FORMAT.md §3: W4A16 AWQ in Nunchaku's files, our 4-bit layers with 16-bit activations after the
import). Builds ComfyUI's own Flux class with the FLUX.1-dev config on the meta device (no memory, no
weights) and counts parameters; converts one random AWQ layer of each modulation shape with the
importer's own function and counts its bytes: in the converted state dict (what load_svdquant_model
holds) and resident in the compute dtype; and the Hopper kernel copy such layers no longer keep.

    .venv/bin/python scripts/count_flux_modulation.py
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_inprocess  # noqa: E402
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)

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
    shapes = {}
    for n, p in model.named_parameters():
        if n.endswith(("_mod.lin.weight", "modulation.lin.weight")):
            shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    converted, resident, copy = _imported_bytes(shapes, torch.bfloat16)
    print(f"  after a Nunchaku import (bf16 file; {', '.join(f'{c} x {n}x{k}' for (n, k), c in shapes.items())}): "
          f"{converted / 1e9:.2f} GB converted, {resident / 1e9:.2f} GB resident in bf16")
    print(f"  Hopper kernel copy of rank-32 4-bit-activation layers of these shapes, which layers with 16-bit "
          f"activations do not keep: {copy / 1e9:.2f} GB")


def _imported_bytes(shapes: dict, dtype):
    """(converted state-dict bytes, resident bytes in `dtype`) of the imported layers, and the Hopper kernel copy a
    rank-32 4-bit-activation layer of the same shapes would add (kernels.prepared_extra_bytes on the sm_90 path):
    what a 16-bit-activation layer no longer keeps."""
    from unittest import mock

    import torch
    from comfyui_svdquant import kernels
    from comfyui_svdquant.core.nunchaku_import import awq_as_act16_layer
    from comfyui_svdquant.core.qlinear import COMPUTE_DTYPE_TENSORS
    converted = resident = copy = 0
    g = torch.Generator().manual_seed(0)
    for (n, k), count in shapes.items():
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        s, z = (torch.rand(n, k // 64, generator=g) * 0.01).to(dtype), (torch.randn(n, k // 64, generator=g) * 0.05).to(dtype)
        t = awq_as_act16_layer(codes, s, z, torch.zeros(n))
        converted += count * sum(v.numel() * v.element_size() for v in t.values())
        resident += count * sum(v.numel() * (dtype.itemsize if name in COMPUTE_DTYPE_TENSORS else v.element_size())
                                for name, v in t.items())
        with mock.patch.object(kernels, "_device_path", lambda device: 90):  # sized without a GPU
            copy += count * kernels.prepared_extra_bytes(n, k, 32, "cuda")
    return converted, resident, copy


if __name__ == "__main__":
    main()
