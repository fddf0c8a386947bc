"""The three trained reference models: their configs, how they are built (ComfyUI's own classes,
so ComfyUI's model sampling and samplers apply), loaded from the fixtures, conditioned and sampled.

Not SD1.5 / SDXL / FLUX: small models of those architectures trained here on Fashion-MNIST.
"""
import json
import os
import pathlib

import torch

from . import fmnist

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "trained"
CAPTIONS_FILE = FIXTURES / "captions.safetensors"
CTX_DIM = 384  # all-MiniLM-L6-v2 width: cross-attention context and pooled vector

_SD_COMMON = {"use_checkpoint": False, "image_size": 16, "in_channels": 4, "out_channels": 4,
              "use_spatial_transformer": True, "legacy": False, "model_channels": 64,
              "channel_mult": [1, 2], "num_res_blocks": [1, 1], "context_dim": CTX_DIM,
              "use_temporal_resblock": False, "use_temporal_attention": False}
# SD1.5 layout: conv proj_in/proj_out around the transformers, fixed head count, cross-attention
# context only (no pooled vector). 16x16 at 64 channels (convs only), 8x8 at 128 with attention.
SD15 = {**_SD_COMMON, "adm_in_channels": None, "use_linear_in_transformer": False, "num_heads": 4,
        "num_head_channels": -1, "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
        "transformer_depth_middle": 1}
# SDXL layout: linear proj_in/proj_out, 64-wide heads, deeper transformers at lower resolution, and
# the pooled text vector + six size embeddings (ComfyUI's SDXL.encode_adm) through the "sequential" label_emb.
SDXL = {**_SD_COMMON, "num_classes": "sequential", "adm_in_channels": CTX_DIM + 6 * 256,
        "use_linear_in_transformer": True, "num_head_channels": 64, "num_heads": -1,
        "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1}
# FLUX.1-dev layout (double + single stream blocks, guidance embedding, RoPE over 3 axes) at width 256:
# 4 heads of 64, axes 8 + 28 + 28 = 64.
FLUX = {"image_model": "flux", "guidance_embed": True, "axes_dim": [8, 28, 28], "num_heads": 4, "mlp_ratio": 4.0,
        "theta": 10000, "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 256,
        "context_in_dim": CTX_DIM, "patch_size": 2, "vec_in_dim": CTX_DIM, "depth": 1, "depth_single_blocks": 2}

FAMILIES = {"sd15": ("SD15", SD15), "sdxl": ("SDXL", SDXL), "flux": ("Flux", FLUX)}
FLUX_GUIDANCE = 3.5  # ComfyUI's default for FLUX conds; trained at this constant (not guidance-distilled)


def fixture_path(family: str) -> pathlib.Path:
    """The committed fixture, or the one in $SVDQ_QUALITY_FIXTURES (e.g. a retrained model)."""
    return pathlib.Path(os.environ.get("SVDQ_QUALITY_FIXTURES") or FIXTURES) / f"{family}_fmnist.safetensors"


def build(family: str, dtype=torch.float32):
    """A ComfyUI BaseModel of the family's class with this config (weights uninitialised)."""
    import comfy.supported_models as sm
    cls_name, cfg = FAMILIES[family]
    mc = getattr(sm, cls_name)(json.loads(json.dumps(cfg)))
    mc.set_inference_dtype(dtype, None)
    return mc.get_model({})


def patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def load_trained(family: str, path=None):
    """ModelPatcher of the trained fixture (fp16 file, fp32 model on CPU)."""
    import safetensors.torch
    path = pathlib.Path(path or fixture_path(family))
    if not path.is_file():
        raise FileNotFoundError(f"trained fixture {path} missing (bench/quality/train.py --family {family} writes it)")
    model = build(family)
    sd = safetensors.torch.load_file(str(path))
    missing, unexpected = model.diffusion_model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the {family} config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return patcher(model)


def captions():
    """(context 10×16×384, pooled 10×384) float32 from the fixture."""
    import safetensors.torch
    d = safetensors.torch.load_file(str(CAPTIONS_FILE))
    return d["context"].float(), d["pooled"].float()


def cond_pair(family: str, classes, ctx=None, pooled=None):
    """ComfyUI (positive, negative) conditioning for a batch of classes; negative = zeroed
    conditioning (what training dropped 10% of the time, i.e. ConditioningZeroOut)."""
    if ctx is None:
        ctx, pooled = captions()
    idx = torch.as_tensor(classes, dtype=torch.long)
    extra = {"pooled_output": pooled[idx]}
    if family == "flux":
        extra["guidance"] = FLUX_GUIDANCE
    neg_extra = {k: (torch.zeros_like(v) if torch.is_tensor(v) else v) for k, v in extra.items()}
    return [[ctx[idx], extra]], [[torch.zeros_like(ctx[idx]), neg_extra]]


def fixed_noise(family: str, seeds) -> torch.Tensor:
    """One noise tensor per seed (ComfyUI's prepare_noise on a single latent), stacked."""
    import comfy.sample
    z = torch.zeros(1, *fmnist.latent_shape(family))
    return torch.cat([comfy.sample.prepare_noise(z, int(s)) for s in seeds])


def sample(mp, family: str, classes, seeds, steps=20, cfg=3.0, sampler="euler", scheduler="normal", batch=50):
    """Images N×1×28×28 in [-1, 1] (clamped) through ComfyUI's sampler (comfy.sample.sample, the
    KSampler path) and the exact decode."""
    import comfy.sample
    ctx, pooled = captions()
    out = []
    for i in range(0, len(classes), batch):
        cl, sd = list(classes[i:i + batch]), list(seeds[i:i + batch])
        pos, neg = cond_pair(family, cl, ctx, pooled)
        noise = fixed_noise(family, sd)
        latent = torch.zeros_like(noise)
        z = comfy.sample.sample(mp, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                                disable_pbar=True, seed=int(sd[0]))
        out.append(fmnist.decode(mp.model.process_latent_in(z.float().cpu()), family).clamp(-1, 1))
    return torch.cat(out)


def calibration_conds(family: str):
    """One (positive, negative) pair per class caption: what Calibrate & Quantize gets."""
    ctx, pooled = captions()
    return [cond_pair(family, [c], ctx, pooled) for c in range(len(fmnist.CLASSES))]


def comfy_size(family: str) -> int:
    return fmnist.pixel_size(family)


def threads_from_env(default=1):
    n = int(os.environ.get("SVDQ_THREADS", default))
    torch.set_num_threads(n)
    return n
