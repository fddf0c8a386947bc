"""End to end on a real ComfyUI server: 16-bit model -> Calibrate & Quantize -> stock KSampler,
then save -> Load SVDQuant Model -> sample, for SD1.5, SDXL and FLUX tiny models."""
import pathlib

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
# GPTQ (the node's default) where it is cheap on CPU: its factorisations cost K³ per layer and the
# tiny FLUX has 12288/15360-wide MLP inputs (harness/tiny_runs.py).
GPTQ = {"sd15": True, "sdxl": False, "flux": False}


def calibrate_hook(family, prefix, rank=16, smoothing=None, save=True, **over):
    def hook(g, model_ref):
        cond = g.out("guidance") if "guidance" in g.nodes else g.out("zero")
        inputs = dict(model=model_ref, positive=cond, negative=cond, calibration_samples=1, steps=2,
                      cfg=FAMILIES[family][1], sampler_name="euler", scheduler=FAMILIES[family][2], seed=0,
                      width=64, height=64, rank=rank, smoothing=smoothing or FAMILIES[family][3], lowrank_iters=1, skip_layers="",
                      save=save, filename_prefix=prefix, gptq=GPTQ[family])
        inputs.update(over)
        g.add("quant", "SVDQuantCalibrateQuantize", **inputs)
        return g.out("quant")
    return hook


def load_source(model_name, family="auto"):
    def source(g):
        g.add("q4", "SVDQuantLoadModel", model_name=model_name, family=family, compute_dtype="auto", device="default")
        return g.out("q4")
    return source


def sd15_4bit_file(srv, pattern="*sd15*.safetensors", prefix="e2e_sd15"):
    """A saved SD1.5 4-bit file in the server's models/svdquant: one an earlier test made (matching
    `pattern`), else a fresh one from the tiny SD1.5 (rank 8, no smoothing: the fastest)."""
    saved = sorted((srv.models_dir / "svdquant").glob(pattern))
    if saved:
        return saved[0]
    r = srv.run(graphs.sd15(prefix=f"{prefix}_src", steps=1,
                            model_hook=calibrate_hook("sd15", prefix, rank=8, smoothing="off")), timeout=900)
    assert r.ok, r.error_text()
    return sorted((srv.models_dir / "svdquant").glob(f"{prefix}_*.safetensors"))[0]


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
    assert pathlib.Path(graphs.saved_path(report)).name == saved[0].name  # as scripts/demo.py reads it
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


def test_stock_lora_loader_on_the_4bit_model(comfy_server):
    """LoraLoaderModelOnly (stock) on Load SVDQuant Model's output: runs, changes the image, and
    every LoRA key reaches its 4-bit layer (no 'lora key not loaded' for them in the log)."""
    import torch
    from safetensors.torch import load_file, save_file
    srv = comfy_server
    saved = sd15_4bit_file(srv, "e2e_sd15_*.safetensors", "e2e_sd15")
    sd = load_file(str(saved))
    g = torch.Generator().manual_seed(0)
    lora = {}
    for k, v in sd.items():
        if k.endswith(".qweight") and ".attn1.to_" in k:
            name = k[: -len(".qweight")]
            n, kk = v.shape[0], v.shape[1] * 2
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = torch.randn(4, kk, generator=g) / kk ** 0.5
            lora[f"{key}.lora_up.weight"] = torch.randn(n, 4, generator=g)
            lora[f"{key}.alpha"] = torch.tensor(4.0)
    (srv.models_dir / "loras").mkdir(exist_ok=True)
    save_file(lora, str(srv.models_dir / "loras" / "tiny_sd15_lora.safetensors"))

    def lora_hook(strength):
        def hook(g, model_ref):
            g.add("lora", "LoraLoaderModelOnly", model=model_ref, lora_name="tiny_sd15_lora.safetensors",
                  strength_model=strength)
            return g.out("lora")
        return hook

    src = load_source(f"svdquant/{saved.name}", "sd15")
    plain = srv.run(graphs.sd15(prefix="lora_off", steps=3, model_source=src))
    with_lora = srv.run(graphs.sd15(prefix="lora_on", steps=3, model_source=src, model_hook=lora_hook(1.0)))
    assert plain.ok and with_lora.ok, (plain.error_text(), with_lora.error_text())
    diff = float(np.abs(image(srv, with_lora) - image(srv, plain)).mean())
    print(f"LoRA changed the 4-bit image by {diff:.2f}/255")
    assert diff > 0.5
    assert "lora key not loaded" not in srv.log_text()


def test_rank_selector_error_budget_drives_per_layer_ranks(comfy_server):
    """Low-Rank Rank Selector (error budget) -> Calibrate & Quantize: the selector shows its policy,
    the quantizer reports per-layer ranks from the candidates, and the model samples."""
    def hook(g, model_ref):
        g.add("ranks", "SVDQuantRankSelector", mode="error budget", rank=16, error_budget=0.12, max_rank=64)
        inner = calibrate_hook("sd15", "e2e_ranksel", save=False, smoothing="off")
        ref = inner(g, model_ref)
        g.nodes["quant"]["inputs"]["rank_policy"] = g.out("ranks")
        return ref
    r = comfy_server.run(graphs.sd15(prefix="ranksel", steps=2, model_hook=hook), timeout=900)
    assert r.ok, r.error_text()
    assert "relative output error <= 0.12" in r.outputs["ranks"]["text"][0]
    report = r.outputs["quant"]["text"][0]
    lines = report.splitlines()[1:]  # after the header: one line per layer, then the totals and times
    layer_lines = lines[:next(i for i, line in enumerate(lines) if " layers, mean rank " in line)]
    ranks = {int(line.split()[1]) for line in layer_lines}
    assert ranks <= {0, 8, 16, 32, 48, 64} and ranks
    assert "saved:" not in report


def test_model_patches_on_the_4bit_model_and_patches_carried_through_calibration(comfy_server):
    """Stock model patches work on the 4-bit model (FreeU_V2, ModelSamplingDiscrete), and a patch
    applied to the 16-bit model before Calibrate & Quantize is kept on the 4-bit result."""
    srv = comfy_server
    sd15 = sd15_4bit_file(srv, prefix="e2e_patch_src")

    def patches(g, model_ref):
        g.add("freeu", "FreeU_V2", model=model_ref, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
        g.add("msd", "ModelSamplingDiscrete", model=g.out("freeu"), sampling="v_prediction", zsnr=False)
        return g.out("msd")

    src = load_source(f"svdquant/{sd15.name}", "sd15")
    plain = srv.run(graphs.sd15(prefix="patch_off", steps=2, model_source=src))
    patched = srv.run(graphs.sd15(prefix="patch_on", steps=2, model_source=src, model_hook=patches))
    assert plain.ok and patched.ok, (plain.error_text(), patched.error_text())
    assert float(np.abs(image(srv, patched) - image(srv, plain)).mean()) > 0.5

    # ModelSamplingDiscrete(v_prediction) before quantization survives it: the result samples like
    # the same patch applied after.
    def before(g, model_ref):
        g.add("msd", "ModelSamplingDiscrete", model=model_ref, sampling="v_prediction", zsnr=False)
        return calibrate_hook("sd15", "e2e_patch_before", rank=8, smoothing="off", save=False)(g, g.out("msd"))

    def after(g, model_ref):
        ref = calibrate_hook("sd15", "e2e_patch_after", rank=8, smoothing="off", save=False)(g, model_ref)
        g.add("msd", "ModelSamplingDiscrete", model=ref, sampling="v_prediction", zsnr=False)
        return g.out("msd")
    rb = srv.run(graphs.sd15(prefix="patch_before", steps=2, model_hook=before), timeout=900)
    ra = srv.run(graphs.sd15(prefix="patch_after", steps=2, model_hook=after), timeout=900)
    assert rb.ok and ra.ok, (rb.error_text(), ra.error_text())
    assert float(np.abs(image(srv, rb) - image(srv, ra)).mean()) < 0.5

