"""API-format prompts for the stock graphs, built from stock nodes only.

Node ids are readable names ("ckpt", "sampler", ...) so a test can find or
replace a node. Every builder takes `model_hook(graph, model_ref) -> model_ref`,
which may add nodes between the model source and the KSampler (e.g. our
quantize/patch node), and `model_source(graph) -> model_ref`, which replaces
where the MODEL comes from (e.g. our loader) while CLIP/VAE stay stock.

Text conditioning is always CLIPTextEncode → ConditioningZeroOut: the tiny text
encoders are stubs whose missing weights ComfyUI leaves uninitialised, so their
raw output is garbage (possibly NaN); zeroing keeps the stock path exercised
and the result deterministic. One encode feeds positive and negative.
"""

SD15_CKPT = "tiny_sd15.safetensors"
SDXL_CKPT = "tiny_sdxl.safetensors"
SD15_UNET = "tiny_sd15_unet.safetensors"
SDXL_UNET = "tiny_sdxl_unet.safetensors"
FLUX_UNET = "tiny_flux_unet.safetensors"
CLIP_L = "tiny_clip_l.safetensors"
CLIP_G = "tiny_clip_g.safetensors"
T5_STUB = "tiny_t5xxl_stub.safetensors"
TAESD = "tiny_taesd.safetensors"
TAEF1 = "tiny_taef1.safetensors"


class Graph:
    """A prompt under construction: add(id, class_type, **inputs) returns a ref builder."""

    def __init__(self):
        self.nodes = {}

    def add(self, node_id, class_type, **inputs):
        if node_id in self.nodes:
            raise ValueError(f"duplicate node id {node_id!r}")
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id, index=0):
        return [node_id, index]

    def prompt(self) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}


def _zero_text(g, clip_ref, text):
    g.add("text", "CLIPTextEncode", clip=clip_ref, text=text)
    g.add("zero", "ConditioningZeroOut", conditioning=g.out("text"))
    return g.out("zero")


def _sample_and_save(g, model_ref, cond_ref, latent_ref, vae_ref, *, seed, steps, cfg, sampler,
                     scheduler, prefix, model_hook):
    if model_hook is not None:
        model_ref = model_hook(g, model_ref)
    g.add("sampler", "KSampler", model=model_ref, positive=cond_ref, negative=cond_ref,
          latent_image=latent_ref, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
          scheduler=scheduler, denoise=1.0)
    g.add("decode", "VAEDecode", samples=g.out("sampler"), vae=vae_ref)
    g.add("save", "SaveImage", images=g.out("decode"), filename_prefix=prefix)
    return g.prompt()


def checkpoint_graph(ckpt, *, width=64, height=64, seed=0, steps=4, cfg=2.0, sampler="euler",
                     scheduler="normal", text="a photo of a cat", prefix="svdq", model_hook=None,
                     model_source=None) -> dict:
    """CheckpointLoaderSimple → CLIPTextEncode → ZeroOut → EmptyLatentImage → KSampler → VAEDecode → SaveImage."""
    g = Graph()
    g.add("ckpt", "CheckpointLoaderSimple", ckpt_name=ckpt)
    model = model_source(g) if model_source else g.out("ckpt", 0)
    cond = _zero_text(g, g.out("ckpt", 1), text)
    g.add("latent", "EmptyLatentImage", width=width, height=height, batch_size=1)
    return _sample_and_save(g, model, cond, g.out("latent"), g.out("ckpt", 2), seed=seed, steps=steps,
                            cfg=cfg, sampler=sampler, scheduler=scheduler, prefix=prefix, model_hook=model_hook)


def sd15(ckpt=SD15_CKPT, prefix="svdq_sd15", **kw) -> dict:
    return checkpoint_graph(ckpt, prefix=prefix, **kw)


def sdxl(ckpt=SDXL_CKPT, prefix="svdq_sdxl", **kw) -> dict:
    return checkpoint_graph(ckpt, prefix=prefix, **kw)


def unet_graph(unet, clip_loader, vae, *, width=64, height=64, seed=0, steps=4, cfg=2.0,
               sampler="euler", scheduler="normal", text="a photo of a cat", prefix="svdq_unet",
               latent="EmptyLatentImage", guidance=None, model_hook=None, model_source=None) -> dict:
    """UNETLoader + a text-encoder loader + VAELoader (the split-files layout).

    clip_loader: (class_type, inputs) of the CLIP loader node."""
    g = Graph()
    if model_source:
        model = model_source(g)
    else:
        g.add("unet", "UNETLoader", unet_name=unet, weight_dtype="default")
        model = g.out("unet")
    g.add("clip", clip_loader[0], **clip_loader[1])
    cond = _zero_text(g, g.out("clip"), text)
    if guidance is not None:
        g.add("guidance", "FluxGuidance", conditioning=cond, guidance=guidance)
        cond = g.out("guidance")
    g.add("latent", latent, width=width, height=height, batch_size=1)
    g.add("vae", "VAELoader", vae_name=vae)
    return _sample_and_save(g, model, cond, g.out("latent"), g.out("vae"), seed=seed, steps=steps, cfg=cfg,
                            sampler=sampler, scheduler=scheduler, prefix=prefix, model_hook=model_hook)


def sd15_unet(unet=SD15_UNET, prefix="svdq_sd15_unet", **kw) -> dict:
    return unet_graph(unet, ("CLIPLoader", {"clip_name": CLIP_L, "type": "stable_diffusion"}), TAESD,
                      prefix=prefix, **kw)


def sdxl_unet(unet=SDXL_UNET, prefix="svdq_sdxl_unet", **kw) -> dict:
    return unet_graph(unet, ("DualCLIPLoader", {"clip_name1": CLIP_L, "clip_name2": CLIP_G, "type": "sdxl"}),
                      TAESD, prefix=prefix, **kw)


# FLUX text paths, cheapest first (measured on the 2-core CPU box, see README of tests/harness):
#  "clip_l_sd3": CLIPLoader(type=sd3) on the CLIP-L stub. SD3's encoder pads CLIP-L's
#      768-wide output to 4096 (FLUX's context width) and pools to 2048, of which FLUX
#      reads the first 768 (vec_in_dim): a real FLUX.1 layout with a CLIP-L-sized cost.
#  "dualclip": the standard DualCLIPLoader(type=flux) with the T5 stub: ComfyUI builds the
#      full 4.7 B-param T5-XXL and pads to 256 tokens, ~30 s per encode on CPU.
FLUX_TEXT = {
    "clip_l_sd3": ("CLIPLoader", {"clip_name": CLIP_L, "type": "sd3"}),
    "dualclip": ("DualCLIPLoader", {"clip_name1": CLIP_L, "clip_name2": T5_STUB, "type": "flux"}),
}


def flux(unet=FLUX_UNET, text="clip_l_sd3", prefix="svdq_flux", cfg=1.0, scheduler="simple",
         guidance=3.5, **kw) -> dict:
    """UNETLoader + text path + FluxGuidance + EmptySD3LatentImage + KSampler(cfg 1) + taef1."""
    return unet_graph(unet, FLUX_TEXT[text], TAEF1, prefix=prefix, cfg=cfg, scheduler=scheduler,
                      latent="EmptySD3LatentImage", guidance=guidance, **kw)


def broken_checkpoint(ckpt="does_not_exist.safetensors") -> dict:
    """Fails validation (HTTP 400): the checkpoint name is not in the combo list."""
    return sd15(ckpt=ckpt, prefix="svdq_broken")


def saved_path(report_text: str) -> str:
    """The file path in Calibrate & Quantize's report text (its "saved: <path>" line, wherever it sits)."""
    for line in report_text.splitlines():
        if line.startswith("saved: "):
            return line.removeprefix("saved: ")
    raise ValueError(f"no 'saved: ' line in the report:\n{report_text}")
