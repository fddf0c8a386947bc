"""A Nunchaku INT4 FLUX file through Load SVDQuant Model (in-process, ComfyUI's real Flux class).

The tiny FLUX is calibrated and quantized by our own Calibrate & Quantize (float scales, adaLN
linears left 16-bit and then made AWQ-representable), saved in our format (file A), and the same
model written in Nunchaku's layout by tests/nunchaku_pack.py (file B). Loading B must give the model
A gives: the same sampling output up to the rounding their format imposes (16-bit biases). A holds the
AWQ modulation weights as fp32 values, B keeps them 4-bit with 16-bit activations.
"""
import pytest
import torch

import nunchaku_pack as npk
from comfy_inprocess import inprocess_marks

pytestmark = inprocess_marks()

MODS = ("*_mod.lin", "*.modulation.lin")



@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    from comfyui_svdquant.core import checkpoint as ckpt
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    mp = comfy.tiny_flux_patcher()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # non-zero biases, so that every bias path (joins, shift, "+1") is exercised
        for name, p in mp.model.diffusion_model.named_parameters():
            if name.endswith("bias"):
                p.copy_((torch.randint(-12, 13, p.shape, generator=g) / 128).float())
    pos, neg = comfy.flux_conds()
    folder = tmp_path_factory.mktemp("nunchaku")
    path_a = str(folder / "ours_a.safetensors")
    qcfg = QuantConfig(scale_mode="float", rank=RankPolicy("fixed", 16), alpha_grid=(0.5,), skip_patterns=MODS)
    calibrate_and_quantize(mp, [(pos, neg)], qcfg, 2, 1.0, "euler", "simple", 0, 64, 64, save_path=path_a)
    sd, _, _ = ckpt.load_checkpoint(path_a)
    header = ckpt.read_metadata(path_a)
    dtype = sd["img_in.weight"].dtype
    awq = {}
    for name in [k[:-len(".weight")] for k in sd if k.endswith(("_mod.lin.weight", "modulation.lin.weight"))]:
        npk.make_awq(sd, awq, name, sd[f"{name}.weight"], dtype)
        # A holds code·s + z in fp32, the value B's 4-bit layer computes: the tiny random model amplifies the
        # modulation's 16-bit rounding (2e-4) about 200-fold in the sampled latent.
        codes, sc, z = awq[name]
        sd[f"{name}.weight"] = (codes.double() * sc.double().repeat_interleave(64, 1)
                                + z.double().repeat_interleave(64, 1)).float()
    ckpt.save_checkpoint(path_a, sd, header)  # A, with the adaLN weights Nunchaku can hold
    cfg = dict(comfy.FLUX_TINY)
    path_b = folder / "svdq-int4_r32-flux.1-tiny.safetensors"
    npk.write(path_b, npk.flux_state_dict(sd, cfg, dtype, awq), npk.flux_metadata(cfg))
    path_c = folder / "svdq-int4_r32-flux.1-tiny-noshift.safetensors"
    npk.write(path_c, npk.flux_state_dict(sd, cfg, dtype, awq, forget_shift=True), npk.flux_metadata(cfg))
    return dict(mp=mp, conds=(pos, neg), a=path_a, folder=folder, b=path_b.name, c=path_c.name, dtype=dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_nunchaku_file_loads_to_the_same_model_as_our_file(comfy, files):
    """Load SVDQuant Model (the node) on their file samples like our loader on our file of the same
    model; a file whose post-GELU biases were not shifted (what a wrong reading of their bias
    convention would amount to) is caught by the tolerance."""
    import folder_paths
    from comfyui_svdquant.nodes.load_model import LoadSVDQuantModel
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    folder_paths.add_model_folder_path("diffusion_models", str(files["folder"]))
    dt = str(comfy.DTYPE).removeprefix("torch.")
    ours, _ = load_svdquant_model(files["a"], "flux", dt)
    node = LoadSVDQuantModel()
    theirs = node.load(f"diffusion_models/{files['b']}", "flux", dt, "default")[0]
    wrong = node.load(f"diffusion_models/{files['c']}", "flux", dt, "default")[0]
    pos, neg = files["conds"]

    def run(m):
        return comfy.sample(m, pos, neg, steps=2, cfg=1.0, channels=16)
    y_a, y_b, y_c, y16 = run(ours), run(theirs), run(wrong), run(files["mp"])
    d_b, d_c, gap = _rel(y_b, y_a), _rel(y_c, y_a), _rel(y_a, y16)
    print(f"Nunchaku file vs our file: {d_b:.2e}; unshifted biases: {d_c:.2e}; 4-bit vs 16-bit: {gap:.3f}")
    def quantized(m):
        return {n for n, mod in m.model.diffusion_model.named_modules() if getattr(mod, "quantized", False)}
    mods = {"double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin"}
    assert len(quantized(ours)) == 10 and quantized(theirs) == quantized(ours) | mods  # their AWQ ones stay 4-bit
    assert all(theirs.model.diffusion_model.get_submodule(n).act_bits is not None for n in mods)  # 16-bit activations
    assert d_b < 1e-3
    assert d_c > 20 * max(d_b, 1e-5)
    assert 1e-3 < gap < 0.5


def test_loader_refuses_other_nunchaku_files_and_families(comfy, files, tmp_path):
    import json
    from comfyui_svdquant.core.checkpoint import CheckpointError
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    path_b = str(files["folder"] / files["b"])
    with pytest.raises(CheckpointError, match="this is a flux 4-bit model, but the loader was set to sdxl"):
        load_svdquant_model(path_b, expected_family="sdxl")
    fp4 = tmp_path / "svdq-fp4_r32-flux.1-dev.safetensors"
    npk.write(fp4, {"transformer_blocks.0.qkv_proj.wscales": torch.zeros(4, 768, dtype=torch.float8_e4m3fn)},
              npk.flux_metadata(comfy.FLUX_TINY, weight_dtype="fp4_e2m1_all"))
    with pytest.raises(CheckpointError, match=f"{fp4}: this is a Nunchaku NVFP4 file"):
        load_svdquant_model(str(fp4))
    qwen = tmp_path / "svdq-int4_r128-qwen-image.safetensors"
    npk.write(qwen, {"transformer_blocks.0.img_mod.1.qweight": torch.zeros(4, 4, dtype=torch.int32)},
              {"model_class": "NunchakuQwenImageTransformer2DModel", "quantization_config": json.dumps({"rank": 128})})
    with pytest.raises(CheckpointError, match="Nunchaku NunchakuQwenImageTransformer2DModel file; only FLUX.1 INT4"):
        load_svdquant_model(str(qwen))


def test_names_agree_with_comfyuis_own_diffusers_map(comfy):
    """Our name tables against comfy.utils.flux_to_diffusers (ComfyUI's map of diffusers FLUX names)."""
    import comfy.utils
    from comfyui_svdquant.core import nunchaku_import as ni
    h = 256
    km = comfy.utils.flux_to_diffusers({"depth": 1, "depth_single_blocks": 1, "hidden_size": h})

    def target(key):
        v = km[key]
        return v if isinstance(v, str) else v[0]
    for theirs, ours in ni.TOP_LEVEL.items():
        for leaf in ("weight", "bias"):
            assert target(f"{theirs}.{leaf}") == f"{ours}.{leaf}"
            assert (len(km[f"{theirs}.{leaf}"]) == 3) == (theirs in ni.SWAP_HALVES)  # ComfyUI swaps these halves too
    for v2_name, v1_name in ni.V2_DOUBLE.items():  # their v2 names are the diffusers names
        if v1_name in ("qkv_proj", "qkv_proj_context"):
            continue  # fused in both: checked below through the q/k/v slices
        want = ni.DOUBLE_NORMS[v1_name] if v1_name in ni.DOUBLE_NORMS else f"{ni.DOUBLE_LINEARS[v1_name]}.weight"
        assert target(f"transformer_blocks.0.{v2_name}.weight") == f"double_blocks.0.{want}", v2_name
    for src, ours in (("to_", "img_attn.qkv"), ("add_", "txt_attn.qkv")):
        assert ni.DOUBLE_LINEARS["qkv_proj" if src == "to_" else "qkv_proj_context"] == ours
        for j, part in enumerate("qkv"):
            name = f"transformer_blocks.0.attn.{src}{part}.weight" if src == "to_" else f"transformer_blocks.0.attn.add_{part}_proj.weight"
            assert km[name] == (f"double_blocks.0.{ours}.weight", (0, j * h, h))
    for theirs, ours, *_ in ni.DOUBLE_MODS:
        assert target(f"transformer_blocks.0.{theirs}.weight") == f"double_blocks.0.{ours}.weight"
    for theirs, ours, *_ in ni.SINGLE_MODS:
        assert target(f"single_transformer_blocks.0.{theirs}.weight") == f"single_blocks.0.{ours}.weight"
    for v1_name, ours in ni.SINGLE_NORMS.items():
        assert target(f"single_transformer_blocks.0.attn.{v1_name}.weight") == f"single_blocks.0.{ours}"
    # linear1 = [q; k; v; mlp] in this order (our join order), linear2 = the whole proj_out
    for j, part in enumerate("qkv"):
        assert km[f"single_transformer_blocks.0.attn.to_{part}.weight"] == ("single_blocks.0.linear1.weight", (0, j * h, h))
    assert km["single_transformer_blocks.0.proj_mlp.weight"] == ("single_blocks.0.linear1.weight", (0, 3 * h, 4 * h))
    assert target("single_transformer_blocks.0.proj_out.weight") == "single_blocks.0.linear2.weight"
