"""GPTQ rounding of a 4-bit residual with fixed per-group steps (Frantar et al. 2022).

The steps (scales) are chosen first, by either scale mode's own search (core/weight_quant.py), so
the file format does not change: GPTQ only picks the integer codes, column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer's input, H = X̂ᵀX̂ (X̂ = smoothed calibration activations). Damping (a fraction of mean
diag(H)) and lazy blocks of columns as in the reference implementation (damp 0.01, block 128).
"""
import torch

from .. import kernels
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
        low, info = torch.linalg.cholesky_ex(h + (damp * extra) * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(low)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
    raise GPTQError(f"layer {name}: the calibration Hessian is not positive definite even with "
                    f"{100 * 100 * damp:g}% damping; use more calibration samples or turn GPTQ off")


def gptq_codes(r: torch.Tensor, steps: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01,
               block: int = 128, name: str = "") -> torch.Tensor:
    """INT4 codes (N, K) int8 in [-7, 7] of residual r (N, K) on the fixed grid step[n, k // G].

    h (K, K): X̂ᵀX̂ of the calibration rows (any positive multiple). Returns what
    ref.quantize_with_steps would, except that each column's rounding error is compensated on the
    later columns: the output error ||X̂ (R − R_q)ᵀ|| falls, the stored scales do not change.
    """
    n, k = r.shape
    if h.shape != (k, k):
        raise GPTQError(f"layer {name}: Hessian shape {tuple(h.shape)} does not match {k} input channels")
    hinv = _inverse_cholesky(h, damp, name)
    # Column-major working copies (row c = input channel c): every step below reads contiguous rows.
    wt = r.float().t().contiguous()                                      # (K, N)
    st = steps.float().t().repeat_interleave(group_size, dim=0)          # (K, N) step of each weight
    q_all = torch.empty_like(wt)
    # kernels/csrc/gptq.cu runs the column loop (blocks of <= 128 columns) one thread per output channel
    use_kernel = block <= 128 and kernels.gptq_available(wt.device)
    if use_kernel:
        hinv = hinv.contiguous()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        err1 = torch.empty_like(wt[i1:i2])
        if use_kernel:
            kernels.gptq_block(wt[i1:i2], st[i1:i2], hinv[i1:i2, i1:], q_all[i1:i2], err1, ref.QMAX)
        else:
            _column_loop(wt[i1:i2], st[i1:i2], hinv[i1:i2, i1:i2], q_all[i1:i2], err1)
        if i2 < k:  # the block's errors onto every later column: one GEMM
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    return q_all.t().to(torch.int8).contiguous()


def _column_loop(w1, st, hb, q_out, err_out) -> None:
    """One block, column by column (the reference of kernels/csrc/gptq.cu): round column j on its steps
    (code 0 where the step is 0), scale its error by 1/diag, push it onto the block's later columns."""
    live = (st > 0).float()
    safe = torch.where(st > 0, st, torch.ones_like(st))
    dinv = 1.0 / torch.diagonal(hb)
    b = w1.shape[0]
    for j in range(b):
        q = torch.round(w1[j] / safe[j]).clamp_(-ref.QMAX, ref.QMAX).mul_(live[j])
        q_out[j] = q
        e = (w1[j] - q * st[j]).mul_(dinv[j])
        err_out[j] = e
        if j + 1 < b:
            w1[j + 1:].addr_(hb[j, j + 1:], e, alpha=-1.0)
