"""Settings of the quantizer, in the words a user tunes them by."""
from dataclasses import dataclass, field

SUPPORTED_GROUP_SIZES = (64,)  # INT4 g64 today; NVFP4 (g16) would be a second format name
SCALE_MODES = ("int_ratio", "float")  # docs/FORMAT.md §1; int_ratio runs on 8-bit tensor cores without per-group promotion


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
    # Smoothing λ = max|x|^α / max|w|^(1-α); α is searched on this grid per layer (1.0 = no
    # smoothing is always tried too). An empty grid disables smoothing.
    alpha_grid: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    # Low-rank refinement L ← SVD_r(Ŵ − Q(Ŵ − L)); 1 = a single SVD.
    lowrank_iters: int = 1
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
