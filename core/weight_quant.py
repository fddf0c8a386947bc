"""4-bit quantization of a layer's residual R (N×K) in either scale mode (docs/FORMAT.md §1).

Scales are chosen by a small search rather than taken from absmax alone: a slightly smaller step that
clips the largest value often lowers the error of the whole group (float mode), and in int_ratio mode
the row base and each group's integer multiplier are picked to minimise the error. The error of a
weight column is weighted by the mean square of the (smoothed) activation that multiplies it, so the
search spends precision where the layer's output feels it.
"""
from dataclasses import dataclass

import torch

from ..kernels import reference as ref

# float mode: step = absmax · t / 7 for t on this grid (t = 1: no clipping)
FLOAT_CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(11))
# int_ratio mode: row base = row absmax / (7 · F) for F on this grid (F = 18: the largest group is unclipped)
RATIO_BASE_GRID = tuple(18.0 - 0.5 * i for i in range(13))


@dataclass
class QuantizedWeight:
    codes: torch.Tensor          # int8 (N, K) in [-7, 7]
    steps: torch.Tensor          # fp32 (N, K/G): the effective per-group scale
    file_tensors: dict           # what the file stores for these scales (besides qweight)

    def dequantize(self, group_size: int) -> torch.Tensor:
        return ref.dequantize_groups(self.codes, self.steps, group_size)


def _group_error(xg, steps, imp):
    """Weighted squared error per (row, group) of quantizing xg (N, ng, G) with steps (N, ng)."""
    safe = torch.where(steps > 0, steps, torch.ones_like(steps)).unsqueeze(-1)
    d = torch.round(xg / safe).clamp_(-ref.QMAX, ref.QMAX) * safe - xg
    return (d * d * imp).sum(dim=-1)


def _importance(k, group_size, importance, device):
    if importance is None:
        return torch.ones(1, k // group_size, group_size, device=device)
    return importance.float().to(device).clamp_min(0).reshape(1, k // group_size, group_size)


def quantize_weight(r: torch.Tensor, group_size: int, mode: str, importance: torch.Tensor | None = None,
                    search: bool = True) -> QuantizedWeight:
    """Quantize R (N×K) to INT4 codes with `mode` scales; importance (K,) weights the per-column error.

    search=False takes the plain absmax scales (cheap: used while scoring smoothing candidates).
    """
    r = r.float()
    n, k = r.shape
    if k % group_size:
        raise ValueError(f"input channels {k} are not a multiple of group size {group_size}")
    ng = k // group_size
    xg = r.reshape(n, ng, group_size)
    amax = xg.abs().amax(dim=-1)
    imp = _importance(k, group_size, importance, r.device)
    if mode == "float":
        best = amax / ref.QMAX
        if search:
            best_err = _group_error(xg, best, imp)
            for t in FLOAT_CLIP_GRID[1:]:
                cand = amax * (t / ref.QMAX)
                err = _group_error(xg, cand, imp)
                better = err < best_err
                best = torch.where(better, cand, best)
                best_err = torch.where(better, err, best_err)
        codes = ref.quantize_with_steps(r, best, group_size)
        return QuantizedWeight(codes, best, {"wscales": best.t().contiguous()})
    if mode != "int_ratio":
        raise ValueError(f"unknown scale mode {mode!r} (expected one of {ref.SCALE_MODES})")
    rmax = amax.amax(dim=-1, keepdim=True)  # (N, 1)
    grid = RATIO_BASE_GRID if search else RATIO_BASE_GRID[:1]
    best_mult = best_base = best_rowerr = None
    for f_top in grid:
        base = rmax / (ref.QMAX * f_top)
        unit = base * ref.QMAX
        safe = torch.where(unit > 0, unit, torch.ones_like(unit))
        up = torch.where(unit > 0, torch.ceil(amax / safe), torch.ones_like(amax)).clamp_(1, ref.RATIO_MAX)
        if not search:  # one candidate: nothing to compare, no error to compute
            best_mult, best_base = up, base
            break
        err = _group_error(xg, base * up, imp)
        down = (up - 1).clamp_(min=1)
        err_d = _group_error(xg, base * down, imp)
        take = err_d < err
        mult, err = torch.where(take, down, up), torch.where(take, err_d, err)
        row_err = err.sum(dim=-1, keepdim=True)
        if best_rowerr is None:
            best_mult, best_base, best_rowerr = mult, base, row_err
        else:
            better = row_err < best_rowerr
            best_mult = torch.where(better, mult, best_mult)
            best_base = torch.where(better, base, best_base)
            best_rowerr = torch.where(better, row_err, best_rowerr)
    steps = best_base * best_mult
    codes = ref.quantize_with_steps(r, steps, group_size)
    return QuantizedWeight(codes, steps, {"wscale_mult": best_mult.t().to(torch.uint8).contiguous(),
                                          "wscale_base": best_base.reshape(n).contiguous()})
