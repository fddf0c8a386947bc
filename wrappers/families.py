"""Which model family a ComfyUI model is, and which of its linears stay 16-bit by default."""
import comfy.supported_models as sm

FAMILIES = ("sd15", "sdxl", "flux")

# Embeddings, conditioning inputs and the final projection keep 16 bits: they are small, run once
# per step, and their error reaches every later layer.
DEFAULT_SKIP = {
    "sd15": ("time_embed.*", "label_emb.*"),
    "sdxl": ("time_embed.*", "label_emb.*"),
    "flux": ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*"),
    "other": (),
}


# Linears whose input comes straight out of a GELU (FLUX's double-block MLPs: Linear, GELU(tanh),
# Linear): candidates for unsigned activations. SD's feed-forward is GEGLU (x · GELU(gate), signed),
# FLUX's single blocks feed linear2 attention output and GELU output together: neither qualifies.
# Linears that read one embedding vector per image (adaLN modulation): 16-bit activations (QuantConfig.act16_inputs).
PER_IMAGE_INPUTS = {
    "flux": ("*_mod.lin", "*modulation.lin"),
}
POST_GELU = {
    "flux": ("double_blocks.*.img_mlp.2", "double_blocks.*.txt_mlp.2"),
}


def family_of(model_config) -> str:
    if isinstance(model_config, sm.Flux):
        return "flux"
    if isinstance(model_config, (sm.SDXL, sm.SDXLRefiner)):
        return "sdxl"
    if isinstance(model_config, sm.SD15):
        return "sd15"
    return "other"


def model_class_by_name(name: str):
    cls = getattr(sm, name, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"model class {name!r} is not known to this ComfyUI (comfy.supported_models)")
    return cls
