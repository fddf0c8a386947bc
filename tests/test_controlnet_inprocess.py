"""Stock ControlNet nodes on the 4-bit model (in-process, tiny random-weight SD1.5 + ControlNet).

The ControlNet file is written in the layout ComfyUI's own loader detects and is loaded and applied
with the stock ControlNetLoader / ControlNetApplyAdvanced nodes; sampling goes through
comfy.sample.sample (KSampler's path), which is where the control residuals enter the UNet.
Random weights: the numbers bound the plumbing, they say nothing about quality.
"""
import pytest
import torch

from comfy_inprocess import inprocess_marks

pytestmark = inprocess_marks()

CONTROLNET = "tiny_sd15_controlnet.safetensors"



@pytest.fixture(scope="module")
def controlled(comfy, tmp_path_factory):
    """16-bit model, the stock-loaded ControlNet, plain and controlled conditioning, and the 4-bit
    model calibrated on the controlled conditioning (one calibration serves every test here)."""
    import folder_paths
    import nodes
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    folder = tmp_path_factory.mktemp("controlnet")
    comfy.write_tiny_sd15_controlnet(folder / CONTROLNET)
    folder_paths.add_model_folder_path("controlnet", str(folder))
    cnet = nodes.ControlNetLoader().load_controlnet(CONTROLNET)[0]
    mp = comfy.tiny_sd15_patcher()
    pos, neg = comfy.sd15_conds()
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    pos_c, neg_c = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cnet, hint, 1.0, 0.0, 1.0)
    cn_before = {k: v.clone() for k, v in cnet.control_model.state_dict().items()}
    qcfg = QuantConfig(scale_mode="float", rank=RankPolicy("fixed", 16), alpha_grid=(0.5,))
    qm, _, report = calibrate_and_quantize(mp, [(pos_c, neg_c)], qcfg, 2, 2.0, "euler", "normal", 0, 64, 64)
    return dict(mp=mp, qm=qm, report=report, cnet=cnet, cn_before=cn_before, qcfg=qcfg,
                plain=(pos, neg), control=(pos_c, neg_c))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_controlnet_changes_4bit_output_like_16bit(comfy, controlled):
    """ControlNetLoader + ControlNetApplyAdvanced on the 4-bit model: the control really acts (so a
    silently ignored control fails), acts like on the 16-bit model, and 4-bit + ControlNet stays as
    close to 16-bit + ControlNet as 4-bit is to 16-bit without it."""
    c = controlled
    y16 = comfy.sample(c["mp"], *c["plain"])
    y16c = comfy.sample(c["mp"], *c["control"])
    y4 = comfy.sample(c["qm"], *c["plain"])
    y4c = comfy.sample(c["qm"], *c["control"])
    d16, d4 = (y16c - y16).flatten(), (y4c - y4).flatten()
    cos = float(torch.nn.functional.cosine_similarity(d16, d4, dim=0))
    gap_plain, gap_control = _rel(y4, y16), _rel(y4c, y16c)
    print(f"control effect |d16|/|y16|={float(d16.norm() / y16.norm()):.3f} |d4|/|y4|={float(d4.norm() / y4.norm()):.3f} "
          f"cos={cos:.4f}; 4-bit vs 16-bit: plain {gap_plain:.4f}, with ControlNet {gap_control:.4f}")
    assert float(d16.norm()) > 0.1 * float(y16.norm())
    assert float(d4.norm()) > 0.1 * float(y4.norm())
    assert cos > 0.8
    assert 0.0 < gap_control < 1.5 * gap_plain + 0.02


def test_calibration_with_controlnet_quantizes_only_the_diffusion_model(comfy, controlled):
    """Calibrate & Quantize on ControlNet-applied conditioning: the control model runs during
    calibration but none of its linears is captured or quantized, and it is left unchanged."""
    from comfyui_svdquant.core.calibrate import find_target_linears
    from comfyui_svdquant.wrappers.families import DEFAULT_SKIP
    import dataclasses
    c = controlled
    qcfg = dataclasses.replace(c["qcfg"], skip_patterns=DEFAULT_SKIP["sd15"])
    expected = set(find_target_linears(c["mp"].model.diffusion_model, qcfg))
    assert set(c["report"]["layers"]) == expected and len(expected) >= 30
    control_model = c["cnet"].control_model
    assert not any(getattr(m, "quantized", False) for m in control_model.modules())
    linears = [m for m in control_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight is not None and m.weight.numel() > 0 for m in linears)
    after = control_model.state_dict()
    assert set(after) == set(c["cn_before"])
    assert all(torch.equal(after[k].cpu(), v.cpu()) for k, v in c["cn_before"].items())
