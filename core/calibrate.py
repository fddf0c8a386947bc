"""Model-level calibration: pick the target linears, capture their inputs, quantize layer by layer.

ComfyUI-free: the caller supplies a function that runs the calibration forward passes (for ComfyUI
that is a sampler run; for tests a loop over random inputs).
"""
import fnmatch
import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .config import QuantConfig
from .layer_quant import LayerProblem
from .stats import ActivationStats

Progress = Callable[[int, int, str], None]


def find_target_linears(model: nn.Module, cfg: QuantConfig) -> dict:
    """Linear layers to quantize: every nn.Linear whose name matches no skip pattern and whose
    input width is a multiple of the group size and at least `min_features`."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.skip_patterns):
            continue
        k, n = mod.in_features, mod.out_features
        if k % cfg.group_size or k < cfg.min_features or n < cfg.min_features:
            continue
        out[name] = mod
    return out


@contextmanager
def capture_inputs(layers: dict, cfg: QuantConfig, seed: int = 0):
    """Forward pre-hooks that feed each layer's input into an ActivationStats; removed on exit."""
    gen = torch.Generator().manual_seed(seed)
    stats = {n: ActivationStats(m.in_features, cfg.sample_rows, gen, n) for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.update(args[0]))
               for n, m in layers.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _clamp_rank(rank: int, mod: nn.Linear) -> int:
    return min(rank, mod.in_features, mod.out_features)


def _allocate_size_budget(curves: dict, sizes: dict, avg_rank: int) -> dict:
    """Greedy: spend avg_rank·Σ(N+K) parameters where the squared relative error falls most per parameter."""
    budget = sum(avg_rank * s for s in sizes.values())
    chosen = {n: 0 for n in curves}
    spent = 0
    while True:
        best = None
        for n, curve in curves.items():
            r0 = chosen[n]
            for r in curve:
                if r <= r0:
                    continue
                cost = (r - r0) * sizes[n]
                if spent + cost > budget:
                    continue
                gain = (curve[r0] ** 2 - curve[r] ** 2) / cost
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n, r, cost)
        if best is None:
            return chosen
        _, n, r, cost = best
        chosen[n], spent = r, spent + cost


def quantize_layers(layers: dict, stats: dict, cfg: QuantConfig, device=None, out_dtype=None,
                    progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Quantize every captured layer; returns name -> QuantizedLinear (tensors on CPU)."""
    policy = cfg.rank
    names = list(layers)
    for n in names:
        if stats[n].rows_seen == 0:
            raise ValueError(f"layer {n} saw no input during calibration (0 calibration samples reached it)")
        if policy.mode == "fixed" and policy.rank > min(layers[n].in_features, layers[n].out_features):
            m = layers[n]
            raise ValueError(f"rank {policy.rank} is larger than layer {n} allows "
                             f"(min(out={m.out_features}, in={m.in_features}) = {min(m.in_features, m.out_features)})")
    total = len(names) * (2 if policy.mode == "size" else 1)
    done = 0
    t0 = time.time()

    def step(msg):
        nonlocal done
        done += 1
        if progress:
            progress(done, total, msg)
        if log and (done == total or done % max(1, total // 10) == 0):
            eta = (time.time() - t0) / done * (total - done)
            log(f"[svdquant] {done}/{total} layers ({msg}), about {eta:.0f} s left")

    def problem(n):
        m = layers[n]
        w = m.weight.detach().to(device or m.weight.device)
        return LayerProblem(w, stats[n].absmax, stats[n].sample, cfg, n)

    results = {}
    if policy.mode == "size":
        plans, curves, sizes = {}, {}, {}
        for n in names:
            m, p = layers[n], problem(n)
            ranks = sorted({_clamp_rank(r, m) for r in policy.candidates})
            alpha, _, _ = p.search_alpha(_clamp_rank(policy.rank, m))
            plans[n], curves[n], sizes[n] = alpha, p.rank_curve(alpha, ranks), m.in_features + m.out_features
            step(f"scored {n}")
        chosen = _allocate_size_budget(curves, sizes, policy.rank)
        for n in names:
            m = layers[n]
            results[n] = problem(n).finish(plans[n], chosen[n], m.bias, out_dtype or m.weight.dtype)
            step(n)
        return results

    for n in names:
        m, p = layers[n], problem(n)
        if policy.mode == "fixed":
            rank = policy.rank
            alpha, _, _ = p.search_alpha(rank)
        else:
            alpha, _, _ = p.search_alpha(_clamp_rank(policy.rank, m))
            ranks = sorted({_clamp_rank(r, m) for r in policy.candidates})
            curve = p.rank_curve(alpha, ranks)
            ok = [r for r in ranks if curve[r] <= policy.error_budget]
            rank = ok[0] if ok else ranks[-1]
        results[n] = p.finish(alpha, rank, m.bias, out_dtype or m.weight.dtype)
        step(n)
    return results


def summarize(results: dict) -> dict:
    """Totals for reports: bytes before/after and the error spread."""
    reps = [q.report for q in results.values()]
    if not reps:
        return {"layers": 0}
    return {
        "layers": len(reps),
        "bytes_16bit": sum(r["bytes_16bit"] for r in reps),
        "bytes_4bit": sum(r["bytes_4bit"] for r in reps),
        "mean_rank": sum(r["rank"] for r in reps) / len(reps),
        "mean_error": sum(r["error"] for r in reps) / len(reps),
        "mean_error_naive_w4a4": sum(r["error_naive_w4a4"] for r in reps) / len(reps),
    }


def format_report(results: dict, outliers: dict | None = None, limit: int = 0) -> str:
    """Plain-text table a node can show: one line per layer. `outliers`: name -> ActivationStats.outlier_report()."""
    lines = [f"{'layer':60s} {'rank':>4s} {'alpha':>5s} {'err naive':>9s} {'err':>7s} {'KiB 16b':>8s} {'KiB 4b':>7s}"
             + (f" {'outl.ch':>7s} {'max/med':>7s}" if outliers else "")]
    items = list(results.items())
    for n, q in items[:limit or len(items)]:
        r = q.report
        a = "-" if r["alpha"] is None else f"{r['alpha']:.1f}"
        line = (f"{n[-60:]:60s} {r['rank']:4d} {a:>5s} {r['error_naive_w4a4']:9.4f} {r['error']:7.4f} "
                f"{r['bytes_16bit'] / 1024:8.0f} {r['bytes_4bit'] / 1024:7.0f}")
        if outliers:
            o = outliers[n]
            line += f" {o['outlier_channels']:7d} {o['max_over_median']:7.1f}"
        lines.append(line)
    s = summarize(results)
    if s["layers"]:
        lines.append(f"{s['layers']} layers, mean rank {s['mean_rank']:.1f}, mean error {s['mean_error']:.4f} "
                     f"(naive W4A4 {s['mean_error_naive_w4a4']:.4f}), {s['bytes_16bit'] / 2**20:.1f} MiB -> "
                     f"{s['bytes_4bit'] / 2**20:.1f} MiB")
    return "\n".join(lines)
