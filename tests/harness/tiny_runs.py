"""How the tests run the shipped workflows (workflows/*.json) on the tiny models.

One place for what both tests/test_workflows.py (API prompts) and tests/browser/ (widgets in
the real frontend) change: small images, few steps, one short calibration run. Stdlib only.
"""
import json
import os
import pathlib

from . import graphs

WORKFLOW_DIR = pathlib.Path(__file__).resolve().parents[2] / "workflows"
NAMES = [f"{fam}_{kind}.json" for fam in ("sd15", "sdxl", "flux") for kind in ("quantize", "generate_4bit")]

TINY_SIZE, TINY_STEPS = 64, 2
TINY_MODELS = {  # family -> {loader class: {input: tiny file}} pointing the workflow at the tiny models
    "sd15": {"CheckpointLoaderSimple": {"ckpt_name": graphs.SD15_CKPT}},
    "sdxl": {"CheckpointLoaderSimple": {"ckpt_name": graphs.SDXL_CKPT}},
    "flux": {"UNETLoader": {"unet_name": graphs.FLUX_UNET},
             "DualCLIPLoader": {"clip_name1": graphs.CLIP_L, "clip_name2": graphs.T5_STUB},
             "VAELoader": {"vae_name": graphs.TAEF1}},
}
CALIBRATION = {"calibration_samples": 1, "steps": 1, "width": TINY_SIZE, "height": TINY_SIZE,
               # The workflows' `prompts` would be encoded by the stub text encoders, whose output
               # is garbage: the node then refuses the non-finite activations (verified), and each
               # line costs a T5 encode (~30 s on CPU). Calibrate on the workflow's own (zeroed)
               # positive/negative instead.
               "prompts": ""}

# Smoothing per family in these tests. The workflows use "search" (11 candidate settings per
# layer). Whole quantize workflow on the 2-core CPU box, other load present, server with
# OMP_NUM_THREADS=1: tiny FLUX (hidden 3072, the smallest ComfyUI's UNETLoader detects) 245 s
# with search vs 50-62 s with off (~25 s of it the T5 stub's encode); tiny SDXL 49 s vs 20-23 s;
# tiny SD1.5 7.5 s vs 3 s. With torch's default 2 threads and another busy process, the same runs
# took 4-20x longer (SDXL off 149 s, SD1.5 search 89-224 s, FLUX search 400-724 s).
# SVDQ_WORKFLOW_SMOOTHING=search runs every workflow as shipped.
SMOOTHING = {"sd15": "search", "sdxl": "off", "flux": "off"}
SMOOTHING_ALL = os.environ.get("SVDQ_WORKFLOW_SMOOTHING")
# GPTQ (on in the workflows) per family in these tests: its Cholesky factorisations cost K³ per
# layer, 1.8 s at K = 3072 on one CPU thread (measured), so the tiny FLUX's 12288- and 15360-wide
# MLP inputs would add minutes per run and SDXL's 261 linears a lot; SD1.5 runs it.
# SVDQ_WORKFLOW_GPTQ=1 runs every workflow with it.
GPTQ = {"sd15": True, "sdxl": False, "flux": False}
GPTQ_ALL = os.environ.get("SVDQ_WORKFLOW_GPTQ") == "1"


def load(name) -> dict:
    return json.loads((WORKFLOW_DIR / name).read_text())


def family_of(name) -> str:
    return name.split("_", 1)[0]


def size_and_steps(name, node_types) -> dict:
    """{class_type: {input: value}} for the nodes of `node_types` present in workflow `name`:
    TINY_SIZE images, TINY_STEPS sampler steps, the short calibration (model files and output
    names are left to the caller)."""
    out = {"KSampler": {"steps": TINY_STEPS}}
    for latent in ("EmptyLatentImage", "EmptySD3LatentImage"):
        out[latent] = {"width": TINY_SIZE, "height": TINY_SIZE}
    out["SVDQuantCalibrateQuantize"] = {**CALIBRATION, "smoothing": SMOOTHING_ALL or SMOOTHING[family_of(name)],
                                        "gptq": GPTQ_ALL or GPTQ[family_of(name)]}
    return {cls: v for cls, v in out.items() if cls in set(node_types)}
