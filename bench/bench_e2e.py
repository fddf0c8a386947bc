"""End to end through ComfyUI: 4-bit vs 16-bit sampling speed, memory, quantize and load time (issue 5).

Builds the published SD1.5 / SDXL / FLUX.1-dev architectures with ComfyUI's own model classes and random
bf16 weights (std 1/sqrt(fan_in): no trained weights can be downloaded here, so nothing about image quality
is measured), samples with ComfyUI's sampler (comfy.sample.sample: the KSampler path), quantizes with the
pack's Calibrate & Quantize path (wrappers/quantize.py, default settings except where --fast-quant says),
saves, reloads with Load SVDQuant Model's code, samples again. Per family and batch size it reports:
DiT/UNet weight bytes, peak VRAM while sampling, time per denoising step, calibrate+quantize time, save
and load time. Ratios are 4-bit / 16-bit from the same run. Prints a table, writes JSON.
--compile [inductor|cudagraphs] adds both models under the stock TorchCompileModel node's wrapper with that
backend (default inductor; cudagraphs replays CUDA graphs, which removes the host time of small models): step
time, the first (compiling) run's time (a whole sampling run), and the compiled output's relative distance from
eager's.
--vram-cap G samples the 4-bit model once more as on a GPU with G GiB for this process: ComfyUI's free-memory
query answers G minus what torch holds, so it plans a partial (low-VRAM) load as it would there, and torch's
allocator is capped at G GiB (set_per_process_memory_fraction), so going over fails for real; the allocator
backend is ComfyUI's default (cudaMallocAsync, as its main.py sets) unless --alloc-conf says otherwise.
--profile records one denoising step of each model with torch.profiler and sums GPU time per category
(4-bit GEMM, quantize, 16-bit GEMM, attention, norms/elementwise, copies); --host-profile the host (Python) time
of a step by function and by package (cProfile: for the host-bound SD models, where a step's wall time is 2-4x its
GPU time).
FLUX 4-bit models run the fused block forward (wrappers/flux_blocks.py, as the loader installs it);
--unfused-too also times the 4-bit model through ComfyUI's own block forward, --fused-16bit the 16-bit model
through the fused one, so the quantization's share and the fusion's share of the speed-up are both on record.
--interleave N times N alternating rounds of (16-bit, 4-bit) per batch size with both models kept: each round's
4-bit / 16-bit ratio and their median, for the host-bound SD steps whose single timings drift by tens of percent.

  python3 bench/bench_e2e.py --family sd15 sdxl --json out.json          # on the GPU machine
  python3 bench/bench_e2e.py --family sd15 --tiny --steps 2              # plumbing check (CPU ok)
FLUX at full depth (19 + 38 blocks) needs ~24 GB for bf16 weights; --flux-depth D S builds fewer blocks
(reported as such, never extrapolated).
"""
import argparse
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)

# Published architectures (the configs ComfyUI's model_detection derives for these checkpoints).
_SD_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
              "use_temporal_resblock": False}
SD15 = {**_SD_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
SDXL = {**_SD_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
        "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
FLUX_DEV = {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
            "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 4096,
            "patch_size": 2, "vec_in_dim": 768, "depth": 19, "depth_single_blocks": 38, "guidance_embed": True}
# (model class, config, latent channels, latent downscale, default resolution, steps, cfg)
FAMILIES = {"sd15": ("SD15", SD15, 4, 8, 512, 30, 7.0), "sdxl": ("SDXL", SDXL, 4, 8, 1024, 30, 7.0),
            "flux": ("Flux", FLUX_DEV, 16, 8, 1024, 28, 1.0)}


def tiny(family):
    from comfy_inprocess import SD15_UNET
    if family == "sd15":
        return dict(SD15_UNET)
    if family == "sdxl":
        return {**SDXL, "num_res_blocks": [6], "channel_mult": [1], "transformer_depth": [0, 0, 2, 2, 10, 10],
                "transformer_depth_output": [0] * 7, "transformer_depth_middle": -2}
    return {**FLUX_DEV, "depth": 1, "depth_single_blocks": 1}


def conds(family, batch, device):
    g = torch.Generator().manual_seed(0)
    if family == "sd15":
        c = [[torch.randn(batch, 77, 768, generator=g), {}]]
    elif family == "sdxl":
        c = [[torch.randn(batch, 77, 2048, generator=g), {"pooled_output": torch.randn(batch, 1280, generator=g)}]]
    else:
        c = [[torch.randn(batch, 256, 4096, generator=g), {"pooled_output": torch.randn(batch, 768, generator=g),
                                                            "guidance": 3.5}]]
    neg = [[torch.zeros_like(c[0][0]), {k: (torch.zeros_like(v) if torch.is_tensor(v) else v) for k, v in c[0][1].items()}]]
    return c, neg


def build(family, cfg, dtype, device):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    mc = getattr(sm, FAMILIES[family][0])(dict(cfg))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1)
            else:
                p.zero_()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sampling_inputs(family, batch, res, device):
    """noise, empty latent and the positive / negative conditioning of one sampling run (fixed seeds)."""
    ch, down = FAMILIES[family][2], FAMILIES[family][3]
    latent = torch.zeros(batch, ch, res // down, res // down)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return (noise, latent, *conds(family, batch, device))


def sample(patcher, family, batch, res, steps, cfg, device, warm_steps=2):
    """Seconds for `steps` denoising steps, the peak VRAM (GiB) of that run, the warm-up's seconds and the
    output latent, through comfy.sample.sample. A compiled model warms up with the timed run's step count:
    dynamo guards on the sampling schedule's length, so a shorter warm-up leaves a recompile (8-16 s on the
    H200) inside the timed run (seen in the first GPU run of --compile, whose step times were 10x eager)."""
    import comfy.model_management as mm
    import comfy.sample
    noise, latent, pos, neg = sampling_inputs(family, batch, res, device)
    mm.load_models_gpu([patcher])
    sync()
    t0 = time.perf_counter()
    comfy.sample.sample(patcher, noise, warm_steps, cfg, "euler", "normal", pos, neg, latent, seed=1)  # warm-up (compiles)
    sync()
    warm = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gc.collect()  # the calibration's garbage is collected before, not inside, the first timed run after it
    sync()
    t0 = time.perf_counter()
    out = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=1)
    sync()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    assert torch.isfinite(out).all(), "sampling produced non-finite latents"
    return dt, peak, warm, out.float().cpu()


def sync_sites(patcher, family, res, cfg_scale, device):
    """Where one sampling run waits for the GPU outside this script's own timing syncs: torch's sync debug mode
    warns at every synchronizing CUDA call; returns {'file:line': count} of the Python lines that made them."""
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample(patcher, family, 1, res, 2, cfg_scale, device)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sites = {}
    for w in caught:
        if "synchroniz" in str(w.message) and not w.filename.endswith("bench_e2e.py"):
            key = f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    return sites


def sample_row(row, tag, patcher, family, b, res, steps, cfg_scale, device, compile_backend):
    """Eager (and with --compile, TorchCompileModel with that backend) timings of one model into `row`."""
    dt, peak, _, eager = sample(patcher, family, b, res, steps, cfg_scale, device)
    row[f"b{b}_step{tag}_s"], row[f"b{b}_peak{tag}_gib"] = dt / steps, peak
    if os.environ.get("SVDQ_BENCH_SYNC_SITES") == "1" and b == 1 and device.type == "cuda":
        row[f"sync_sites{tag}"] = sync_sites(patcher, family, res, cfg_scale, device)
        print(f"   sync sites, {tag}: {row[f'sync_sites{tag}']}", flush=True)
    if compile_backend:
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        compiled = patcher.clone()
        set_torch_compile_wrapper(model=compiled, backend=compile_backend)
        row["compile_backend"] = compile_backend
        dt, _, warm, out = sample(compiled, family, b, res, steps, cfg_scale, device, warm_steps=steps)
        row[f"b{b}_step{tag}c_s"], row[f"b{b}_compile{tag}_s"] = dt / steps, warm
        row[f"b{b}_compiled_vs_eager{tag}"] = float((out - eager).norm() / eager.norm())
        torch._dynamo.reset()


KERNEL_CATEGORIES = (  # (category, substrings of the kernel name), first match wins
    ("4-bit quantize + LoRA-down", ("quant_lora_down", "quant_i8_ratio")),
    ("4-bit GEMM + LoRA-up", ("gemm_sm90", "gemm_mma_s4")),
    ("fused FLUX block ops", ("qk_norm_rope", "concat_rows", "ln_modulate")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("16-bit GEMM (cuBLAS)", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_")),
    ("copies", ("memcpy", "memset", "copy", "cat", "index")),
    ("norms / elementwise", ("elementwise", "vectorized", "reduce", "norm", "softmax", "triton")),
)


def kernel_category(name):
    low = name.lower()
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_step(patcher, family, batch, res, cfg, device):
    """GPU time (ms) per kernel category of one denoising step (torch.profiler), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    import comfy.sample
    noise, latent, pos, neg = sampling_inputs(family, batch, res, device)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        comfy.sample.sample(patcher, noise, 1, cfg, "euler", "normal", pos, neg, latent, seed=1)
        sync()
    cats, kernels = {}, []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or 0
        if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cat = kernel_category(e.key)
        cats[cat] = cats.get(cat, 0.0) + t / 1e3
        kernels.append((t / 1e3, e.count, e.key[:120]))
    kernels.sort(reverse=True)
    return {"ms_per_category": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "gpu_ms": sum(cats.values()),
            "top_kernels": [{"ms": t, "calls": n, "name": k} for t, n, k in kernels[:15]]}


def _code_place(path: str) -> str:
    """Where a profiled function's code lives (cProfile names C functions' file "~")."""
    if path == "~":
        return "built-in (C)"
    if "/ComfyUI/" in path:
        return "ComfyUI"
    if "/torch/" in path:
        return "torch (Python)"
    if "-packages/" in path or not path.startswith(str(ROOT)):  # the venv lives inside the repository
        return "other Python"
    return "svdquant pack"


def host_profile(patcher, family, res, cfg, device, steps=5, top=25):
    """Where the host (Python) time of a step goes: cProfile over `steps` denoising steps at batch 1 (after a
    one-step warm-up), per step: the profiled wall time, the functions with most own time, and own time summed by
    where the code lives (this pack, ComfyUI, torch's Python, built-ins: C functions incl. kernel launches). cProfile
    slows every Python call, so compare the 4-bit and 16-bit tables of one run, not these times with the step's.
    Also the pack's functions with most cumulative time (the 4-bit layers' whole host time per step)."""
    import cProfile
    import pstats
    import comfy.sample
    noise, latent, pos, neg = sampling_inputs(family, 1, res, device)
    comfy.sample.sample(patcher, noise, 1, cfg, "euler", "normal", pos, neg, latent, seed=1)
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=1)
    sync()
    prof.disable()
    wall = time.perf_counter() - t0
    rows, by_place = [], {}
    for (path, line, name), (_, ncalls, own, cum, _) in pstats.Stats(prof).stats.items():
        place = _code_place(path)
        by_place[place] = by_place.get(place, 0.0) + own / steps * 1e3
        where = name if path == "~" else f"{pathlib.Path(path).name}:{line}({name})"
        rows.append((own / steps * 1e3, cum / steps * 1e3, ncalls / steps, where, place))
    rows.sort(reverse=True)
    pack = sorted((r for r in rows if r[4] == "svdquant pack"), key=lambda r: -r[1])
    return {"steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "own_ms_per_step_by_place": dict(sorted(by_place.items(), key=lambda kv: -kv[1])),
            "top_own": [{"own_ms": o, "cum_ms": c, "calls": n, "function": w} for o, c, n, w, _ in rows[:top]],
            "pack_top_cum": [{"own_ms": o, "cum_ms": c, "calls": n, "function": w} for o, c, n, w, _ in pack[:10]]}


def interleaved(row, p16, q, family, args, res, steps, cfg_scale, device):
    """--interleave N: N rounds of (16-bit run, 4-bit run) per batch size, alternating, so that the host's drift
    (batch-1 SD timings moved by up to 40 % between single runs on the H200 machine) hits both models alike; each
    round's ratio, and their median and range. Both models stay loaded (ComfyUI moves them as memory allows)."""
    for b in args.batch:
        t16, t4 = [], []
        for _ in range(args.interleave):
            t16.append(sample(p16, family, b, res, steps, cfg_scale, device)[0] / steps)
            t4.append(sample(q, family, b, res, steps, cfg_scale, device)[0] / steps)
        ratios = sorted(a / c for a, c in zip(t4, t16))
        row[f"b{b}_ab_step16_s"], row[f"b{b}_ab_step4_s"], row[f"b{b}_ab_ratios"] = t16, t4, ratios
        row[f"b{b}_ab_ratio_median"] = statistics.median(ratios)


def sample_capped(row, patcher, family, res, steps, cfg_scale, device, cap_gib):
    """Batch-1 sampling as on a GPU with `cap_gib` GiB for this process (see the module docstring):
    ComfyUI's free-memory query answers cap − what torch holds, and the allocator refuses more than cap."""
    import gc
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    cap = int(cap_gib * 2 ** 30)
    total = torch.cuda.mem_get_info()[1]
    real_free = mm.get_free_memory

    def capped_free(dev=None, torch_free_too=False):
        if dev is not None and torch.device(dev).type != "cuda":
            return real_free(dev, torch_free_too)
        torch_free = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        free = max(0, cap - torch.cuda.memory_reserved()) + torch_free
        return (free, torch_free) if torch_free_too else free
    mm.get_free_memory = capped_free
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    torch.cuda.reset_peak_memory_stats()
    row["vram_cap_gib"] = cap_gib
    row["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    try:
        dt, peak, _, _ = sample(patcher, family, 1, res, steps, cfg_scale, device)
        row["b1_step4cap_s"], row["b1_peak4cap_gib"] = dt / steps, peak
        row["b1_reserved4cap_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    except torch.OutOfMemoryError as e:  # record what ComfyUI planned; the other measurements stay
        row["cap_error"] = str(e).split("\n")[0][:300]
        row["cap_plan"] = [{"loaded_gib": lm.model.loaded_size() / 2 ** 30, "model_gib": lm.model.model_size() / 2 ** 30}
                           for lm in mm.current_loaded_models]
        row["cap_torch_gib"] = {"allocated": torch.cuda.memory_allocated() / 2 ** 30,
                                "reserved": torch.cuda.memory_reserved() / 2 ** 30,
                                "peak_allocated": torch.cuda.max_memory_allocated() / 2 ** 30}
        print(f"   {cap_gib:g} GiB cap: out of memory: plan {row['cap_plan']}, torch {row['cap_torch_gib']}", flush=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        mm.get_free_memory = real_free
        mm.unload_all_models()
        mm.soft_empty_cache()


def weight_bytes(patcher):
    return sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())


def run_family(family, args, dtype, device, checkpoint=lambda row: None):
    """One family's row; `checkpoint(row)` is called after each stage so a killed run keeps what it measured."""
    from comfyui_svdquant.core.config import QuantConfig
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    import comfy.model_management as mm
    cls, cfg, _, _, res, steps, cfg_scale = FAMILIES[family]
    cfg = tiny(family) if args.tiny else dict(cfg)
    if family == "flux" and args.flux_depth:
        cfg["depth"], cfg["depth_single_blocks"] = args.flux_depth
    res = args.res or (64 if args.tiny else res)
    steps = args.steps or steps
    t0 = time.perf_counter()
    p16 = build(family, cfg, dtype, device)
    row = {"family": family, "config": {k: cfg[k] for k in ("depth", "depth_single_blocks") if k in cfg},
           "res": res, "steps": steps, "build_s": time.perf_counter() - t0, "bytes_16": weight_bytes(p16)}
    for b in ([] if args.skip_16bit else args.batch):
        sample_row(row, "16", p16, family, b, res, steps, cfg_scale, device, args.compile)
    if args.profile and not args.skip_16bit:
        row["profile16"] = profile_step(p16, family, 1, res, cfg_scale, device)
    if args.host_profile and not args.skip_16bit:
        row["host16"] = host_profile(p16, family, res, cfg_scale, device)
    if args.fused_16bit and family == "flux":  # the 16-bit model with the same fused block forward (a clone: the
        from comfyui_svdquant.wrappers.flux_blocks import install_fused_flux_blocks  # calibration sees ComfyUI's)
        p16f = p16.clone()
        install_fused_flux_blocks(p16f)
        sample_row(row, "16f", p16f, family, 1, res, steps, cfg_scale, device, None)
        if args.profile:
            row["profile16f"] = profile_step(p16f, family, 1, res, cfg_scale, device)
        del p16f
    checkpoint(row)
    qcfg = QuantConfig(alpha_grid=(0.5,)) if args.fast_quant else QuantConfig()
    if args.share_qkv:
        qcfg = dataclasses.replace(qcfg, share_inputs=True)
    pos, neg = conds(family, 1, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{family}_svdq.safetensors")
        sync()
        t0 = time.perf_counter()
        q, _, report = calibrate_and_quantize(p16, [(pos, neg)] * args.calib_samples, qcfg, args.calib_steps,
                                              cfg_scale, "euler", "normal", 0, res, res, save_path=path)
        sync()
        row["quantize_s"] = time.perf_counter() - t0  # includes the save
        row["file_bytes"] = os.path.getsize(path)
        row["layers_4bit"] = len(report["layers"])
        row["quantize_phases_s"] = dict(report["time_s"])
        checkpoint(row)
        del q
        p16.model.to("cpu")
        if not args.interleave:
            del p16
        mm.soft_empty_cache()
        t0 = time.perf_counter()
        q, _ = load_svdquant_model(path, compute_dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
                                   weights_in_vram=args.weights_in_vram)
        row["weights_in_vram"] = args.weights_in_vram
        row["load_s"] = time.perf_counter() - t0
    row["bytes_4"] = weight_bytes(q)
    for b in args.batch:
        sample_row(row, "4", q, family, b, res, steps, cfg_scale, device, args.compile)
        if args.skip_16bit:
            continue
        row[f"b{b}_step_ratio"] = row[f"b{b}_step4_s"] / row[f"b{b}_step16_s"]
        if args.compile:
            row[f"b{b}_step_ratio_compiled"] = row[f"b{b}_step4c_s"] / row[f"b{b}_step16c_s"]
    if args.profile:
        row["profile4"] = profile_step(q, family, 1, res, cfg_scale, device)
    if args.host_profile:
        row["host4"] = host_profile(q, family, res, cfg_scale, device)
    checkpoint(row)
    if args.unfused_too and family == "flux":  # the same 4-bit model through ComfyUI's own block forward
        from comfyui_svdquant.wrappers.flux_blocks import remove_fused_flux_blocks
        row["fused_blocks_removed"] = remove_fused_flux_blocks(q)
        sample_row(row, "4u", q, family, 1, res, steps, cfg_scale, device, None)
        if args.profile:
            row["profile4u"] = profile_step(q, family, 1, res, cfg_scale, device)
        checkpoint(row)
    if args.share_qkv and args.ungrouped_too:  # the same 4-bit model with each input quantized per layer
        from comfyui_svdquant.core.input_group import detach_input_groups
        grouped = [(m, m._input_group) for m in q.model.diffusion_model.modules()
                   if getattr(m, "_input_group", None) is not None]
        row["input_groups_detached"] = detach_input_groups(q.model.diffusion_model)
        sample_row(row, "4a", q, family, 1, res, steps, cfg_scale, device, None)
        if args.profile:
            row["profile4a"] = profile_step(q, family, 1, res, cfg_scale, device)
        for m, g in grouped:  # and grouped once more, after the detached run: order effects show as a difference
            m._input_group = g
        sample_row(row, "4g", q, family, 1, res, steps, cfg_scale, device, None)
        checkpoint(row)
    if args.row_base_too:  # the same 4-bit model with one activation base per row (kernel 2e, docs/KERNELS.md §6c)
        os.environ["SVDQ_ROW_BASE"] = "1"  # read by prepare_weights; dropping the layers' cache re-prepares them
        layers = [m for m in q.model.diffusion_model.modules() if hasattr(m, "_prepared")]
        for m in layers:
            m._prepared = None
        row["row_base_layers"] = len(layers)
        sample_row(row, "4r", q, family, 1, res, steps, cfg_scale, device, None)
        if args.profile:
            row["profile4r"] = profile_step(q, family, 1, res, cfg_scale, device)
        del os.environ["SVDQ_ROW_BASE"]
        checkpoint(row)
    if args.interleave:
        interleaved(row, p16, q, family, args, res, steps, cfg_scale, device)
        del p16
        checkpoint(row)
    if args.vram_cap:
        sample_capped(row, q, family, res, steps, cfg_scale, device, args.vram_cap)
    row["bytes_ratio"] = row["bytes_4"] / row["bytes_16"]
    del q
    mm.soft_empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", nargs="+", default=["sd15"], choices=list(FAMILIES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=0, help="denoising steps timed (default: the family's)")
    ap.add_argument("--res", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=1)
    ap.add_argument("--calib-steps", type=int, default=2)
    ap.add_argument("--fast-quant", action="store_true", help="one smoothing strength instead of the search")
    ap.add_argument("--share-qkv", action="store_true",
                    help="quantize q/k/v (and k/v on the text) as input groups: one activation pass per group")
    ap.add_argument("--row-base-too", action="store_true",
                    help="also time the 4-bit model with one activation base per row (SVDQ_ROW_BASE=1, kernel 2e)")
    ap.add_argument("--ungrouped-too", action="store_true",
                    help="with --share-qkv: also time the same 4-bit model with its groups detached (row '4a')")
    ap.add_argument("--flux-depth", nargs=2, type=int, default=None, metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny configs (plumbing check)")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, choices=["inductor", "cudagraphs"],
                    help="also time both models under TorchCompileModel with this backend (default inductor)")
    ap.add_argument("--vram-cap", type=float, default=0, metavar="GIB",
                    help="also sample the 4-bit model (batch 1) as on a GPU with this many GiB free (CUDA only)")
    ap.add_argument("--alloc-conf", default="backend:cudaMallocAsync",
                    help="PYTORCH_CUDA_ALLOC_CONF for a --vram-cap run (default: what ComfyUI's main.py sets)")
    ap.add_argument("--comfy-allocator", action="store_true",
                    help="run everything with --alloc-conf (ComfyUI's own default, cudaMallocAsync), not only a "
                         "--vram-cap run: the allocator users get; earlier rows used torch's native one")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel category of one step (torch.profiler)")
    ap.add_argument("--host-profile", action="store_true",
                    help="host (Python) time of a step by function and by package (cProfile), both models")
    ap.add_argument("--skip-16bit", action="store_true", help="do not time the 16-bit model (quantize it only)")
    ap.add_argument("--verbose", action="store_true", help="show the pack's INFO log (calibration progress per layer)")
    ap.add_argument("--weights-in-vram", default="fast", choices=["fast", "compact"],
                    help="Load SVDQuant Model's weights_in_vram for the 4-bit model (Hopper: int8 copy or packed)")
    ap.add_argument("--unfused-too", action="store_true",
                    help="FLUX: also time the 4-bit model without the fused block forward (wrappers/flux_blocks.py)")
    ap.add_argument("--fused-16bit", action="store_true",
                    help="FLUX: also time the 16-bit model with the fused block forward (wrappers/flux_blocks.py)")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="also time N alternating (16-bit, 4-bit) rounds per batch size (both models kept loaded)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if (args.vram_cap or args.comfy_allocator) and args.alloc_conf and \
            os.environ.get("PYTORCH_CUDA_ALLOC_CONF") != args.alloc_conf:
        # torch fixes the allocator backend when it loads: start again with the setting in the environment
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": args.alloc_conf})
    on_gpu = torch.cuda.is_available()
    if args.vram_cap and not on_gpu:
        ap.error("--vram-cap needs a CUDA GPU")
    os.environ["SVDQ_COMFY_DEVICE"] = "cuda" if on_gpu else "cpu"
    from comfy_inprocess import import_comfy
    import_comfy()
    if args.verbose:
        import logging
        logging.getLogger().setLevel(logging.INFO)
    from comfyui_svdquant import kernels
    dtype = torch.bfloat16 if on_gpu else torch.float32
    device = torch.device("cuda" if on_gpu else "cpu")
    gpu = torch.cuda.get_device_name() if on_gpu else "cpu"
    backend = kernels.backend_name(device, 'int_ratio', packed=args.weights_in_vram == 'compact')
    print(f"GPU: {gpu}  torch {torch.__version__}  driver {_driver()}  4-bit backend {backend}")
    rows = []

    def save(partial=None):
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "driver": _driver(),
                                                           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                                                           "rows": rows + ([partial] if partial else [])}, indent=1))

    def checkpoint(row):
        save(row)
        print("   so far: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items() if not isinstance(v, dict)), flush=True)
    for fam in args.family:  # each family's result is printed and saved as soon as it exists
        r = run_family(fam, args, dtype, device, checkpoint)
        rows.append(r)
        print(f"{r['family']} {r['config'] or ''} {r['res']}px {r['steps']} steps: weights {r['bytes_16'] / 2**30:.2f} -> "
              f"{r['bytes_4'] / 2**30:.2f} GiB ({r['bytes_ratio']:.2f}x), file {r['file_bytes'] / 2**30:.2f} GiB, "
              f"{r['layers_4bit']} 4-bit linears, quantize {r['quantize_s']:.1f} s, load {r['load_s']:.1f} s", flush=True)
        for b in ([] if args.skip_16bit else args.batch):
            print(f"   batch {b}: step {r[f'b{b}_step16_s'] * 1e3:8.1f} ms -> {r[f'b{b}_step4_s'] * 1e3:8.1f} ms "
                  f"({r[f'b{b}_step_ratio']:.2f}x), peak VRAM {r[f'b{b}_peak16_gib']:.2f} -> {r[f'b{b}_peak4_gib']:.2f} GiB",
                  flush=True)
            if args.compile:
                print(f"   batch {b}, TorchCompileModel ({args.compile}): step {r[f'b{b}_step16c_s'] * 1e3:8.1f} ms -> "
                      f"{r[f'b{b}_step4c_s'] * 1e3:8.1f} ms ({r[f'b{b}_step_ratio_compiled']:.2f}x), compile "
                      f"{r[f'b{b}_compile16_s']:.0f} / {r[f'b{b}_compile4_s']:.0f} s, compiled vs eager "
                      f"{r[f'b{b}_compiled_vs_eager16']:.1e} / {r[f'b{b}_compiled_vs_eager4']:.1e}", flush=True)
        for b in args.batch:
            if f"b{b}_ab_ratios" in r:
                t16, t4, q = r[f"b{b}_ab_step16_s"], r[f"b{b}_ab_step4_s"], r[f"b{b}_ab_ratios"]
                print(f"   batch {b}, {len(q)} interleaved rounds: step 16-bit {statistics.median(t16) * 1e3:.1f} ms, "
                      f"4-bit {statistics.median(t4) * 1e3:.1f} ms (medians); 4-bit / 16-bit per round: median "
                      f"{r[f'b{b}_ab_ratio_median']:.2f}x, range {q[0]:.2f}-{q[-1]:.2f}x", flush=True)
        print("   quantize phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["quantize_phases_s"].items()), flush=True)
        if args.vram_cap and "b1_step4cap_s" in r:
            print(f"   batch 1 with {r['vram_cap_gib']:g} GiB free (low-VRAM load): step {r['b1_step4cap_s'] * 1e3:8.1f} ms, "
                  f"peak allocated {r['b1_peak4cap_gib']:.2f} GiB, reserved {r['b1_reserved4cap_gib']:.2f} GiB", flush=True)
        if "b1_step16f_s" in r:
            print(f"   batch 1, 16-bit with the fused blocks: step {r['b1_step16f_s'] * 1e3:8.1f} ms; 4-bit / 16-bit, both "
                  f"fused: {r['b1_step4_s'] / r['b1_step16f_s']:.2f}x", flush=True)
        if "b1_step4u_s" in r:
            print(f"   batch 1, 4-bit without the fused blocks: step {r['b1_step4u_s'] * 1e3:8.1f} ms "
                  f"({r['b1_step4u_s'] / r['b1_step16_s'] if 'b1_step16_s' in r else float('nan'):.2f}x)", flush=True)
        variants = (  # (tag, what the 4-bit model ran with, the ratio's name, its numerator's and denominator's tags)
            ("4a", f"its {r.get('input_groups_detached')} input groups detached", "grouped / detached", "4", "4a"),
            ("4g", "its input groups again, after that", "grouped again / detached", "4g", "4a"),
            ("4r", f"row bases ({r.get('row_base_layers')} layers re-prepared)", "row / chunk", "4r", "4"))
        for tag, what, name, num, den in variants:
            if f"b1_step{tag}_s" in r:
                print(f"   batch 1, 4-bit with {what}: step {r[f'b1_step{tag}_s'] * 1e3:8.1f} ms; {name} "
                      f"{r[f'b1_step{num}_s'] / r[f'b1_step{den}_s']:.2f}x", flush=True)
        for tag in ("16", "4"):
            if f"host{tag}" in r:
                h = r[f"host{tag}"]
                print(f"   host time, {tag}-bit (cProfile, {h['wall_ms_per_step']:.1f} ms per profiled step): " + ", ".join(
                    f"{k} {v:.1f}" for k, v in h["own_ms_per_step_by_place"].items()), flush=True)
                for e in h["top_own"][:8] + h["pack_top_cum"][:3]:
                    print(f"      {e['own_ms']:7.2f} ms own {e['cum_ms']:8.2f} cum {e['calls']:7.0f} calls  {e['function']}",
                          flush=True)
        for tag in ("16", "16f", "4", "4u", "4a", "4r"):
            if f"profile{tag}" in r:
                pr = r[f"profile{tag}"]
                print(f"   one step, {tag}-bit, GPU {pr['gpu_ms']:.1f} ms: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in pr["ms_per_category"].items()), flush=True)
        save()


def _driver():
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
