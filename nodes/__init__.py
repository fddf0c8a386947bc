"""The pack's nodes (category "SVDQuant"); UI only — the work lives in wrappers/ and core/."""
from .load_model import LoadSVDQuantModel
from .calibrate_quantize import CalibrateAndQuantize
from .rank_selector import LowRankRankSelector

NODE_CLASS_MAPPINGS = {
    "SVDQuantLoadModel": LoadSVDQuantModel,
    "SVDQuantCalibrateQuantize": CalibrateAndQuantize,
    "SVDQuantRankSelector": LowRankRankSelector,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SVDQuantLoadModel": "Load SVDQuant Model",
    "SVDQuantCalibrateQuantize": "Calibrate & Quantize (SVDQuant)",
    "SVDQuantRankSelector": "Low-Rank Rank Selector",
}
