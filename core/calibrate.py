"""Model-level calibration: pick the target linears, capture their inputs, quantize layer by layer.

ComfyUI-free: the caller supplies a function that runs the calibration forward passes (for ComfyUI
that is a sampler run; for tests a loop over random inputs).
"""
import fnmatch
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .config import QuantConfig
from .layer_quant import LayerProblem
from .resume import PartialResults, config_fingerprint
from .stats import ActivationStats
from .timing import PhaseTimer

Progress = Callable[[int, int, str], None]

# Shift of unsigned activations: GELU's minimum is -0.16997 (tanh form -0.17004); 11/64 lies just
# below and is exact in bf16/fp16, so X + c >= 0 for every post-GELU input.
GELU_SHIFT = 0.171875


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


class SharedInputs:
    """Which target linears are fed the very same input tensor object, in every forward pass.

    Each tensor a hook sees is tracked (by a weak reference) with the layers it reached; when it is
    freed, every one of those layers intersects its set of partners with that set. A group is a set
    of sibling layers (same parent module: one attention's q/k/v, or its k/v on the context) whose
    partner sets are exactly the group, so an input shared once by chance never groups layers.
    """

    def __init__(self):
        self._open = {}       # id(tensor) -> (weakref, names)
        self._partners = {}   # name -> names that received every one of its inputs

    def see(self, name: str, x: torch.Tensor) -> None:
        key = id(x)
        entry = self._open.get(key)
        if entry is not None and entry[0]() is x:
            entry[1].add(name)
            return
        self._open[key] = (weakref.ref(x, lambda _ref, key=key: self._close(key)), {name})

    def _close(self, key) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        names = entry[1]
        for n in names:
            prev = self._partners.get(n)
            self._partners[n] = set(names) if prev is None else prev & names

    def groups(self, order) -> list:
        """Groups of >= 2 layer names, members in `order`; every layer belongs to at most one."""
        for key in list(self._open):
            self._close(key)
        out, taken = [], set()
        for n in order:
            if n in taken or n not in self._partners:
                continue
            parent = n.rpartition(".")[0]
            members = [m for m in order if m in self._partners[n] and m.rpartition(".")[0] == parent]
            if len(members) < 2:
                continue
            if any({p for p in self._partners.get(m, ()) if p.rpartition(".")[0] == parent} != set(members)
                   for m in members):
                continue
            out.append(tuple(members))
            taken.update(members)
        return out


def gram_layers(layers: dict, cfg: QuantConfig) -> set:
    """Layers (in model order) whose exact XᵀX fits the GPTQ memory budget."""
    if not cfg.gptq or cfg.gram_budget_mb <= 0:
        return set()
    left = cfg.gram_budget_mb * 2 ** 20
    out = set()
    for n, m in layers.items():
        cost = 4 * (m.in_features ** 2 + m.in_features)
        if cost <= left:
            out.add(n)
            left -= cost
    return out


@contextmanager
def capture_inputs(layers: dict, cfg: QuantConfig, seed: int = 0, shared: SharedInputs | None = None):
    """Forward pre-hooks that feed each layer's input into an ActivationStats (and `shared`, which
    records linears fed the same tensor); removed on exit."""
    gen = torch.Generator().manual_seed(seed)
    exact = gram_layers(layers, cfg)
    stats = {n: ActivationStats(m.in_features, cfg.sample_rows, gen, n, track_gram=n in exact) for n, m in layers.items()}

    def hook_for(name):
        def hook(mod, args):
            stats[name].update(args[0])
            if shared is not None:
                shared.see(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _clamp_rank(rank: int, mod: nn.Linear) -> int:
    return min(rank, mod.in_features, mod.out_features)


def _allocate_size_budget(curves: dict, sizes: dict, avg_rank: int, weights: dict | None = None) -> dict:
    """Greedy: spend avg_rank·Σ(N+K) parameters where the squared relative error falls most per parameter.

    weights: per unit, how many layers' errors its curve stands for (an input group counts once per member)."""
    budget = sum(avg_rank * s for s in sizes.values())
    weights = weights or {}
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
                gain = weights.get(n, 1) * (curve[r0] ** 2 - curve[r] ** 2) / cost
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, n, r, cost)
        if best is None:
            return chosen
        _, n, r, cost = best
        chosen[n], spent = r, spent + cost


def unsigned_layers(layers: dict, stats: dict, cfg: QuantConfig, log_fn=None) -> set:
    """Layers that get unsigned activations: matching cfg.unsigned_patterns, and whose calibration
    inputs never went below −GELU_SHIFT (a layer that did is not post-GELU and stays signed)."""
    if not cfg.unsigned_acts:
        return set()
    out = set()
    for n in layers:
        if not any(fnmatch.fnmatchcase(n, p) for p in cfg.unsigned_patterns):
            continue
        lo = float(stats[n].xmin.min())
        if lo < -GELU_SHIFT:
            if log_fn:
                log_fn(f"[svdquant] {n}: inputs reach {lo:.3f} < -{GELU_SHIFT}: not post-GELU, keeps signed activations")
            continue
        out.add(n)
    return out


def act16_layers(layers: dict, cfg: QuantConfig) -> set:
    """Layers that keep 16-bit activations: matching cfg.act16_patterns when cfg.act16_inputs."""
    if not cfg.act16_inputs:
        return set()
    return {n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in cfg.act16_patterns)}


def _units(names, groups) -> list:
    """Layers to quantize together, in model order: a group at its first member, others alone."""
    member = {m: g for g in groups for m in g}
    out, done = [], set()
    for n in names:
        if n in done:
            continue
        unit = member.get(n, (n,))
        out.append(tuple(unit))
        done.update(unit)
    return out


def quantize_layers(layers: dict, stats: dict, cfg: QuantConfig, device=None, out_dtype=None,
                    progress: Progress | None = None, log: Callable[[str], None] | None = None,
                    groups: list | None = None, resume_dir: str | None = None,
                    timer: PhaseTimer | None = None) -> dict:
    """Quantize every captured layer; returns name -> QuantizedLinear (tensors on CPU).

    groups: input groups from SharedInputs.groups() (used when cfg.share_inputs).
    resume_dir: keep each finished layer there and reuse what an earlier run with the same inputs left.
    """
    policy = cfg.rank
    names = list(layers)
    for n in names:
        if stats[n].rows_seen == 0:
            raise ValueError(f"layer {n} saw no input during calibration (0 calibration samples reached it)")
        if policy.mode == "fixed" and policy.rank > min(layers[n].in_features, layers[n].out_features):
            m = layers[n]
            raise ValueError(f"rank {policy.rank} is larger than layer {n} allows "
                             f"(min(out={m.out_features}, in={m.in_features}) = {min(m.in_features, m.out_features)})")
    timer = timer or PhaseTimer()
    timer.watch(device)
    act16 = act16_layers(layers, cfg)
    unsigned = unsigned_layers(layers, stats, cfg, log) - act16  # a 16-bit input needs no shift
    units = _units(names, groups if cfg.share_inputs and groups else [])
    store = PartialResults(resume_dir) if resume_dir else None
    total = len(names) * (2 if policy.mode == "size" else 1)
    done = 0
    t0 = time.time()

    def step(unit, msg):
        nonlocal done
        for n in unit:
            done += 1
            if progress:
                progress(done, total, n if msg is None else f"{msg} {n}")
        if log and (done == total or done % max(1, total // 10) < len(unit)):
            eta = (time.time() - t0) / done * (total - done)
            log(f"[svdquant] {done}/{total} layers ({msg or 'quantized'} {unit[-1]}), about {eta:.0f} s left")

    def problem(unit):
        mods = [layers[n] for n in unit]
        dev = device or mods[0].weight.device
        w = torch.cat([m.weight.detach().to(dev) for m in mods]) if len(mods) > 1 else mods[0].weight.detach().to(dev)
        s = stats[unit[0]]  # members saw the same tensor: one member's statistics stand for all
        shift = len(unit) == 1 and unit[0] in unsigned
        return LayerProblem(w, s.absmax, s.sample, cfg, unit[0] if len(unit) == 1 else ",".join(unit),
                            splits=[m.out_features for m in mods], act_shift=GELU_SHIFT if shift else None,
                            x_max=s.xmax, gram=s.shifted_gram(GELU_SHIFT if shift else 0.0), timer=timer,
                            act16=all(n in act16 for n in unit))

    def unit_key(unit, *extra):
        if store is None:
            return None
        with timer("resume"):
            return _unit_key_now(store, cfg, unit, layers, stats, unsigned, out_dtype, device, *extra)

    def finish(unit, alpha, rank, key):
        out = None
        if store is not None:
            with timer("resume"):
                out = store.load(key)
        if out is None:
            out = problem(unit).finish_all(alpha, rank, [layers[n].bias for n in unit],
                                           out_dtype or layers[unit[0]].weight.dtype, list(unit))
            if store is not None:
                with timer("resume"):
                    store.save(key, out)
        return dict(zip(unit, out))

    def unit_limit(unit):
        return min(min(layers[n].in_features, layers[n].out_features) for n in unit)

    results = {}
    if policy.mode == "size":
        plans, curves, sizes, weights = {}, {}, {}, {}
        for unit in units:
            key = unit_key(unit, "plan")
            plan = store.load_json(key) if store is not None else None
            if plan is None:
                p = problem(unit)
                lim = unit_limit(unit)
                ranks = sorted({min(r, lim) for r in policy.candidates})
                alpha, _, _ = p.search_alpha(min(policy.rank, lim))
                curve = p.rank_curve(alpha, ranks)
                plan = {"alpha": alpha, "curve": [[r, e] for r, e in curve.items()]}
                if store is not None:
                    store.save_json(key, plan)
            alpha = plan["alpha"]
            plans[unit] = tuple(alpha) if isinstance(alpha, list) else alpha
            curves[unit] = {int(r): e for r, e in plan["curve"]}
            sizes[unit] = sum(layers[n].in_features + layers[n].out_features for n in unit)
            weights[unit] = len(unit)
            step(unit, "scored")
        chosen = _allocate_size_budget(curves, sizes, policy.rank, weights)
        for unit in units:
            results.update(finish(unit, plans[unit], chosen[unit], unit_key(unit, "final", plans[unit], chosen[unit])))
            step(unit, None)
        return results

    # With a resume store, keys (a hash of each layer's weights and statistics, CPU-bound) are computed
    # ahead by worker threads and finished layers are written by another, while the GPU quantizes the
    # next layers; hashlib, copies and file writes release the GIL. The "resume" phase then times only waits.
    hasher = ThreadPoolExecutor(2, thread_name_prefix="svdq-key") if store is not None else None
    writer = ThreadPoolExecutor(1, thread_name_prefix="svdq-save") if store is not None else None
    keys = {unit: hasher.submit(_unit_key_now, store, cfg, unit, layers, stats, unsigned, out_dtype, device, "final")
            for unit in units} if store is not None else {}
    pending = []
    try:
        for unit in units:
            key, cached = None, None
            if store is not None:
                with timer("resume"):
                    key = keys[unit].result()
                    cached = store.load(key)
            if cached is not None:
                results.update(dict(zip(unit, cached)))
                step(unit, "resumed")
                continue
            p = problem(unit)
            lim = unit_limit(unit)
            if policy.mode == "fixed":
                rank = policy.rank
                alpha, _, _ = p.search_alpha(rank)
            else:
                alpha, _, _ = p.search_alpha(min(policy.rank, lim))
                ranks = sorted({min(r, lim) for r in policy.candidates})
                curve = p.rank_curve(alpha, ranks)
                ok = [r for r in ranks if curve[r] <= policy.error_budget]
                rank = ok[0] if ok else ranks[-1]
            out = p.finish_all(alpha, rank, [layers[n].bias for n in unit], out_dtype or layers[unit[0]].weight.dtype,
                               list(unit))
            if store is not None:
                pending.append(writer.submit(store.save, key, out))
            results.update(dict(zip(unit, out)))
            step(unit, None)
    finally:  # an interrupted run still keeps every finished layer for the next one
        if store is not None:
            for f in keys.values():
                f.cancel()
            with timer("resume"):
                for f in pending:
                    f.result()
            hasher.shutdown(wait=True)
            writer.shutdown(wait=True)
    return results


def _unit_key_now(store, cfg, unit, layers, stats, unsigned, out_dtype, device, *extra) -> str:
    """The resume key of a layer (or input group): everything its result depends on."""
    s = stats[unit[0]]
    return store.key(config_fingerprint(cfg), list(unit), [layers[n].weight for n in unit],
                     [layers[n].bias for n in unit], s.absmax, s.xmin, s.xmax, s.sample, s.gram, s.colsum,
                     s.rows_seen, bool(unsigned & set(unit)), str(out_dtype), str(device), *extra)


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


def _smoothing_text(alpha) -> str:
    if alpha is None:
        return "-"
    if isinstance(alpha, (list, tuple)):
        return f"{alpha[0]:.2f}/{alpha[1]:.2f}"
    return f"{alpha:.1f}"


def format_report(results: dict, outliers: dict | None = None, limit: int = 0) -> str:
    """Plain-text table a node can show: one line per layer. `outliers`: name -> ActivationStats.outlier_report().

    smooth α/β: the smoothing λ = max|x|^α / max|w|^β chosen ('-' = none); ch>kσ: input channels whose
    max |x| lies more than k standard deviations above the mean over channels; flags: g = GPTQ,
    u = unsigned activations, a = 16-bit activations, s = shares its input's smoothing and low-rank down projection."""
    k_std = next(iter(outliers.values()))["k_std"] if outliers else 0
    lines = [f"{'layer':60s} {'rank':>4s} {'smooth α/β':>10s} {'err naive':>9s} {'err':>7s} {'KiB 16b':>8s} {'KiB 4b':>7s}"
             + (f" {f'ch>{k_std:g}σ':>7s} {'max/med':>7s}" if outliers else "") + " flags"]
    items = list(results.items())
    for n, q in items[:limit or len(items)]:
        r = q.report
        flags = ("g" if r.get("gptq") else "") + ("u" if r.get("unsigned_acts") else "") + ("a" if r.get("act16") else "") \
            + ("s" if r.get("input_group") else "")
        line = (f"{n[-60:]:60s} {r['rank']:4d} {_smoothing_text(r['alpha']):>10s} {r['error_naive_w4a4']:9.4f} "
                f"{r['error']:7.4f} {r['bytes_16bit'] / 1024:8.0f} {r['bytes_4bit'] / 1024:7.0f}")
        if outliers:
            o = outliers[n]
            line += f" {o['outlier_channels']:7d} {o['max_over_median']:7.1f}"
        lines.append(line + (f" {flags}" if flags else ""))
    s = summarize(results)
    if s["layers"]:
        lines.append(f"{s['layers']} layers, mean rank {s['mean_rank']:.1f}, mean error {s['mean_error']:.4f} "
                     f"(naive W4A4 {s['mean_error_naive_w4a4']:.4f}), {s['bytes_16bit'] / 2**20:.1f} MiB -> "
                     f"{s['bytes_4bit'] / 2**20:.1f} MiB")
    return "\n".join(lines)
