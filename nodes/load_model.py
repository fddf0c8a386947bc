from ..wrappers.loader import DTYPES, load_svdquant_model
from . import folders


class LoadSVDQuantModel:
    DESCRIPTION = ("Loads a 4-bit SVDQuant diffusion model (SD1.5, SDXL or FLUX) saved by Calibrate & Quantize, "
                   "or a Nunchaku INT4 FLUX.1 checkpoint (converted while loading). "
                   "The MODEL works with the stock KSampler, LoRA loaders, ControlNets and model patches.")
    CATEGORY = "SVDQuant"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The 4-bit diffusion model.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (folders.list_models(), {"tooltip": "A 4-bit .safetensors file from models/svdquant or models/diffusion_models: one of ours, or a Nunchaku INT4 FLUX.1 file."}),
            "family": (["auto", "sd15", "sdxl", "flux"], {"default": "auto", "tooltip": "Refuse a file of another family than the rest of your graph expects; auto accepts any."}),
            "compute_dtype": (list(DTYPES), {"default": "auto", "tooltip": "Dtype of activations and of the 16-bit parts; auto follows ComfyUI's choice for the device."}),
            "device": (["default", "cpu"], {"default": "default", "tooltip": "default = ComfyUI's device and memory management; cpu forces the CPU."}),
        }}

    def load(self, model_name, family, compute_dtype, device):
        patcher, _ = load_svdquant_model(folders.resolve(model_name), family, compute_dtype, device)
        return (patcher,)
