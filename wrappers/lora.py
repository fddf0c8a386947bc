"""LoRA (and other weight patches) on 4-bit layers, through ComfyUI's stock LoRA loaders.

A 4-bit layer has no 16-bit weight to patch, and must not get one (that would undo the memory
saving). So: the layer lists a placeholder `weight` key in its state dict, which lets ComfyUI's
LoRA loaders register patches for it as for any linear; when the patched model is loaded, an
ON_LOAD callback turns each layer's patches into extra terms of its 16-bit low-rank branch,
`Y += (X·D)·Uᵀ` — no re-quantization, no dequantized copy. A clone with other strengths is loaded
again by ComfyUI, which reruns the callback: strengths change without reloading the file.
"""
import torch

import comfy.lora
from comfy.patcher_extension import CallbacksMP
from comfy.weight_adapter import LoRAAdapter

CALLBACK_KEY = "svdquant_lora"


class UnsupportedPatchError(ValueError):
    pass


def _lowrank_terms(patches, key, n, k, device, dtype):
    """ComfyUI patch list of one weight -> (D (K×r), U (N×r)) with U·Dᵀ = Σ strength·ΔW."""
    downs, ups = [], []
    for strength, v, strength_model, offset, function in patches:
        if strength_model != 1.0 or offset is not None or function is not None:
            raise UnsupportedPatchError(f"{key}: a patch that rescales or offsets the weight cannot be applied "
                                        f"to a 4-bit layer (strength_model={strength_model}, offset={offset})")
        if isinstance(v, LoRAAdapter) and v.weights[3] is None and v.weights[4] is None and v.weights[5] is None:
            up, down, alpha = v.weights[0], v.weights[1], v.weights[2]
            r = down.shape[0]
            scale = strength * (float(alpha) / r if alpha is not None else 1.0)
            downs.append(down.reshape(r, k).to(device, torch.float32).t())
            ups.append(up.reshape(n, r).to(device, torch.float32) * scale)
            continue
        if isinstance(v, LoRAAdapter) and v.weights[4] is not None:
            raise UnsupportedPatchError(f"{key}: DoRA patches depend on the full weight and are not supported on 4-bit layers")
        # Any other additive patch (LoHa, LoKr, diff, ...): its dense ΔW, kept as an exact rank-min(N,K)
        # term so that one code path serves all.
        delta = comfy.lora.calculate_weight([(strength, v, 1.0, None, None)], torch.zeros(n, k, device=device), key)
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        keep = s > s.max() * 1e-6 if s.numel() else s.bool()
        downs.append(vh[keep].t())
        ups.append(u[:, keep] * s[keep])
    if not downs:
        return None
    return torch.cat(downs, 1).to(dtype), torch.cat(ups, 1).to(dtype)


def apply_lora_on_load(patcher, device_to, *args, **kwargs):
    """ON_LOAD callback: give every 4-bit layer the low-rank terms of its current patches (or none)."""
    dm = patcher.model.diffusion_model
    for name, m in dm.named_modules():
        if not getattr(m, "quantized", False):
            continue
        key = f"diffusion_model.{name}.weight"
        patches = patcher.patches.get(key)
        dev = device_to if device_to is not None else m.qweight.device
        m.set_lora(_lowrank_terms(patches, key, m.out_features, m.in_features, dev, m.smooth_factor.dtype) if patches else None)


def enable_lora(patcher) -> None:
    """Register the callback on a patcher holding 4-bit layers (its clones inherit it)."""
    patcher.remove_callbacks_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY)
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY, apply_lora_on_load)
