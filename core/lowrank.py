"""Truncated SVD of a (smoothed) weight: Ŵ ≈ L_up · L_down with singular values in L_up.

Two forms:
- `top_svd(w, r)`: one matrix, for the stored split. Up to GRAM_MAX_DIM on the narrow side the
  top-r subspace comes from the eigen-decomposition of the small Gram matrix (LAPACK's full SVD of
  a wide fp32 matrix is seconds on CPU: 1.1 s for 320×2048 measured here, vs 0.02 s this way; fp32
  suffices for the top r, whose σ² are far above eps·σ_max²); above it a randomized SVD.
- `batched_top_svd(w, s, r)`: the randomized SVD of W·diag(s_c) for many column scalings s_c at
  once (smoothing candidates). Every product with W is one GEMM over all candidates, because
  W·diag(s_c)·Ω = W·(s_c ⊙ Ω): the weight is read once per power iteration, not once per candidate.

Randomized SVDs draw their test matrix from a generator with a fixed seed, so a layer's split is
the same on every run (resumed runs must reproduce uninterrupted ones bit for bit).
"""
import torch

GRAM_MAX_DIM = 512
SEED = 0x5EED


def _gram_top(w: torch.Tensor, rank: int):
    n, k = w.shape
    if n <= k:
        evals, evecs = torch.linalg.eigh(w @ w.t())
        u = evecs[:, -rank:].flip(1)
        s = evals[-rank:].flip(0).clamp_min(0).sqrt()
        vh = (u.t() @ w) / s.clamp_min(1e-30).unsqueeze(1)
    else:
        evals, evecs = torch.linalg.eigh(w.t() @ w)
        v = evecs[:, -rank:].flip(1)
        s = evals[-rank:].flip(0).clamp_min(0).sqrt()
        u = (w @ v) / s.clamp_min(1e-30)
        vh = v.t()
    return (u * s).float(), vh.float().contiguous()


def _times_w(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """W (N×K) @ z (C×K×q) -> (C×N×q) as one GEMM."""
    c, k, q = z.shape
    return (w @ z.permute(1, 0, 2).reshape(k, c * q)).reshape(w.shape[0], c, q).permute(1, 0, 2)


def _times_wt(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Wᵀ (K×N) @ y (C×N×q) -> (C×K×q) as one GEMM."""
    c, n, q = y.shape
    return (w.t() @ y.permute(1, 0, 2).reshape(n, c * q)).reshape(w.shape[1], c, q).permute(1, 0, 2)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def batched_top_svd(w: torch.Tensor, col_scales: torch.Tensor, rank: int, oversample: int = 16, niter: int = 2,
                    seed: int = SEED):
    """Top-`rank` factors of Ŵ_c = W·diag(col_scales[c]) for every row c: (L_up (C,N,r), L_down (C,r,K)), fp32.

    Randomized range finder with `niter` power iterations and `oversample` extra columns (Halko et
    al. 2011); the test matrix is shared by the candidates and seeded, so results are reproducible.
    """
    w = w.float()
    s = col_scales.float()
    n, k = w.shape
    c = s.shape[0]
    if rank == 0:
        return w.new_zeros(c, n, 0), w.new_zeros(c, 0, k)
    q = min(rank + oversample, n, k)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(k, q, generator=gen, device=w.device)
    y = _orth(_times_w(w, s.unsqueeze(2) * omega))
    for _ in range(niter):
        z = _orth(s.unsqueeze(2) * _times_wt(w, y))
        y = _orth(_times_w(w, s.unsqueeze(2) * z))
    bt = s.unsqueeze(2) * _times_wt(w, y)               # (C, K, q) = Ŵ_cᵀ Q_c
    evals, evecs = torch.linalg.eigh(bt.transpose(1, 2) @ bt)  # B Bᵀ (q×q): its top eigenpairs give B's top SVD
    ub = evecs[..., -rank:].flip(-1)
    sv = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
    l_down = (bt @ ub).transpose(1, 2) / sv.clamp_min(1e-30).unsqueeze(2)
    l_up = (y @ ub) * sv.unsqueeze(1)
    return l_up, l_down.contiguous()


def top_svd(w: torch.Tensor, rank: int, fast: bool = False):
    """Return (L_up (N×r), L_down (r×K)) in fp32 with L_up·L_down the best rank-r approximation.

    fast: fewer power iterations on large layers, for scoring candidates (the final split is exact-er).
    """
    n, k = w.shape
    if rank > min(n, k):
        raise ValueError(f"rank {rank} is larger than the layer allows (min(out, in) = {min(n, k)})")
    w = w.float()
    if rank == 0:
        return w.new_zeros(n, 0), w.new_zeros(0, k)
    if min(n, k) <= GRAM_MAX_DIM:
        return _gram_top(w, rank)
    ones = torch.ones(1, k, device=w.device)
    u, d = batched_top_svd(w, ones, rank, oversample=16 if fast else 32, niter=2 if fast else 4)
    return u[0], d[0]


def activation_weighted_top(d: torch.Tensor, rank: int, damp: float = 0.01, *, h: torch.Tensor | None = None,
                            rows: torch.Tensor | None = None):
    """(L_up (N×r), L_down (r×K)) minimising ‖X̂(D − L_up·L_down)ᵀ‖² + δ‖D − L_up·L_down‖², δ = damp · mean(diag H),
    H = X̂ᵀX̂: L = SVD_r(D·H_δ^½)·H_δ^-½ (the closed form of activation-weighted low-rank error reconstruction).
    D is what the branch should carry (Ŵ minus the dequantized 4-bit residual). Give H (K×K) or the rows X̂
    (n×K, n small): with rows, H_δ^±½ = V·(S²+δ)^±½·Vᵀ + δ^±½·(I − VVᵀ) from the thin SVD X̂ = U·S·Vᵀ, so no
    K×K matrix is formed (K is 15360 on FLUX's single blocks)."""
    d = d.float()
    if rows is not None:
        _, s, vt = torch.linalg.svd(rows.float(), full_matrices=False)
        delta = damp * float((s * s).sum()) / d.shape[1]
        delta = max(delta, 1e-30)
        grow = (s * s + delta).sqrt() - delta ** 0.5            # H_δ^½ − √δ·I on the row space
        dv = d @ vt.t()
        u_up, d_down = top_svd((dv * grow) @ vt + delta ** 0.5 * d, rank)
        shrink = (s * s + delta).rsqrt() - delta ** -0.5        # H_δ^-½ − I/√δ on the row space
        return u_up, ((d_down @ vt.t()) * shrink) @ vt + d_down * delta ** -0.5
    k = h.shape[0]
    h = h.float()
    hd = h + damp * float(h.diagonal().mean().clamp_min(1e-30)) * torch.eye(k, device=h.device)
    ev, v = torch.linalg.eigh(hd)
    ev = ev.clamp_min(float(ev.max()) * 1e-12).sqrt()
    u_up, d_down = top_svd(d @ (v * ev) @ v.t(), rank)  # the rank-r split of D·H^½
    return u_up, (d_down @ v / ev) @ v.t()
