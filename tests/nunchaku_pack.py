"""Test side: write files in Nunchaku's published INT4 FLUX layout (no Nunchaku file can be downloaded here).

Written forward, the way their exporter describes it (deepcompressor backend/nunchaku NunchakuWeightPacker,
backend/tinychat pack_w4, backend/nunchaku/convert.py; nunchaku merge_safetensors.py), as read through
the search tool — independent of core/nunchaku_layout.py, which undoes it by permuting bytes instead
of re-tiling codes. No code was copied.
"""
import json

import torch
from safetensors.torch import save_file

from comfyui_svdquant.kernels import reference as ref

SHIFT = 0.171875


def pack_w4a4_weight(codes: torch.Tensor) -> torch.Tensor:
    """int codes (N, K) in [-8, 7] -> their int8 (N, K/2): mma.m16n8k64 tiles of 128×64, 8 codes per int32."""
    n, k = codes.shape
    w = codes.to(torch.int32).reshape(n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)
    # (n_tile, n_pack, n_half, n_lane, reg_n, k_tile, k_pack, k_half, k_lane, code) ->
    # (n_tile, k_tile, k_pack, n_pack, n_lane, k_lane, n_half, k_half, reg_n, code)
    w = w.permute(0, 5, 6, 1, 3, 8, 2, 7, 4, 9).contiguous()
    word = torch.zeros(w.shape[:-1], dtype=torch.int32)
    for r in range(8):
        word |= (w[..., r] & 0xF) << (4 * r)
    return word.view(torch.int8).reshape(n, k // 2)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """(N, G) scales (G = 1 for a per-channel vector) -> their lane-broadcast order, shape (G, N) / (N,)."""
    n, g = scales.shape
    s = scales.reshape(n // 128, 1, 8, 2, 4, 2, g).permute(0, 6, 1, 2, 4, 3, 5).contiguous()
    return s.reshape(n) if g == 1 else s.reshape(g, n)


def pack_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """lora_down (r, K) / lora_up (N, r), Linear layout -> their fragment order, shape (K, r) / (N, r)."""
    if down:
        r, c = weight.shape
        w = weight.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
    else:
        c, r = weight.shape
        w = weight.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    w = w.reshape(c // 16, r // 16, 2, 8, 1, 2, 4, 2)  # (c, r, n_half, n_lane, reg_n, k_half, k_lane, pair)
    return w.permute(0, 1, 3, 6, 2, 5, 4, 7).contiguous().reshape(c, r)


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """AWQ W4A16: codes (N, K) in 0..15 with W = code·scale + zero, scales/zeros (N, K/64) ->
    (qweight int32 (N/4, K/2), wscales, wzeros (G_pad, N)) as tinychat's pack_w4 writes them."""
    n, k = codes.shape
    w = codes.to(torch.int32).reshape(-1, 4, 8)
    w16 = w[:, 0] | (w[:, 1] << 4) | (w[:, 2] << 8) | (w[:, 3] << 12)
    w16 = w16.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k).to(torch.int16)
    g = k // 64
    packs = -(-g // 8)                # 8 groups per int32 pack of zero points ...
    g_pad = -(-packs // 2) * 2 * 8    # ... and an even number of packs for groups of 64
    ws, wz = scales.new_zeros(g_pad, n), zeros.new_zeros(g_pad, n)
    ws[:g], wz[:g] = scales.t(), zeros.t()
    return w16.view(torch.int32), ws, wz


def awq_quantize(w: torch.Tensor, dtype):
    """Asymmetric 4-bit per 64 inputs: (codes, scales, zeros) with w ≈ code·scale + zero, and the
    16-bit weight those stand for (computed in fp64, rounded once)."""
    n, k = w.shape
    wg = w.double().reshape(n, k // 64, 64)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-8).to(dtype)
    z = lo.to(dtype)
    codes = ((wg - z.double().unsqueeze(-1)) / s.double().unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    deq = (codes.double() * s.double().unsqueeze(-1) + z.double().unsqueeze(-1)).reshape(n, k).to(dtype)
    return codes.reshape(n, k), s, z, deq


def residual(t: dict) -> torch.Tensor:
    """The dequantized 4-bit residual R (N, K) in fp64, from our natural tensors."""
    codes = ref.unpack_int4(t["qweight"]).double()
    return codes * t["wscales"].double().t().repeat_interleave(64, dim=1)


def w4a4_tensors(t: dict, shifted: bool, dtype, v2_names: bool = False) -> dict:
    """Our natural layer tensors -> their tensors for one SVDQuant layer (bias lowered by the 4-bit
    path's share of the GELU shift when `shifted`, as their converter does)."""
    n = t["qweight"].shape[0]
    bias = t["bias"].double() if t.get("bias") is not None else torch.zeros(n, dtype=torch.float64)
    if shifted:
        bias = bias - residual(t) @ (SHIFT / t["smooth_factor"].double())
    names = ("proj_down", "proj_up", "smooth_factor", "smooth_factor_orig") if v2_names else \
        ("lora_down", "lora_up", "smooth", "smooth_orig")
    smooth = pack_scales(t["smooth_factor"].to(dtype).reshape(-1, 1))
    return {"qweight": pack_w4a4_weight(ref.unpack_int4(t["qweight"])),
            "wscales": pack_scales(t["wscales"].to(dtype).t().contiguous()),
            "bias": pack_scales(bias.to(dtype).reshape(-1, 1)),
            names[2]: smooth, names[3]: smooth.clone(),
            names[0]: pack_lowrank(t["proj_down"].to(dtype).t().contiguous(), True),
            names[1]: pack_lowrank(t["proj_up"].to(dtype).contiguous(), False)}


def awq_tensors(params, bias: torch.Tensor, splits: int, dtype):
    """An adaLN linear given as AWQ (codes, scales, zeros) (see awq_quantize) -> their W4A16 tensors:
    rows interleaved chunk by chunk, "+1" folded into the scale chunks' bias as their converter does."""
    codes, s, z = params
    n = codes.shape[0]
    order = torch.arange(n).reshape(splits, n // splits).t().reshape(-1)  # new row j·splits + c <- old c·(N/splits) + j
    b = bias.double().reshape(splits, n // splits).clone()
    for c in {1, splits - 2}:  # the scale chunks: (shift, scale, gate) x 2, or x 1 (both indices are 1)
        b[c] += 1.0
    qw, ws, wz = pack_awq(codes[order], s[order].to(dtype), z[order].to(dtype))
    return {"qweight": qw, "wscales": ws, "wzeros": wz, "bias": b.t().reshape(n).to(dtype)}


def make_awq(sd: dict, awq: dict, name: str, weight: torch.Tensor, dtype) -> None:
    """Give layer `name` an AWQ-representable 16-bit weight in `sd` and its AWQ parameters in `awq`."""
    codes, s, z, deq = awq_quantize(weight, dtype)
    sd[f"{name}.weight"] = deq
    awq[name] = (codes, s, z)


def split_rows(t: dict, at: int):
    """One of our layers -> two layers reading the same input: rows [:at] and [at:] (rank kept)."""
    a = {k: v for k, v in t.items()}
    b = {k: v for k, v in t.items()}
    for key, dim in (("qweight", 0), ("wscales", 1), ("proj_up", 0), ("bias", 0)):
        a[key], b[key] = t[key].narrow(dim, 0, at), t[key].narrow(dim, at, t[key].shape[dim] - at)
    return a, b


def split_cols(t: dict, at: int):
    """One of our layers -> two layers summed: inputs [:at] and [at:] (the bias goes to the first)."""
    k = t["smooth_factor"].numel()
    a, b = dict(t), dict(t)
    for key, dim, scale in (("qweight", 1, 2), ("wscales", 0, 64), ("smooth_factor", 0, 1), ("proj_down", 0, 1)):
        a[key] = t[key].narrow(dim, 0, at // scale)
        b[key] = t[key].narrow(dim, at // scale, (k - at) // scale)
    b["bias"] = torch.zeros_like(t["bias"])
    return a, b


DOUBLE = {"img_attn.qkv": "qkv_proj", "txt_attn.qkv": "qkv_proj_context", "img_attn.proj": "out_proj",
          "txt_attn.proj": "out_proj_context", "img_mlp.0": "mlp_fc1", "img_mlp.2": "mlp_fc2",
          "txt_mlp.0": "mlp_context_fc1", "txt_mlp.2": "mlp_context_fc2"}
DOUBLE_V2 = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
             "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
             "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2"}
SINGLE_V2 = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "mlp_fc1": "mlp_fc1", "mlp_fc2": "mlp_fc2"}
NORMS_DOUBLE = {"img_attn.norm.query_norm.scale": "norm_q", "img_attn.norm.key_norm.scale": "norm_k",
                "txt_attn.norm.query_norm.scale": "norm_added_q", "txt_attn.norm.key_norm.scale": "norm_added_k"}
NORMS_SINGLE = {"norm.query_norm.scale": "norm_q", "norm.key_norm.scale": "norm_k"}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
       "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
       "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
       "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
       "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}


def _layer(sd, name):
    keys = ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias")
    return {k: sd[f"{name}.{k}"] for k in keys if f"{name}.{k}" in sd}


def flux_state_dict(sd: dict, cfg: dict, dtype, awq: dict, v2_names=False, forget_shift=False) -> dict:
    """Our natural-layout FLUX state dict (ComfyUI names; adaLN linears 16-bit, their AWQ parameters in
    `awq`, see make_awq) -> their tensors and names."""
    h = cfg["hidden_size"]
    out = {}

    def put(prefix, module, tensors, v2_map=None):
        name = v2_map.get(module, module) if (v2_names and v2_map) else module
        for k, v in tensors.items():
            out[f"{prefix}.{name}.{k}"] = v.contiguous()

    for i in range(cfg["depth"]):
        ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for our_name, their_name in DOUBLE.items():
            shifted = their_name.endswith("fc2") and not forget_shift
            put(theirs, their_name, w4a4_tensors(_layer(sd, f"{ours}.{our_name}"), shifted, dtype, v2_names), DOUBLE_V2)
        for our_name, their_name in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")):
            put(theirs, their_name, awq_tensors(awq[f"{ours}.{our_name}"], sd[f"{ours}.{our_name}.bias"], 6, dtype))
        for our_name, their_name in NORMS_DOUBLE.items():
            key = f"{theirs}.attn.{their_name}.weight" if v2_names else f"{theirs}.{their_name}.weight"
            out[key] = sd[f"{ours}.{our_name}"].to(dtype)
    for i in range(cfg["depth_single_blocks"]):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv, fc1 = split_rows(_layer(sd, f"{ours}.linear1"), 3 * h)
        out_proj, fc2 = split_cols(_layer(sd, f"{ours}.linear2"), h)
        for their_name, t, shifted in (("qkv_proj", qkv, False), ("mlp_fc1", fc1, False), ("out_proj", out_proj, False),
                                       ("mlp_fc2", fc2, not forget_shift)):
            put(theirs, their_name, w4a4_tensors(t, shifted, dtype, v2_names), SINGLE_V2)
        put(theirs, "norm.linear", awq_tensors(awq[f"{ours}.modulation.lin"], sd[f"{ours}.modulation.lin.bias"], 3, dtype))
        for our_name, their_name in NORMS_SINGLE.items():
            key = f"{theirs}.attn.{their_name}.weight" if v2_names else f"{theirs}.{their_name}.weight"
            out[key] = sd[f"{ours}.{our_name}"].to(dtype)
    for our_name, their_name in TOP.items():
        for leaf in ("weight", "bias"):
            if f"{our_name}.{leaf}" not in sd:
                continue
            v = sd[f"{our_name}.{leaf}"].to(dtype)
            if their_name == "norm_out.linear":
                v = torch.cat(v.chunk(2, dim=0)[::-1])  # ComfyUI (shift, scale) -> diffusers (scale, shift)
            out[f"{their_name}.{leaf}"] = v
    return out


def flux_metadata(cfg: dict, model_class="Flux", rank=32, weight_dtype="int4", nunchaku_class="NunchakuFluxTransformer2dModel"):
    """The header nunchaku.merge_safetensors writes: diffusers config, ComfyUI config, class, quantization."""
    heads = cfg["num_heads"]
    diffusers = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": cfg["hidden_size"] // heads,
                 "guidance_embeds": cfg["guidance_embed"], "in_channels": cfg["in_channels"] * 4,
                 "joint_attention_dim": cfg["context_in_dim"], "num_attention_heads": heads,
                 "num_layers": cfg["depth"], "num_single_layers": cfg["depth_single_blocks"], "patch_size": 1,
                 "pooled_projection_dim": cfg["vec_in_dim"], "axes_dims_rope": list(cfg["axes_dim"])}
    comfy = {"model_class": model_class, "model_config": {**cfg, "disable_unet_model_creation": True}}
    fp4 = weight_dtype != "int4"
    quant = {"method": "svdquant",
             "weight": {"dtype": weight_dtype, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
                        "group_size": 16 if fp4 else 64},
             "activation": {"dtype": weight_dtype, "scale_dtype": "fp8_e4m3_nan" if fp4 else None,
                            "group_size": 16 if fp4 else 64},
             "rank": rank}
    return {"config": json.dumps(diffusers), "comfy_config": json.dumps(comfy), "model_class": nunchaku_class,
            "quantization_config": json.dumps(quant)}


def write(path, tensors: dict, metadata: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
