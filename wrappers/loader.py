"""Build a ComfyUI ModelPatcher holding 4-bit layers, from a 4-bit file or an in-memory state dict.

Mirrors comfy.sd.load_diffusion_model_state_dict, except that the model class and its config
come from the declaration (packed shapes would defeat ComfyUI's shape-based detection) and linears
are built by SVDQuantOps / SVDQuantOpsDirect (wrappers/ops.py). Calibrate & Quantize builds its result the same way, so a model made in
memory and the same model loaded from its file are built by one path.
"""
import logging

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..core.checkpoint import CheckpointError, check_layers, load_checkpoint, parse_declaration, read_header
from ..core.input_group import attach_input_groups
from ..core.nunchaku_import import convert_nunchaku_flux, looks_like_nunchaku
from .families import model_class_by_name
from .flux_blocks import install_fused_flux_blocks
from .lora import enable_lora
from .ops import svdquant_ops

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Load SVDQuant Model's "weights_in_vram": fast = Hopper's int8 copy of each 4-bit weight (kernel 2c), compact = the
# packed 4-bit codes only (kernel 2d). Only Hopper GPUs differ; other GPUs always read the packed codes.
WEIGHTS_IN_VRAM = {"fast": False, "compact": True}


def _packed_weights(weights_in_vram: str) -> bool:
    if weights_in_vram not in WEIGHTS_IN_VRAM:
        raise ValueError(f"weights_in_vram must be one of {sorted(WEIGHTS_IN_VRAM)}, not {weights_in_vram!r}")
    return WEIGHTS_IN_VRAM[weights_in_vram]


def build_patcher(sd: dict, fmeta: dict, n_declared: int, source: str, dtype=None, device: str = "default",
                  weights_in_vram: str = "fast"):
    """Model + ModelPatcher from a 4-bit state dict (consumed) and its file declaration."""
    packed = _packed_weights(weights_in_vram)
    if not fmeta.get("model_class"):
        raise CheckpointError(f"{source}: the declaration names no model_class, so the model cannot be built")
    try:
        model_config = model_class_by_name(fmeta["model_class"])(fmeta.get("unet_config") or {})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: cannot build model class {fmeta['model_class']!r}: {e}") from e

    load_device = mm.get_torch_device() if device == "default" else torch.device(device)
    offload_device = mm.unet_offload_device() if device == "default" else torch.device(device)
    if dtype is None:
        dtype = mm.unet_dtype(supported_dtypes=list(model_config.supported_inference_dtypes))
    manual_cast_dtype = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    model_config.custom_operations = svdquant_ops(manual_cast_dtype)

    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    still_meta = [n for n, p in model.diffusion_model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: no weights for {len(still_meta)} parameters, e.g. {still_meta[:3]}")
    model = model.to(offload_device)
    quantized = [m for m in model.diffusion_model.modules() if getattr(m, "quantized", False)]
    for m in quantized:  # before ComfyUI sizes the model (kernel_cache entries) and moves it to the GPU
        m.set_packed_weights(packed)
    n_q = len(quantized)
    if n_q != n_declared:
        raise CheckpointError(f"{source}: {n_declared} layers are declared 4-bit but {n_q} were found in the model; "
                              f"the file does not match {fmeta['model_class']}")
    n_groups = attach_input_groups(model.diffusion_model, fmeta.get("input_groups"), source)
    logging.info(f"[svdquant] built {fmeta.get('family')} ({fmeta['model_class']}) from {source}: "
                 f"{n_q} 4-bit linears ({n_groups} input groups quantized once per call), compute dtype {dtype}, "
                 f"weights in VRAM: {weights_in_vram}")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    install_fused_flux_blocks(patcher)
    enable_lora(patcher)
    return patcher


def read_4bit_file(path: str):
    """(state dict, file declaration, layer declarations) of our file, or of a Nunchaku INT4 FLUX
    file converted to our layout (core/nunchaku_import.py); both checked layer by layer."""
    meta, keys = read_header(path)
    if not looks_like_nunchaku(meta, keys):
        return load_checkpoint(path)
    sd, header = convert_nunchaku_flux(path)
    fmeta, layers = parse_declaration(header, path)
    check_layers(sd, layers, int(fmeta["group_size"]), path)
    return sd, fmeta, layers


def load_svdquant_model(path: str, expected_family: str = "auto", compute_dtype: str = "auto",
                        device: str = "default", weights_in_vram: str = "fast"):
    _packed_weights(weights_in_vram)  # a bad setting fails before a large file is read
    sd, fmeta, layers = read_4bit_file(path)
    family = fmeta.get("family")
    if expected_family != "auto" and family != expected_family:
        raise CheckpointError(f"{path}: this is a {family} 4-bit model, but the loader was set to {expected_family}; "
                              f"use a {expected_family} file or set family to auto and use {family} text encoders/VAE")
    return build_patcher(sd, fmeta, len(layers), path, DTYPES[compute_dtype], device, weights_in_vram), fmeta
