"""Quantize one linear layer (or a group sharing one input) the SVDQuant way, scored by output error.

Given W (N×K), calibration statistics of its input and a rank, find the smoothing factor λ,
the low-rank branch and the 4-bit residual that minimise ||X Wᵀ − Ŷ|| / ||X Wᵀ|| on the
calibration sample, with both weights and activations quantized (the real run-time error).

A group (linears fed the same input, e.g. q/k/v) is one problem on the concatenated weight
[W_q; W_k; W_v]: one λ, one L_down, the concatenated output error; each member then stores its
slice of L_up and of the residual (rows are quantized independently, so slicing is exact).
"""
from dataclasses import dataclass, field

import torch

from ..kernels import reference as ref
from .config import QuantConfig
from .gptq import gptq_codes
from .lowrank import activation_weighted_top, batched_top_svd, top_svd
from .timing import PhaseTimer
from .weight_quant import QuantizedWeight, quantize_weight

# Scoring evaluates candidates in batches of about this many bytes of working tensors: on a GPU
# large batches save launches on small layers; on a CPU small ones stay in cache (measured: 256 MiB
# batches took 1.5-2.9x the time of 16 MiB ones on 320x1280 ... 1280x1280 layers, one thread).
SCORE_BYTES = {"cpu": 16 << 20, "cuda": 2 << 30}
# Marker tensor of a layer with 16-bit activations: uint8 (1,) holding 16 (docs/FORMAT.md §1).
ACT_BITS = "act_bits"


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
    act_shift: torch.Tensor | None = None   # (1,) fp32: unsigned activations (reference path only)
    act16: bool = False                     # 16-bit activations: stored as the `act_bits` marker (docs/FORMAT.md)

    def tensors(self) -> dict:
        t = {"qweight": self.qweight, **self.scales, "smooth_factor": self.smooth_factor,
             "proj_down": self.proj_down, "proj_up": self.proj_up}
        if self.bias is not None:
            t["bias"] = self.bias
        if self.act_shift is not None:
            t["act_shift"] = self.act_shift
        if self.act16:
            t[ACT_BITS] = torch.tensor([16], dtype=torch.uint8)
        return t


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha, beta: float | None = None) -> torch.Tensor:
    """λ = max|x|^α / max|w|^β, normalised to geometric mean 1; alpha None = no smoothing (λ = 1).

    alpha may be an (α, β) pair (a smoothing candidate); a bare α means β = 1 − α.
    A channel that never fired (max|x| = 0) keeps λ = 1: it carries nothing to migrate.
    """
    if alpha is None:
        return torch.ones_like(x_absmax, dtype=torch.float32)
    if isinstance(alpha, (tuple, list)):
        alpha, beta = alpha
    if beta is None:
        beta = 1.0 - alpha
    xa = x_absmax.float()
    wa = w_absmax.float().clamp_min(1e-8)
    lam = xa.clamp_min(1e-8).pow(alpha) / wa.pow(beta)
    lam = torch.where(xa > 0, lam, torch.ones_like(lam))
    lam = lam / lam.log().mean().exp()
    return lam.clamp(1e-4, 1e4)


def fake_quant_act(xs: torch.Tensor, group_size: int, mode: str, unsigned: bool = False) -> torch.Tensor:
    """Smoothed activations after the run-time 4-bit round trip (what the kernels compute)."""
    if unsigned:
        codes, scales = ref.quantize_groups_unsigned(xs, group_size)
        return ref.dequantize_groups(codes, scales, group_size)
    if mode == "int_ratio":
        codes, mult, base = ref.quantize_groups_ratio(xs, group_size, ref.ACT_CHUNK_GROUPS)
        return ref.dequantize_ratio(codes, mult, base, group_size, ref.ACT_CHUNK_GROUPS)
    codes, scales = ref.quantize_groups(xs, group_size)
    return ref.dequantize_groups(codes, scales, group_size)


def _split(w_hat, rank, iters, quant, score=None, fast=False):
    """Low-rank split with optional refinement L ← SVD_r(Ŵ − Q(Ŵ − L)), kept while `score` falls.

    Returns ((L_up, L_down), SVDs that improved the score (1 = the plain SVD)).
    """
    l_up, l_down = top_svd(w_hat, rank, fast)
    best, used = (l_up, l_down), 1
    if iters <= 1 or rank == 0:
        return best, used
    best_err = score(l_up, l_down) if score else None
    for i in range(iters - 1):
        # the branch refits what the 4-bit residual misses: Ŵ − Q(Ŵ − L) = L + (R − Q(R))
        l_up, l_down = top_svd(w_hat - quant(w_hat - l_up @ l_down), rank)
        if score is None:
            best, used = (l_up, l_down), i + 2
            continue
        err = score(l_up, l_down)
        if err >= best_err:
            break
        best, best_err, used = (l_up, l_down), err, i + 2
    return best, used


def _simulate(x, w_hat, lam, l_up, l_down, group_size, mode, quant, unsigned=False, act16=False):
    """Fake-quantized output of the 4-bit layer on rows x (no bias), fp32 (act16: activations not quantized)."""
    r = w_hat - l_up @ l_down
    xs = x / lam
    y = (xs if act16 else fake_quant_act(xs, group_size, mode, unsigned)) @ quant(r).t()
    if l_up.shape[1]:
        y = y + (xs @ l_down.t()) @ l_up.t()
    return y


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    den = y_ref.float().pow(2).sum().clamp_min(1e-30)
    return float(((y.float() - y_ref.float()).pow(2).sum() / den).sqrt())


def _plain_quant(r: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Dequantized absmax-scale 4-bit R (..., N, K): the cheap quantizer that scores candidates."""
    shape = r.shape
    return quantize_weight(r.reshape(-1, shape[-1]), group_size, mode, search=False).dequantize(group_size).reshape(shape)


def _describe(cand):
    return None if cand is None else [float(cand[0]), float(cand[1])] if isinstance(cand, (tuple, list)) else float(cand)


class LayerProblem:
    """One layer's (or one input group's) weight and calibration sample, with what every candidate reuses.

    splits: output widths of the group's members in the concatenated weight (None: one layer).
    act_shift: a shift c for unsigned activations (the layer reads X + c >= 0), None = signed.
    x_max: per-channel max of x (for the shifted range); gram: XᵀX (shifted by c) over all rows, for GPTQ.
    """

    def __init__(self, weight: torch.Tensor, x_absmax: torch.Tensor, x_sample: torch.Tensor, cfg: QuantConfig,
                 name: str = "", *, splits=None, act_shift: float | None = None, x_max: torch.Tensor | None = None,
                 gram: torch.Tensor | None = None, timer: PhaseTimer | None = None, act16: bool = False):
        self.name = name
        self.cfg = cfg
        self.w = weight.detach().float()
        n, k = self.w.shape
        if k % cfg.group_size:
            raise ValueError(f"layer {name}: in_features {k} is not a multiple of group size {cfg.group_size}")
        if x_sample.shape[0] == 0:
            raise ValueError(f"layer {name}: no calibration rows were captured (0 samples)")
        self.splits = list(splits) if splits else [n]
        if sum(self.splits) != n:
            raise ValueError(f"layer {name}: member widths {self.splits} do not add up to {n} outputs")
        dev = self.w.device
        self.timer = timer or PhaseTimer()
        if act16 and act_shift is not None:
            raise ValueError(f"layer {name}: 16-bit activations cannot also be unsigned")
        self.act16 = act16
        self.unsigned = act_shift is not None
        self.shift = float(act_shift or 0.0)
        self.x_orig = x_sample.float().to(dev)
        self.x = self.x_orig + self.shift if self.shift else self.x_orig
        xa = x_absmax.float().to(dev)
        if self.unsigned:
            xa = ((x_max.float().to(dev) if x_max is not None else xa) + self.shift).clamp_min(0)
        self.x_absmax = xa
        self.w_absmax = self.w.abs().amax(dim=0)
        self.y_ref = self.x @ self.w.t()
        # the layer's own output (before the shift is folded into its bias) sets the error scale
        self.y_orig = self.x_orig @ self.w.t() if self.shift else self.y_ref
        self.den = float(self.y_orig.pow(2).sum().clamp_min(1e-30))
        self.gram = gram

    # ---- scoring -------------------------------------------------------------------------------
    def _rel(self, y: torch.Tensor) -> float:
        return float(((y - self.y_ref).pow(2).sum() / self.den).sqrt())

    def lam(self, cand) -> torch.Tensor:
        return smoothing_factor(self.x_absmax, self.w_absmax, cand)

    def importance(self, lam):
        return (self.x / lam).pow(2).mean(dim=0)

    def quantizer(self, lam, search):
        """R ↦ dequantized 4-bit R in this config's scale mode, its error weighted by E[x̂²] per channel."""
        imp = self.importance(lam)
        mode, g = self.cfg.scale_mode, self.cfg.group_size
        return lambda r: quantize_weight(r, g, mode, imp, search).dequantize(g)

    def _sim(self, w_hat, lam, l_up, l_down, quant):
        return _simulate(self.x, w_hat, lam, l_up, l_down, self.cfg.group_size, self.cfg.scale_mode, quant,
                         self.unsigned, self.act16)

    def error(self, lam, rank, iters=1, fast=False):
        w_hat = self.w * lam
        quant = self.quantizer(lam, search=not fast)
        score = (lambda u, d: self._rel(self._sim(w_hat, lam, u, d, quant)))
        (l_up, l_down), _ = _split(w_hat, rank, iters, quant, score, fast)
        return score(l_up, l_down), (l_up, l_down)

    def score_candidates(self, cands, rank: int) -> list:
        """Output error of each smoothing candidate at `rank` (randomized SVD, absmax weight scales),
        evaluated in batches: the randomized SVDs of a batch share their products with W."""
        n, k = self.w.shape
        m = self.x.shape[0]
        g, mode = self.cfg.group_size, self.cfg.scale_mode
        per_cand = 4 * (4 * n * k + 3 * m * k + 2 * m * n)
        budget = SCORE_BYTES["cuda" if self.w.is_cuda else "cpu"]
        chunk = max(1, budget // per_cand)
        lams = torch.stack([self.lam(c) for c in cands])
        errs = []
        for i in range(0, len(cands), chunk):
            lam = lams[i:i + chunk]
            w_hat = self.w.unsqueeze(0) * lam.unsqueeze(1)                      # (c, N, K)
            xs = self.x.unsqueeze(0) / lam.unsqueeze(1)                          # (c, M, K)
            r = w_hat
            if rank:
                l_up, l_down = batched_top_svd(self.w, lam, rank)
                r = w_hat - l_up @ l_down
            del w_hat
            xq = xs if self.act16 else fake_quant_act(xs, g, mode, self.unsigned)
            y = xq @ _plain_quant(r, g, mode).transpose(1, 2)
            if rank:
                y = y + (xs @ l_down.transpose(1, 2)) @ l_up.transpose(1, 2)
            e = ((y - self.y_ref.unsqueeze(0)).pow(2).sum(dim=(1, 2)) / self.den).sqrt()
            errs.extend(float(v) for v in e)
        return errs

    def search_alpha(self, rank):
        """Best smoothing candidate at this rank, by output error: (candidate, error, all errors)."""
        cands = self.cfg.smoothing_candidates()
        with self.timer("smoothing_search"):
            errs = self.score_candidates(cands, rank)
        i = min(range(len(errs)), key=errs.__getitem__)
        return cands[i], errs[i], dict(zip(map(str, cands), errs))

    def rank_curve(self, alpha, ranks):
        """Output error at each rank for a fixed smoothing (one SVD of the largest rank serves all)."""
        with self.timer("rank_search"):
            lam = self.lam(alpha)
            w_hat = self.w * lam
            u, d = top_svd(w_hat, max(ranks))
            quant = self.quantizer(lam, search=False)
            return {r: self._rel(self._sim(w_hat, lam, u[:, :r], d[:r], quant)) for r in ranks}

    # ---- the stored result ---------------------------------------------------------------------
    def hessian(self, lam) -> torch.Tensor:
        """H = X̂ᵀX̂ of the smoothed (and shifted) input: from XᵀX over every row when captured, else the sample."""
        g = self.gram.to(self.w.device).float() if self.gram is not None else self.x.t() @ self.x
        inv = 1.0 / lam
        return g * inv.unsqueeze(1) * inv.unsqueeze(0)

    def _naive_errors(self) -> list:
        """Per member: relative output error of round-to-nearest W4A4 (no smoothing, no low rank, float scales)."""
        g = self.cfg.group_size
        wq = quantize_weight(self.w, g, "float", search=False).dequantize(g)
        y = fake_quant_act(self.x_orig, g, "float") @ wq.t()
        return self._member_errors(y, self.y_orig)

    def _member_errors(self, y, y_ref) -> list:
        out, s = [], 0
        for width in self.splits:
            out.append(relative_error(y[:, s:s + width], y_ref[:, s:s + width]))
            s += width
        return out

    def finish_all(self, alpha, rank, biases, out_dtype, names=None) -> list:
        """The stored tensors of every member for the chosen smoothing and rank (refined, GPTQ if configured)."""
        cfg, g = self.cfg, self.cfg.group_size
        names = names or [self.name]
        with self.timer("lowrank"):
            lam = self.lam(alpha)
            w_hat = self.w * lam
            quant = self.quantizer(lam, search=True)
            score = (lambda u, d: self._rel(self._sim(w_hat, lam, u, d, quant)))
            (l_up, l_down), used = _split(w_hat, rank, cfg.lowrank_iters, quant, score)
        with self.timer("packing"):
            r = w_hat - l_up @ l_down
            wq = quantize_weight(r, g, cfg.scale_mode, self.importance(lam))
        hess = self.hessian(lam) if cfg.gptq or (cfg.lowrank_refit and rank and self.gram is not None) else None
        if cfg.gptq:
            with self.timer("gptq"):
                codes = gptq_codes(r, wq.steps, hess, g, cfg.gptq_damp, cfg.gptq_block, self.name)
                wq = QuantizedWeight(codes, wq.steps, wq.file_tensors)
        deq = wq.dequantize(g)
        with self.timer("report"):
            y = self._sim(w_hat, lam, l_up, l_down, lambda _r: deq)
            err = self._rel(y)
        refit = False
        if cfg.lowrank_refit and rank:
            with self.timer("lowrank"):
                # the sampled rows when they are all there is (no K×K matrix), XᵀX over every row when captured
                up2, down2 = (activation_weighted_top(w_hat - deq, rank, cfg.gptq_damp, rows=self.x / lam)
                              if self.gram is None else activation_weighted_top(w_hat - deq, rank, cfg.gptq_damp, h=hess))
                y2 = self._sim(w_hat, lam, up2, down2, lambda _r: deq)
                err2 = self._rel(y2)
                if err2 < err:
                    l_up, l_down, y, err, refit = up2, down2, y2, err2, True
        with self.timer("report"):
            # member errors against each member's own output (y − y_ref = ŷ − y_orig per member)
            errs = self._member_errors(y - self.y_ref + self.y_orig, self.y_orig)
            naive = self._naive_errors()
        with self.timer("packing"):
            out = self._pack(wq, lam, l_up, l_down, alpha, rank, biases, out_dtype, names)
        for q, e, nv in zip(out, errs, naive):
            q.report.update({"error_naive_w4a4": nv, "error": e, "lowrank_iters_used": used, "gptq": cfg.gptq,
                             "lowrank_refit": refit})
            if len(out) > 1:
                q.report.update({"input_group": list(names), "group_error": err})
        return out

    def _pack(self, wq, lam, l_up, l_down, alpha, rank, biases, out_dtype, names) -> list:
        k = self.w.shape[1]
        elt = torch.finfo(out_dtype).bits // 8
        smooth = lam.to(out_dtype).cpu()
        proj_down = (l_down / lam).t().contiguous().to(out_dtype).cpu()
        shift = torch.tensor([self.shift], dtype=torch.float32) if self.unsigned else None
        out, s = [], 0
        for name, width, bias in zip(names, self.splits, biases):
            e = s + width
            w = self.w[s:e]
            if self.unsigned:  # Y = W(X + c − c) + b: the layer reads X + c, its bias absorbs −c·W·1
                b = (bias.detach().float().to(w.device) if bias is not None else w.new_zeros(width)) - self.shift * w.sum(dim=1)
            else:
                b = None if bias is None else bias.detach()
            # float-mode scales are stored in the model dtype; int_ratio multipliers/bases keep their own dtypes
            scales = {}
            for t_name, t in wq.file_tensors.items():
                part = t[s:e] if t_name == "wscale_base" else t[:, s:e]
                scales[t_name] = (part.to(out_dtype) if t_name == "wscales" else part).contiguous().cpu()
            q = QuantizedLinear(
                qweight=ref.pack_int4(wq.codes[s:e]).cpu(),
                scales=scales,
                smooth_factor=smooth.clone(),     # own copies: files and modules never alias tensors
                proj_down=proj_down.clone(),
                proj_up=l_up[s:e].contiguous().to(out_dtype).cpu(),
                bias=None if b is None else b.to(out_dtype).cpu(),
                rank=rank,
                alpha=alpha,
                act_shift=shift,
                act16=self.act16,
            )
            q.report = {
                "layer": name, "in": k, "out": width, "rank": rank, "alpha": _describe(alpha),
                "scales": self.cfg.scale_mode, "unsigned_acts": self.unsigned, "act16": self.act16,
                "bytes_16bit": width * k * elt + (width * elt if bias is not None else 0),
                "bytes_4bit": sum(t.numel() * t.element_size() for t in q.tensors().values()),
            }
            out.append(q)
            s = e
        return out

    def finish(self, alpha, rank, bias, out_dtype) -> QuantizedLinear:
        """The stored tensors of a single layer (see finish_all)."""
        if len(self.splits) != 1:
            raise ValueError(f"layer {self.name}: a group of {len(self.splits)} layers needs finish_all")
        return self.finish_all(alpha, rank, [bias], out_dtype)[0]


def quantize_linear(weight, bias, x_absmax, x_sample, cfg: QuantConfig, rank: int, name: str = "",
                    out_dtype=None) -> QuantizedLinear:
    """Smoothing search at `rank`, then the final split; the one-layer entry point."""
    n, k = weight.shape
    if rank > min(n, k):
        raise ValueError(f"layer {name}: rank {rank} is larger than the layer allows (min(out, in) = {min(n, k)})")
    prob = LayerProblem(weight, x_absmax, x_sample, cfg, name)
    alpha, _, _ = prob.search_alpha(rank)
    return prob.finish(alpha, rank, bias, out_dtype or weight.dtype)
