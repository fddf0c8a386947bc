"""Calibration options on synthetic outlier-heavy layers: output error and CPU time per method (issue 9).

Layers: SD1.5 / SDXL / FLUX.1 shapes with random weights and activations built to look like a
diffusion model's (tests/synthetic.py: correlated heavy-tailed tokens, log-normal channel
magnitudes, a few 20–100× outlier channels, weights with a steep top spectrum; post-GELU inputs
for the MLP's second linear where the family has a plain GELU). Random weights are not trained
weights: these numbers rank the methods on such layers, they say nothing about image quality.

Each method quantizes the layer from 2048 calibration rows (statistics over all, 512 sampled rows
for scoring, as QuantConfig.sample_rows) and is evaluated on 1024 held-out rows through the stored
tensors and the reference kernel path: relative output error ||Ŷ − Y|| / ||X Wᵀ||. The error on
the calibration sample (what the per-layer report shows) is printed too: GPTQ fits that sample.

    python bench/bench_calibration.py                       # SD1.5 + SDXL shapes, 2 seeds
    python bench/bench_calibration.py --family flux --seeds 1
    python bench/bench_calibration.py --json bench/results/calibration_cpu.json
"""
import argparse
import json
import os
import pathlib
import platform
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (registers the comfyui_svdquant package alias)
from synthetic import lowrankish_weight, realistic_activations  # noqa: E402

from comfyui_svdquant.core.calibrate import GELU_SHIFT  # noqa: E402
from comfyui_svdquant.core.config import QuantConfig  # noqa: E402
from comfyui_svdquant.core.layer_quant import LayerProblem, _plain_quant, fake_quant_act  # noqa: E402
from comfyui_svdquant.core.qlinear import SVDQuantLinear  # noqa: E402
from comfyui_svdquant.core.stats import ActivationStats  # noqa: E402
from comfyui_svdquant.core.timing import PhaseTimer  # noqa: E402

# (label, out N, in K, post-GELU input)
LAYERS = {
    "sd15": [("sd15 attn1.to_q 320x320", 320, 320, False), ("sd15 ff.net.0.proj 2560x320", 2560, 320, False),
             ("sd15 ff.net.2 320x1280", 320, 1280, False)],
    "sdxl": [("sdxl attn1.to_q 1280x1280", 1280, 1280, False), ("sdxl ff.net.2 1280x5120", 1280, 5120, False)],
    "flux": [("flux img_attn.qkv 9216x3072", 9216, 3072, False), ("flux img_mlp.2 3072x12288 (GELU)", 3072, 12288, True)],
    "gelu": [("post-GELU 640x2560", 640, 2560, True), ("post-GELU 1280x5120", 1280, 5120, True)],
}

BASE = dict(scale_mode="int_ratio", gptq=False)  # every option explicit: defaults change
# name -> (QuantConfig fields, rank, use the exact XᵀX of all calibration rows for GPTQ, unsigned activations)
METHODS = {
    "smooth only": (dict(), 0, False, False),
    "SVDQuant": (dict(), 32, False, False),
    "+grid39": (dict(smooth_grid="reference39"), 32, False, False),
    "+refine": (dict(lowrank_iters=8), 32, False, False),
    "+gptq": (dict(gptq=True), 32, False, False),
    "+gptq(XtX)": (dict(gptq=True, gram_budget_mb=4096), 32, True, False),
    "+refine+gptq": (dict(lowrank_iters=8, gptq=True), 32, False, False),
    "+gptq+refit": (dict(gptq=True, lowrank_refit=True), 32, False, False),
    "+grid39+refine+gptq": (dict(smooth_grid="reference39", lowrank_iters=8, gptq=True), 32, False, False),
    "+unsigned": (dict(), 32, False, True),
    "+refine+gptq+unsigned": (dict(lowrank_iters=8, gptq=True), 32, False, True),
}
CAL_ROWS, SAMPLE_ROWS, EVAL_ROWS = 2048, 512, 1024


DEVICE = torch.device("cpu")  # --device: where the layers are quantized (data is generated on the CPU, then moved)


def make_layer(n, k, post_gelu, seed):
    g = torch.Generator().manual_seed(seed)
    w = lowrankish_weight(n, k, g)
    b = 0.1 * torch.randn(n, generator=g)
    x = realistic_activations(CAL_ROWS + EVAL_ROWS, k, g, post_gelu=post_gelu)
    w, b, x = w.to(DEVICE), b.to(DEVICE), x.to(DEVICE)
    return w, b, x[:CAL_ROWS], x[CAL_ROWS:]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def rel(y, y_ref, den):
    return float((y - y_ref).norm() / den)


def run_layer(n, k, post_gelu, seed, methods):
    w, b, x_cal, x_eval = make_layer(n, k, post_gelu, seed)
    stats = ActivationStats(k, SAMPLE_ROWS, torch.Generator().manual_seed(seed), track_gram=True)
    for i in range(0, CAL_ROWS, 256):
        stats.update(x_cal[i:i + 256])
    y_eval = x_eval @ w.t()
    den = float(y_eval.norm())
    out = {}
    t0 = time.perf_counter()
    wq = _plain_quant(w, 64, "int_ratio")
    y = fake_quant_act(x_eval, 64, "int_ratio") @ wq.t()
    out["RTN W4A4"] = {"error": rel(y, y_eval, den), "time_s": time.perf_counter() - t0}
    for name in methods:
        fields, rank, exact_h, unsigned = METHODS[name]
        if unsigned and not post_gelu:
            continue
        cfg = QuantConfig(**{**BASE, **fields})
        timer = PhaseTimer()
        timer.watch(DEVICE)
        _sync()
        t0 = time.perf_counter()
        shift = GELU_SHIFT if unsigned else None
        p = LayerProblem(w, stats.absmax, stats.sample, cfg, name, act_shift=shift, x_max=stats.xmax,
                         gram=stats.shifted_gram(shift or 0.0) if exact_h else None, timer=timer)
        cand, _, _ = p.search_alpha(rank)
        q = p.finish_all(cand, rank, [b], torch.bfloat16)[0]
        _sync()
        dt = time.perf_counter() - t0
        with torch.no_grad():
            y = SVDQuantLinear.from_tensors({t: v.to(DEVICE) for t, v in q.tensors().items()})(x_eval)
        out[name] = {"error": rel(y, y_eval + b.bfloat16().float(), den), "error_calibration_sample": q.report["error"],
                     "time_s": dt, "smoothing": q.report["alpha"], "lowrank_iters_used": q.report["lowrank_iters_used"],
                     "phases_s": timer.as_dict()}
    return out


def compare_scoring(n, k, post_gelu, seed, grid="reference39", rank=32):
    """Smoothing search two ways on one layer: each candidate scored alone (its own SVD, as before
    batching) vs all candidates in batches sharing their products with W. Times, and the held-out
    error of the layer finished with each way's choice."""
    w, b, x_cal, x_eval = make_layer(n, k, post_gelu, seed)
    stats = ActivationStats(k, SAMPLE_ROWS, torch.Generator().manual_seed(seed))
    for i in range(0, CAL_ROWS, 256):
        stats.update(x_cal[i:i + 256])
    cfg = QuantConfig(**{**BASE, "smooth_grid": grid})
    p = LayerProblem(w, stats.absmax, stats.sample, cfg)
    cands = cfg.smoothing_candidates()
    t0 = time.perf_counter()
    alone = [p.error(p.lam(c), rank, fast=True)[0] for c in cands]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = p.score_candidates(cands, rank)
    t_batched = time.perf_counter() - t0
    y_eval = x_eval @ w.t()
    out = {"candidates": len(cands), "time_alone_s": t_alone, "time_batched_s": t_batched}
    for name, errs in (("alone", alone), ("batched", batched)):
        c = cands[min(range(len(errs)), key=errs.__getitem__)]
        q = p.finish(c, rank, None, torch.bfloat16)
        y = SVDQuantLinear.from_tensors(q.tensors())(x_eval)
        out[f"choice_{name}"] = q.report["alpha"]
        out[f"error_{name}"] = float((y - y_eval).norm() / y_eval.norm())
    return out


# q/k/v of one attention: (label, width, context width or None for self-attention)
QKV = [("sd15 attn1 q/k/v 3x320x320", 320), ("sdxl attn1 q/k/v 3x1280x1280", 1280)]


def compare_shared(width, seed, rank=32, gptq=False):
    """q/k/v on one input: each quantized alone vs one group (one λ, one L_down on [W_q; W_k; W_v]).
    Returns the mean held-out error of the three layers each way, and the low-rank parameters."""
    g = torch.Generator().manual_seed(seed)
    ws = [lowrankish_weight(width, width, g) for _ in range(3)]
    x = realistic_activations(CAL_ROWS + EVAL_ROWS, width, g)
    x_cal, x_eval = x[:CAL_ROWS], x[CAL_ROWS:]
    stats = ActivationStats(width, SAMPLE_ROWS, torch.Generator().manual_seed(seed))
    for i in range(0, CAL_ROWS, 256):
        stats.update(x_cal[i:i + 256])
    cfg = QuantConfig(**{**BASE, "gptq": gptq})

    def held_out(q, w):
        y_ref = x_eval @ w.t()
        return float((SVDQuantLinear.from_tensors(q.tensors())(x_eval) - y_ref).norm() / y_ref.norm())

    out = {}
    t0 = time.perf_counter()
    alone = []
    for w in ws:
        p = LayerProblem(w, stats.absmax, stats.sample, cfg)
        cand, _, _ = p.search_alpha(rank)
        alone.append(held_out(p.finish(cand, rank, None, torch.bfloat16), w))
    out["alone"] = {"error": sum(alone) / 3, "time_s": time.perf_counter() - t0, "lowrank_params": 3 * rank * 2 * width}
    for way, r in (("group", rank), ("group_same_params", rank * 3 // 2)):  # 1.5x rank: as many low-rank weights
        t0 = time.perf_counter()
        p = LayerProblem(torch.cat(ws), stats.absmax, stats.sample, cfg, splits=[width] * 3)
        cand, _, _ = p.search_alpha(r)
        qs = p.finish_all(cand, r, [None] * 3, torch.bfloat16, ["q", "k", "v"])
        out[way] = {"error": sum(held_out(q, w) for q, w in zip(qs, ws)) / 3, "time_s": time.perf_counter() - t0,
                    "lowrank_params": r * (width + 3 * width)}
    return out


def print_tables(rows, names, seeds):
    """Error and time tables (mean over seeds per layer); returns {layer: {method: {error, time_s}}}."""
    width = {m: max(9, len(m)) for m in names}
    print(f"\nrelative output error on held-out rows (mean over {seeds} seeds); time = CPU wall seconds to quantize")
    print(f"{'layer':34s} " + " ".join(f"{m:>{width[m]}s}" for m in names))
    by_layer = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r["methods"])
    summary = {}
    for label, runs in by_layer.items():
        cells, tcells = [], []
        for m in names:
            vals = [run[m] for run in runs if m in run]
            if not vals:
                cells.append(f"{'-':>{width[m]}s}")
                tcells.append(f"{'-':>{width[m]}s}")
                continue
            e = sum(v["error"] for v in vals) / len(vals)
            t = sum(v["time_s"] for v in vals) / len(vals)
            summary.setdefault(label, {})[m] = {"error": e, "time_s": t}
            cells.append(f"{e:{width[m]}.4f}")
            tcells.append(f"{t:{width[m] - 1}.1f}s")
        print(f"{label:34s} " + " ".join(cells))
        print(f"{'  time':34s} " + " ".join(tcells))
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="+", default=["sd15", "sdxl", "gelu"], choices=list(LAYERS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scoring", action="store_true", help="also time one-at-a-time vs batched smoothing scoring")
    ap.add_argument("--shared", action="store_true", help="only: q/k/v quantized alone vs as one input group")
    ap.add_argument("--json", default=None)
    ap.add_argument("--print", dest="print_json", default=None, help="print the tables of a saved JSON and exit")
    ap.add_argument("--device", default="cpu", help="quantize on this device (cuda: per-layer GPU times per phase)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable times on a shared machine; OpenMP threads spin when cores are busy)")
    args = ap.parse_args()
    if args.print_json:
        saved = json.load(open(args.print_json))
        names = ["RTN W4A4"] + [m for m in METHODS if m in saved["meta"]["methods"]]
        print_tables(saved["runs"], names, max(r["seed"] for r in saved["runs"]) + 1)
        for r in saved.get("scoring", []):
            print(f"{r['layer']:34s} search alone {r['time_alone_s']:.1f} s, batched {r['time_batched_s']:.1f} s; "
                  f"held-out error {r['error_alone']:.4f} / {r['error_batched']:.4f}")
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.shared:
        shared = []
        print(f"q/k/v: mean held-out error of the three layers, rank 32 (mean over {args.seeds} seeds)")
        for label, width in QKV:
            for gptq in (False, True):
                res = [compare_shared(width, seed, gptq=gptq) for seed in range(args.seeds)]
                row = {way: {k: sum(r[way][k] for r in res) / len(res) for k in res[0][way]} for way in res[0]}
                shared.append({"layer": label, "gptq": gptq, **row})
                print(f"{label:30s} gptq={gptq!s:5s} " + "; ".join(
                    f"{way} {v['error']:.4f} ({v['time_s']:.1f} s, {v['lowrank_params'] / 1e3:.0f}k low-rank weights)"
                    for way, v in row.items()), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": "python " + " ".join(sys.argv), "shared": shared}, f, indent=1)
        return
    run_layer(128, 256, True, 99, args.methods)  # warm-up: first calls of LAPACK/MKL paths are slow
    rows = []
    for fam in args.family:
        for label, n, k, gelu in LAYERS[fam]:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                res = run_layer(n, k, gelu, seed, args.methods)
                rows.append({"layer": label, "seed": seed, "methods": res})
                print(f"{label} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    names = ["RTN W4A4"] + list(args.methods)
    summary = print_tables(rows, names, args.seeds)
    print(f"\nseconds per phase ({DEVICE})")
    for r in rows:
        for m, v in r["methods"].items():
            if "phases_s" in v:
                print(f"{r['layer']:34s} {m:12s} " + ", ".join(f"{k} {t:.2f}" for k, t in v["phases_s"].items()))
    scoring = []
    if args.scoring:
        print("\nsmoothing search, 39 candidates at rank 32: one at a time vs batched (seed 0)")
        print(f"{'layer':36s} {'alone s':>8s} {'batched s':>9s} {'err alone':>9s} {'err batched':>11s}")
        for fam in args.family:
            for label, n, k, gelu in LAYERS[fam]:
                r = compare_scoring(n, k, gelu, 0)
                scoring.append({"layer": label, **r})
                print(f"{label:36s} {r['time_alone_s']:8.1f} {r['time_batched_s']:9.1f} {r['error_alone']:9.4f} "
                      f"{r['error_batched']:11.4f}", flush=True)
    if args.json:
        meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
                "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "rows": {"calibration": CAL_ROWS, "sampled": SAMPLE_ROWS, "held_out": EVAL_ROWS},
                "methods": {m: {"fields": METHODS[m][0], "rank": METHODS[m][1], "exact_hessian": METHODS[m][2],
                                "unsigned": METHODS[m][3]} for m in args.methods},
                "note": "random weights and synthetic activations: ranks methods, not image quality"}
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": rows, "scoring": scoring}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
