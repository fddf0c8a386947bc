"""Layers with 16-bit activations (FLUX's modulation linears): calibration without activation rounding, the
`act_bits` marker and "16bit" declaration in the file, and the runtime (reference, and the Hopper-copy form)."""
import pytest
import torch
from torch import nn

from comfyui_svdquant import kernels
from comfyui_svdquant.core import checkpoint as ckpt
from comfyui_svdquant.core.calibrate import capture_inputs, find_target_linears, quantize_layers
from comfyui_svdquant.core.config import QuantConfig, RankPolicy
from comfyui_svdquant.core.layer_quant import ACT_BITS, LayerProblem
from comfyui_svdquant.core.qlinear import SVDQuantLinear
from comfyui_svdquant.kernels import reference as ref
from synthetic import outlier_layer


def _layer(act16, rank=16, scales="int_ratio"):
    w, x = outlier_layer(n=128, k=256, rows=256)
    cfg = QuantConfig(alpha_grid=(0.5,), scale_mode=scales)
    prob = LayerProblem(w, x.abs().amax(0), x, cfg, "mod.lin", act16=act16)
    return w, x, prob.finish(0.5, rank, torch.randn(128) * 0.1, torch.float32)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_16bit_activations_remove_the_activation_rounding_error():
    _, _, q4 = _layer(act16=False)
    _, _, q16 = _layer(act16=True)
    assert q16.act16 and not q4.act16 and q16.report["act16"]
    assert q16.report["error"] < 0.5 * q4.report["error"]  # outlier-heavy inputs: rounding them dominated
    t = q16.tensors()
    assert t[ACT_BITS].dtype == torch.uint8 and t[ACT_BITS].tolist() == [16] and ACT_BITS not in q4.tensors()


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
def test_module_forward_is_the_stored_weights_on_unrounded_inputs(scales):
    w, x, q = _layer(act16=True, scales=scales)
    t = q.tensors()
    mod = SVDQuantLinear.from_tensors(t)
    assert "16-bit activations" in mod.extra_repr()
    y = mod(x)
    wdeq = ref._dequant_weight(t["qweight"], ref.weight_scales_for_gemm(t), 64)
    want = (x / t["smooth_factor"]) @ wdeq.t() + (x @ t["proj_down"]) @ t["proj_up"].t() + t["bias"]
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    assert _rel(y, x @ w.t() + t["bias"]) < q.report["error"] * 1.5  # the calibrated error, not W4A4's


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_form_matches_the_reference(monkeypatch, dtype, scales):
    """On a GPU the layer computes in the compute dtype with a weight made from the packed codes for the call
    (int_ratio: code × multiplier; float: codes stepped per group): the same code run here on the CPU, against
    the fp32 reference. Inputs ×30: Σ x̂·q·f then passes fp16's range, which the fp16 int_ratio form must survive.
    No kernel copy is prepared for such a layer, on any device."""
    _, x, q = _layer(act16=True, scales=scales)
    t = {k: (v.to(dtype) if v.is_floating_point() and k not in ("wscale_base",) else v)
         for k, v in q.tensors().items()}
    monkeypatch.setattr(kernels, "_device_path", lambda device: 90)
    monkeypatch.setattr(kernels._lib, "has_gemv", lambda: False)  # the torch form (a library without the GEMV)
    assert not kernels.prepare_weights({**t, "act16": True}, torch.device("cpu"))["_act16_16bit"]  # CPU: reference
    monkeypatch.setenv("SVDQ_BACKEND", "reference")
    assert not kernels.prepare_weights({**t, "act16": True}, torch.device("cuda"))["_act16_16bit"]
    monkeypatch.delenv("SVDQ_BACKEND")
    # prepared for a GPU (the tensors stay where they are: the form is device-agnostic, so it runs here)
    p = kernels.prepare_weights({**t, "act16": True}, torch.device("cuda"))
    assert p["_act16_16bit"] and p["_path"] == 0 and "_qw" not in p
    assert kernels.prepared_extra_bytes(128, 256, 16, "cuda", act16=True) == 0
    monkeypatch.setattr(kernels._lib, "has_gemv", lambda: True)  # the GEMV's operands: 1/λ, bias, steps (fp32)
    assert kernels.prepared_extra_bytes(128, 256, 16, "cuda", act16=True) == 4 * 256 + 4 * 128 + 4 * 4 * 128
    monkeypatch.setattr(kernels._lib, "has_gemv", lambda: False)
    assert kernels.prepared_extra_bytes(128, 256, 16, "cuda") > 128 * 256  # a 4-bit-activation layer's copy
    xb = (x * 30).to(dtype)
    y = kernels.linear(xb, p)
    want = ref.svdquant_linear_act16(xb.float(), t["qweight"], ref.weight_scales_for_gemm(t), t["smooth_factor"],
                                     t["proj_down"], t["proj_up"], t["bias"])
    if scales == "int_ratio":
        xs = xb.float() / t["smooth_factor"].float()
        codes = kernels._int8_from_ratio(t["qweight"], t["wscale_mult"])
        assert float((xs @ codes.float().t()).abs().max()) > 65504  # Σ x̂·q·f: the hazard is real
    assert y.dtype == dtype and torch.isfinite(y).all() and _rel(y, want) < 1e-2


def test_calibration_marks_the_layers_named_by_the_patterns():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mod = nn.Linear(128, 256)
            self.fc = nn.Linear(128, 128)

        def forward(self, x, v):
            return self.fc(x) + self.mod(v)[:, :128]

    m = Block()
    cfg = QuantConfig(alpha_grid=(0.5,), rank=RankPolicy("fixed", 8), act16_patterns=("mod",))
    layers = find_target_linears(m, cfg)
    with torch.no_grad(), capture_inputs(layers, cfg) as stats:
        m(torch.randn(64, 128), torch.randn(64, 128))
    res = quantize_layers(layers, stats, cfg)
    assert res["mod"].act16 and not res["fc"].act16
    off = quantize_layers(layers, stats, QuantConfig(alpha_grid=(0.5,), rank=RankPolicy("fixed", 8),
                                                     act16_patterns=("mod",), act16_inputs=False))
    assert not off["mod"].act16


def _file(tmp_path, mutate=None):
    _, _, q = _layer(act16=True)
    tensors = {f"blocks.0.mod.{k}": v.to(torch.bfloat16) if v.is_floating_point() and k != "wscale_base" else v
               for k, v in q.tensors().items()}
    meta = ckpt.build_metadata({"blocks.0.mod": {"rank": 16, "scales": "int_ratio", "act16": True}}, family="flux",
                               source_dtype=torch.bfloat16, model_class="Flux")
    if mutate:
        mutate(tensors, meta)
    path = str(tmp_path / "a16.safetensors")
    ckpt.save_checkpoint(path, tensors, meta)
    return path, tensors


def test_file_declares_16bit_activations_and_round_trips(tmp_path):
    path, tensors = _file(tmp_path)
    sd, fmeta, layers = ckpt.load_checkpoint(path)
    assert fmeta["version"] == ckpt.UNSIGNED_VERSION  # older readers must refuse: they would round the inputs
    assert layers["blocks.0.mod"]["act"] == "16bit"
    assert all(torch.equal(sd[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("case,match", [
    ("marker without declaration", "act_bits is present but layer blocks.0.mod does not declare '16bit'"),
    ("declaration without marker", "tensor blocks.0.mod.act_bits is missing"),
    ("marker value", "act_bits holds 4, expected 16"),
])
def test_inconsistent_16bit_declarations_are_refused(tmp_path, case, match):
    import json

    def mutate(tensors, meta):
        if case == "marker without declaration":
            q = json.loads(meta[ckpt.QUANT_META_KEY])
            del q["layers"]["blocks.0.mod"]["act"]
            meta[ckpt.QUANT_META_KEY] = json.dumps(q)
        elif case == "declaration without marker":
            del tensors["blocks.0.mod.act_bits"]
        else:
            tensors["blocks.0.mod.act_bits"] = torch.tensor([4], dtype=torch.uint8)
    path, _ = _file(tmp_path, mutate)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
def test_a_16bit_activation_layer_traces_without_a_graph_break(scales):
    """TorchCompileModel compiles the diffusion model: the act16 layer's forward is plain torch ops, in the fp32
    reference form (CPU) and in the 16-bit form a GPU runs (prepared for "cuda"; the form is device-agnostic)."""
    _, x, q = _layer(act16=True, scales=scales)
    mod = SVDQuantLinear.from_tensors(q.tensors())
    f = torch.compile(lambda t: mod(t) * 2, backend="eager", fullgraph=True)  # fullgraph: a break raises
    assert torch.allclose(f(x), mod(x) * 2, atol=1e-5)
    t = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "wscale_base" else v) for k, v in q.tensors().items()}
    p = kernels.prepare_weights({**t, "act16": True}, torch.device("cuda"))
    xb = x.to(torch.bfloat16)
    g = torch.compile(lambda t: kernels.linear(t, p) * 2, backend="eager", fullgraph=True)
    assert torch.equal(g(xb), kernels.linear(xb, p) * 2)


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
def test_gemv_operands_and_routing(monkeypatch, scales):
    """The Python side of the W4A16 GEMV, on the CPU: the operands prepare makes (steps transposed to (N, K/64), 1/λ,
    fp32 bias, low-rank activations in the compute dtype) and the routing (a 3-D input of up to GEMV_MAX_M rows goes to
    the GEMV; more rows take the torch form). The kernel is replaced by the formula it computes (kernels/csrc/w4a16.cu
    header); the kernel itself is tested against the reference on the GPU (tests/gpu/test_gemv_gpu.py)."""
    _, x, q = _layer(act16=True, scales=scales)
    t = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "wscale_base" else v) for k, v in q.tensors().items()}
    p = {**t, "act16": True, "_act16_16bit": True, **kernels._prepare_gemv(t, torch.device("cpu"))}
    n, k = t["qweight"].shape[0], 2 * t["qweight"].shape[1]
    assert (p["_gv_steps"] if scales == "float" else p["_gv_mult"]).shape == (n, k // 64)
    calls = []

    def formula(x2, smooth_rcp, qweight, steps, mult, base, lora, up, bias):
        calls.append(x2.shape[0])
        st = steps if steps is not None else base.unsqueeze(1) * mult.float()  # (N, K/64)
        w = ref.unpack_int4(qweight).float().view(n, k // 64, 64) * st.unsqueeze(-1)
        y = (x2.float() * smooth_rcp) @ w.view(n, k).t() + lora.float() @ up.float().t() + bias
        assert lora.dtype == up.dtype == x2.dtype == torch.bfloat16 and bias.dtype == torch.float32
        return y.to(x2.dtype)

    ops = kernels._get_ops()
    monkeypatch.setattr(ops, "gemv", formula)
    for m in (1, kernels.GEMV_MAX_M, kernels.GEMV_MAX_M + 1):
        xb = x[:m].to(torch.bfloat16).unsqueeze(1)  # (B, 1, C), as the modulation's input
        y = kernels.linear(xb, p)
        want = ref.svdquant_linear_act16(xb.float(), t["qweight"], ref.weight_scales_for_gemm(t), t["smooth_factor"],
                                         t["proj_down"], t["proj_up"], t["bias"])
        assert y.shape == (m, 1, n) and _rel(y, want) < 1e-2
    assert calls == [1, kernels.GEMV_MAX_M]  # the torch form past GEMV_MAX_M rows
