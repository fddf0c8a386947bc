"""Synthetic layers with realistic activation outliers, shared by the core tests."""
import torch


def outlier_activations(rows: int, k: int, n_outliers: int = 6, gen: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian activations where a few input channels are 10–100× larger than the rest."""
    x = torch.randn(rows, k, generator=gen)
    ch = torch.randperm(k, generator=gen)[:n_outliers]
    x[:, ch] *= torch.logspace(1, 2, n_outliers)
    return x


def outlier_layer(n: int = 192, k: int = 384, rows: int = 384, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = outlier_activations(rows, k, gen=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return w, x
