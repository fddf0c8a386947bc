"""Quantize one linear layer the SVDQuant way, scored by the layer's output error.

Given W (N×K), calibration statistics of its input and a rank, find the smoothing factor λ,
the low-rank branch and the 4-bit residual that minimise ||X Wᵀ − Ŷ|| / ||X Wᵀ|| on the
calibration sample, with both weights and activations quantized (the real run-time error).
"""
from dataclasses import dataclass, field

import torch

from ..kernels import reference as ref
from .config import QuantConfig
from .lowrank import top_svd
from .weight_quant import quantize_weight


@dataclass
class QuantizedLinear:
    """The tensors of docs/FORMAT.md for one layer (natural layout), plus what was chosen."""
    qweight: torch.Tensor
    scales: dict                 # "wscales" (float mode) or "wscale_mult" + "wscale_base" (int_ratio)
    smooth_factor: torch.Tensor
    proj_down: torch.Tensor
    proj_up: torch.Tensor
    bias: torch.Tensor | None
    rank: int
    alpha: float | None
    report: dict = field(default_factory=dict)

    def tensors(self) -> dict:
        t = {"qweight": self.qweight, **self.scales, "smooth_factor": self.smooth_factor,
             "proj_down": self.proj_down, "proj_up": self.proj_up}
        if self.bias is not None:
            t["bias"] = self.bias
        return t


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """λ = max|x|^α / max|w|^(1−α), normalised to geometric mean 1; None = no smoothing (λ = 1).

    A channel that never fired (max|x| = 0) keeps λ = 1: it carries nothing to migrate.
    """
    if alpha is None:
        return torch.ones_like(x_absmax, dtype=torch.float32)
    xa = x_absmax.float()
    wa = w_absmax.float().clamp_min(1e-8)
    lam = xa.clamp_min(1e-8).pow(alpha) / wa.pow(1.0 - alpha)
    lam = torch.where(xa > 0, lam, torch.ones_like(lam))
    lam = lam / lam.log().mean().exp()
    return lam.clamp(1e-4, 1e4)


def fake_quant_act(xs: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Smoothed activations after the run-time 4-bit round trip of `mode` (what the kernels compute)."""
    if mode == "int_ratio":
        codes, mult, base = ref.quantize_groups_ratio(xs, group_size, ref.ACT_CHUNK_GROUPS)
        return ref.dequantize_ratio(codes, mult, base, group_size, ref.ACT_CHUNK_GROUPS)
    codes, scales = ref.quantize_groups(xs, group_size)
    return ref.dequantize_groups(codes, scales, group_size)


def _split(w_hat, rank, iters, quant, score=None, fast=False):
    """Low-rank split with optional refinement L ← SVD_r(Ŵ − Q(Ŵ − L)); keeps the best by `score`."""
    l_up, l_down = top_svd(w_hat, rank, fast)
    best = (l_up, l_down)
    if iters <= 1 or rank == 0:
        return best
    best_err = score(l_up, l_down) if score else None
    for _ in range(iters - 1):
        r = w_hat - l_up @ l_down
        q_err = r - quant(r)
        l_up, l_down = top_svd(w_hat - q_err, rank)
        if score is None:
            best = (l_up, l_down)
            continue
        err = score(l_up, l_down)
        if err >= best_err:
            break
        best, best_err = (l_up, l_down), err
    return best


def _simulate(x, w_hat, lam, l_up, l_down, group_size, mode, quant):
    """Fake-quantized output of the 4-bit layer on rows x (no bias), fp32."""
    r = w_hat - l_up @ l_down
    xs = x / lam
    y = fake_quant_act(xs, group_size, mode) @ quant(r).t()
    if l_up.shape[1]:
        y = y + (xs @ l_down.t()) @ l_up.t()
    return y


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    den = y_ref.float().pow(2).sum().clamp_min(1e-30)
    return float(((y.float() - y_ref.float()).pow(2).sum() / den).sqrt())


class LayerProblem:
    """One layer's weight and calibration sample, with the pieces every candidate reuses."""

    def __init__(self, weight: torch.Tensor, x_absmax: torch.Tensor, x_sample: torch.Tensor, cfg: QuantConfig, name: str = ""):
        self.name = name
        self.cfg = cfg
        self.w = weight.detach().float()
        n, k = self.w.shape
        if k % cfg.group_size:
            raise ValueError(f"layer {name}: in_features {k} is not a multiple of group size {cfg.group_size}")
        if x_sample.shape[0] == 0:
            raise ValueError(f"layer {name}: no calibration rows were captured (0 samples)")
        self.x = x_sample.float().to(self.w.device)
        self.x_absmax = x_absmax.float().to(self.w.device)
        self.w_absmax = self.w.abs().amax(dim=0)
        self.y_ref = self.x @ self.w.t()

    def quantizer(self, lam, search):
        """R ↦ dequantized 4-bit R in this config's scale mode, its error weighted by E[x̂²] per channel."""
        imp = (self.x / lam).pow(2).mean(dim=0)
        mode, g = self.cfg.scale_mode, self.cfg.group_size
        return lambda r: quantize_weight(r, g, mode, imp, search).dequantize(g)

    def error(self, lam, rank, iters=1, fast=False):
        w_hat = self.w * lam
        g, mode = self.cfg.group_size, self.cfg.scale_mode
        quant = self.quantizer(lam, search=not fast)
        score = (lambda u, d: relative_error(_simulate(self.x, w_hat, lam, u, d, g, mode, quant), self.y_ref))
        l_up, l_down = _split(w_hat, rank, iters, quant, score, fast)
        err = score(l_up, l_down)
        return err, (l_up, l_down)

    def search_alpha(self, rank):
        """Best α on the grid (None = no smoothing) at this rank, by output error."""
        best = None
        for a in (None, *self.cfg.alpha_grid):
            err, lr = self.error(smoothing_factor(self.x_absmax, self.w_absmax, a), rank, fast=True)
            if best is None or err < best[1]:
                best = (a, err, lr)
        return best

    def rank_curve(self, alpha, ranks):
        """Output error at each rank for a fixed α (one SVD of the largest rank serves all)."""
        lam = smoothing_factor(self.x_absmax, self.w_absmax, alpha)
        w_hat = self.w * lam
        top = max(ranks)
        u, d = top_svd(w_hat, top)
        quant = self.quantizer(lam, search=False)
        g, mode = self.cfg.group_size, self.cfg.scale_mode
        return {r: relative_error(_simulate(self.x, w_hat, lam, u[:, :r], d[:r], g, mode, quant), self.y_ref)
                for r in ranks}

    def finish(self, alpha, rank, bias, out_dtype) -> QuantizedLinear:
        """Build the stored tensors for the chosen α and rank (with refinement if configured)."""
        g = self.cfg.group_size
        lam = smoothing_factor(self.x_absmax, self.w_absmax, alpha)
        err, (l_up, l_down) = self.error(lam, rank, self.cfg.lowrank_iters)
        imp = (self.x / lam).pow(2).mean(dim=0)
        wq = quantize_weight(self.w * lam - l_up @ l_down, g, self.cfg.scale_mode, imp)
        ones = torch.ones_like(lam)
        naive = relative_error(_simulate(self.x, self.w, ones, self.w.new_zeros(self.w.shape[0], 0),
                                         self.w.new_zeros(0, self.w.shape[1]), g, "float",
                                         lambda r: quantize_weight(r, g, "float", search=False).dequantize(g)),
                               self.y_ref)
        n, k = self.w.shape
        # float-mode scales are stored in the model dtype; int_ratio multipliers/bases keep their own dtypes
        scales = {name: (t.to(out_dtype) if name == "wscales" else t).cpu() for name, t in wq.file_tensors.items()}
        q = QuantizedLinear(
            qweight=ref.pack_int4(wq.codes).cpu(),
            scales=scales,
            smooth_factor=lam.to(out_dtype).cpu(),
            proj_down=(l_down / lam).t().contiguous().to(out_dtype).cpu(),
            proj_up=l_up.contiguous().to(out_dtype).cpu(),
            bias=None if bias is None else bias.detach().to(out_dtype).cpu(),
            rank=rank,
            alpha=alpha,
        )
        elt = torch.finfo(out_dtype).bits // 8
        q.report = {
            "layer": self.name, "in": k, "out": n, "rank": rank,
            "alpha": alpha, "scales": self.cfg.scale_mode, "error_naive_w4a4": naive, "error": err,
            "bytes_16bit": n * k * elt + (n * elt if bias is not None else 0),
            "bytes_4bit": sum(t.numel() * t.element_size() for t in q.tensors().values()),
        }
        return q


def quantize_linear(weight, bias, x_absmax, x_sample, cfg: QuantConfig, rank: int, name: str = "",
                    out_dtype=None) -> QuantizedLinear:
    """Smoothing search at `rank`, then the final split; the one-layer entry point."""
    n, k = weight.shape
    if rank > min(n, k):
        raise ValueError(f"layer {name}: rank {rank} is larger than the layer allows (min(out, in) = {min(n, k)})")
    prob = LayerProblem(weight, x_absmax, x_sample, cfg, name)
    alpha, _, _ = prob.search_alpha(rank)
    return prob.finish(alpha, rank, bias, out_dtype or weight.dtype)
