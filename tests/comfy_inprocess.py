"""ComfyUI imported into the test process (no server): fast checks of the glue in wrappers/.

Builds tiny SD1.5 / FLUX models with ComfyUI's own classes in memory. Weights are rounded to
values exact in both fp16 and bf16, so a saved 16-bit file holds exactly what the in-memory model used.
"""
import os
import sys

import pytest
import torch

from harness import config


# SVDQ_COMFY_DEVICE=cuda runs these tests with ComfyUI on the GPU (tests/gpu/run_comfy_gpu.sh), in
# bf16 so that the CUDA kernels, not the reference, serve the 4-bit layers.
ON_GPU = os.environ.get("SVDQ_COMFY_DEVICE", "cpu") == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def inprocess_marks() -> list:
    """`pytestmark` of every in-process test module: marker `comfy`, skipped without a ComfyUI tree."""
    reason = config.comfyui_missing_reason()
    return [pytest.mark.comfy, pytest.mark.skipif(reason is not None, reason=str(reason))]


def import_comfy():
    root = str(config.comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = not ON_GPU  # before comfy.model_management is imported, or it asserts CUDA
    import comfy.model_management  # noqa: F401


SD15_UNET = {"model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1],
             "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
             "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
             "num_head_channels": -1, "num_heads": 8, "transformer_depth_middle": -2,
             "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
             "use_temporal_resblock": False, "image_size": 32, "use_checkpoint": False}


def random_init(module: torch.nn.Module, seed: int = 0) -> None:
    """std 1/sqrt(fan_in) matrices, unit norm weights, zero biases; values exact in fp16 and bf16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1)
            else:
                p.zero_()
            p.copy_(torch.where(p.abs() < 1e-4, 0, p).bfloat16().half().float())


def _tiny_patcher(class_name: str, unet_config: dict, seed: int):
    """A random-weight model of ComfyUI's own class, wrapped in a stock ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    mc = getattr(sm, class_name)(dict(unet_config))
    mc.set_inference_dtype(DTYPE, None)
    model = mc.get_model({})
    random_init(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_sd15_patcher(seed: int = 0):
    return _tiny_patcher("SD15", SD15_UNET, seed)


def sd15_conds(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.zeros(1, 77, 768), {}]]


def denoise_once(patcher, x, sigma, cond):
    """One call of the model's denoiser (ComfyUI's apply_model path) on the patched model."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    dev = patcher.load_device
    with torch.no_grad():
        return patcher.model.apply_model(x.to(dev), sigma.to(dev), c_crossattn=cond[0][0].to(dev)).float().cpu()


# FLUX with hidden 256 (2 heads of 128, so the RoPE axes still sum to the head width). Only our own
# loader can rebuild it (it reads this config from the file); UNETLoader's detection assumes 24 heads.
FLUX_TINY = {"image_model": "flux", "guidance_embed": True, "axes_dim": [16, 56, 56], "num_heads": 2,
             "mlp_ratio": 4.0, "theta": 10000, "out_channels": 16, "qkv_bias": True, "in_channels": 16,
             "hidden_size": 256, "context_in_dim": 64, "patch_size": 2, "vec_in_dim": 64, "depth": 1,
             "depth_single_blocks": 1}


def tiny_flux_patcher(seed: int = 0):
    return _tiny_patcher("Flux", FLUX_TINY, seed)


def flux_conds(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 64, generator=g), "guidance": 3.5}
    return [[torch.randn(1, 16, 64, generator=g), extra]], [[torch.zeros(1, 16, 64), dict(extra)]]


def denoise_once_flux(patcher, x, sigma, cond):
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    dev = patcher.load_device
    opts = dict(patcher.model_options.get("transformer_options", {}))  # its block patches, as the samplers pass them
    with torch.no_grad():
        return patcher.model.apply_model(x.to(dev), sigma.to(dev), c_crossattn=cond[0][0].to(dev),
                                         y=cond[0][1]["pooled_output"].to(dev), transformer_options=opts,
                                         guidance=torch.tensor([3.5], device=dev)).float().cpu()


def sd15_lora(patcher, layers, rank=4, seed=0, scale=0.5):
    """A LoRA in the kohya key format (lora_unet_<path>.lora_up/lora_down/alpha) for these layers."""
    g = torch.Generator().manual_seed(seed)
    dm = patcher.model.diffusion_model
    sd = {}
    for name in layers:
        m = dm.get_submodule(name)
        n, k = m.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, k, generator=g) / k ** 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(n, rank, generator=g) * scale / rank ** 0.5
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def with_lora(patcher, lora_sd, strength):
    import comfy.sd
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, strength, 0)
    return model


def write_tiny_sd15_controlnet(path, seed: int = 3) -> None:
    """A random-weight SD1.5 ControlNet in the original (ldm) key layout that ComfyUI's
    load_controlnet detects (zero_convs.*, input_hint_block.*, the UNet encoder copy), matching
    tiny_sd15_patcher's UNet. Zero convs get random weights too, so the control has an effect."""
    import comfy.cldm.cldm
    import comfy.ops
    import safetensors.torch
    cfg = dict(SD15_UNET)
    cfg.pop("out_channels", None)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     dtype=torch.float32, device="cpu", **cfg)
    random_init(net, seed)
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(path))


def sample(patcher, positive, negative, steps: int = 2, cfg: float = 2.0, seed: int = 0, size: int = 64,
           channels: int = 4):
    """A KSampler run (comfy.sample.sample, the stock node's path): the conditioning's control, model
    patches and model options all take part. Returns the final latent (fp32, CPU)."""
    import comfy.sample
    latent = torch.zeros(1, channels, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                              disable_pbar=True, seed=seed)
    return out.float().cpu()
