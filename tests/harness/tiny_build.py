"""Build the tiny random-weight models with ComfyUI's own classes.

Runs as a script under ComfyUI's Python (see tiny_models.build_tiny_models):
    python tiny_build.py --comfyui <ComfyUI tree> --out <dir> --seed 0

Why ComfyUI's classes and not hand-written key lists: the files must be what
ComfyUI's loaders detect (model_detection.detect_unet_config, sd.detect_te_model,
the TAESD key check), so we build the real module, take its state dict, then feed
it back through detection and assert the class. Detection pins some dimensions
(SD15/SDXL model_channels 320 and context dims, FLUX hidden 3072); only depths are
free, so the models are small in depth, not width. Text encoders are fixed-size in
ComfyUI (CLIP-L 123 M, CLIP-G 694 M, T5-XXL 4.7 B params, built whatever the file
holds), so we write stubs that pass detection; their missing weights are left
uninitialised by ComfyUI, hence the graphs zero the conditioning.
"""
import argparse
import json
import math
import os
import pathlib
import resource
import sys
import time
import zlib

# Filled by main() once ComfyUI is importable.
torch = None


# Configs exactly as detect_unet_config would report them for the files we write.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": -2,
    "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# SDXL detection wants transformer_depth == [0,0,2,2,10,10] per input res block
# (24 transformer blocks are unavoidable); one level of 6 res blocks is the
# cheapest arrangement (no down/up-samplers, 7 output blocks, no transformers on
# the way up, no middle block). Shorter lists detect as Vega/SSD-1B/KOALA instead.
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [6], "channel_mult": [1],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0] * 7,
    "transformer_depth_middle": -2, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# FLUX.1-dev layout (guidance embedding), one double and one single block.
FLUX_UNET = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0,
    "theta": 10000, "out_channels": 16, "qkv_bias": True, "in_channels": 16,
    "hidden_size": 3072, "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768,
    "depth": 1, "depth_single_blocks": 1, "guidance_embed": True,
}

CLIP_L_STUB_KEYS = {  # layers.0 → detect_te_model says CLIP_L; layers.1 → Flux/SD3 load_sd routes it to clip_l
    "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
    "text_model.encoder.layers.1.mlp.fc1.weight": (3072, 768),
}
CLIP_G_STUB_KEYS = {  # layers.30 → CLIP_G for detect_te_model and SDXLClipModel.load_sd
    "text_model.encoder.layers.30.mlp.fc1.weight": (5120, 1280),
}
T5_STUB_KEYS = {  # DualCLIPLoader(flux) sends every non-CLIP-L file to the T5; one key suffices
    "encoder.final_layer_norm.weight": (4096,),
}


def _generator(seed, name):
    # Seed per file so a file's content does not depend on build order.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def realistic_init_(module, gen):
    """std 1/sqrt(fan_in) for matrices/convs, 1 for norm scales, 0 for biases.

    ComfyUI builds models with disable_weight_init ops (torch.empty), so every
    parameter must be written here; this keeps activations O(1) through the net."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 0:
                continue  # TAESD vae_scale/vae_shift keep their defaults (1, 0)
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def random_tensors(spec, gen):
    """Matrices ~ N(0, 1/fan_in); vectors (norm scales) = 1."""
    return {k: torch.randn(shape, generator=gen) / math.sqrt(shape[1]) if len(shape) > 1 else torch.ones(shape)
            for k, shape in spec.items()}


def fp16(sd):
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def unet_state_dict(config_cls, unet_config, gen):
    model = config_cls(dict(unet_config)).get_model({})
    realistic_init_(model.diffusion_model, gen)
    sd = fp16(model.diffusion_model.state_dict())
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    del model
    return sd, n_params


# A random UNet does not denoise, so its final latents are ~20x a real model's
# (std ~90 for the SD models, ~4 for FLUX, in ComfyUI's latent space). TAESD's own
# vae_scale maps them into the decoder's range, and a 0.5 bias on the last conv
# centres the image (its output is the image in [0, 1]): images keep detail
# (std ~0.15-0.2, <1% clipped) instead of saturating, so small numeric changes
# in the model stay visible in the PNG.
TAESD_VAE_SCALE = {4: 0.0025, 16: 0.05}


def taesd_state_dict(latent_channels, gen):
    import comfy.taesd.taesd
    vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    realistic_init_(vae, gen)
    with torch.no_grad():
        vae.vae_scale.fill_(TAESD_VAE_SCALE[latent_channels])
        vae.taesd_decoder[-1].bias.fill_(0.5)
    return fp16(vae.state_dict())


def check_unet(sd, prefix, expected_class):
    import comfy.model_detection
    mc = comfy.model_detection.model_config_from_unet(sd, prefix)
    got = type(mc).__name__ if mc is not None else None
    if got != expected_class:
        raise SystemExit(f"detection check failed: {prefix or 'unet'} detected as {got}, expected {expected_class}")
    return got


def check_te(sd, expected):
    import comfy.sd
    got = comfy.sd.detect_te_model(sd)
    if got != expected:
        raise SystemExit(f"text encoder stub detected as {got}, expected {expected}")


def save(out_dir, rel, sd, meta, manifest, extra):
    import safetensors.torch
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata={"svdq_tiny_model": json.dumps(meta)})
    os.replace(tmp, path)
    manifest[rel] = {"bytes": path.stat().st_size, **extra}


def build(out_dir, seed, version):
    import comfy.sd
    import comfy.supported_models as sm
    out_dir = pathlib.Path(out_dir)
    manifest = {}
    meta = {"version": version, "seed": seed, "tool": "tests/harness/tiny_build.py"}
    timings = {}

    def timed(name):
        timings[name] = time.perf_counter()

    TE = comfy.sd.TEModel
    timed("text_encoders")
    clip_l = fp16(random_tensors(CLIP_L_STUB_KEYS, _generator(seed, "clip_l")))
    clip_g = fp16(random_tensors(CLIP_G_STUB_KEYS, _generator(seed, "clip_g")))
    t5 = fp16(random_tensors(T5_STUB_KEYS, _generator(seed, "t5")))
    check_te(clip_l, TE.CLIP_L)
    check_te(clip_g, TE.CLIP_G)
    save(out_dir, "text_encoders/tiny_clip_l.safetensors", clip_l, meta, manifest, {"detected": "CLIP_L stub"})
    save(out_dir, "text_encoders/tiny_clip_g.safetensors", clip_g, meta, manifest, {"detected": "CLIP_G stub"})
    save(out_dir, "text_encoders/tiny_t5xxl_stub.safetensors", t5, meta, manifest, {"detected": "T5-XXL stub (DualCLIPLoader flux)"})

    timed("vae")
    taesd = taesd_state_dict(4, _generator(seed, "taesd"))
    taef1 = taesd_state_dict(16, _generator(seed, "taef1"))
    save(out_dir, "vae/tiny_taesd.safetensors", taesd, meta, manifest, {"detected": "TAESD 4ch"})
    save(out_dir, "vae/tiny_taef1.safetensors", taef1, meta, manifest, {"detected": "TAESD 16ch"})

    def unet_files(name, model_class, unet_config, expected, text_encoder_keys):
        """The UNet as a diffusion_models file and as a full checkpoint (+ TAESD + text-encoder stubs)."""
        timed(name)
        unet, n = unet_state_dict(model_class, unet_config, _generator(seed, name))
        info = {"detected": check_unet(unet, "", expected), "unet_params": n}
        save(out_dir, f"diffusion_models/tiny_{name}_unet.safetensors", unet, meta, manifest, info)
        ckpt = {"model.diffusion_model." + k: v for k, v in unet.items()}
        ckpt.update({"first_stage_model." + k: v for k, v in taesd.items()})
        ckpt.update(text_encoder_keys)
        check_unet(ckpt, "model.diffusion_model.", expected)
        save(out_dir, f"checkpoints/tiny_{name}.safetensors", ckpt, meta, manifest, info)

    unet_files("sd15", sm.SD15, SD15_UNET, "SD15",
               {"cond_stage_model.transformer." + k: v for k, v in clip_l.items()})
    sdxl_te = {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()}
    # open_clip naming, as in real SDXL checkpoints (ComfyUI converts it on load).
    sdxl_te["conditioner.embedders.1.model.transformer.resblocks.30.mlp.c_fc.weight"] = \
        clip_g["text_model.encoder.layers.30.mlp.fc1.weight"]
    unet_files("sdxl", sm.SDXL, SDXL_UNET, "SDXL", sdxl_te)

    timed("flux")
    unet, n = unet_state_dict(sm.Flux, FLUX_UNET, _generator(seed, "flux"))
    info = {"detected": check_unet(unet, "", "Flux"), "unet_params": n}
    save(out_dir, "diffusion_models/tiny_flux_unet.safetensors", unet, meta, manifest, info)
    del unet
    timed("end")

    names = list(timings)
    seconds = {names[i]: round(timings[names[i + 1]] - timings[names[i]], 2) for i in range(len(names) - 1)}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"version": version, "seed": seed, "files": manifest,
            "build_seconds": seconds, "peak_rss_mb": round(peak_mb)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", required=True)
    a = ap.parse_args()

    sys.path.insert(0, a.comfyui)
    from comfy.cli_args import args
    args.cpu = True  # before comfy.model_management is imported, else it asserts CUDA
    global torch
    import torch as _torch
    torch = _torch
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    report = build(a.out, a.seed, a.version)
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    (pathlib.Path(a.out) / "manifest.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
