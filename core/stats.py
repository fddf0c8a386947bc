"""Calibration statistics of one linear layer's input, in bounded memory.

Keeps the per-channel max |x| over every row seen, and a uniform random sample of at most
`max_rows` rows (priority sampling: every row draws a random key, the largest keys stay), so
memory does not grow with the number of calibration samples.
"""
import torch


class NonFiniteActivationError(ValueError):
    pass


class ActivationStats:
    def __init__(self, in_features: int, max_rows: int = 512, generator: torch.Generator | None = None, name: str = ""):
        self.in_features = in_features
        self.max_rows = max_rows
        self.name = name
        self.absmax = torch.zeros(in_features, dtype=torch.float32)
        self.rows_seen = 0
        self._rows = torch.zeros(0, in_features, dtype=torch.float32)
        self._keys = torch.zeros(0, dtype=torch.float32)
        self._gen = generator

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: expected {self.in_features} input channels, got {x.shape[-1]}")
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"non-finite activations (NaN/Inf) reach layer {self.name or '?'}: calibration cannot use them")
        dev = self.absmax.device if self.rows_seen else x.device
        if self.rows_seen == 0:
            self.absmax = self.absmax.to(dev)
            self._rows = self._rows.to(dev)
            self._keys = self._keys.to(dev)
        xf = x.to(dev, torch.float32)
        self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=0))
        keys = torch.rand(xf.shape[0], generator=self._gen).to(dev)
        if xf.shape[0] > self.max_rows:  # only the batch's top keys can survive the merge
            keys, idx = keys.topk(self.max_rows)
            xf = xf[idx]
        rows = torch.cat([self._rows, xf])
        allkeys = torch.cat([self._keys, keys])
        if rows.shape[0] > self.max_rows:
            allkeys, idx = allkeys.topk(self.max_rows)
            rows = rows[idx]
        self._rows, self._keys = rows, allkeys
        self.rows_seen += x.shape[0]

    @property
    def sample(self) -> torch.Tensor:
        return self._rows

    def outlier_report(self, k_std: float = 4.0) -> dict:
        """Channels whose max |x| exceeds mean + k·std of the per-channel maxima."""
        a = self.absmax
        thresh = a.mean() + k_std * a.std()
        med = a.median().clamp_min(1e-12)
        return {
            "outlier_channels": int((a > thresh).sum()),
            "k_std": k_std,
            "max_over_median": float(a.max() / med),
            "rows_seen": self.rows_seen,
        }
