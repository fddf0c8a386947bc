"""Calibrate & quantize a ComfyUI MODEL: calibration passes through ComfyUI's own sampler,
layer-by-layer quantization, a patched clone of the ModelPatcher, and an optional atomic save."""
import copy
import dataclasses
import json
import logging
import os
import shutil
import time

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.utils

from ..core import checkpoint as ckpt
from ..core.calibrate import (SharedInputs, capture_inputs, find_target_linears, format_report, quantize_layers,
                              summarize)
from ..core.config import QuantConfig
from ..core.qlinear import KERNEL_CACHE
from ..core.timing import PhaseTimer
from .families import DEFAULT_SKIP, PER_IMAGE_INPUTS, POST_GELU, family_of
from .loader import build_patcher

# Stored in fp32 whatever the model dtype (docs/FORMAT.md): int_ratio bases, the unsigned-activation shift.
FP32_TENSORS = ("wscale_base", "act_shift")


def run_calibration(model, conds, steps, cfg, sampler_name, scheduler, seed, width, height, pbar=None):
    """One sampler run per (positive, negative) pair; the activations are what we keep, not the images."""
    t0 = time.time()
    for i, (positive, negative) in enumerate(conds):
        latent = torch.zeros(1, 4, height // 8, width // 8)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                            disable_pbar=True, seed=seed + i)
        if pbar:
            pbar(i + 1, len(conds))
        left = (time.time() - t0) / (i + 1) * (len(conds) - i - 1)
        logging.info(f"[svdquant] calibration run {i + 1}/{len(conds)}, about {left:.0f} s left in capture")


def save_dtype_for(model_config, diffusion_model):
    """16-bit dtype of the 4-bit file's 16-bit parts: the model's own if 16-bit; for a model
    upcast to fp32 (ComfyUI on CPU), the 16-bit dtype its weights came from when they are all
    exact in it (lossless), else the first 16-bit dtype the family supports."""
    params = [p for p in diffusion_model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    for dt in (torch.float16, torch.bfloat16):
        if dt in model_config.supported_inference_dtypes and all(torch.equal(p, p.to(dt).to(p.dtype)) for p in params):
            return dt
    for dt in model_config.supported_inference_dtypes:
        if dt in (torch.bfloat16, torch.float16):
            return dt
    return torch.float16


def quantized_state_dict(diffusion_model, results: dict, dtype) -> dict:
    """The 16-bit state dict with every quantized layer's weight/bias replaced by its 4-bit tensors."""
    sd = {}
    for k, v in diffusion_model.state_dict().items():
        layer, _, leaf = k.rpartition(".")
        if (layer in results and leaf in ("weight", "bias")) or leaf == KERNEL_CACHE:
            continue  # KERNEL_CACHE: a size entry of an already 4-bit layer, no data
        sd[k] = v.to(dtype) if v.is_floating_point() else v
    for name, q in results.items():
        for t, v in q.tensors().items():  # int_ratio bases stay fp32 (docs/FORMAT.md)
            sd[f"{name}.{t}"] = v.to(dtype) if (v.is_floating_point() and t not in FP32_TENSORS) else v
    return sd


def unique_path(folder: str, prefix: str) -> str:
    """`<prefix>_00001.safetensors`, the first number not taken: never overwrites."""
    if not prefix or os.path.isabs(prefix) or ".." in prefix.replace("\\", "/").split("/"):
        raise ValueError(f"filename_prefix {prefix!r} must be a relative name inside the models folder")
    base = os.path.join(folder, prefix)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    i = 1
    while os.path.exists(f"{base}_{i:05d}.safetensors"):
        i += 1
    return f"{base}_{i:05d}.safetensors"


def partial_dir(save_path: str) -> str:
    """Where per-layer results of an unfinished run on `save_path` are kept (removed once it is saved)."""
    return save_path + ".partial"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def calibrate_and_quantize(model, conds, qcfg: QuantConfig, steps, cfg, sampler_name, scheduler, seed,
                           width, height, save_path=None, node_id=None):
    """Returns (4-bit ModelPatcher, report text, report dict). `model` is left untouched.

    With save_path, every finished layer is also kept in partial_dir(save_path): an interrupted run
    rerun with the same inputs (the same file name comes up, since no file was written) skips them.
    """
    if not conds:
        raise ValueError("calibration_samples must be at least 1: no calibration data, nothing to quantize with")
    base = model.model
    family = family_of(base.model_config)
    qcfg = dataclasses.replace(qcfg, skip_patterns=tuple(DEFAULT_SKIP[family]) + tuple(qcfg.skip_patterns),
                               unsigned_patterns=tuple(POST_GELU.get(family, ())) + tuple(qcfg.unsigned_patterns),
                               act16_patterns=tuple(PER_IMAGE_INPUTS.get(family, ())) + tuple(qcfg.act16_patterns))
    dm = base.diffusion_model
    layers = find_target_linears(dm, qcfg)
    if not layers:
        raise ValueError("no linear layer of this model can be quantized with these settings "
                         f"(skip patterns {qcfg.skip_patterns}, group size {qcfg.group_size})")
    logging.info(f"[svdquant] calibrating {len(layers)} linears of a {family} model on {len(conds)} samples "
                 f"x {steps} steps; rank policy: {qcfg.rank.describe()}")

    # progress: calibration runs, then layers (twice for the size budget: scored, then quantized), then saving
    total = len(conds) + len(layers) * (2 if qcfg.rank.mode == "size" else 1) + 1
    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    timer = PhaseTimer()
    shared = SharedInputs() if qcfg.share_inputs else None
    with timer("capture"), capture_inputs(layers, qcfg, seed, shared) as stats:
        run_calibration(model, conds, steps, cfg, sampler_name, scheduler, seed, width, height,
                        pbar=lambda d, t: bar.update_absolute(d, total))
    groups = shared.groups(list(layers)) if shared is not None else []
    device = mm.get_torch_device()
    # The in-memory model gets exactly the tensors the file gets, so save -> load reproduces it.
    out_dtype = save_dtype_for(base.model_config, dm)
    results = quantize_layers(layers, stats, qcfg, device=device, out_dtype=out_dtype,
                              progress=lambda d, t, n: bar.update_absolute(len(conds) + d, total),
                              log=logging.info, groups=groups, timer=timer,
                              resume_dir=partial_dir(save_path) if save_path else None)
    outliers = {n: stats[n].outlier_report(qcfg.outlier_k_std) for n in layers}
    del stats

    text = format_report(results, outliers)
    meta = ckpt.build_metadata({n: {"rank": q.rank, "scales": q.report.get("scales", "float"),
                                    "unsigned_acts": q.report.get("unsigned_acts", False),
                                    "act16": q.report.get("act16", False)}
                               for n, q in results.items()}, family=family,
                               source_dtype=out_dtype, group_size=qcfg.group_size,
                               model_class=type(base.model_config).__name__,
                               unet_config=json.loads(json.dumps(base.model_config.unet_config, default=str)),
                               input_groups=groups)
    with timer("packing"):
        sd = quantized_state_dict(dm, results, out_dtype)
    if save_path:
        with timer("saving"):
            ckpt.save_checkpoint(save_path, sd, meta)
        text += f"\nsaved: {save_path}"
        logging.info(f"[svdquant] saved {save_path}")
    bar.update_absolute(total, total)
    report = {"family": family, "policy": qcfg.rank.describe(), "settings": _settings(qcfg),
              "summary": summarize(results), "input_groups": [list(g) for g in groups],
              "time_s": timer.as_dict(),
              "layers": {n: {**q.report, **outliers[n]} for n, q in results.items()}}
    text += "\ntime per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["time_s"].items())
    if save_path:
        _write_json(os.path.splitext(save_path)[0] + ".report.json", report)
        shutil.rmtree(partial_dir(save_path), ignore_errors=True)  # the file is complete: nothing left to resume
    # A new model, built the way the loader builds it from the file: it shares no module with the
    # 16-bit input, so both stay usable side by side under ComfyUI's model management.
    qmodel = build_patcher(dict(sd), json.loads(meta[ckpt.FILE_META_KEY]), len(results), "calibration",
                           dtype=base.get_dtype())
    carry_model_patches(model, qmodel)
    return qmodel, text, report


def _settings(qcfg: QuantConfig) -> dict:
    d = dataclasses.asdict(qcfg)
    d["rank"] = qcfg.rank.describe()
    return d


def carry_model_patches(src, dst) -> None:
    """Keep what other nodes patched onto the input model outside the diffusion net (e.g. a
    ModelSampling shift) and its model_options (wrappers, sampler settings)."""
    for k, v in src.object_patches.items():
        if not k.startswith("diffusion_model."):
            dst.add_object_patch(k, v)
    dst.model_options = copy.deepcopy(src.model_options)
