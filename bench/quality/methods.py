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

# Every calibration option is written out, so a name keeps its meaning when QuantConfig's defaults
# change: the issue-8 tables were measured before GPTQ existed, so their methods are one SVD with
# GPTQ off; GPTQ became the default later (issue 9) and is the "_gptq" names here.
ONE_SVD = {"smooth_grid": "alpha", "lowrank_iters": 1, "gptq": False, "gram_budget_mb": 0,
           "share_inputs": False, "unsigned_acts": False, "lowrank_refit": False, "act16_inputs": False}


def _w4a4(label, rank, families=None, **quant):
    spec = {"kind": "w4a4", "quant": {**ONE_SVD, **quant}, "rank": rank, "label": label}
    if families:
        spec["families"] = list(families)  # the option does something only on these families
    return spec


R32 = {"mode": "fixed", "rank": 32}
METHODS = {
    # issue 8 (one SVD, no GPTQ: what the first QUALITY.md tables measured)
    "naive_w4a4": _w4a4("naive W4A4 (no smoothing, no low-rank, no GPTQ)", {"mode": "fixed", "rank": 0},
                        alpha_grid=[]),
    "smooth_only": _w4a4("smoothing only (rank 0, no GPTQ)", {"mode": "fixed", "rank": 0}),
    "svdq_r8": _w4a4("SVDQuant rank 8 (one SVD, no GPTQ)", {"mode": "fixed", "rank": 8}),
    "svdq_r16": _w4a4("SVDQuant rank 16 (one SVD, no GPTQ)", {"mode": "fixed", "rank": 16}),
    "svdq_r32": _w4a4("SVDQuant rank 32 (one SVD, no GPTQ)", R32),
    "svdq_r64": _w4a4("SVDQuant rank 64 (one SVD, no GPTQ)", {"mode": "fixed", "rank": 64}),
    "svdq_auto_error": _w4a4("SVDQuant, rank by error budget 0.05 (Rank Selector default; no GPTQ)",
                             {"mode": "error", "rank": 32, "error_budget": 0.05}),
    "svdq_auto_size": _w4a4("SVDQuant, size budget avg rank 32 (no GPTQ)", {"mode": "size", "rank": 32}),
    "w4a16": {"kind": "w4a16", "group_size": 64, "label": "weight-only INT4 g64 (W4A16, fake-quant)"},
    # issue 9's options, one at a time on rank 32, then combined
    "svdq_r32_grid39": _w4a4("rank 32 + 39-point (α, β) grid", R32, smooth_grid="reference39"),
    "svdq_r32_refine4": _w4a4("rank 32 + refinement (≤ 4 SVDs)", R32, lowrank_iters=4),
    "svdq_r32_gptq": _w4a4("rank 32 + GPTQ (the default since issue 9)", R32, gptq=True),
    "svdq_r32_refine4_gptq": _w4a4("rank 32 + refinement (≤ 4) + GPTQ", R32, lowrank_iters=4, gptq=True),
    "svdq_r32_unsigned": _w4a4("rank 32 + unsigned post-GELU", R32, families=["flux"], unsigned_acts=True),
    "svdq_r32_gptq_unsigned": _w4a4("rank 32 + GPTQ + unsigned post-GELU", R32, families=["flux"],
                                    gptq=True, unsigned_acts=True),
    "svdq_r32_refine4_gptq_unsigned": _w4a4("rank 32 + refinement (≤ 4) + GPTQ + unsigned post-GELU", R32,
                                            families=["flux"], lowrank_iters=4, gptq=True, unsigned_acts=True),
    # the default since 2026-12-04: FLUX's modulation linears read 16-bit inputs (no such layers in SD1.5/SDXL,
    # where it equals svdq_r32_gptq)
    "svdq_r32_gptq_act16": _w4a4("rank 32 + GPTQ + 16-bit modulation inputs (the default)", R32, gptq=True,
                                 act16_inputs=True),
    "svdq_r32_gptq_refit": _w4a4("rank 32 + GPTQ + activation-weighted branch refit", R32, gptq=True,
                                 lowrank_refit=True),
    "svdq_r64_gptq": _w4a4("SVDQuant rank 64 + GPTQ", {"mode": "fixed", "rank": 64}, gptq=True),
    # input groups (q/k/v, k/v on the text) sharing one smoothing vector and proj_down: one activation pass per group
    # at run time (core/input_group.py); no such groups in FLUX (its q/k/v is one linear already)
    "svdq_r32_gptq_shared": _w4a4("rank 32 + GPTQ + shared q/k/v input", R32, families=["sd15", "sdxl"], gptq=True,
                                  share_inputs=True),
    "svdq_r64_gptq_shared": _w4a4("rank 64 + GPTQ + shared q/k/v input", {"mode": "fixed", "rank": 64},
                                  families=["sd15", "sdxl"], gptq=True, share_inputs=True),
    "svdq_auto_error_gptq": _w4a4("SVDQuant, rank by error budget 0.05 + GPTQ",
                                  {"mode": "error", "rank": 32, "error_budget": 0.05}, gptq=True),
    "svdq_auto_size_gptq": _w4a4("SVDQuant, size budget avg rank 32 + GPTQ", {"mode": "size", "rank": 32}, gptq=True),
}
# The first QUALITY.md tables (issue 8) and the calibration-option ladder (issue 9).
ISSUE8 = ["naive_w4a4", "smooth_only", "svdq_r8", "svdq_r16", "svdq_r32", "svdq_r64", "svdq_auto_error",
          "svdq_auto_size", "w4a16"]
LADDER = ["naive_w4a4", "smooth_only", "svdq_r32", "svdq_r32_grid39", "svdq_r32_refine4", "svdq_r32_gptq",
          "svdq_r32_refine4_gptq", "svdq_r32_unsigned", "svdq_r32_gptq_unsigned", "svdq_r32_refine4_gptq_unsigned",
          "w4a16"]
DEFAULT_ORDER = list(METHODS)


def applies(spec, family) -> bool:
    """False for a method whose option has no layer to act on in this family (e.g. unsigned post-GELU
    activations outside FLUX): measuring it would only repeat the method without the option."""
    return family in spec.get("families", [family])


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
