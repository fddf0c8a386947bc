"""The 4-bit linear layer: holds the tensors of docs/FORMAT.md and calls the kernels."""
import torch
from torch import nn

from .. import kernels

TENSOR_NAMES = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up")


class SVDQuantLinear(nn.Module):
    """Y = Q(X/λ)·Q(R)ᵀ + (X·proj_down)·proj_upᵀ + b, a drop-in for nn.Linear(K, N)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 group_size: int = 64, dtype=torch.bfloat16, device=None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
        self.in_features, self.out_features, self.rank, self.group_size = in_features, out_features, rank, group_size
        g = in_features // group_size
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.int8, **kw))
        self.register_buffer("wscales", torch.zeros(g, out_features, dtype=dtype, **kw))
        self.register_buffer("smooth_factor", torch.ones(in_features, dtype=dtype, **kw))
        self.register_buffer("proj_down", torch.zeros(in_features, rank, dtype=dtype, **kw))
        self.register_buffer("proj_up", torch.zeros(out_features, rank, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self._prepared = None  # (device, dtype) -> kernel-ready tensors; rebuilt after .to()

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int = 64) -> "SVDQuantLinear":
        n, k2 = tensors["qweight"].shape
        m = cls(k2 * 2, n, tensors["proj_down"].shape[1], bias=tensors.get("bias") is not None,
                group_size=group_size, dtype=tensors["wscales"].dtype, device="meta")
        for name in TENSOR_NAMES + ("bias",):
            if tensors.get(name) is not None:
                setattr(m, name, tensors[name])
        return m

    def _apply(self, fn, *args, **kwargs):
        self._prepared = None
        return super()._apply(fn, *args, **kwargs)

    def kernel_tensors(self, dtype) -> dict:
        key = (self.qweight.device, dtype)
        if self._prepared is None or self._prepared[0] != key:
            t = {n: getattr(self, n) for n in TENSOR_NAMES}
            for n in ("wscales", "smooth_factor", "proj_down", "proj_up"):
                t[n] = t[n].to(dtype)
            t["bias"] = None if self.bias is None else self.bias.to(dtype)
            self._prepared = (key, kernels.prepare_weights(t, self.qweight.device))
        return self._prepared[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.kernel_tensors(x.dtype), self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
