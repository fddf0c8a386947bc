"""Settings of the quantizer, in the words a user tunes them by."""
from dataclasses import dataclass, field

SUPPORTED_GROUP_SIZES = (64,)  # INT4 g64 today; NVFP4 (g16) would be a second format name
SCALE_MODES = ("int_ratio", "float")  # docs/FORMAT.md §1; int_ratio runs on 8-bit tensor cores without per-group promotion
# Smoothing candidates: "alpha" = α on alpha_grid with β = 1 − α, plus no smoothing; "reference39" =
# deepcompressor's default grid (docs/CALIBRATION.md): (0, 0), (α, 0) and (α, 1 − α), α = 0.05 … 0.95.
SMOOTH_GRIDS = ("alpha", "reference39")


@dataclass
class RankPolicy:
    """How many low-rank components each layer keeps.

    mode "fixed": every layer gets `rank`.
    mode "error": each layer gets the smallest rank in `candidates` whose relative output error is
                  at most `error_budget` (the largest candidate if none reaches it).
    mode "size":  a total budget of `rank` × Σ(N+K) low-rank parameters is spent greedily where it
                  lowers the output error most.
    """
    mode: str = "fixed"
    rank: int = 32
    error_budget: float = 0.05
    candidates: tuple = (0, 8, 16, 32, 48, 64, 96, 128)

    def __post_init__(self):
        if self.mode not in ("fixed", "error", "size"):
            raise ValueError(f"rank policy mode must be fixed, error or size, got {self.mode!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.mode == "error" and not (0 < self.error_budget < 1):
            raise ValueError(f"error budget must be in (0, 1), got {self.error_budget}")

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"fixed rank {self.rank}"
        if self.mode == "error":
            return f"smallest rank with relative output error <= {self.error_budget:g}"
        return f"size budget of average rank {self.rank}"


@dataclass
class QuantConfig:
    group_size: int = 64
    # Per-group scales: "int_ratio" (base × integer multiplier; the fast Hopper path) or "float".
    scale_mode: str = "int_ratio"
    rank: RankPolicy = field(default_factory=RankPolicy)
    # Smoothing λ = max|x|^α / max|w|^(1-α); α is searched on this grid per layer (no smoothing is
    # always tried too). An empty grid disables smoothing (whatever smooth_grid says).
    alpha_grid: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    # "alpha" (the grid above) or "reference39" (λ = max|x|^α / max|w|^β, deepcompressor's 39 (α, β)).
    smooth_grid: str = "alpha"
    # Low-rank refinement L ← SVD_r(Ŵ − Q(Ŵ − L)), at most this many SVDs, stopped as soon as the
    # output error stops falling; 1 = a single SVD.
    lowrank_iters: int = 1
    # After the residual is quantized, refit the rank-r branch to what the 4-bit residual leaves
    # (Ŵ − deq Q(R)) weighted by the calibration activations (‖X̂(·)ᵀ‖, H = X̂ᵀX̂ as GPTQ's); kept only where
    # it lowers the layer's output error on the calibration sample.
    lowrank_refit: bool = False
    # Linears fed the same input tensor (q/k/v of one attention) share one smoothing vector and one
    # low-rank down projection, fitted on their concatenated weight and output.
    share_inputs: bool = False
    # GPTQ rounding of the 4-bit residual (scales fixed first) from the calibration Hessian X̂ᵀX̂.
    # On: it lowered the held-out output error by 3-19% on every synthetic layer measured
    # (docs/CALIBRATION.md); the 39-grid, refinement and shared q/k/v stay off on the same evidence.
    gptq: bool = True
    gptq_damp: float = 0.01        # relative to the mean of diag(H), as the reference
    gptq_block: int = 128
    # Memory (MiB) for exact XᵀX accumulated over every calibration row at capture time (layers in
    # order until spent); other layers take their Hessian from the sampled rows. 0 = sampled rows only.
    gram_budget_mb: int = 0
    # Unsigned activations for layers whose names match these patterns (post-GELU inputs; the family
    # fills them): X + act_shift >= 0 quantized to [0, 15], the shift folded into the bias.
    # Reference path only (no CUDA kernel reads such layers).
    unsigned_acts: bool = False
    unsigned_patterns: tuple = ()
    # 16-bit activations for layers whose names match act16_patterns (the family fills them: FLUX's
    # modulation linears, which read one embedding vector per image): the same 4-bit weights and branch,
    # X̂ = X/λ not quantized. Such layers run with M = batch rows, so 4-bit inputs buy no speed there, and
    # their rounding was the FLUX-style model's whole gap to weight-only 4-bit (docs/CALIBRATION.md §6a).
    act16_inputs: bool = True
    act16_patterns: tuple = ()
    # Outlier report: input channels whose calibration max |x| exceeds mean + k·std over channels.
    outlier_k_std: float = 4.0
    # Calibration rows (tokens) kept per layer for scoring; statistics use every row.
    sample_rows: int = 512
    skip_patterns: tuple = ()
    min_features: int = 64

    def __post_init__(self):
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group size {self.group_size} not supported (supported: {SUPPORTED_GROUP_SIZES})")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if any(not (0.0 <= a <= 1.0) for a in self.alpha_grid):
            raise ValueError(f"smoothing alphas must lie in [0, 1], got {self.alpha_grid}")
        if self.lowrank_iters < 1:
            raise ValueError(f"lowrank_iters must be >= 1, got {self.lowrank_iters}")
        if self.sample_rows < 1:
            raise ValueError(f"sample_rows must be >= 1, got {self.sample_rows}")
        if self.smooth_grid not in SMOOTH_GRIDS:
            raise ValueError(f"smooth_grid must be one of {SMOOTH_GRIDS}, got {self.smooth_grid!r}")
        if not (0.0 <= self.gptq_damp < 1.0) or self.gptq_block < 1:
            raise ValueError(f"GPTQ damp must lie in [0, 1) and block >= 1, got {self.gptq_damp}, {self.gptq_block}")
        if self.gram_budget_mb < 0:
            raise ValueError(f"gram_budget_mb must be >= 0, got {self.gram_budget_mb}")
        if not (1.0 <= self.outlier_k_std <= 10.0):
            raise ValueError(f"outlier k (standard deviations) must lie in [1, 10], got {self.outlier_k_std}")

    def smoothing_candidates(self) -> list:
        """(α, β) pairs to score; None = no smoothing (λ = 1, the reference grid's (0, 0))."""
        if not self.alpha_grid:
            return [None]
        if self.smooth_grid == "reference39":
            alphas = [round(0.05 * i, 2) for i in range(1, 20)]
            return [None] + [(a, 0.0) for a in alphas] + [(a, round(1.0 - a, 2)) for a in alphas]
        return [None] + [(float(a), round(1.0 - float(a), 10)) for a in self.alpha_grid]
