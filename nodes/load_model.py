from ..wrappers.loader import DTYPES, WEIGHTS_IN_VRAM, load_svdquant_model
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
        }, "optional": {
            "weights_in_vram": (list(WEIGHTS_IN_VRAM), {"default": "fast", "tooltip": (
                "Hopper GPUs (H100/H200) only. fast: an int8 copy of each 4-bit weight for the tensor cores "
                "(twice the file's weight bytes in VRAM). compact: the 4-bit weights only, expanded on the fly: "
                "about half the VRAM (FLUX.1-dev peak 7.1 instead of 15.2 GiB on an H200) and slower steps "
                "(about 1.5x the 16-bit step time there). Other GPUs always keep the 4-bit weights only.")}),
        }}

    def load(self, model_name, family, compute_dtype, device, weights_in_vram="fast"):
        patcher, _ = load_svdquant_model(folders.resolve(model_name), family, compute_dtype, device, weights_in_vram)
        return (patcher,)
