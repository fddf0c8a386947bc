"""Random SVDQuant layers and activations with outlier channels, for the GPU kernel tests and the bench."""
import torch

from comfyui_svdquant.kernels import reference as ref


def make_layer(n, k, rank, dtype, device, bias=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    t = {
        "qweight": ref.pack_int4(codes),
        "wscales": (torch.rand(k // 64, n, generator=g) * 0.02 + 0.002),
        "smooth_factor": torch.rand(k, generator=g) * 1.5 + 0.5,
        "proj_down": torch.randn(k, rank, generator=g) / k ** 0.5,
        "proj_up": torch.randn(n, rank, generator=g) * 0.05,
        "bias": torch.randn(n, generator=g) * 0.1 if bias else None,
    }
    t["smooth_factor"][torch.randperm(k, generator=g)[: max(1, k // 64)]] *= 8.0  # outlier channels
    out = {}
    for name, v in t.items():
        if v is None:
            out[name] = None
        elif name == "qweight":
            out[name] = v.to(device)
        else:
            out[name] = v.to(device=device, dtype=dtype)
    return out


def make_x(m, k, dtype, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    cols = torch.randperm(k, generator=g)[: max(1, k // 50)]
    x[:, cols] *= 30.0  # outlier channels
    return x.to(device=device, dtype=dtype)


def make_ratio_layer(n, k, rank, dtype, device, bias=True, seed=0):
    """A random layer with int_ratio scales: multipliers 1..18 per (group, column), one fp32 base per column."""
    lay = make_layer(n, k, rank, dtype, device, bias=bias, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    del lay["wscales"]
    lay["wscale_mult"] = torch.randint(1, ref.RATIO_MAX + 1, (k // 64, n), generator=g, dtype=torch.uint8).to(device)
    lay["wscale_base"] = (torch.rand(n, generator=g) * 0.002 + 0.0002).to(device)
    return lay
