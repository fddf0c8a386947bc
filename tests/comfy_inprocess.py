"""ComfyUI imported into the test process (no server): fast checks of the glue in wrappers/.

Builds tiny SD1.5 / FLUX models with ComfyUI's own classes in memory. Weights are rounded to
fp16 so a saved 16-bit file holds exactly what the in-memory model used.
"""
import sys

import torch

from harness import config


def import_comfy():
    root = str(config.comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = True  # before comfy.model_management is imported, or it asserts CUDA
    import comfy.model_management  # noqa: F401


SD15_UNET = {"model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1],
             "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
             "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
             "num_head_channels": -1, "num_heads": 8, "transformer_depth_middle": -2,
             "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
             "use_temporal_resblock": False, "image_size": 32, "use_checkpoint": False}


def random_init(module: torch.nn.Module, seed: int = 0) -> None:
    """std 1/sqrt(fan_in) matrices, unit norm weights, zero biases; fp16-representable values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1)
            else:
                p.zero_()
            p.copy_(p.half().float())


def tiny_sd15_patcher(seed: int = 0):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    mc = sm.SD15(dict(SD15_UNET))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    random_init(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sd15_conds(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.zeros(1, 77, 768), {}]]


def denoise_once(patcher, x, sigma, cond):
    """One call of the model's denoiser (ComfyUI's apply_model path) on the patched model."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=cond[0][0])
