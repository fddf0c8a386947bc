"""End to end on a real ComfyUI server: 16-bit model -> Calibrate & Quantize -> stock KSampler,
then save -> Load SVDQuant Model -> sample, for SD1.5, SDXL and FLUX tiny models."""
import numpy as np
import pytest
from PIL import Image

from harness import graphs

pytestmark = pytest.mark.comfy

FAMILIES = {
    # family: (graph builder, calibrate cfg, scheduler, smoothing). The smoothing search scores ~11
    # candidates per layer: affordable for SD1.5's 33 linears on 2 CPU cores, not for SDXL's 261 or
    # FLUX's 3072-wide ones, which the CPU tests run with smoothing off.
    "sd15": (graphs.sd15, 2.0, "normal", "search"),
    "sdxl": (graphs.sdxl, 2.0, "normal", "off"),
    "flux": (graphs.flux, 1.0, "simple", "off"),
}


def calibrate_hook(family, prefix, rank=16, smoothing=None, save=True, **over):
    def hook(g, model_ref):
        cond = g.out("guidance") if "guidance" in g.nodes else g.out("zero")
        inputs = dict(model=model_ref, positive=cond, negative=cond, calibration_samples=1, steps=2,
                      cfg=FAMILIES[family][1], sampler_name="euler", scheduler=FAMILIES[family][2], seed=0,
                      width=64, height=64, rank=rank, smoothing=smoothing or FAMILIES[family][3], lowrank_iters=1, skip_layers="",
                      save=save, filename_prefix=prefix)
        inputs.update(over)
        g.add("quant", "SVDQuantCalibrateQuantize", **inputs)
        return g.out("quant")
    return hook


def load_source(model_name, family="auto"):
    def source(g):
        g.add("q4", "SVDQuantLoadModel", model_name=model_name, family=family, compute_dtype="auto", device="default")
        return g.out("q4")
    return source


def image(srv, result):
    paths = srv.output_images(result)
    assert len(paths) == 1 and paths[0].is_file(), paths
    return np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.float32)


def test_pack_loaded_with_its_nodes(comfy_server):
    assert comfy_server.pack_status() == "loaded", comfy_server.pack_import_error()
    info = comfy_server.object_info()
    for node in ("SVDQuantLoadModel", "SVDQuantCalibrateQuantize", "SVDQuantRankSelector"):
        assert info[node]["category"] == "SVDQuant"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_sample_save_load_sample(comfy_server, family):
    srv = comfy_server
    build = FAMILIES[family][0]
    prefix = f"e2e_{family}"
    r16 = srv.run(build(prefix=f"{prefix}_16bit", steps=3), timeout=900)
    assert r16.ok, r16.error_text()
    r4 = srv.run(build(prefix=f"{prefix}_4bit", steps=3, model_hook=calibrate_hook(family, prefix)), timeout=1800)
    assert r4.ok, r4.error_text()
    report = r4.outputs["quant"]["text"][0]
    assert "saved:" in report and "mean rank 16.0" in report
    saved = sorted((srv.models_dir / "svdquant").glob(f"{prefix}_*.safetensors"))
    assert len(saved) == 1
    assert not list((srv.models_dir / "svdquant").glob("*.tmp"))
    r_load = srv.run(build(prefix=f"{prefix}_loaded", steps=3,
                           model_source=load_source(f"svdquant/{saved[0].name}", family)), timeout=900)
    assert r_load.ok, r_load.error_text()

    img16, img4, img_loaded = image(srv, r16), image(srv, r4), image(srv, r_load)
    d_q = float(np.abs(img4 - img16).mean())
    d_load = float(np.abs(img_loaded - img4).mean())
    print(f"{family}: mean |4bit - 16bit| = {d_q:.2f}/255, |loaded - in-memory 4bit| = {d_load:.3f}/255")
    # The file holds exactly the tensors the in-memory 4-bit model used.
    assert d_load < 0.5
    # Random weights: a bound on plumbing (4-bit output differs, but is not noise), not on quality.
    assert 0 < d_q < 40
