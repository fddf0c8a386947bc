"""The ComfyUI glue in-process: calibrate & quantize, object patches, save -> load, refusals."""
import os

import pytest
import torch

from harness import config

pytestmark = [pytest.mark.comfy,
              pytest.mark.skipif(config.comfyui_missing_reason() is not None,
                                 reason=str(config.comfyui_missing_reason()))]


@pytest.fixture(scope="module")
def comfy():
    import comfy_inprocess as ci
    ci.import_comfy()
    return ci


@pytest.fixture(scope="module")
def quantized_sd15(comfy, tmp_path_factory):
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    mp = comfy.tiny_sd15_patcher()
    pos, neg = comfy.sd15_conds()
    path = str(tmp_path_factory.mktemp("q") / "tiny_sd15_00001.safetensors")
    qcfg = QuantConfig(rank=RankPolicy("fixed", 16), alpha_grid=(0.3, 0.5))
    qm, text, report = calibrate_and_quantize(mp, [(pos, neg)], qcfg, 2, 2.0, "euler", "normal", 0, 64, 64,
                                              save_path=path)
    return mp, qm, text, report, path


def _probe_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([7.0])


def test_quantized_clone_leaves_the_16bit_model_intact(comfy, quantized_sd15):
    from comfyui_svdquant.wrappers.ops import SVDQuantOps
    mp, qm, text, report, _ = quantized_sd15
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y16 = comfy.denoise_once(mp, x, s, pos)
    y4 = comfy.denoise_once(qm, x, s, pos)
    n_q = sum(isinstance(m, SVDQuantOps.Linear) for m in qm.model.diffusion_model.modules())
    assert n_q == report["summary"]["layers"] >= 30  # the clone is patched while loaded
    y16_again = comfy.denoise_once(mp, x, s, pos)
    assert not any(isinstance(m, SVDQuantOps.Linear) for m in mp.model.diffusion_model.modules())
    assert torch.equal(y16, y16_again)
    rel = float((y4 - y16).norm() / y16.norm())
    # Random weights have no structure for SVDQuant to exploit: every linear keeps ~0.14 relative
    # error and ~33 of them compound to 0.28 (measured, seed 0) — a bound on plumbing, not quality.
    assert 1e-4 < rel < 0.4, rel
    assert "mean rank 16.0" in text


def test_saved_file_loads_to_the_same_model(comfy, quantized_sd15):
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    mp, qm, _, report, path = quantized_sd15
    lm, meta = load_svdquant_model(path)
    assert meta["family"] == "sd15" and meta["model_class"] == "SD15"
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y_mem = comfy.denoise_once(qm, x, s, pos)
    y_file = comfy.denoise_once(lm, x, s, pos)
    assert torch.allclose(y_mem, y_file, rtol=0, atol=1e-5), float((y_mem - y_file).abs().max())
    rep = path[:-len(".safetensors")] + ".report.json"
    assert os.path.isfile(rep)


def test_loader_refuses_wrong_family(comfy, quantized_sd15):
    from comfyui_svdquant.core.checkpoint import CheckpointError
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    path = quantized_sd15[-1]
    with pytest.raises(CheckpointError, match="sd15 4-bit model, but the loader was set to flux"):
        load_svdquant_model(path, expected_family="flux")


def test_zero_samples_and_too_large_rank_are_refused(comfy):
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    mp = comfy.tiny_sd15_patcher()
    pos, neg = comfy.sd15_conds()
    with pytest.raises(ValueError, match="calibration_samples must be at least 1"):
        calibrate_and_quantize(mp, [], QuantConfig(), 1, 1.0, "euler", "normal", 0, 64, 64)
    with pytest.raises(ValueError, match="rank 4096 is larger than layer"):
        calibrate_and_quantize(mp, [(pos, neg)], QuantConfig(rank=RankPolicy("fixed", 4096)), 1, 1.0,
                               "euler", "normal", 0, 64, 64)


def test_flux_quantize_save_load(comfy, tmp_path):
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    mp = comfy.tiny_flux_patcher()
    pos, neg = comfy.flux_conds()
    path = str(tmp_path / "tiny_flux.safetensors")
    qm, text, report = calibrate_and_quantize(mp, [(pos, neg)], QuantConfig(rank=RankPolicy("fixed", 16), alpha_grid=(0.5,)),
                                              2, 1.0, "euler", "simple", 0, 64, 64, save_path=path)
    assert report["family"] == "flux"
    names = set(report["layers"])
    # embedders and the final layer stay 16-bit; attention, MLP and modulation linears are 4-bit
    assert not names & {"img_in", "txt_in", "final_layer.linear"}
    assert {"double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_mod.lin"} <= names
    lm, meta = load_svdquant_model(path, expected_family="flux")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.7])
    y16 = comfy.denoise_once_flux(mp, x, s, pos)
    y_mem = comfy.denoise_once_flux(qm, x, s, pos)
    y_file = comfy.denoise_once_flux(lm, x, s, pos)
    assert torch.allclose(y_mem, y_file, rtol=0, atol=1e-5)
    rel = float((y_mem - y16).norm() / y16.norm())
    assert 1e-4 < rel < 0.4, rel


def test_low_vram_partial_load_runs_the_4bit_layers(comfy, quantized_sd15):
    """ComfyUI's low-VRAM mode (weights left on the offload device, cast per call) on 4-bit layers:
    the same output as a full load. On CPU both devices are the CPU; the code path is the same."""
    mp, qm, *_ = quantized_sd15
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y_full = comfy.denoise_once(qm, x, s, pos)
    qm.unpatch_model()
    try:
        qm.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1024, load_weights=True)
        assert qm.model.model_lowvram
        q = [m for m in qm.model.diffusion_model.modules() if getattr(m, "quantized", False)]
        assert q and all(m.comfy_cast_weights for m in q)
        with torch.no_grad():
            y_low = qm.model.apply_model(x, s, c_crossattn=pos[0][0])
        assert torch.equal(y_low, y_full)
    finally:
        qm.unpatch_model()
