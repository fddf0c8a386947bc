"""Truncated SVD of a (smoothed) weight: Ŵ ≈ L_up · L_down with singular values in L_up."""
import torch

# Below this size a full SVD is cheap and exact; above it a randomized SVD gives the same
# top-r subspace to within its oversampling error at a fraction of the cost.
FULL_SVD_MAX_DIM = 2048


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
    if min(n, k) <= FULL_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        q = min(rank + (16 if fast else 32), min(n, k))
        u, s, v = torch.svd_lowrank(w, q=q, niter=2 if fast else 4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].t()
    return u * s, vh.contiguous()
