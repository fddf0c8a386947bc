"""The ComfyUI glue in-process: calibrate & quantize, object patches, save -> load, refusals."""
import json
import os

import pytest
import torch

from comfy_inprocess import inprocess_marks

pytestmark = inprocess_marks()



def _quantize_tiny(patcher, conds, path, alphas, cfg, scheduler):
    """Calibrate & Quantize's code on a tiny model: rank 16, 2 steps of one (pos, neg) pair, saved to `path`."""
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    return calibrate_and_quantize(patcher, [conds], QuantConfig(rank=RankPolicy("fixed", 16), alpha_grid=alphas), 2,
                                  cfg, "euler", scheduler, 0, 64, 64, save_path=path)


@pytest.fixture(scope="module")
def quantized_sd15(comfy, tmp_path_factory):
    mp = comfy.tiny_sd15_patcher()
    path = str(tmp_path_factory.mktemp("q") / "tiny_sd15_00001.safetensors")
    qm, text, report = _quantize_tiny(mp, comfy.sd15_conds(), path, (0.3, 0.5), 2.0, "normal")
    return mp, qm, text, report, path


@pytest.fixture(scope="module")
def quantized_flux(comfy, tmp_path_factory):
    mp = comfy.tiny_flux_patcher()
    path = str(tmp_path_factory.mktemp("f") / "tiny_flux.safetensors")
    qm, _, report = _quantize_tiny(mp, comfy.flux_conds(), path, (0.5,), 1.0, "simple")
    return mp, qm, report, path


def _probe_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([7.0])


def test_quantized_clone_leaves_the_16bit_model_intact(comfy, quantized_sd15):
    from comfyui_svdquant.wrappers.ops import _SVDQuantLinear
    mp, qm, text, report, _ = quantized_sd15
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y16 = comfy.denoise_once(mp, x, s, pos)
    y4 = comfy.denoise_once(qm, x, s, pos)
    n_q = sum(getattr(m, "quantized", False) for m in qm.model.diffusion_model.modules())
    assert n_q == report["summary"]["layers"] >= 30
    assert qm.model is not mp.model  # a new model: nothing shared with the 16-bit one
    y16_again = comfy.denoise_once(mp, x, s, pos)
    assert not any(isinstance(m, _SVDQuantLinear) for m in mp.model.diffusion_model.modules())
    # the 4-bit model's 16-bit layers cast their weights per call exactly where the 16-bit model's do (ComfyUI's
    # choice of operations): a needless manual cast costs host time in every conv and norm of every step
    casts16 = {n: type(m).comfy_cast_weights for n, m in mp.model.diffusion_model.named_modules()
               if hasattr(type(m), "comfy_cast_weights")}
    casts4 = {n: type(m).comfy_cast_weights for n, m in qm.model.diffusion_model.named_modules()
              if hasattr(type(m), "comfy_cast_weights") and not getattr(m, "quantized", False)}
    assert len(casts4) > 20 and all(casts4[n] == casts16[n] for n in casts4), sorted(casts4.items())[:5]
    assert torch.equal(y16, y16_again)
    rel = float((y4 - y16).norm() / y16.norm())
    # Random weights have no structure for SVDQuant to exploit: every linear keeps ~0.14 relative
    # error and ~33 of them compound to 0.28 (measured, seed 0) — a bound on plumbing, not quality.
    assert 1e-4 < rel < 0.4, rel
    assert "mean rank 16.0" in text


def test_saved_file_loads_to_the_same_model(comfy, quantized_sd15):
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    mp, qm, _, report, path = quantized_sd15
    lm, meta = load_svdquant_model(path, compute_dtype=str(comfy.DTYPE).removeprefix("torch."))
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


def test_weights_in_vram_compact_drops_the_hopper_copy(comfy, quantized_sd15, monkeypatch):
    """Load SVDQuant Model's weights_in_vram: compact marks every 4-bit layer for kernel 2d (packed codes, no int8 copy),
    so the kernel_cache entry ComfyUI plans loads with shrinks by N x K per int_ratio layer on Hopper (simulated here,
    as the library's kernel 2d); the samples stay those of the default load (the reference ignores the layout). A bad
    value is refused by name."""
    from comfyui_svdquant import kernels
    from comfyui_svdquant.kernels import _lib
    from comfyui_svdquant.nodes import folders
    from comfyui_svdquant.nodes.load_model import LoadSVDQuantModel
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    path = quantized_sd15[-1]
    dt = str(comfy.DTYPE).removeprefix("torch.")
    folders.register()
    assert LoadSVDQuantModel.INPUT_TYPES()["optional"]["weights_in_vram"][1]["default"] == "fast"
    fast, _ = load_svdquant_model(path, compute_dtype=dt)
    compact, _ = load_svdquant_model(path, compute_dtype=dt, weights_in_vram="compact")
    qf = [m for m in fast.model.diffusion_model.modules() if getattr(m, "quantized", False)]
    qc = [m for m in compact.model.diffusion_model.modules() if getattr(m, "quantized", False)]
    assert qc and all(m.packed_weights for m in qc) and not any(m.packed_weights for m in qf)
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    assert torch.equal(comfy.denoise_once(fast, x, s, pos), comfy.denoise_once(compact, x, s, pos))
    real_path = kernels._device_path
    monkeypatch.setattr(kernels, "_device_path", lambda d: 90 if torch.device(d).type == "cuda" else real_path(d))
    monkeypatch.setattr(_lib, "has_packed_gemm", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ratio = [(f, c) for f, c in zip(qf, qc) if f.scale_mode == "int_ratio"]
    assert ratio
    for f, c in ratio:
        assert f.kernel_cache_bytes() - c.kernel_cache_bytes() == f.out_features * f.in_features
    with pytest.raises(ValueError, match="weights_in_vram"):
        load_svdquant_model(path, compute_dtype=dt, weights_in_vram="small")


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


def test_flux_quantize_save_load(comfy, quantized_flux):
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    mp, qm, report, path = quantized_flux
    pos, _ = comfy.flux_conds()
    assert report["family"] == "flux"
    names = set(report["layers"])
    # embedders and the final layer stay 16-bit; attention, MLP and modulation linears are 4-bit
    assert not names & {"img_in", "txt_in", "final_layer.linear"}
    assert {"double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_mod.lin"} <= names
    lm, meta = load_svdquant_model(path, expected_family="flux", compute_dtype=str(comfy.DTYPE).removeprefix("torch."))
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
    the same output as a full load. On CPU both devices are the CPU; the code path is the same;
    on a GPU (SVDQ_COMFY_DEVICE=cuda) the 4-bit weights really stay in CPU memory."""
    mp, qm, *_ = quantized_sd15
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y_full = comfy.denoise_once(qm, x, s, pos)
    qm.unpatch_model(device_to=qm.offload_device)  # as ComfyUI unloads: weights back to the offload device
    try:
        dev = qm.load_device
        qm.patch_model(device_to=dev, lowvram_model_memory=1024, load_weights=True)
        assert qm.model.model_lowvram
        q = [m for m in qm.model.diffusion_model.modules() if getattr(m, "quantized", False)]
        assert q and all(m.comfy_cast_weights for m in q)
        if dev.type == "cuda":
            assert all(m.qweight.device.type == "cpu" for m in q)
        with torch.no_grad():
            y_low = qm.model.apply_model(x.to(dev), s.to(dev), c_crossattn=pos[0][0].to(dev)).float().cpu()
        assert torch.equal(y_low, y_full)
    finally:
        qm.unpatch_model()


LORA_LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.2",
               "output_blocks.1.1.transformer_blocks.0.attn2.to_v"]


def test_stock_lora_on_4bit_layers_matches_16bit_lora(comfy, quantized_sd15):
    """LoraLoader's path (comfy.sd.load_lora_for_models) on the 4-bit model: the LoRA's effect equals
    its effect on the 16-bit model, strengths change without reloading, strength 0 = no LoRA."""
    mp, qm, *_ = quantized_sd15
    lora = comfy.sd15_lora(mp, LORA_LAYERS)
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y16 = comfy.denoise_once(mp, x, s, pos)
    y4 = comfy.denoise_once(qm, x, s, pos)
    y16_l = comfy.denoise_once(comfy.with_lora(mp, lora, 1.0), x, s, pos)
    q_l = comfy.with_lora(qm, lora, 1.0)
    assert len(q_l.patches) == len(LORA_LAYERS)  # every LoRA key found its 4-bit layer
    y4_l = comfy.denoise_once(q_l, x, s, pos)
    d16, d4 = (y16_l - y16).flatten(), (y4_l - y4).flatten()
    cos = float(torch.nn.functional.cosine_similarity(d16, d4, dim=0))
    print(f"LoRA effect: |d16|={float(d16.norm()):.3f} |d4|={float(d4.norm()):.3f} cos={cos:.4f}")
    assert float(d16.norm()) > 0.05 * float(y16.norm())  # the LoRA does something
    # On random weights the 4-bit network differs from the 16-bit one by ~28%, so the same LoRA moves
    # them alike but not identically (cos 0.69 measured, seed 0); the per-layer term is exact (below).
    assert cos > 0.5 and 0.7 < float(d4.norm() / d16.norm()) < 1.5
    assert float((y4_l - y16_l).norm()) < float((y4 - y16_l).norm())  # the LoRA moved 4-bit toward 16-bit+LoRA
    y4_half = comfy.denoise_once(comfy.with_lora(qm, lora, 0.5), x, s, pos)
    assert not torch.allclose(y4_half, y4_l) and not torch.allclose(y4_half, y4)
    y4_zero = comfy.denoise_once(comfy.with_lora(qm, lora, 0.0), x, s, pos)
    assert torch.allclose(y4_zero, y4, atol=1e-6)
    assert torch.equal(comfy.denoise_once(qm, x, s, pos), y4)  # the LoRA-free clone is clean again


def test_kernel_cache_size_entries_leave_comfyui_paths_intact(comfy, quantized_sd15, monkeypatch):
    """Where the CUDA kernels serve the GPU, each 4-bit layer lists a meta `kernel_cache` state-dict entry
    (the prepared weight copy, for ComfyUI's memory planning). Real on a GPU run, simulated on the CPU: ComfyUI counts it in
    the model's size, and LoRA loading, low-VRAM partial loading and sampling run as without it."""
    from comfyui_svdquant import kernels
    from comfyui_svdquant.core.qlinear import KERNEL_CACHE
    import comfy.model_management as cmm
    mp, qm, *_ = quantized_sd15
    lora = comfy.sd15_lora(mp, LORA_LAYERS)
    x, s = _probe_inputs()
    pos, _ = comfy.sd15_conds()
    y4_l = comfy.denoise_once(comfy.with_lora(qm, lora, 1.0), x, s, pos)
    # ComfyUI's own sum, without the entries (on a GPU run they are already there; on the CPU they appear below)
    size = sum(t.nelement() * t.element_size() for k, t in qm.model.state_dict().items()
               if not k.endswith("." + KERNEL_CACHE))
    real_path = kernels._device_path
    monkeypatch.setattr(kernels, "_device_path", lambda d: 90 if torch.device(d).type == "cuda" else real_path(d))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q = [m for m in qm.model.diffusion_model.modules() if getattr(m, "quantized", False)]
    keys = [k for k in qm.model.state_dict() if k.endswith("." + KERNEL_CACHE)]
    assert len(keys) == len(q)
    assert cmm.module_size(qm.model) == size + sum(m.kernel_cache_bytes() for m in q)
    q_l = comfy.with_lora(qm, lora, 1.0)
    assert len(q_l.patches) == len(LORA_LAYERS)  # the extra keys do not confuse the LoRA key map
    assert torch.equal(comfy.denoise_once(q_l, x, s, pos), y4_l)
    qm.unpatch_model(device_to=qm.offload_device)
    try:
        qm.patch_model(device_to=qm.load_device, lowvram_model_memory=1024, load_weights=True)
        assert qm.model.model_lowvram
    finally:
        qm.unpatch_model()


def test_single_layer_lora_term_is_exact(comfy, quantized_sd15):
    from comfyui_svdquant.wrappers.lora import _lowrank_terms
    mp, qm, *_ = quantized_sd15
    name = LORA_LAYERS[1]
    lora = comfy.sd15_lora(mp, [name])
    import comfy.lora as cl
    key_map = cl.model_lora_keys_unet(mp.model, {})
    patches = cl.load_lora(lora, key_map)
    key = f"diffusion_model.{name}.weight"
    w = mp.model.diffusion_model.get_submodule(name).weight.detach().float().cpu()
    delta = cl.calculate_weight([(0.7, patches[key], 1.0, None, None)], torch.zeros_like(w), key)
    d, u = _lowrank_terms([(0.7, patches[key], 1.0, None, None)], key, w.shape[0], w.shape[1], "cpu", torch.float32)
    assert torch.allclose(u @ d.t(), delta, atol=1e-6)


def test_calibrate_node_encodes_prompts_with_the_clip(comfy):
    """The node's prompts + CLIP input: each sample gets the next prompt's encoding and the empty
    prompt as negative. (The server tests' stub text encoders emit NaN, so a stand-in CLIP is used.)"""
    from comfyui_svdquant.nodes.calibrate_quantize import _conditionings

    class FakeClip:
        def tokenize(self, text):
            return text

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.full((1, 1, 4), float(len(tokens))), {}]]

    conds = _conditionings(None, None, FakeClip(), "a cat\n\n  a big dog \n", 3)
    assert [float(p[0][0][0, 0, 0]) for p, _ in conds] == [5.0, 9.0, 5.0]
    assert all(float(n[0][0][0, 0, 0]) == 0.0 for _, n in conds)
    with pytest.raises(ValueError, match="no CLIP is connected"):
        _conditionings(None, None, None, "a cat", 1)
    with pytest.raises(ValueError, match="connect positive/negative conditioning"):
        _conditionings(None, None, None, "", 1)


@pytest.mark.parametrize("act16, refit", [(True, False), (False, True)])
def test_calibrate_node_passes_its_toggles_to_the_config(comfy, monkeypatch, act16, refit):
    """The node's act16_modulation / lowrank_refit inputs reach QuantConfig (their defaults are the
    library's), with the family's act16 patterns still filled in by the quantize wrapper."""
    from comfyui_svdquant.core.config import QuantConfig
    from comfyui_svdquant.nodes import calibrate_quantize as node
    seen = {}

    def fake(model, conds, qcfg, *args, **kwargs):
        seen["qcfg"] = qcfg
        return model, "report", {}
    monkeypatch.setattr(node, "calibrate_and_quantize", fake)
    pos = [[torch.zeros(1, 1, 4), {}]]
    args = dict(model=object(), calibration_samples=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                seed=0, width=64, height=64, rank=8, smoothing="off", lowrank_iters=1, skip_layers="", save=False,
                filename_prefix="x", positive=pos)
    node.CalibrateAndQuantize().quantize(**args)
    assert (seen["qcfg"].act16_inputs, seen["qcfg"].lowrank_refit) == (QuantConfig().act16_inputs, QuantConfig().lowrank_refit)
    node.CalibrateAndQuantize().quantize(**args, act16_modulation=act16, lowrank_refit=refit)
    assert (seen["qcfg"].act16_inputs, seen["qcfg"].lowrank_refit) == (act16, refit)
    opt = node.CalibrateAndQuantize.INPUT_TYPES()["optional"]
    assert opt["act16_modulation"][1]["default"] is QuantConfig().act16_inputs
    assert opt["lowrank_refit"][1]["default"] is QuantConfig().lowrank_refit


def _sample(comfy_sample, model, pos, neg, seed=3):
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy_sample.prepare_noise(latent, seed)
    return comfy_sample.sample(model, noise, 2, 2.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)


def test_torch_compile_model_adds_no_graph_break(comfy, quantized_sd15):
    """torch.compile on the 4-bit model: (1) dynamo traces every 4-bit linear without a graph break
    (no break's stack has a frame of this pack; ComfyUI's own code breaks some graphs on CPU, e.g.
    psutil memory queries in attention); (2) the stock TorchCompileModel node's path
    (set_torch_compile_wrapper, sampling through KSampler's code) runs the captured graphs and gives
    what eager gives. A logger call in the linear once broke every compiled graph in two."""
    import comfy.model_management as mm
    import comfy.sample as comfy_sample
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfyui_svdquant import kernels
    mp, qm, *_ = quantized_sd15
    pos, neg = comfy.sd15_conds()
    x, s = _probe_inputs()
    root = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
    pack_dirs = tuple(os.path.join(root, d) + os.sep for d in ("core", "kernels", "wrappers", "nodes"))

    torch._dynamo.reset()
    kernels._BACKEND_LOGGED.clear()  # the first call ever is the traced one, as for a user
    mm.load_models_gpu([qm])
    dm = qm.model.diffusion_model
    # the dtypes BaseModel._apply_model hands the diffusion model: x and context in the compute dtype
    dt = qm.model.manual_cast_dtype or qm.model.get_dtype()
    explained = torch._dynamo.explain(dm)(x.to(qm.load_device, dt), s.to(qm.load_device),
                                          context=pos[0][0].to(qm.load_device, dt))
    ours = [str(b.reason).splitlines()[0] + " at " + f"{f.filename}:{f.lineno}"
            for b in explained.break_reasons for f in (b.user_stack or []) if f.filename.startswith(pack_dirs)]
    assert explained.graph_count > 0 and not ours, ours

    graphs = []
    torch._dynamo.reset()
    eager = _sample(comfy_sample, qm, pos, neg)
    compiled = qm.clone()
    set_torch_compile_wrapper(model=compiled, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    assert torch.equal(_sample(comfy_sample, compiled, pos, neg), eager)
    torch._dynamo.reset()
    assert graphs  # the wrapper really compiled the model


class Interrupted(Exception):
    """What ComfyUI's progress hook raises when the user presses Cancel (InterruptProcessingException)."""


def _file_tensors(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_shared_inputs_gptq_and_an_interrupted_run_resumed(comfy, tmp_path):
    """SD1.5 with q/k/v sharing and GPTQ: groups found at capture and declared in the file; a run
    cancelled after 5 layers (from the progress hook, as ComfyUI's Cancel does) writes no file; the
    rerun reuses the finished layers and writes the same file as an uninterrupted run, bit for bit."""
    from comfy import utils as comfy_utils  # (`comfy` here is the in-process helper module)
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize, partial_dir
    mp = comfy.tiny_sd15_patcher()
    pos, neg = comfy.sd15_conds()
    qcfg = QuantConfig(rank=RankPolicy("fixed", 16), alpha_grid=(0.5,), share_inputs=True, gptq=True,
                       skip_patterns=("*.ff.*", "*emb_layers*"))  # fewer layers: three runs stay quick

    def run(path):
        return calibrate_and_quantize(mp, [(pos, neg)], qcfg, 1, 2.0, "euler", "normal", 0, 64, 64, save_path=str(path))

    _, _, report = run(tmp_path / "full.safetensors")
    blocks = {n.rpartition(".")[0] for g in report["input_groups"] for n in g}
    assert report["input_groups"] and all(n.endswith(("attn1", "attn2")) for n in blocks)
    assert all([n.rpartition(".")[2] for n in g] in (["to_q", "to_k", "to_v"], ["to_k", "to_v"])
               for g in report["input_groups"])
    assert {"capture", "smoothing_search", "lowrank", "gptq", "packing", "saving"} <= set(report["time_s"])
    full, meta = _file_tensors(str(tmp_path / "full.safetensors"))
    assert json.loads(meta["svdquant"])["input_groups"] == report["input_groups"]

    path = tmp_path / "cut.safetensors"
    old_hook = comfy_utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value >= 1 + 5:  # 1 calibration run, then 5 layers
            raise Interrupted()

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(Interrupted):
            run(path)
    finally:
        comfy_utils.set_progress_bar_global_hook(old_hook)
    kept = os.listdir(partial_dir(str(path)))
    assert not path.exists() and len(kept) >= 2
    assert all(f.endswith(".layer") for f in kept)  # never offered by a loader's .safetensors list
    _, text, report2 = run(path)
    assert not os.path.exists(partial_dir(str(path)))       # removed once the file is saved
    assert report2["time_s"].get("resume", 0) > 0
    cut, _ = _file_tensors(str(path))
    assert set(cut) == set(full) and all(torch.equal(cut[k], full[k]) for k in full)


def test_input_groups_quantize_their_input_once_in_the_loaded_model(comfy, tmp_path, monkeypatch):
    """A file with q/k/v groups loads with one InputGroup per declared group; a denoising step then runs kernel 1
    once per group and gives bitwise the output of the same model with its layers run alone."""
    from comfyui_svdquant import kernels
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.core.input_group import attach_input_groups, detach_input_groups
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    mp = comfy.tiny_sd15_patcher()
    pos, neg = comfy.sd15_conds()
    path = str(tmp_path / "grouped.safetensors")
    qcfg = QuantConfig(rank=RankPolicy("fixed", 16), alpha_grid=(0.5,), share_inputs=True, gptq=False)
    qm, _, report = calibrate_and_quantize(mp, [(pos, neg)], qcfg, 1, 2.0, "euler", "normal", 0, 64, 64,
                                           save_path=path)
    groups = report["input_groups"]
    lm, _ = load_svdquant_model(path, compute_dtype=str(comfy.DTYPE).removeprefix("torch."))
    for model in (qm, lm):  # built in memory by Calibrate & Quantize, and from the file
        dm = model.model.diffusion_model
        members = {n: m for n, m in dm.named_modules() if getattr(m, "_input_group", None) is not None}
        assert sorted(members) == sorted(n for g in groups for n in g)
    calls = []
    real = kernels.reference.quantize_act_lora_down
    monkeypatch.setattr(kernels.reference, "quantize_act_lora_down", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, s = _probe_inputs()
    grouped = comfy.denoise_once(lm, x, s, pos)
    n_grouped = len(calls)
    assert detach_input_groups(lm.model.diffusion_model) == len(groups)
    calls.clear()
    alone = comfy.denoise_once(lm, x, s, pos)
    assert torch.equal(grouped, alone)
    n_layers = report["summary"]["layers"]  # each 4-bit layer runs once per step
    assert len(calls) == n_layers and n_grouped == n_layers - sum(len(g) - 1 for g in groups)
    # the one-GEMM form (Hopper's; here the reference's twin): ComfyUI's attention takes the members' column views
    monkeypatch.setattr(kernels, "FUSE_REFERENCE", True)
    attach_input_groups(lm.model.diffusion_model, groups)
    fused = comfy.denoise_once(lm, x, s, pos)
    assert all(m._input_group._fused[1] is not None for m in members.values())  # the fused form ran
    assert torch.allclose(fused, alone, rtol=1e-4, atol=1e-4), float((fused - alone).abs().max())


def test_flux_unsigned_gelu_layers(comfy, tmp_path):
    """FLUX with unsigned activations: the double blocks' MLP output linears (after GELU) get an
    act_shift, nothing else does; the file (version 3) loads to the same model."""
    from comfyui_svdquant.core.config import QuantConfig, RankPolicy
    from comfyui_svdquant.wrappers.loader import load_svdquant_model
    from comfyui_svdquant.wrappers.quantize import calibrate_and_quantize
    mp = comfy.tiny_flux_patcher()
    pos, neg = comfy.flux_conds()
    path = str(tmp_path / "flux_u.safetensors")
    qcfg = QuantConfig(rank=RankPolicy("fixed", 16), alpha_grid=(0.5,), unsigned_acts=True)
    qm, text, report = calibrate_and_quantize(mp, [(pos, neg)], qcfg, 1, 1.0, "euler", "simple", 0, 64, 64, save_path=path)
    unsigned = {n for n, r in report["layers"].items() if r["unsigned_acts"]}
    assert unsigned == {"double_blocks.0.img_mlp.2", "double_blocks.0.txt_mlp.2"}
    lm, meta = load_svdquant_model(path, compute_dtype=str(comfy.DTYPE).removeprefix("torch."))
    assert meta["version"] == 3
    mods = dict(lm.model.diffusion_model.named_modules())
    assert mods["double_blocks.0.img_mlp.2"].act_shift is not None and mods["double_blocks.0.img_mlp.0"].act_shift is None
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.7])
    y_mem = comfy.denoise_once_flux(qm, x, s, pos)
    y_file = comfy.denoise_once_flux(lm, x, s, pos)
    assert torch.allclose(y_mem, y_file, rtol=0, atol=1e-5)


def test_flux_attention_prep_reference_is_comfyui_own(comfy):
    """kernels/reference.py qk_norm_rope (the CUDA kernel's oracle and the CPU path) against ComfyUI's QKNorm,
    txt ‖ img concatenation and apply_rope on the same tensors: bitwise, two sources with strided rows, B = 2."""
    from comfy.ldm.flux.layers import QKNorm
    from comfy.ldm.flux.math import apply_rope
    from comfyui_svdquant.kernels import reference
    g = torch.Generator().manual_seed(3)
    b, h, d, lt, li = 2, 3, 16, 5, 7
    norms = []
    for _ in range(2):
        n = QKNorm(d, dtype=comfy.DTYPE)
        with torch.no_grad():
            n.query_norm.scale.copy_(1 + 0.3 * torch.randn(d, generator=g))
            n.key_norm.scale.copy_(1 + 0.3 * torch.randn(d, generator=g))
        norms.append(n)
    wide = torch.randn(b, lt + li, 3 * h * d + 32, generator=g).to(comfy.DTYPE)  # rows wider than qkv: strided views
    txt, img = wide[:, :lt, : 3 * h * d], wide[:, lt:, 32:]
    pe = torch.randn(b, 1, lt + li, d // 2, 2, 2, generator=g)

    def comfy_qkv(x, norm):
        q, k, v = x.reshape(b, x.shape[1], 3, h, d).permute(2, 0, 3, 1, 4)
        return (*norm(q, k, v), v)

    tq, tk, tv = comfy_qkv(txt, norms[0])
    iq, ik, iv = comfy_qkv(img, norms[1])
    want_q, want_k = apply_rope(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), pe)
    want_v = torch.cat((tv, iv), 2)
    got = reference.qk_norm_rope([(txt, norms[0].query_norm.scale, norms[0].key_norm.scale),
                                  (img, norms[1].query_norm.scale, norms[1].key_norm.scale)], pe, h)
    for g_, w in zip(got, (want_q, want_k, want_v)):
        assert g_.shape == (b, h, lt + li, d) and g_.dtype == comfy.DTYPE
        assert torch.equal(g_, w)


def test_flux_fused_blocks_replace_every_block_with_comfyui_output(comfy, quantized_flux, monkeypatch):
    """wrappers/flux_blocks.py: a loaded 4-bit FLUX model gets a block-replace patch per block; the patched forward
    runs the fused modulated LayerNorms and attention preparation in every block and gives ComfyUI's forward's output (bitwise on the CPU,
    where the references are ComfyUI's ops; within the kernels' rounding on a GPU). A clone keeps the patches
    without copying the blocks; an attention mask, a missing pe or inputs newer ComfyUIs pass fall back to ComfyUI's
    block."""
    from comfyui_svdquant.kernels import flux_ops
    from comfyui_svdquant.wrappers import flux_blocks, loader
    path = quantized_flux[3]
    dtype = str(comfy.DTYPE).removeprefix("torch.")
    fused, _ = loader.load_svdquant_model(path, expected_family="flux", compute_dtype=dtype)
    dm = fused.model.diffusion_model
    dit = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", 0), ("single_block", 0)}
    clone = fused.clone()
    assert clone.model_options["transformer_options"]["patches_replace"]["dit"][("single_block", 0)].block \
        is dm.single_blocks[0]

    calls, lns = [], []
    real, real_ln = flux_blocks.qk_norm_rope, flux_blocks.ln_modulate
    monkeypatch.setattr(flux_blocks, "qk_norm_rope", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    monkeypatch.setattr(flux_blocks, "ln_modulate", lambda *a, **k: lns.append(a[0].shape) or real_ln(*a, **k))
    pos, _ = comfy.flux_conds()
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.7])
    y_fused = comfy.denoise_once_flux(fused, x, s, pos)
    assert calls == [2, 1]  # the double block's two sources (txt, img), the single block's one
    assert len(lns) == 5  # the double block's four modulated LayerNorms (img, txt x attention, MLP), the single's one
    assert flux_blocks.remove_fused_flux_blocks(fused) == 2
    y_plain = comfy.denoise_once_flux(fused, x, s, pos)
    assert calls == [2, 1] and torch.isfinite(y_plain).all()
    if comfy.ON_GPU:
        assert flux_ops._kernel_ok(fused.load_device)  # the CUDA kernels ran, not the references
        assert float((y_fused - y_plain).norm() / y_plain.norm()) < 1e-2
    else:
        assert torch.equal(y_fused, y_plain)

    seen = []
    original = {"original_block": lambda args: seen.append(args) or {"img": "original"}}
    patch = flux_blocks.FusedSingleBlock(dm.single_blocks[0])
    assert patch({"img": torch.zeros(1), "vec": None, "pe": torch.zeros(1), "attn_mask": torch.ones(1)},
                 original) == {"img": "original"}  # a mask
    assert patch({"img": torch.zeros(1), "vec": None, "pe": torch.zeros(1), "modulation_dims": [(0, 1, 0)]},
                 original) == {"img": "original"}  # an input ComfyUI 0.3.75 does not pass
    double = flux_blocks.FusedDoubleBlock(dm.double_blocks[0])
    assert double({"img": None, "txt": None, "vec": None, "pe": None}, original) == {"img": "original"}  # no pe
    assert len(seen) == 3


def test_flux_fused_blocks_write_the_row_bases(comfy, quantized_flux, monkeypatch):
    """Row bases (SVDQ_ROW_BASE=1; here every layer, the threshold set to 0) on a Hopper GPU: the fused forward's
    producers write the next linear's bases (ln_modulate_rowbase for the five modulated inputs, concat_rows_rowbase
    for the single block's linear2 and the double block's two MLP GELUs), and the output is within rounding of the
    same model whose layers compute their own bases (only the double blocks' GELU changes: torch's kernel → the
    concatenation's formula, within two ulps)."""
    from comfyui_svdquant import kernels
    from comfyui_svdquant.kernels import _lib, flux_ops
    from comfyui_svdquant.wrappers import flux_blocks, loader
    if not comfy.ON_GPU or _lib.device_path(torch.cuda.current_device()) != 90:
        pytest.skip("row bases are the Hopper GPU path")
    monkeypatch.setenv("SVDQ_ROW_BASE", "1")
    monkeypatch.setattr(kernels, "ROW_BASE_MIN_WEIGHTS", 0)
    dtype = str(comfy.DTYPE).removeprefix("torch.")
    fused, _ = loader.load_svdquant_model(quantized_flux[3], expected_family="flux", compute_dtype=dtype)
    made = []

    def spy(name, real):
        def producer(*a, **k):
            y = real(*a, **k)
            made.append((name, y is not None))  # None: the kernel did not take the inputs
            return y
        return producer

    for name in ("ln_modulate_rowbase", "concat_rows_rowbase"):
        monkeypatch.setattr(flux_blocks, name, spy(name, getattr(flux_blocks, name)))
    pos, _ = comfy.flux_conds()
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.5])
    y_given = comfy.denoise_once_flux(fused, x, s, pos)
    assert flux_ops._kernel_ok(fused.load_device)
    assert sorted(made) == sorted([("ln_modulate_rowbase", True)] * 5 + [("concat_rows_rowbase", True)] * 3), made
    monkeypatch.setattr(flux_blocks, "_slot", lambda *a: None)  # every layer computes its own bases
    y_own = comfy.denoise_once_flux(fused, x, s, pos)
    assert torch.isfinite(y_given).all()
    assert float((y_given - y_own).norm() / y_own.norm()) < 1e-2


def test_fused_flux_blocks_on_a_16bit_model(comfy):
    """The fused block forward on a 16-bit FLUX (bench_e2e --fused-16bit compares with it): installed on a clone (the
    source patcher keeps no patch, the weights are shared), ComfyUI's forward's output (bitwise on the CPU; within
    the kernels' rounding on a GPU). A non-FLUX model gets no patch."""
    from comfyui_svdquant.wrappers.flux_blocks import install_fused_flux_blocks
    mp = comfy.tiny_flux_patcher()
    fused = mp.clone()
    assert install_fused_flux_blocks(fused) == 2 and fused.model is mp.model
    assert "patches_replace" not in mp.model_options["transformer_options"]
    pos, _ = comfy.flux_conds()
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.6])
    y_fused, y_plain = comfy.denoise_once_flux(fused, x, s, pos), comfy.denoise_once_flux(mp, x, s, pos)
    if comfy.ON_GPU:
        assert float((y_fused - y_plain).norm() / y_plain.norm()) < 1e-2
    else:
        assert torch.equal(y_fused, y_plain)
    assert install_fused_flux_blocks(comfy.tiny_sd15_patcher()) == 0


def test_fused_flux_forward_compiles_as_one_graph(comfy, quantized_flux, monkeypatch):
    """torch.compile of the 4-bit FLUX with the fused block forward: dynamo traces the whole apply_model as one graph
    (the flux_ops and the 4-bit linears are custom ops with fake implementations) and the traced graph (aot_eager)
    gives the eager output. The attention is ComfyUI's pytorch one, as on a GPU: on the CPU ComfyUI picks a split
    attention that asks psutil for free memory, a graph break of its own in either forward."""
    import torch._dynamo
    import comfy.ldm.flux.math as flux_math
    from comfy.ldm.modules import attention
    from comfyui_svdquant.wrappers import flux_blocks, loader
    monkeypatch.setattr(flux_math, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(flux_blocks, "optimized_attention", attention.attention_pytorch)
    dtype = str(comfy.DTYPE).removeprefix("torch.")
    fused, _ = loader.load_svdquant_model(quantized_flux[3], expected_family="flux", compute_dtype=dtype)
    import comfy.model_management as mm
    mm.load_models_gpu([fused])
    dev = fused.load_device
    pos, _ = comfy.flux_conds()
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)).to(dev)
    model = fused.model

    def step(x):
        opts = dict(fused.model_options["transformer_options"])
        return model.apply_model(x, torch.tensor([0.7], device=dev), c_crossattn=pos[0][0].to(dev),
                                 y=pos[0][1]["pooled_output"].to(dev), transformer_options=opts,
                                 guidance=torch.tensor([3.5], device=dev))

    torch._dynamo.reset()
    calls = []
    real = flux_blocks.qk_norm_rope
    monkeypatch.setattr(flux_blocks, "qk_norm_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        explain = torch._dynamo.explain(step)(x)
        assert calls, "the fused blocks were not traced"
        assert explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
        eager = step(x)
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)
