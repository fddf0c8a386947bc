"""The harness itself: a real ComfyUI server runs the stock graphs on the tiny models."""
import pytest

from harness import graphs
from harness.comfy_server import PromptValidationError

pytestmark = pytest.mark.comfy

CORE_NODES = {"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader",
              "CLIPTextEncode", "ConditioningZeroOut", "FluxGuidance", "EmptyLatentImage",
              "EmptySD3LatentImage", "KSampler", "VAEDecode", "SaveImage"}


def image_stats(path):
    from PIL import Image  # Pillow comes with ComfyUI's requirements
    import numpy as np
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return a.shape, a.std(), ((a == 0) | (a == 255)).mean()


def test_server_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    assert len(info) > 400, f"only {len(info)} node classes"
    assert CORE_NODES <= info.keys(), CORE_NODES - info.keys()


def test_pack_imports_cleanly(comfy_server):
    status = comfy_server.pack_status()
    if status == "absent":
        pytest.skip("the repo has no root __init__.py yet: nothing to import")
    assert status == "loaded", comfy_server.pack_import_error()
    ours = [k for k, v in comfy_server.object_info().items()
            if v.get("python_module", "").endswith("ComfyUI-SVDQuant")]
    assert ours, "the pack imported but registered no node"


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_stock_graph_makes_png(comfy_server, comfy_timings, name):
    prompt = getattr(graphs, name)(prefix=f"smoke_{name}")
    result = comfy_server.run(prompt, timeout=600)
    comfy_timings[f"{name} graph (s)"] = round(result.seconds, 1)
    assert result.ok, result.error_text()
    images = comfy_server.output_images(result)
    assert len(images) == 1 and images[0].is_file(), images
    shape, std, clipped = image_stats(images[0])
    assert shape == (64, 64, 3)
    # The tiny models are tuned to give detail, not a flat or saturated image.
    assert std > 5 and clipped < 0.2, (std, clipped)


def test_broken_prompts_are_reported_and_server_survives(comfy_server):
    with pytest.raises(PromptValidationError) as exc:
        comfy_server.queue(graphs.broken_checkpoint())
    errors = exc.value.node_errors["ckpt"]["errors"]
    assert errors[0]["type"] == "value_not_in_list", errors

    # Valid graph that fails while running: SD15's 4-channel latent into the 16-channel FLUX VAE.
    prompt = graphs.sd15(prefix="smoke_runtime_error")
    prompt["vae16"] = {"class_type": "VAELoader", "inputs": {"vae_name": graphs.TAEF1}}
    prompt["decode"]["inputs"]["vae"] = ["vae16", 0]
    result = comfy_server.run(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "VAEDecode" and result.error["exception_message"], result.error

    after = comfy_server.run(graphs.sd15(seed=7, prefix="smoke_after_error"))
    assert after.ok, after.error_text()
    assert comfy_server.alive
