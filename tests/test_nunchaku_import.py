"""Nunchaku INT4 FLUX import, ComfyUI-free: tilings against their documented fragment orders, round trips
natural -> their layout (tests/nunchaku_pack.py) -> our converter, a whole synthetic file, refusals."""
import json

import pytest
import torch

import nunchaku_pack as npk
from comfyui_svdquant.core import nunchaku_import as ni
from comfyui_svdquant.core import nunchaku_layout as nl
from comfyui_svdquant.core.checkpoint import CheckpointError, check_layers, parse_declaration
from comfyui_svdquant.kernels import reference as ref

SHAPES = [(128, 128), (256, 384), (384, 256), (128, 1024)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,k", SHAPES)
def test_w4a4_weight_round_trip_is_bit_identical(n, k):
    codes = torch.randint(-8, 8, (n, k), generator=_gen(n * 7 + k))
    codes[0, :16] = -8  # their clipped codes reach -8, which our packed format holds too
    theirs = npk.pack_w4a4_weight(codes)
    assert theirs.dtype == torch.int8 and theirs.shape == (n, k // 2)
    assert not torch.equal(theirs, ref.pack_int4(codes))  # a real permutation, not the identity
    assert torch.equal(nl.unpack_w4a4_weight(theirs), ref.pack_int4(codes))
    assert torch.equal(ref.unpack_int4(nl.unpack_w4a4_weight(theirs)), codes.to(torch.int8))  # -8 decodes as -8


def test_w4a4_weight_tiles_follow_the_mma_fragment():
    """Each code lands where PTX's mma.m16n8k64 B fragment wants it: lane = 4·(n mod 8) + (k mod 32)//8,
    register = (n mod 16)//8 · 2 + (k mod 64)//32, nibble = k mod 8; 32 lanes × 4 registers per 128×64 tile."""
    n, k = 256, 256
    g = _gen(1)
    for _ in range(40):
        i, j = int(torch.randint(n, (1,), generator=g)), int(torch.randint(k, (1,), generator=g))
        codes = torch.zeros(n, k, dtype=torch.int64)
        codes[i, j] = 5
        words = npk.pack_w4a4_weight(codes).view(torch.int32).reshape(-1)
        lane = 4 * (i % 8) + (j % 32) // 8
        reg = 2 * ((i % 16) // 8) + (j % 64) // 32
        word = ((((i // 128) * (k // 64) + j // 64) * 8 + (i % 128) // 16) * 32 + lane) * 4 + reg
        assert torch.nonzero(words).flatten().tolist() == [word]
        assert int(words[word]) == 5 << (4 * (j % 8))


def test_scale_order_matches_their_documented_table():
    """deepcompressor's pack_scale comment for warp_n 128: lane 0 holds channels 0 1 8 9, lane 1 2 3 10 11,
    lane 4 16 17 24 25, lane 7 22 23 30 31, lane 28 112 113 120 121, lane 31 118 119 126 127."""
    packed = npk.pack_scales(torch.arange(256).reshape(256, 1)).reshape(-1, 4)
    table = {0: [0, 1, 8, 9], 1: [2, 3, 10, 11], 2: [4, 5, 12, 13], 3: [6, 7, 14, 15], 4: [16, 17, 24, 25],
             7: [22, 23, 30, 31], 28: [112, 113, 120, 121], 31: [118, 119, 126, 127], 32: [128, 129, 136, 137]}
    for lane, chans in table.items():
        assert packed[lane].tolist() == chans
    assert torch.equal(nl.unpack_channel_scales(packed.reshape(-1), 256), torch.arange(256))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_scales_and_vectors_round_trip(n, k, dtype):
    scales = torch.rand(k // 64, n, generator=_gen(k)).to(dtype)
    vec = torch.randn(n, generator=_gen(n)).to(dtype)
    packed = npk.pack_scales(scales.t().contiguous())
    assert packed.shape == (k // 64, n) and not torch.equal(packed, scales)
    assert torch.equal(nl.unpack_channel_scales(packed, n), scales)
    assert torch.equal(nl.unpack_channel_scales(npk.pack_scales(vec.reshape(-1, 1)), n), vec)


@pytest.mark.parametrize("rank", [16, 32, 48])
@pytest.mark.parametrize("c", [128, 384])
def test_lowrank_round_trip(c, rank):
    down = torch.randn(c, rank, generator=_gen(c + rank)).bfloat16()  # our proj_down (K, r)
    up = torch.randn(c, rank, generator=_gen(c - rank)).bfloat16()    # our proj_up (N, r)
    p_down, p_up = npk.pack_lowrank(down.t().contiguous(), True), npk.pack_lowrank(up, False)
    assert p_down.shape == (c, rank) and p_up.shape == (c, rank)
    assert not torch.equal(p_down, down) and not torch.equal(p_up, up)
    assert torch.equal(nl.unpack_lowrank(p_down, True), down)
    assert torch.equal(nl.unpack_lowrank(p_up, False), up)


def test_lowrank_tiles_follow_the_mma_fragment():
    """lora_up (N, r): channel n is the MMA's n (lane = 4·(n mod 8) + (r mod 8)//2), rank the k
    (register = 2·(n mod 16)//8 + (r mod 16)//8, half = r mod 2), 16×16 tiles channel-major."""
    n, r = 256, 32
    for i, j in [(0, 0), (5, 3), (13, 9), (130, 17), (255, 31)]:
        up = torch.zeros(n, r)
        up[i, j] = 1.0
        flat = npk.pack_lowrank(up, False).reshape(-1)
        lane, reg = 4 * (i % 8) + (j % 8) // 2, 2 * ((i % 16) // 8) + (j % 16) // 8
        pos = (((i // 16) * (r // 16) + j // 16) * 32 + lane) * 8 + reg * 2 + j % 2
        assert torch.nonzero(flat).flatten().tolist() == [pos]


@pytest.mark.parametrize("n,k", [(128, 128), (256, 256), (384, 3072)])
def test_awq_codes_round_trip(n, k):
    codes = torch.randint(0, 16, (n, k), generator=_gen(k), dtype=torch.int64).to(torch.uint8)
    s, z = torch.rand(n, k // 64).half(), torch.randn(n, k // 64).half()
    qw, ws, wz = npk.pack_awq(codes, s, z)
    assert qw.dtype == torch.int32 and qw.shape == (n // 4, k // 2) and ws.shape[0] >= k // 64
    assert torch.equal(nl.unpack_awq_codes(qw, k), codes)
    assert torch.equal(ws[:k // 64], s.t()) and torch.equal(wz[:k // 64], z.t())


def test_layout_errors_name_the_problem():
    with pytest.raises(nl.LayoutError, match="multiple of 128"):
        nl.unpack_w4a4_weight(torch.zeros(100, 64, dtype=torch.int8))
    with pytest.raises(nl.LayoutError, match="multiples of 16"):
        nl.unpack_lowrank(torch.zeros(128, 20), True)


# -- the layer math: joins and the GELU shift ---------------------------------------------------

def _layer(n, k, rank, seed, smooth=None):
    g = _gen(seed)
    codes = torch.randint(-7, 8, (n, k), generator=g)
    return {"qweight": ref.pack_int4(codes), "wscales": torch.rand(k // 64, n, generator=g) * 0.02 + 0.01,
            "smooth_factor": smooth if smooth is not None else torch.rand(k, generator=g) + 0.5,
            "proj_down": torch.randn(k, rank, generator=g) * 0.05, "proj_up": torch.randn(n, rank, generator=g) * 0.05,
            "bias": torch.randn(n, generator=g) * 0.1}


def _forward(t, x):
    return ref.svdquant_linear(x, t["qweight"], t["wscales"], t["smooth_factor"], t["proj_down"], t["proj_up"], t["bias"])


def test_join_outputs_and_inputs_are_the_same_layers():
    x = torch.randn(7, 256, generator=_gen(3))
    a = _layer(384, 256, 16, 1)
    b = _layer(256, 256, 32, 2, smooth=a["smooth_factor"])
    joined = ni.join_outputs(a, b)
    assert torch.allclose(_forward(joined, x), torch.cat([_forward(a, x), _forward(b, x)], 1), rtol=0, atol=1e-5)
    assert ni.join_outputs(a, _layer(256, 256, 16, 4)) is None  # different smoothing: no exact join
    c, d = _layer(128, 256, 16, 5), _layer(128, 512, 32, 6)
    xc, xd = x, torch.randn(7, 512, generator=_gen(4))
    both = ni.join_inputs(c, d)
    assert both["proj_down"].shape == (768, 48)
    assert torch.allclose(_forward(both, torch.cat([xc, xd], 1)), _forward(c, xc) + _forward(d, xd), rtol=0, atol=1e-5)


def test_unshifted_bias_reproduces_their_shifted_post_gelu_layer():
    """Their mlp_fc2 feeds (gelu + 0.171875)/λ to the 4-bit path, the raw input to the low-rank branch,
    and holds a bias their converter lowered by the 4-bit path's response to the shift. In exact
    arithmetic (activations unquantized) ours, unshifted with the raised bias, is the same function;
    keeping their bias would be off by the shift response. (Their unsigned activation rounding
    differs from our signed one: that part is not reproducible, see docs/FORMAT.md §3.)"""
    ours = _layer(128, 512, 16, 7)
    r = npk.residual(ours)
    lam, low = ours["smooth_factor"].double(), ours["proj_down"].double() @ ours["proj_up"].double().t()
    their_bias = ours["bias"].double() - r @ (npk.SHIFT / lam)
    x = torch.nn.functional.gelu(torch.randn(64, 512, generator=_gen(8)), approximate="tanh").double()
    y_theirs = ((x + npk.SHIFT) / lam) @ r.t() + x @ low + their_bias
    converted = dict(ours, bias=their_bias.float())
    ni.unshift_bias(converted)
    y_ours = (x / lam) @ r.t() + x @ low + converted["bias"].double()
    y_kept = (x / lam) @ r.t() + x @ low + their_bias
    assert float((y_ours - y_theirs).norm() / y_theirs.norm()) < 1e-6
    assert float((y_kept - y_theirs).norm() / y_theirs.norm()) > 0.05
    y_run = _forward(converted, x.float()).double()  # our runtime, activations quantized: 4-bit noise only
    assert float((y_run - y_theirs).norm() / y_theirs.norm()) < 0.2


# -- a whole synthetic file ------------------------------------------------------------------------

CFG = {"image_model": "flux", "guidance_embed": True, "axes_dim": [16, 56, 56], "num_heads": 2, "mlp_ratio": 4.0,
       "theta": 10000, "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 256,
       "context_in_dim": 64, "patch_size": 2, "vec_in_dim": 64, "depth": 2, "depth_single_blocks": 2}


def synthetic_flux(dtype, rank=16, seed=0):
    """Our natural-layout FLUX state dict (ComfyUI names), random, with AWQ-representable adaLN
    linears (their AWQ parameters in the second dict) and biases on a 2^-7 grid (so "+1" is exact)."""
    g = _gen(seed)
    h, m = 256, 1024

    def q(n, k, smooth=None):
        codes = torch.randint(-8, 8, (n, k), generator=g)
        return {"qweight": ref.pack_int4(codes), "wscales": (torch.rand(k // 64, n, generator=g) * 0.02 + 0.005).to(dtype),
                "smooth_factor": (smooth if smooth is not None else torch.rand(k, generator=g) + 0.5).to(dtype),
                "proj_down": (torch.randn(k, rank, generator=g) * 0.05).to(dtype),
                "proj_up": (torch.randn(n, rank, generator=g) * 0.05).to(dtype),
                "bias": (torch.randint(-40, 40, (n,), generator=g) / 128).to(dtype)}

    def lin(n, k):
        return {"weight": (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype), "bias": (torch.randn(n, generator=g) * 0.1).to(dtype)}

    sd, awq = {}, {}

    def put(name, t):
        sd.update({f"{name}.{k}": v for k, v in t.items()})

    for i in range(CFG["depth"]):
        p = f"double_blocks.{i}"
        for name, shape in (("img_attn.qkv", (3 * h, h)), ("txt_attn.qkv", (3 * h, h)), ("img_attn.proj", (h, h)),
                            ("txt_attn.proj", (h, h)), ("img_mlp.0", (m, h)), ("img_mlp.2", (h, m)),
                            ("txt_mlp.0", (m, h)), ("txt_mlp.2", (h, m))):
            put(f"{p}.{name}", q(*shape))
        for name in ("img_mod.lin", "txt_mod.lin"):
            npk.make_awq(sd, awq, f"{p}.{name}", lin(6 * h, h)["weight"], dtype)
            sd[f"{p}.{name}.bias"] = (torch.randint(-40, 40, (6 * h,), generator=g) / 128).to(dtype)
        for name in npk.NORMS_DOUBLE:
            sd[f"{p}.{name}"] = torch.rand(128, generator=g).to(dtype) + 0.5
    for i in range(CFG["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        put(f"{p}.linear1", q(3 * h + m, h))
        put(f"{p}.linear2", q(h, h + m))
        npk.make_awq(sd, awq, f"{p}.modulation.lin", lin(3 * h, h)["weight"], dtype)
        sd[f"{p}.modulation.lin.bias"] = (torch.randint(-40, 40, (3 * h,), generator=g) / 128).to(dtype)
        for name in npk.NORMS_SINGLE:
            sd[f"{p}.{name}"] = torch.rand(128, generator=g).to(dtype) + 0.5
    for name, shape in (("img_in", (h, 64)), ("txt_in", (h, 64)), ("time_in.in_layer", (h, 256)), ("time_in.out_layer", (h, h)),
                        ("guidance_in.in_layer", (h, 256)), ("guidance_in.out_layer", (h, h)),
                        ("vector_in.in_layer", (h, 64)), ("vector_in.out_layer", (h, h)),
                        ("final_layer.linear", (64, h)), ("final_layer.adaLN_modulation.1", (2 * h, h))):
        put(name, lin(*shape))
    return sd, awq


@pytest.fixture(scope="module")
def bf16_flux():
    """(our natural state dict, AWQ parameters, their tensors) of the synthetic model in bfloat16."""
    sd, awq = synthetic_flux(torch.bfloat16)
    return sd, awq, npk.flux_state_dict(sd, CFG, torch.bfloat16, awq)


@pytest.mark.parametrize("dtype,v2_names", [(torch.bfloat16, False), (torch.float16, True)])
def test_synthetic_file_converts_to_the_same_tensors(tmp_path, bf16_flux, dtype, v2_names):
    """natural -> their file -> converter: every tensor back bit-identical, except what the joins
    and the shift change by construction (checked exactly against that construction)."""
    if dtype == torch.bfloat16 and not v2_names:
        sd, awq, theirs = bf16_flux
    else:
        sd, awq = synthetic_flux(dtype)
        theirs = npk.flux_state_dict(sd, CFG, dtype, awq, v2_names=v2_names)
    path = str(tmp_path / "svdq-int4_r32-flux.1-tiny.safetensors")
    npk.write(path, theirs, npk.flux_metadata(CFG))
    out, header = ni.convert_nunchaku_flux(path)
    fmeta, layers = parse_declaration(header, path)
    check_layers(out, layers, 64, path)
    assert fmeta["model_class"] == "Flux" and fmeta["family"] == "flux" and fmeta["unet_config"] == CFG
    assert fmeta["source_dtype"] == str(dtype).removeprefix("torch.") and fmeta["imported_from"]["format"] == "nunchaku"
    assert all(v["scales"] == "float" for v in layers.values()) and len(layers) == (8 + 2) * 2 + (2 + 1) * 2
    mods = {n for n, v in layers.items() if v.get("act") == "16bit"}
    assert mods == {f"double_blocks.{i}.{m}" for i in range(2) for m in ("img_mod.lin", "txt_mod.lin")} | \
        {f"single_blocks.{i}.modulation.lin" for i in range(2)}
    for name in mods:  # the AWQ weight code·s + z, exactly (fp32 offsets), as a 4-bit layer with 16-bit inputs
        codes, sc, z = awq[name]
        want = codes.double() * sc.double().repeat_interleave(64, 1) + z.double().repeat_interleave(64, 1)
        t = {k: out[f"{name}.{k}"] for k in ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up")}
        got = ref.unpack_int4(t["qweight"]).double() * t["wscales"].double().t().repeat_interleave(64, 1) \
            / t["smooth_factor"].double() + t["proj_up"].double() @ t["proj_down"].double().t()
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
        assert int(ref.unpack_int4(t["qweight"]).min()) >= -8 and out[f"{name}.act_bits"].tolist() == [16]
        assert torch.equal(out[f"{name}.bias"].to(dtype), sd[f"{name}.bias"])
    exact = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up")
    for i in range(2):
        for name in npk.DOUBLE:
            key = f"double_blocks.{i}.{name}"
            for t in exact:
                assert torch.equal(out[f"{key}.{t}"], sd[f"{key}.{t}"]), (key, t)
            tol = 0 if not name.endswith(".2") else 2 ** -7  # fc2: their 16-bit bias held b - R·shift/λ
            assert torch.allclose(out[f"{key}.bias"], sd[f"{key}.bias"].float(), rtol=0, atol=tol), key
        for name in npk.NORMS_DOUBLE:
            assert torch.equal(out[f"double_blocks.{i}.{name}"], sd[f"double_blocks.{i}.{name}"])
        s = f"single_blocks.{i}"
        l1, l2 = f"{s}.linear1", f"{s}.linear2"
        for t in ("qweight", "wscales", "smooth_factor"):
            assert torch.equal(out[f"{l1}.{t}"], sd[f"{l1}.{t}"]) and torch.equal(out[f"{l2}.{t}"], sd[f"{l2}.{t}"])
        d, u = sd[f"{l1}.proj_down"], sd[f"{l1}.proj_up"]
        assert torch.equal(out[f"{l1}.proj_down"], torch.cat([d, d], 1))
        assert torch.equal(out[f"{l1}.proj_up"], torch.block_diag(u[:768], u[768:]))
        assert torch.equal(out[f"{l1}.bias"], sd[f"{l1}.bias"].float())
        d, u = sd[f"{l2}.proj_down"], sd[f"{l2}.proj_up"]
        assert torch.equal(out[f"{l2}.proj_down"], torch.block_diag(d[:256], d[256:]))
        assert torch.equal(out[f"{l2}.proj_up"], torch.cat([u, u], 1))
        assert torch.allclose(out[f"{l2}.bias"], sd[f"{l2}.bias"].float(), rtol=0, atol=2 ** -7)
    for name in npk.TOP:
        for t in ("weight", "bias"):
            assert torch.equal(out[f"{name}.{t}"], sd[f"{name}.{t}"]), name


def test_config_from_the_diffusers_config_when_comfy_config_is_absent(tmp_path):
    meta = npk.flux_metadata(CFG)
    del meta["comfy_config"]
    assert ni.flux_config(meta, "x") == ("Flux", CFG)
    schnell = dict(CFG, guidance_embed=False)
    meta = npk.flux_metadata(schnell, model_class="FluxSchnell")
    del meta["comfy_config"]
    assert ni.flux_config(meta, "x") == ("FluxSchnell", schnell)


def test_looks_like_nunchaku():
    assert ni.looks_like_nunchaku(npk.flux_metadata(CFG), [])
    assert ni.looks_like_nunchaku({}, ["a.qweight", "a.lora_down"])
    assert not ni.looks_like_nunchaku({}, ["a.weight"])
    assert not ni.looks_like_nunchaku({"svdquant": "{}", "quantization_config": "{}"}, ["a.qweight"])


# -- refusals ----------------------------------------------------------------------------------------

def test_refusals_name_the_file_and_what_was_found(tmp_path, bf16_flux):
    theirs = bf16_flux[2]
    cases = {
        "nvfp4": (npk.flux_metadata(CFG, weight_dtype="fp4_e2m1_all"), {}, "NVFP4 file .*fp4_e2m1_all"),
        "qwen": ({**npk.flux_metadata(CFG), "model_class": "NunchakuQwenImageTransformer2DModel"}, {},
                 "Nunchaku NunchakuQwenImageTransformer2DModel file; only FLUX.1 INT4"),
        "sdxl": ({"model_class": "NunchakuSDXLUNet2DConditionModel",
                  "quantization_config": npk.flux_metadata(CFG)["quantization_config"]}, {}, "NunchakuSDXLUNet2DConditionModel"),
        "comfy_class": ({**npk.flux_metadata(CFG), "comfy_config": json.dumps({"model_class": "QwenImage", "model_config": {}})},
                        {}, "comfy_config model_class 'QwenImage'"),
        "unknown": (npk.flux_metadata(CFG), {"transformer_blocks.0.extra_proj.qweight": torch.zeros(128, 64, dtype=torch.int8)},
                    "1 tensors of an unknown layout, e.g. \\['transformer_blocks.0.extra_proj.qweight'\\]"),
        "depth": ({**npk.flux_metadata(dict(CFG, depth=3))}, {}, "declares 3 transformer_blocks but the file holds 2"),
    }
    for name, (meta, extra, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        npk.write(path, {**theirs, **extra}, meta)
        with pytest.raises(CheckpointError, match=msg) as e:
            ni.convert_nunchaku_flux(str(path))
        assert str(path) in str(e.value), name


def test_refusals_of_incomplete_or_damaged_files(tmp_path, bf16_flux):
    theirs = bf16_flux[2]
    meta = npk.flux_metadata(CFG)
    cases = {
        "split": ({k: v for k, v in theirs.items() if "transformer_blocks" in k}, "old split layout .*merge_safetensors"),
        "missing": ({k: v for k, v in theirs.items() if k != "single_transformer_blocks.1.mlp_fc2.lora_up"},
                    "single_transformer_blocks.1.mlp_fc2.lora_up"),
        "shape": ({**theirs, "transformer_blocks.0.out_proj.qweight": torch.zeros(256, 64, dtype=torch.int8)},
                  "transformer_blocks.0.out_proj.qweight has shape \\(256, 64\\), expected \\(256, 128\\)"),
        "awq": ({**theirs, "transformer_blocks.1.norm1.linear.qweight": torch.zeros(384, 128, dtype=torch.int8)},
                "norm1.linear.qweight is torch.int8"),
        "scales": ({**theirs, "transformer_blocks.0.mlp_fc1.wscales": torch.zeros(4, 1024, dtype=torch.float8_e4m3fn)},
                   "NVFP4|mlp_fc1.wscales is torch.float8_e4m3fn"),
    }
    for name, (tensors, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        npk.write(path, tensors, meta)
        with pytest.raises(CheckpointError, match=msg) as e:
            ni.convert_nunchaku_flux(str(path))
        assert str(path) in str(e.value), name


def test_unjoinable_linear1_is_dequantized_and_missing_lowrank_is_rank_0(tmp_path, bf16_flux):
    """A file whose single-block qkv_proj and mlp_fc1 have different smoothing (their exporter never
    writes one) gets a 16-bit linear1 = R·diag(1/λ) + P_up·P_downᵀ of each part; a layer without a
    low-rank branch (their loader allows it) gets rank 0."""
    sd, _, theirs = bf16_flux
    theirs = dict(theirs)
    l1 = {k: sd[f"single_blocks.0.linear1.{k}"] for k in ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias")}
    _, fc1 = npk.split_rows(l1, 768)
    fc1["smooth_factor"] = fc1["smooth_factor"] * 2
    theirs["single_transformer_blocks.0.mlp_fc1.smooth"] = npk.pack_scales(fc1["smooth_factor"].reshape(-1, 1))
    del theirs["transformer_blocks.1.out_proj.lora_down"], theirs["transformer_blocks.1.out_proj.lora_up"]
    path = str(tmp_path / "odd.safetensors")
    npk.write(path, theirs, npk.flux_metadata(CFG))
    out, header = ni.convert_nunchaku_flux(path)
    fmeta, layers = parse_declaration(header, path)
    check_layers(out, layers, 64, path)
    assert "single_blocks.0.linear1" not in layers and "single_blocks.1.linear1" in layers
    w = out["single_blocks.0.linear1.weight"]
    assert w.shape == (1792, 256) and w.dtype == torch.bfloat16
    assert torch.equal(out["single_blocks.0.linear1.bias"], sd["single_blocks.0.linear1.bias"].float())
    want = (npk.residual(fc1) / fc1["smooth_factor"].double()
            + fc1["proj_up"].double() @ fc1["proj_down"].double().t())
    assert torch.allclose(w[768:].double(), want, rtol=1e-2, atol=1e-3)
    assert layers["double_blocks.1.img_attn.proj"]["rank"] == 0
    assert out["double_blocks.1.img_attn.proj.proj_down"].shape == (256, 0)
