"""Calibration statistics of one linear layer's input, in bounded memory.

Keeps the per-channel max |x|, min x and max x over every row seen, and a uniform random sample of
at most `max_rows` rows (priority sampling: every row draws a random key, the largest keys stay), so
memory does not grow with the number of calibration samples. Optionally (`track_gram`) also the
exact XᵀX and column sums over every row (K² floats: for GPTQ's Hessian where memory allows).
"""
import torch


class NonFiniteActivationError(ValueError):
    pass


class ActivationStats:
    def __init__(self, in_features: int, max_rows: int = 512, generator: torch.Generator | None = None, name: str = "",
                 track_gram: bool = False):
        self.in_features = in_features
        self.max_rows = max_rows
        self.name = name
        self.absmax = torch.zeros(in_features, dtype=torch.float32)
        self.xmin = torch.full((in_features,), float("inf"))
        self.xmax = torch.full((in_features,), float("-inf"))
        self.rows_seen = 0
        self._rows = torch.zeros(0, in_features, dtype=torch.float32)
        self._keys = torch.zeros(0, dtype=torch.float32)
        self._gen = generator
        self.gram = torch.zeros(in_features, in_features) if track_gram else None
        self.colsum = torch.zeros(in_features) if track_gram else None

    def _to(self, dev):
        for name in ("absmax", "xmin", "xmax", "_rows", "_keys", "gram", "colsum"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(dev))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: expected {self.in_features} input channels, got {x.shape[-1]}")
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"non-finite activations (NaN/Inf) reach layer {self.name or '?'}: calibration cannot use them")
        if self.rows_seen == 0:
            self._to(x.device)
        dev = self.absmax.device
        xf = x.to(dev, torch.float32)
        if xf.shape[0]:
            self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=0))
            self.xmin = torch.minimum(self.xmin, xf.amin(dim=0))
            self.xmax = torch.maximum(self.xmax, xf.amax(dim=0))
        if self.gram is not None:
            self.gram += xf.t() @ xf
            self.colsum += xf.sum(dim=0)
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

    def shifted_gram(self, shift: float = 0.0):
        """(X + c)ᵀ(X + c) over every row seen, from XᵀX and the column sums; None if not tracked."""
        if self.gram is None:
            return None
        if not shift:
            return self.gram
        s = self.colsum
        return self.gram + shift * (s.unsqueeze(1) + s.unsqueeze(0)) + shift * shift * self.rows_seen

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
