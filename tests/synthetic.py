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


def realistic_activations(rows: int, k: int, gen: torch.Generator, n_outliers: int | None = None,
                          post_gelu: bool = False) -> torch.Tensor:
    """Activations shaped like a diffusion model's (random, not trained): correlated channels (a
    latent factor model), heavy-tailed tokens (Student-t factors, log-normal token scales), log-normal
    channel magnitudes and a few 20–100× outlier channels. post_gelu: the GELU (tanh) of such
    pre-activations, as the input of an MLP's second linear (>= -0.17, mostly small, long positive tail)."""
    d = max(8, k // 8)
    chi2 = torch.randn(4, rows, d, generator=gen).pow(2).sum(0)                      # Student-t, 4 dof
    z = torch.randn(rows, d, generator=gen) / (chi2 / 4).sqrt()
    mix = torch.randn(d, k, generator=gen) / d ** 0.5
    x = z @ mix + 0.5 * torch.randn(rows, k, generator=gen)
    x *= torch.exp(0.5 * torch.randn(rows, 1, generator=gen))                       # token scales
    x *= torch.exp(0.7 * torch.randn(1, k, generator=gen))                          # channel magnitudes
    n_out = max(2, k // 256) if n_outliers is None else n_outliers
    ch = torch.randperm(k, generator=gen)[:n_out]
    x[:, ch] *= torch.logspace(torch.log10(torch.tensor(20.0)), 2, n_out)
    if post_gelu:
        x = torch.nn.functional.gelu(x / x.std(dim=0).median(), approximate="tanh")  # typical channel: unit std
    return x


def lowrankish_weight(n: int, k: int, gen: torch.Generator, strong: int = 32) -> torch.Tensor:
    """Random weight with a trained-like spectrum: a Gaussian bulk plus `strong` directions whose
    singular values fall steeply from ~3× the bulk's edge (the shape of the paper's Fig. 5)."""
    bulk = torch.randn(n, k, generator=gen) / k ** 0.5
    edge = (n ** 0.5 + k ** 0.5) / k ** 0.5
    u = torch.linalg.qr(torch.randn(n, strong, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(k, strong, generator=gen)).Q
    s = 3 * edge * torch.exp(-torch.arange(strong, dtype=torch.float32) / 8)
    w = bulk + (u * s) @ v.t()
    return w * torch.exp(0.3 * torch.randn(1, k, generator=gen))                    # input-channel weight scales
