from ..core.config import RankPolicy

MODES = {"fixed": "fixed", "error budget": "error", "size budget": "size"}


class LowRankRankSelector:
    DESCRIPTION = ("Chooses how many low-rank (16-bit) components each layer keeps. Fixed: the same rank everywhere. "
                   "Error budget: per layer, the smallest rank whose output error stays under the budget. "
                   "Size budget: the parameters of an average rank, spent where they lower the error most.")
    CATEGORY = "SVDQuant"
    RETURN_TYPES = ("SVDQUANT_RANK_POLICY",)
    RETURN_NAMES = ("rank_policy",)
    OUTPUT_TOOLTIPS = ("Connect to rank_policy of Calibrate & Quantize.",)
    FUNCTION = "select"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mode": (list(MODES), {"default": "fixed", "tooltip": "How ranks are chosen per layer."}),
            "rank": ("INT", {"default": 32, "min": 0, "max": 1024, "step": 8, "tooltip": "Fixed mode: the rank of every layer. Size budget: the average rank. Error budget: the rank at which smoothing is searched."}),
            "error_budget": ("FLOAT", {"default": 0.05, "min": 0.001, "max": 0.99, "step": 0.005, "tooltip": "Error budget mode: the largest relative output error a layer may keep."}),
            "max_rank": ("INT", {"default": 128, "min": 8, "max": 1024, "step": 8, "tooltip": "Automatic modes: the largest rank any layer may get."}),
        }}

    def select(self, mode, rank, error_budget, max_rank):
        cands = tuple(r for r in (0, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024) if r <= max_rank)
        policy = RankPolicy(MODES[mode], rank=rank, error_budget=error_budget, candidates=cands)
        text = policy.describe() + ("" if policy.mode == "fixed" else f"; candidate ranks {list(cands)}")
        return {"ui": {"text": [text]}, "result": (policy,)}
