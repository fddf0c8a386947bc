"""GPTQ rounding of a 4-bit residual with fixed per-group steps (Frantar et al. 2022).

The steps (scales) are chosen first, by either scale mode's own search (core/weight_quant.py), so
the file format does not change: GPTQ only picks the integer codes, column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer's input, H = X̂ᵀX̂ (X̂ = smoothed calibration activations). Damping (a fraction of mean
diag(H)) and lazy blocks of columns as in the reference implementation (damp 0.01, block 128).
"""
import torch

from ..kernels import reference as ref


class GPTQError(ValueError):
    pass


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after damping; more damping if H is numerically singular."""
    h = h.float().clone()
    k = h.shape[0]
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # a channel that never fired: its column is rounded on its own
    mean = float(diag.mean())
    eye = torch.eye(k, device=h.device)
    for extra in (1.0, 10.0, 100.0):
        l, info = torch.linalg.cholesky_ex(h + (damp * extra) * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
    raise GPTQError(f"layer {name}: the calibration Hessian is not positive definite even with "
                    f"{100 * damp:g}% damping; use more calibration samples or turn GPTQ off")


def gptq_codes(r: torch.Tensor, steps: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01,
               block: int = 128, name: str = "") -> torch.Tensor:
    """INT4 codes (N, K) int8 in [-7, 7] of residual r (N, K) on the fixed grid step[n, k // G].

    h (K, K): X̂ᵀX̂ of the calibration rows (any positive multiple). Returns what
    ref.quantize_with_steps would, except that each column's rounding error is compensated on the
    later columns: the output error ||X̂ (R − R_q)ᵀ|| falls, the stored scales do not change.
    """
    w = r.float().clone()
    n, k = w.shape
    if h.shape != (k, k):
        raise GPTQError(f"layer {name}: Hessian shape {tuple(h.shape)} does not match {k} input channels")
    hinv = _inverse_cholesky(h, damp, name)
    col_steps = steps.float().repeat_interleave(group_size, dim=1)       # (N, K)
    safe = torch.where(col_steps > 0, col_steps, torch.ones_like(col_steps))
    live = col_steps > 0
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            q = torch.round(w1[:, j] / safe[:, c]).clamp_(-ref.QMAX, ref.QMAX)
            q = torch.where(live[:, c], q, torch.zeros_like(q))
            codes[:, c] = q.to(torch.int8)
            e = (w1[:, j] - q * col_steps[:, c]) / hb[j, j]
            w1[:, j:] -= e.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            err1[:, j] = e
        if i2 < k:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes
