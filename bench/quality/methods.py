"""The 4-bit methods the quality benchmark compares, as data: a name, a kind and the QuantConfig
fields it sets. New quantizer options (core.config.QuantConfig fields added later) are compared by
adding an entry, or from the command line with --method NAME='{"quant": {...}, "rank": {...}}'.

kinds:
  w4a4  : the pack's own path (wrappers.quantize.calibrate_and_quantize: calibration through
          ComfyUI's sampler, per-layer smoothing search, low-rank branch, INT4 weights AND
          activations); "quant" = QuantConfig fields, "rank" = RankPolicy fields.
  w4a16 : weight-only 4-bit baseline (the GGUF-Q4 / NF4 idea): the same layers' weights rounded to
          per-group (64) symmetric INT4 with a float scale per group (the pack's weight quantizer,
          clip search, no calibration data), activations stay 16-bit. Fake-quantized: the dequantized
          weights replace the 16-bit ones, so it measures the rounding, not a kernel.
"""
import copy
import json

METHODS = {
    "naive_w4a4": {"kind": "w4a4", "quant": {"alpha_grid": []}, "rank": {"mode": "fixed", "rank": 0},
                   "label": "naive W4A4 (no smoothing, no low-rank)"},
    "smooth_only": {"kind": "w4a4", "quant": {}, "rank": {"mode": "fixed", "rank": 0},
                    "label": "smoothing only (rank 0)"},
    "svdq_r8": {"kind": "w4a4", "quant": {}, "rank": {"mode": "fixed", "rank": 8}, "label": "SVDQuant rank 8"},
    "svdq_r16": {"kind": "w4a4", "quant": {}, "rank": {"mode": "fixed", "rank": 16}, "label": "SVDQuant rank 16"},
    "svdq_r32": {"kind": "w4a4", "quant": {}, "rank": {"mode": "fixed", "rank": 32}, "label": "SVDQuant rank 32"},
    "svdq_r64": {"kind": "w4a4", "quant": {}, "rank": {"mode": "fixed", "rank": 64}, "label": "SVDQuant rank 64"},
    "svdq_auto_error": {"kind": "w4a4", "quant": {}, "rank": {"mode": "error", "rank": 32, "error_budget": 0.05},
                        "label": "SVDQuant, rank by error budget 0.05 (node default)"},
    "svdq_auto_size": {"kind": "w4a4", "quant": {}, "rank": {"mode": "size", "rank": 32},
                       "label": "SVDQuant, size budget avg rank 32"},
    "w4a16": {"kind": "w4a16", "group_size": 64, "label": "weight-only INT4 g64 (W4A16, fake-quant)"},
}
DEFAULT_ORDER = list(METHODS)


def parse_extra(specs) -> dict:
    """--method NAME=JSON entries (kind w4a4 unless given)."""
    out = {}
    for s in specs or ():
        name, _, js = s.partition("=")
        if not name or not js:
            raise ValueError(f"--method wants NAME=JSON, got {s!r}")
        spec = json.loads(js)
        spec.setdefault("kind", "w4a4")
        spec.setdefault("quant", {})
        spec.setdefault("rank", {"mode": "fixed", "rank": 32})
        spec.setdefault("label", name)
        out[name] = spec
    return out


def quant_config(spec):
    """core.config.QuantConfig for a w4a4 spec (unknown fields fail loudly, naming the method)."""
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    q = copy.deepcopy(spec.get("quant", {}))
    for k in ("alpha_grid", "candidates", "skip_patterns"):
        if k in q:
            q[k] = tuple(q[k])
    r = dict(spec.get("rank", {}))
    if "candidates" in r:
        r["candidates"] = tuple(r["candidates"])
    try:
        return QuantConfig(rank=RankPolicy(**r), **q)
    except TypeError as e:
        raise ValueError(f"method {spec.get('label')}: {e}") from None


def weight_only_int4_(diffusion_model, family, group_size=64):
    """W4A16 fake-quant, in place: the layers the pack would quantize get INT4-rounded weights."""
    import torch
    from comfyui_svdquant.core.calibrate import find_target_linears
    from comfyui_svdquant.core.config import QuantConfig
    from comfyui_svdquant.core.weight_quant import quantize_weight
    from comfyui_svdquant.wrappers.families import DEFAULT_SKIP
    layers = find_target_linears(diffusion_model, QuantConfig(skip_patterns=tuple(DEFAULT_SKIP[family])))
    with torch.no_grad():
        for m in layers.values():
            w = m.weight.float()
            m.weight.copy_(quantize_weight(w, group_size, "float", None, search=True).dequantize(group_size).to(m.weight.dtype))
    return len(layers)


def quantize_trained(family, spec, calib_steps=20, cfg=3.0, sampler="euler", scheduler="normal", calib_seed=1000):
    """The trained fixture of `family` quantized by `spec`: (ModelPatcher, report dict, seconds).
    w4a4: the pack's Calibrate & Quantize path, calibrated by sampler runs on the 10 class captions."""
    import time
    from . import reference_models as rm
    t0 = time.time()
    if spec["kind"] == "w4a16":
        mp = rm.load_trained(family)
        n = weight_only_int4_(mp.model.diffusion_model, family, spec.get("group_size", 64))
        return mp, {"summary": {"layers": n}}, time.time() - t0
    if spec["kind"] != "w4a4":
        raise ValueError(f"method {spec.get('label')}: unknown kind {spec['kind']!r} (w4a4 or w4a16)")
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    qcfg = quant_config(spec)
    size = rm.comfy_size(family)
    qm, _, report = calibrate_and_quantize(rm.load_trained(family), rm.calibration_conds(family), qcfg, calib_steps,
                                           cfg, sampler, scheduler, calib_seed, size, size)
    return qm, report, time.time() - t0
