"""Markdown tables for docs/QUALITY.md from bench_quality.py's JSON files (no numbers typed by hand).

  python bench/quality/report.py bench/results/quality/quality_{sd15,sdxl,flux}.json
  python bench/quality/report.py --ladder bench/results/quality/ladder_{flux,sd15,sdxl}.json  # issue 9's options
  python bench/quality/report.py --ladder bench/results/quality/ladder_flux.json --before bench/results/quality/quality_flux.json
  python bench/quality/report.py --headline bench/results/quality/ladder_{sd15,sdxl,flux}.json
"""
import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import methods  # noqa: E402  (this folder's methods.py: the current labels)


def fmt(v, nd):
    return "–" if v is None else f"{v:.{nd}f}"


def family_table(res):
    fam = res["family"]
    w16 = res.get("w16", {})
    floor = res.get("w16_other_seeds", {})
    b16 = next((r["bytes_16bit"] for r in res["methods"].values() if r.get("bytes_16bit")), None)
    out = [f"**{fam}-style** ({res['model']}, {res['params'] / 1e6:.2f} M params; the quantized layers hold "
           f"{fmt(None if b16 is None else b16 / 2**20, 2)} MiB in 16-bit). 16-bit vs real test images: "
           f"KID {fmt(w16.get('kid_vs_real'), 4)} ± {fmt(w16.get('kid_vs_real_std'), 4)}, FID {fmt(w16.get('fid_vs_real'), 1)}. "
           f"Noise floor of the set metrics (16-bit vs 16-bit, other seeds): KID {fmt(floor.get('kid_vs_16bit'), 4)}, "
           f"FID {fmt(floor.get('fid_vs_16bit'), 1)}.", "",
           "| method | PSNR dB ↑ | SSIM ↑ | LPIPS ↓ | KID vs 16-bit ↓ | FID vs 16-bit ↓ | FID vs real (Δ to 16-bit) | layer error ↓ | mean rank | 4-bit MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["methods"].items():
        mib = r.get("bytes_4bit")
        out.append(f"| {r['label']} | {fmt(r['psnr'], 2)} ± {fmt(r['psnr_ci95'], 2)} | {fmt(r['ssim'], 4)} | "
                   f"{fmt(r.get('lpips'), 4)} ± {fmt(r.get('lpips_ci95'), 4)} | {fmt(r.get('kid_vs_16bit'), 4)} | "
                   f"{fmt(r.get('fid_vs_16bit'), 1)} | {fmt(r.get('fid_vs_real'), 1)} ({'+' if (r.get('fid_lost_vs_real') or 0) >= 0 else ''}"
                   f"{fmt(r.get('fid_lost_vs_real'), 1)}) | {fmt(r.get('mean_error'), 4)} | {fmt(r.get('mean_rank'), 1)} | "
                   f"{fmt(None if mib is None else mib / 2**20, 2)} |")
    return "\n".join(out)


def outlier_table(results):
    out = ["| family | layers | max/median: median over layers | largest | layers > 10× | layers > 100× | top layers (max/median) |",
           "|---|---|---|---|---|---|---|"]
    for res in results:
        p = res.get("outlier_profile")
        if not p:
            continue
        top = ", ".join(f"`{t['layer']}` {t['max_over_median']:.0f}×" for t in p["top"][:4])
        out.append(f"| {res['family']} | {p['layers']} | {p['max_over_median_median']:.1f} | {p['max_over_median_max']:.1f} | "
                   f"{p['layers_over_10x']} | {p['layers_over_100x']} | {top} |")
    return "\n".join(out)


ORDER = ("naive_w4a4", "smooth_only", "svdq_r8", "svdq_r16", "svdq_r32", "svdq_r32_grid39", "svdq_r32_refine4",
         "svdq_r32_gptq", "svdq_r32_refine4_gptq", "svdq_r32_unsigned", "svdq_r32_gptq_unsigned",
         "svdq_r32_refine4_gptq_unsigned", "svdq_r64", "svdq_r64_gptq", "svdq_auto_error", "svdq_auto_error_gptq",
         "svdq_auto_size", "svdq_auto_size_gptq", "w4a16")


# Each ladder step against the method it adds one option to (paired over the same seeds).
LADDER_BASE = {"smooth_only": "naive_w4a4", "svdq_r32": "smooth_only", "svdq_r32_grid39": "svdq_r32",
               "svdq_r32_refine4": "svdq_r32", "svdq_r32_gptq": "svdq_r32", "svdq_r32_refine4_gptq": "svdq_r32_gptq",
               "svdq_r32_unsigned": "svdq_r32", "svdq_r32_gptq_unsigned": "svdq_r32_gptq",
               "svdq_r32_refine4_gptq_unsigned": "svdq_r32_refine4_gptq", "svdq_r64_gptq": "svdq_r32_gptq",
               "svdq_auto_error_gptq": "svdq_r32_gptq", "svdq_auto_size_gptq": "svdq_r32_gptq",
               "w4a16": "svdq_r32_gptq", "svdq_r32_gptq_shared": "svdq_r32_gptq",
               "svdq_r64_gptq_shared": "svdq_r32_gptq"}


def paired_delta(a, b, key):
    """Mean of a − b over the same samples and its 95% half-width (normal), or None without per-sample values."""
    va, vb = a.get(key + "_per_sample"), b.get(key + "_per_sample")
    if not va or not vb or len(va) != len(vb):
        return None
    d = [x - y for x, y in zip(va, vb) if abs(x) != float("inf") and abs(y) != float("inf")]
    m = sum(d) / len(d)
    sd = (sum((x - m) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    return m, 1.96 * sd / len(d) ** 0.5


def ladder_table(res, before=None):
    """The calibration options' ladder: pairwise metrics, FID vs real when measured, layer error and
    calibrate+quantize seconds (with the quantizer's phases); `before`: the same family from an
    earlier file, whose PSNR/LPIPS of the same method names are shown beside the new ones."""
    rows = res["methods"]
    fid = any("fid_vs_real" in r for r in rows.values())
    old = (before or {}).get("methods", {})
    head = ["method", "PSNR dB ↑", "LPIPS ↓"] + (["FID vs 16-bit (paired)", "FID vs real, Δ to 16-bit"] if fid else []) + \
        ["layer error ↓", "step: vs", "Δ PSNR dB (paired 95%)", "Δ LPIPS (paired 95%)",
         "calibrate + quantize s", "of which capture / α+rank search / low-rank / GPTQ s"] + \
        (["issue-8 run: PSNR / LPIPS"] if old else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        t = r.get("phase_seconds") or {}
        parts = (t.get("capture", 0.0), t.get("smoothing_search", 0.0) + t.get("rank_search", 0.0),
                 t.get("lowrank", 0.0), t.get("gptq", 0.0))
        phases = " / ".join(f"{v:.1f}" for v in parts)
        cells = [r["label"], f"{fmt(r['psnr'], 2)} ± {fmt(r['psnr_ci95'], 2)}",
                 f"{fmt(r.get('lpips'), 4)} ± {fmt(r.get('lpips_ci95'), 4)}"]
        if fid:
            d = r.get("fid_lost_vs_real")
            cells.append(fmt(r.get("fid_vs_16bit"), 1))
            cells.append("–" if d is None else f"{r['fid_vs_real']:.1f} ({'+' if d >= 0 else ''}{d:.1f})")
        base = LADDER_BASE.get(name)
        dp = paired_delta(r, rows[base], "psnr") if base in rows else None
        dl = paired_delta(r, rows[base], "lpips") if base in rows else None
        cells += [fmt(r.get("mean_error"), 4), f"`{base}`" if dp else "–",
                  f"{dp[0]:+.2f} ± {dp[1]:.2f}" if dp else "–", f"{dl[0]:+.4f} ± {dl[1]:.4f}" if dl else "–",
                  fmt(r.get("quantize_seconds"), 0), phases if t else "–"]
        if old:
            o = old.get(name)
            cells.append(f"{o['psnr']:.2f} / {o['lpips']:.4f}" if o else "–")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _before_gptq(row) -> bool:
    """A W4A4 row measured before QuantConfig had `gptq` (issue 8's files): one SVD, GPTQ off; its
    old label ("SVDQuant rank 32") now reads as the GPTQ default, so the explicit label replaces it."""
    spec = row.get("spec", {})
    return spec.get("kind") == "w4a4" and "gptq" not in spec.get("quant", {})


def merge(paths):
    """Families from several runs (a family split over processes by --methods: same settings and
    seeds, so the rows are the same as from one run); methods in the usual order."""
    fams, settings = {}, None
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        settings = settings or d["settings"]
        for k in ("n_per_class", "steps", "cfg", "seed", "calib_steps", "real"):
            if d["settings"][k] != settings[k]:
                raise SystemExit(f"{p}: setting {k} = {d['settings'][k]} differs from the other files ({settings[k]})")
        for fam, res in d["families"].items():
            for name, row in res["methods"].items():
                if _before_gptq(row) and name in methods.METHODS:
                    row["label"] = methods.METHODS[name]["label"]
            if fam not in fams:
                fams[fam] = res
            else:
                fams[fam]["methods"].update(res["methods"])
                fams[fam].setdefault("outlier_profile", res.get("outlier_profile"))
    for res in fams.values():
        m = res["methods"]
        res["methods"] = {k: m[k] for k in sorted(m, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))}
    return list(fams.values()), settings


def minilm_table(path):
    with open(path) as f:
        d = json.load(f)
    names = {"naive_w4a4": "naive W4A4", "smooth_only": "smoothing only", "svdq_r8": "SVDQuant r8",
             "svdq_r16": "SVDQuant r16", "svdq_r32": "SVDQuant r32", "w4a16": "W4A16 (weights only)"}
    out = ["| method | mean held-out layer error ↓ | sentence-embedding cosine vs fp32 ↑ |", "|---|---|---|"]
    for k, label in names.items():
        out.append(f"| {label} | {d['mean_error'][k]:.4f} | {d['sentence_cosine'][k]:.4f} |")
    return "\n".join(out)


HEADLINE = (("naive_w4a4", "naive W4A4"), ("smooth_only", "smoothing only"), ("svdq_r32", "rank 32, one SVD, no GPTQ"),
            ("svdq_r32_gptq", "**rank 32 + GPTQ (default)**"), ("svdq_r64_gptq", "rank 64 + GPTQ"),
            ("svdq_auto_error_gptq", "error budget 0.05 + GPTQ"), ("w4a16", "W4A16 (weights only)"))


def headline_table(results):
    """One row per family: PSNR dB / LPIPS / FID-vs-real change of the methods a user chooses between."""
    out = ["| trained model | " + " | ".join(h for _, h in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for res in results:
        cells = []
        for name, _ in HEADLINE:
            r = res["methods"].get(name)
            if r is None:
                cells.append("–")
                continue
            d = r.get("fid_lost_vs_real")
            rank = f", rank {r['mean_rank']:.1f}" if name == "svdq_auto_error_gptq" and r.get("mean_rank") else ""
            cells.append(f"{r['psnr']:.2f} / {r['lpips']:.4f} / " + ("–" if d is None else f"{d:+.1f}") + rank)
        out.append(f"| {res['family']}-style | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench_quality.py JSON files (a family split over files is merged)")
    ap.add_argument("--ladder", action="store_true", help="the calibration options' ladder tables")
    ap.add_argument("--headline", action="store_true", help="one row per family: the methods a user chooses between")
    ap.add_argument("--before", nargs="*", default=[], help="with --ladder: earlier files whose PSNR/LPIPS of the same names are shown")
    a = ap.parse_args(argv)
    if a.headline:
        print(headline_table(merge(a.files)[0]))
        return
    if a.ladder:
        before = {r["family"]: r for r in merge(a.before)[0]} if a.before else {}
        for r in merge(a.files)[0]:
            print(f"**{r['family']}-style**\n")
            print(ladder_table(r, before.get(r["family"])))
            print()
        return
    minilm = [p for p in a.files if "minilm" in p]
    results, s = merge([p for p in a.files if p not in minilm])
    print(f"Settings: {s['n_per_class']} seeds × 10 classes, {s['steps']} {s['sampler']} steps ({s['scheduler']}), cfg {s['cfg']}, "
          f"calibration {s['calib_steps']} steps × 10 captions; real set {s['real']} test images.\n")
    for r in results:
        print(family_table(r))
        print()
    print(outlier_table(results))
    for p in minilm:
        print()
        print(minilm_table(p))


if __name__ == "__main__":
    main(sys.argv[1:])
