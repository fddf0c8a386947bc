"""Stock ControlNet nodes on the 4-bit model through a real ComfyUI server: ControlNetLoader lists and
loads a tiny SD1.5 ControlNet from models/controlnet, ControlNetApplyAdvanced feeds KSampler, and the
4-bit model's image changes with the control (the in-process test compares it with 16-bit)."""
import numpy as np
import pytest

from harness import graphs
from test_e2e_nodes import image, load_source, sd15_4bit_file

pytestmark = pytest.mark.comfy

CONTROLNET = "tiny_sd15_controlnet.safetensors"


def _with_controlnet(prompt: dict) -> dict:
    """The stock sd15 graph with ControlNetLoader + EmptyImage hint + ControlNetApplyAdvanced before KSampler."""
    p = dict(prompt)
    p["cnet"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    p["hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xC08040}}
    p["capply"] = {"class_type": "ControlNetApplyAdvanced",
                   "inputs": {"positive": ["zero", 0], "negative": ["zero", 0], "control_net": ["cnet", 0],
                              "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    sampler = dict(p["sampler"], inputs=dict(p["sampler"]["inputs"], positive=["capply", 0], negative=["capply", 1]))
    p["sampler"] = sampler
    return p


def test_stock_controlnet_nodes_on_the_4bit_model(comfy_server):
    import comfy_inprocess as ci
    ci.import_comfy()
    srv = comfy_server
    folder = srv.models_dir / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / CONTROLNET).is_file():
        ci.write_tiny_sd15_controlnet(folder / CONTROLNET)
    src = load_source(f"svdquant/{sd15_4bit_file(srv, prefix='e2e_cnet_src').name}", "sd15")
    plain = srv.run(graphs.sd15(prefix="cnet_off", steps=2, model_source=src))
    controlled = srv.run(_with_controlnet(graphs.sd15(prefix="cnet_on", steps=2, model_source=src)))
    assert plain.ok and controlled.ok, (plain.error_text(), controlled.error_text())
    diff = float(np.abs(image(srv, controlled) - image(srv, plain)).mean())
    print(f"mean |image with ControlNet - without| = {diff:.2f} (0-255)")
    assert diff > 0.5
