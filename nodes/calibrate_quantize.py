import comfy.samplers

from ..core.config import QuantConfig, RankPolicy
from ..wrappers.quantize import calibrate_and_quantize, unique_path
from . import folders

DEFAULTS = QuantConfig()
DEFAULT_ALPHAS = DEFAULTS.alpha_grid
SMOOTHING = {"search": "alpha", "search 39 (reference grid)": "reference39", "off": None}


def _conditionings(positive, negative, clip, prompts, samples):
    """Per calibration sample a (positive, negative) pair: the given ones, or prompts encoded with `clip`."""
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    if lines:
        if clip is None:
            raise ValueError("prompts were given but no CLIP is connected to encode them")
        def enc(t):
            return clip.encode_from_tokens_scheduled(clip.tokenize(t))
        empty = enc("")
        encoded = [enc(t) for t in lines]
        return [(encoded[i % len(encoded)], empty) for i in range(samples)]
    if positive is None:
        raise ValueError("connect positive/negative conditioning, or a CLIP and some prompts")
    return [(positive, negative if negative is not None else positive)] * samples


class CalibrateAndQuantize:
    DESCRIPTION = ("Runs a few denoising passes of the model with ComfyUI's sampler to capture each linear layer's "
                   "inputs, then quantizes the layers to 4 bits the SVDQuant way (smoothing + 16-bit low-rank branch "
                   "+ INT4 residual). Returns the 4-bit MODEL at once (the input model stays intact) and can save it.")
    CATEGORY = "SVDQuant"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The 4-bit model.", "Per-layer rank, smoothing, error before (naive W4A4) and after, bytes.")
    FUNCTION = "quantize"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The 16-bit model to quantize (from Load Checkpoint or Load Diffusion Model)."}),
                "calibration_samples": ("INT", {"default": 4, "min": 0, "max": 1024, "tooltip": "Sampler runs whose activations calibrate the quantizer."}),
                "steps": ("INT", {"default": 8, "min": 1, "max": 200, "tooltip": "Denoising steps per calibration run: activations of every step are captured."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Guidance of the calibration runs (use 1.0 for FLUX)."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler", "tooltip": "Sampler of the calibration runs (as in KSampler); use the one you will generate with."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal", "tooltip": "Noise schedule of the calibration runs (as in KSampler); simple for FLUX."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "Seed of the calibration noise and of the row sampling."}),
                "width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Width in pixels of the calibration images (the latent is 1/8 of it): use the size you will generate at."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Height in pixels of the calibration images."}),
                "rank": ("INT", {"default": 32, "min": 0, "max": 1024, "step": 8, "tooltip": "Low-rank components per layer (ignored when a rank_policy is connected)."}),
                "smoothing": (list(SMOOTHING), {"default": "search", "tooltip": "search: pick the migration strength α per layer by its output error (11 settings); search 39: the reference toolchain's 39 (α, β) settings (slower); off: no smoothing."}),
                "lowrank_iters": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "At most this many SVDs per layer: the low-rank branch is refitted to what the 4-bit residual misses while the output error falls (1 = one SVD; more: a little lower error, several times slower)."}),
                "skip_layers": ("STRING", {"default": "", "tooltip": "Comma-separated name patterns (fnmatch) of linears to keep 16-bit, on top of the family's defaults."}),
                "save": ("BOOLEAN", {"default": False, "tooltip": "Also save the 4-bit model to models/svdquant (never overwrites)."}),
                "filename_prefix": ("STRING", {"default": "model_svdq_int4", "tooltip": "File name under models/svdquant; a counter is appended."}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Calibration prompt conditioning."}),
                "negative": ("CONDITIONING", {"tooltip": "Calibration negative conditioning (defaults to positive); with prompts, the empty prompt is used."}),
                "rank_policy": ("SVDQUANT_RANK_POLICY", {"tooltip": "From Low-Rank Rank Selector; overrides rank."}),
                "clip": ("CLIP", {"tooltip": "Encodes `prompts`; needed when prompts are given."}),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One calibration prompt per line, encoded with clip; when given they replace positive/negative."}),
                "gptq": ("BOOLEAN", {"default": DEFAULTS.gptq, "tooltip": "GPTQ rounding of the 4-bit residual: the scales stay, the integer codes compensate each other's error through the calibration activations' Hessian. Lower error, slower quantization."}),
                "gptq_hessian_mb": ("INT", {"default": DEFAULTS.gram_budget_mb, "min": 0, "max": 1 << 20, "step": 256, "tooltip": "GPTQ: memory (MiB, on the device running the calibration) for the exact XᵀX over every calibration row, given to layers in order while it lasts; others use the sampled rows. 0 = sampled rows only. Lower error where layers are wide (in_features ≫ 512)."}),
                "share_qkv": ("BOOLEAN", {"default": DEFAULTS.share_inputs, "tooltip": "Linears fed the same input (SD's attention q/k/v, k/v on the text) share one smoothing vector and one low-rank down projection fitted on their concatenated weight; the loaded model then runs each such group as one 4-bit GEMM (fewer kernel launches per step). Costs a little accuracy at the same rank (docs/CALIBRATION.md 6d)."}),
                "unsigned_gelu": ("BOOLEAN", {"default": DEFAULTS.unsigned_acts, "tooltip": "FLUX: the inputs of the MLPs' second linears (after GELU) are shifted to >= 0 and quantized to [0, 15]. No CUDA kernel reads such layers: they run on the slow pure-torch path."}),
                "outlier_k": ("FLOAT", {"default": DEFAULTS.outlier_k_std, "min": 3.0, "max": 5.0, "step": 0.5, "tooltip": "Report: an input channel counts as an outlier when its largest |x| exceeds the mean over channels by this many standard deviations."}),
                "act16_modulation": ("BOOLEAN", {"default": DEFAULTS.act16_inputs, "tooltip": "FLUX: the adaLN modulation linears, which read one embedding vector per image, keep 16-bit inputs (their weights stay 4-bit). Their 4-bit inputs were the whole gap to weight-only 4-bit on our trained FLUX-style model; they run with one row per image, so 4-bit inputs would buy no speed. Off: 4-bit inputs everywhere."}),
                "lowrank_refit": ("BOOLEAN", {"default": DEFAULTS.lowrank_refit, "tooltip": "After the residual is quantized, refit the low-rank branch to what the 4-bit residual misses, weighted by the calibration activations; kept per layer only where it lowers the output error. A little lower error (+0.1 to +0.8 dB on our trained models), slower quantization."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def quantize(self, model, calibration_samples, steps, cfg, sampler_name, scheduler, seed, width, height, rank,
                 smoothing, lowrank_iters, skip_layers, save, filename_prefix, positive=None, negative=None,
                 rank_policy=None, clip=None, prompts="", gptq=DEFAULTS.gptq,
                 gptq_hessian_mb=DEFAULTS.gram_budget_mb, share_qkv=DEFAULTS.share_inputs,
                 unsigned_gelu=DEFAULTS.unsigned_acts, outlier_k=DEFAULTS.outlier_k_std,
                 act16_modulation=DEFAULTS.act16_inputs, lowrank_refit=DEFAULTS.lowrank_refit, unique_id=None):
        if calibration_samples < 1:
            raise ValueError("calibration_samples is 0: at least one calibration sample is needed")
        if smoothing not in SMOOTHING:
            raise ValueError(f"smoothing must be one of {list(SMOOTHING)}, got {smoothing!r}")
        policy = rank_policy if rank_policy is not None else RankPolicy("fixed", rank=rank)
        grid = SMOOTHING[smoothing]
        qcfg = QuantConfig(rank=policy, alpha_grid=DEFAULT_ALPHAS if grid else (), smooth_grid=grid or "alpha",
                           lowrank_iters=lowrank_iters, gptq=gptq, gram_budget_mb=gptq_hessian_mb,
                           share_inputs=share_qkv,
                           unsigned_acts=unsigned_gelu, outlier_k_std=outlier_k,
                           act16_inputs=act16_modulation, lowrank_refit=lowrank_refit,
                           skip_patterns=tuple(p.strip() for p in skip_layers.split(",") if p.strip()))
        conds = _conditionings(positive, negative, clip, prompts, calibration_samples)
        path = unique_path(folders.save_folder(), filename_prefix.strip()) if save else None
        qmodel, text, _ = calibrate_and_quantize(model, conds, qcfg, steps, cfg, sampler_name, scheduler, seed,
                                                 width, height, save_path=path, node_id=unique_id)
        return {"ui": {"text": [text]}, "result": (qmodel, text)}
