"""Open a Nunchaku INT4 FLUX.1 checkpoint: convert it once, at load time, into our layout and names.

Their single-file format (nunchaku `merge_safetensors.py`): diffusers-style module names, packed
tensors (core/nunchaku_layout.py), header metadata `quantization_config`, `config` (diffusers),
`comfy_config` ({model_class, model_config}) and `model_class`. The result is exactly what
Calibrate & Quantize would hand to the loader: a state dict with ComfyUI's FLUX names, 4-bit layers
in docs/FORMAT.md's natural layout with float scales, and our header metadata. What changes on the
way (docs/FORMAT.md §3 has the full table):

- Their separate single-block layers are joined into ComfyUI's fused ones, exactly:
  linear1 = [qkv_proj; mlp_fc1] along the outputs (same input and smoothing; low-rank ranks add),
  linear2 = [out_proj | mlp_fc2] along the inputs (the K split is group-aligned; biases add).
- Post-GELU inputs (every mlp_fc2): their kernel adds 0.171875 to the 4-bit path's input, and
  their converter folded the low-rank branch's share of that shift into the bias. Our runtime adds
  no shift, so the bias gets back the 4-bit path's share: b += R·(0.171875/λ).
- adaLN modulation linears are W4A16 AWQ in their files (W = code·scale + zero per group): they
  become our layers with 16-bit activations, exactly (awq_as_act16_layer: codes − 8 as the residual,
  the zero points as a rank-K/64 branch), their rows de-interleaved and the "+1" that their
  converter folded into the scale biases taken out again (ComfyUI adds it at run time).
"""
import json
import logging
import os

import torch
from safetensors import safe_open

from ..kernels import reference as ref
from . import checkpoint as ckpt
from .layer_quant import ACT_BITS
from .nunchaku_layout import LayoutError, unpack_awq_codes, unpack_channel_scales, unpack_lowrank, unpack_w4a4_weight

# Nunchaku's INT4 GEMM adds this to the (post-GELU) input of every layer whose input it quantizes
# unsigned, i.e. every mlp_fc2 (nunchaku src/kernels/zgemm/gemm_w4a4_launch_impl.cuh, SHIFT_GELU).
GELU_SHIFT = 0.171875
GROUP = 64
FLUX_CLASSES = ("Flux", "FluxSchnell")

# Their names -> ours. Double block W4A4 layers (v1 names; v2 names are mapped to these first).
DOUBLE_LINEARS = {"qkv_proj": "img_attn.qkv", "qkv_proj_context": "txt_attn.qkv", "out_proj": "img_attn.proj",
                  "out_proj_context": "txt_attn.proj", "mlp_fc1": "img_mlp.0", "mlp_fc2": "img_mlp.2",
                  "mlp_context_fc1": "txt_mlp.0", "mlp_context_fc2": "txt_mlp.2"}
SHIFTED = ("mlp_fc2", "mlp_context_fc2")
DOUBLE_NORMS = {"norm_q": "img_attn.norm.query_norm.scale", "norm_k": "img_attn.norm.key_norm.scale",
                "norm_added_q": "txt_attn.norm.query_norm.scale", "norm_added_k": "txt_attn.norm.key_norm.scale"}
SINGLE_NORMS = {"norm_q": "norm.query_norm.scale", "norm_k": "norm.key_norm.scale"}
# adaLN linears: (their name, ours, number of (shift, scale, gate) chunks, chunks whose bias holds "+1")
DOUBLE_MODS = (("norm1.linear", "img_mod.lin", 6, (1, 4)), ("norm1_context.linear", "txt_mod.lin", 6, (1, 4)))
SINGLE_MODS = (("norm.linear", "modulation.lin", 3, (1,)),)
TOP_LEVEL = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
SWAP_HALVES = ("norm_out.linear",)  # diffusers (scale, shift) -> ComfyUI (shift, scale)
# Names of nunchaku's Python (v2) modules and tensors -> the v1 names above.
V2_DOUBLE = {"attn.to_qkv": "qkv_proj", "attn.add_qkv_proj": "qkv_proj_context", "attn.to_out.0": "out_proj",
             "attn.to_add_out": "out_proj_context", "ff.net.0.proj": "mlp_fc1", "ff.net.2": "mlp_fc2",
             "ff_context.net.0.proj": "mlp_context_fc1", "ff_context.net.2": "mlp_context_fc2",
             "attn.norm_q": "norm_q", "attn.norm_k": "norm_k", "attn.norm_added_q": "norm_added_q",
             "attn.norm_added_k": "norm_added_k"}
V2_SINGLE = {"attn.to_qkv": "qkv_proj", "attn.to_out": "out_proj", "attn.norm_q": "norm_q", "attn.norm_k": "norm_k"}
V2_TENSORS = {"proj_down": "lora_down", "proj_up": "lora_up", "smooth_factor": "smooth", "smooth_factor_orig": "smooth_orig"}
IGNORED_TENSORS = ("smooth_orig",)  # unused by their runtime too
NVFP4_TENSORS = ("wtscale", "wcscales")


class NunchakuImportError(ckpt.CheckpointError):
    """A Nunchaku file this pack cannot open; the message names the file and what was found."""


def looks_like_nunchaku(meta: dict, keys) -> bool:
    """A file written by Nunchaku's tools (any model, any precision), by its header or tensor names."""
    if ckpt.FILE_META_KEY in meta:
        return False
    if "quantization_config" in meta or "comfy_config" in meta or str(meta.get("model_class", "")).startswith("Nunchaku"):
        return True
    keys = list(keys)
    return any(k.endswith(".qweight") for k in keys) and any(k.endswith((".lora_down", ".proj_down", ".smooth", ".smooth_factor")) for k in keys)


def _canonical(key: str) -> str:
    """A block tensor's v1 name (v2 module and tensor names mapped back); other keys unchanged."""
    for prefix, table in (("single_transformer_blocks.", V2_SINGLE), ("transformer_blocks.", V2_DOUBLE)):
        if key.startswith(prefix):
            i, _, rest = key[len(prefix):].partition(".")
            module, _, tensor = rest.rpartition(".")
            return f"{prefix}{i}.{table.get(module, module)}.{V2_TENSORS.get(tensor, tensor)}"
    return key


class _Source:
    """The file's tensors under their canonical names, read one at a time; remembers what was used."""

    def __init__(self, handle, path):
        self.f, self.path = handle, path
        self.names = {}
        for k in handle.keys():
            c = _canonical(k)
            if c in self.names:
                raise NunchakuImportError(f"{path}: tensors {self.names[c]!r} and {k!r} name the same thing")
            self.names[c] = k
        self.used = set()

    def has(self, key):
        return key in self.names

    def get(self, key):
        if key not in self.names:
            raise NunchakuImportError(f"{self.path}: tensor {key} is missing (not a complete Nunchaku FLUX INT4 file)")
        self.used.add(key)
        try:
            return self.f.get_tensor(self.names[key])
        except Exception as e:
            raise NunchakuImportError(f"{self.path}: tensor {self.names[key]} is truncated or corrupt ({e})") from e

    def leftover(self):
        return sorted(self.names[k] for k in self.names
                      if k not in self.used and k.rpartition(".")[2] not in IGNORED_TENSORS)


def _refuse_variant(path, meta, keys):
    """Refuse NVFP4, other models and the old split-file layout before reading any tensor."""
    qc = {}
    if "quantization_config" in meta:
        try:
            qc = json.loads(meta["quantization_config"])
        except ValueError as e:
            raise NunchakuImportError(f"{path}: unreadable quantization_config in the header ({e})") from e
    wdtype = str((qc.get("weight") or {}).get("dtype", "int4"))
    if wdtype.startswith(("fp4", "nvfp4")) or any(k.rpartition(".")[2] in NVFP4_TENSORS for k in keys):
        raise NunchakuImportError(f"{path}: this is a Nunchaku NVFP4 file (weight dtype {wdtype!r}); only their INT4 "
                                  "FLUX files can be opened (NVFP4 needs FP4 tensor cores and another format)")
    if wdtype != "int4" or int((qc.get("weight") or {}).get("group_size", GROUP) or GROUP) != GROUP:
        raise NunchakuImportError(f"{path}: Nunchaku weights {qc.get('weight')!r}; only INT4 with groups of 64 is supported")
    model_class = str(meta.get("model_class", ""))
    comfy_class = ""
    if "comfy_config" in meta:
        try:
            comfy_class = str(json.loads(meta["comfy_config"]).get("model_class", ""))
        except (ValueError, AttributeError) as e:
            raise NunchakuImportError(f"{path}: unreadable comfy_config in the header ({e})") from e
    if (model_class and "flux" not in model_class.lower()) or (comfy_class and comfy_class not in FLUX_CLASSES):
        raise NunchakuImportError(f"{path}: this is a Nunchaku {model_class or comfy_class} file; only FLUX.1 INT4 "
                                  f"files are supported (found model_class {model_class!r}, comfy_config model_class "
                                  f"{comfy_class!r})")
    if not any(k.startswith("single_transformer_blocks.") for k in keys):
        raise NunchakuImportError(f"{path}: no FLUX single_transformer_blocks tensors (found e.g. {sorted(keys)[:3]}); "
                                  "only Nunchaku FLUX.1 INT4 files are supported")
    if "x_embedder.weight" not in keys:
        raise NunchakuImportError(f"{path}: holds only the transformer blocks (the old split layout with a separate "
                                  "unquantized_layers.safetensors); merge it into one file first with "
                                  "`python -m nunchaku.merge_safetensors` or ComfyUI-nunchaku's merge node")


def flux_config(meta: dict, path: str):
    """(ComfyUI model class, unet_config) from comfy_config, else derived from the diffusers config."""
    if "comfy_config" in meta:
        cc = json.loads(meta["comfy_config"])
        cfg = dict(cc.get("model_config") or {})
        cfg.pop("disable_unet_model_creation", None)  # their wrapper's flag; we build the net
        return cc.get("model_class"), cfg
    if "config" not in meta:
        raise NunchakuImportError(f"{path}: the header has neither comfy_config nor config, so the FLUX variant is unknown")
    try:
        d = json.loads(meta["config"])
        heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
        cfg = {"image_model": "flux", "in_channels": int(d["in_channels"]) // 4,
               "out_channels": int(d.get("out_channels") or d["in_channels"]) // 4,
               "vec_in_dim": int(d["pooled_projection_dim"]), "context_in_dim": int(d["joint_attention_dim"]),
               "hidden_size": heads * head_dim, "mlp_ratio": 4.0, "num_heads": heads, "depth": int(d["num_layers"]),
               "depth_single_blocks": int(d["num_single_layers"]), "axes_dim": list(d.get("axes_dims_rope", (16, 56, 56))),
               "theta": 10000, "qkv_bias": True, "guidance_embed": bool(d.get("guidance_embeds", False)), "patch_size": 2}
    except (ValueError, KeyError, TypeError) as e:
        raise NunchakuImportError(f"{path}: cannot read the diffusers config in the header ({e})") from e
    return ("Flux" if cfg["guidance_embed"] else "FluxSchnell"), cfg


def _layout(path, name, fn, *args):
    try:
        return fn(*args)
    except LayoutError as e:
        raise NunchakuImportError(f"{path}: layer {name}: {e}") from e


def _w4a4(src, name, shape):
    """One SVDQuant layer (their names) -> our natural tensors; bias in fp32."""
    path = src.path
    qw = src.get(f"{name}.qweight")
    n, k = (qw.shape[0], qw.shape[1] * 2) if qw.ndim == 2 else (-1, -1)
    if (n, k) != shape:
        raise NunchakuImportError(f"{path}: tensor {name}.qweight has shape {tuple(qw.shape)}, expected "
                                  f"({shape[0]}, {shape[1] // 2}) for this FLUX config")
    ws = src.get(f"{name}.wscales")
    if ws.dtype not in (torch.float16, torch.bfloat16) or ws.numel() != (k // GROUP) * n:
        raise NunchakuImportError(f"{path}: tensor {name}.wscales is {ws.dtype} {tuple(ws.shape)}, expected "
                                  f"float16/bfloat16 ({k // GROUP}, {n}) (INT4, groups of 64)")
    t = {"qweight": _layout(path, name, unpack_w4a4_weight, qw),
         "wscales": _layout(path, name, unpack_channel_scales, ws, n)}
    vectors = (("smooth", "smooth_factor", k), ("bias", "bias", n))
    for theirs, ours, length in vectors:
        if theirs == "bias" and not src.has(f"{name}.bias"):
            t["bias"] = torch.zeros(n)
            continue
        v = src.get(f"{name}.{theirs}")
        if v.numel() != length or not v.is_floating_point():
            raise NunchakuImportError(f"{path}: tensor {name}.{theirs} is {v.dtype} {tuple(v.shape)}, expected ({length},)")
        t[ours] = _layout(path, name, unpack_channel_scales, v.reshape(-1), length)
    t["bias"] = t["bias"].float()
    if src.has(f"{name}.lora_down") or src.has(f"{name}.lora_up"):
        down, up = src.get(f"{name}.lora_down"), src.get(f"{name}.lora_up")
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != k or up.shape[0] != n or down.shape[1] != up.shape[1]:
            raise NunchakuImportError(f"{path}: low-rank tensors of {name} are {tuple(down.shape)} / {tuple(up.shape)}, "
                                      f"expected ({k}, r) / ({n}, r)")
        t["proj_down"] = _layout(path, name, unpack_lowrank, down, True)
        t["proj_up"] = _layout(path, name, unpack_lowrank, up, False)
    else:  # no low-rank branch (their loader allows it): rank 0
        t["proj_down"] = ws.new_zeros(k, 0)
        t["proj_up"] = ws.new_zeros(n, 0)
    return t


def residual_response(t: dict, v: torch.Tensor) -> torch.Tensor:
    """R·v for the layer's dequantized 4-bit residual R (N×K, fp64): the 4-bit path's output for a
    smoothed input v (K,), without the low-rank branch or bias."""
    codes = ref.unpack_int4(t["qweight"]).double()
    n, k = codes.shape
    per_group = (codes.reshape(n, k // GROUP, GROUP) * v.double().reshape(1, k // GROUP, GROUP)).sum(-1)
    return (per_group * t["wscales"].double().t()).sum(-1)


def unshift_bias(t: dict, shift: float = GELU_SHIFT) -> None:
    """Their mlp_fc2 reads Q((x + shift)/λ) in the 4-bit path and raw x in the low-rank branch; ours
    reads Q(x/λ). Same output for the same x: b += R·(shift/λ)."""
    t["bias"] = (t["bias"].double() + residual_response(t, shift / t["smooth_factor"].double())).float()


def join_outputs(a: dict, b: dict):
    """[a; b] along N for two layers reading the same input with the same smoothing (exact), else None."""
    if not torch.equal(a["smooth_factor"], b["smooth_factor"]):
        return None
    ra, rb = a["proj_down"].shape[1], b["proj_down"].shape[1]
    na, nb = a["qweight"].shape[0], b["qweight"].shape[0]
    up = a["proj_up"].new_zeros(na + nb, ra + rb)
    up[:na, :ra], up[na:, ra:] = a["proj_up"], b["proj_up"]
    return {"qweight": torch.cat([a["qweight"], b["qweight"]]), "wscales": torch.cat([a["wscales"], b["wscales"]], 1),
            "smooth_factor": a["smooth_factor"], "proj_down": torch.cat([a["proj_down"], b["proj_down"]], 1),
            "proj_up": up, "bias": torch.cat([a["bias"], b["bias"]])}


def join_inputs(a: dict, b: dict) -> dict:
    """[a | b] along K: y = a(x_a) + b(x_b) as one layer of input [x_a; x_b]. Exact: K_a is a multiple
    of the group size, so no activation group straddles the seam."""
    ka, kb = a["smooth_factor"].numel(), b["smooth_factor"].numel()
    ra, rb = a["proj_down"].shape[1], b["proj_down"].shape[1]
    down = a["proj_down"].new_zeros(ka + kb, ra + rb)
    down[:ka, :ra], down[ka:, ra:] = a["proj_down"], b["proj_down"]
    return {"qweight": torch.cat([a["qweight"], b["qweight"]], 1), "wscales": torch.cat([a["wscales"], b["wscales"]]),
            "smooth_factor": torch.cat([a["smooth_factor"], b["smooth_factor"]]), "proj_down": down,
            "proj_up": torch.cat([a["proj_up"], b["proj_up"]], 1), "bias": a["bias"] + b["bias"]}


def dequantize(t: dict, dtype) -> torch.Tensor:
    """The 16-bit weight a 4-bit layer stands for: R·diag(1/λ) + P_up·P_downᵀ."""
    codes = ref.unpack_int4(t["qweight"]).float()
    steps = t["wscales"].float().t().repeat_interleave(GROUP, dim=1)
    w = codes * steps / t["smooth_factor"].float() + t["proj_up"].float() @ t["proj_down"].float().t()
    return w.to(dtype)


def _awq(src, name, shape, splits, plus_one):
    """An AWQ W4A16 modulation linear in ComfyUI's row order: (codes (N, K) in 0..15, scales and zeros
    (N, K/64) as stored, fp32 bias) with W = code·scale + zero per group of 64 inputs."""
    path = src.path
    n, k = shape
    qw = src.get(f"{name}.qweight")
    if qw.dtype != torch.int32 or tuple(qw.shape) != (n // 4, k // 2):
        raise NunchakuImportError(f"{path}: tensor {name}.qweight is {qw.dtype} {tuple(qw.shape)}, expected W4A16 "
                                  f"int32 ({n // 4}, {k // 2})")
    sz = []
    for key in ("wscales", "wzeros"):
        v = src.get(f"{name}.{key}")
        if v.ndim != 2 or v.shape[1] != n or v.shape[0] < k // GROUP or not v.is_floating_point():
            raise NunchakuImportError(f"{path}: tensor {name}.{key} is {v.dtype} {tuple(v.shape)}, expected "
                                      f"16-bit ({k // GROUP}, {n})")
        sz.append(v[:k // GROUP].t())  # rows past K/64 are padding
    codes = _layout(path, name, unpack_awq_codes, qw, k)
    b = src.get(f"{name}.bias").float() if src.has(f"{name}.bias") else torch.zeros(n)
    # their rows are interleaved chunk by chunk: row j·splits + c holds our row c·(N/splits) + j
    theirs = torch.arange(n).reshape(n // splits, splits).t().reshape(-1)
    b = b[theirs].reshape(splits, n // splits)
    for c in plus_one:  # their converter folded ComfyUI's run-time "+1" of the scale chunks into the bias
        b[c] -= 1.0
    return codes[theirs], sz[0][theirs], sz[1][theirs], b.reshape(n)


def awq_as_act16_layer(codes, scales, zeros, bias) -> dict:
    """W = code·s + z (groups of 64 inputs) as one of our layers with 16-bit activations, exactly:
    residual codes − 8 in [−8, 7] with the same scales, no smoothing, and the per-group offsets
    z + 8s as a rank-K/64 branch (proj_down sums each group's inputs, proj_up holds the offsets).
    The weights stay 4-bit: at FLUX.1 size 76 such layers are 3.2 G parameters (6.4 GB in 16 bits)."""
    n, k = codes.shape
    groups = k // GROUP
    down = torch.zeros(k, groups, dtype=scales.dtype)
    down[torch.arange(k), torch.arange(k) // GROUP] = 1.0
    return {"qweight": ref.pack_int4(codes.to(torch.int8) - 8), "wscales": scales.t().contiguous(),
            "smooth_factor": torch.ones(k, dtype=scales.dtype), "proj_down": down,
            "proj_up": (zeros.double() + 8 * scales.double()).float(), "bias": bias,
            ACT_BITS: torch.tensor([16], dtype=torch.uint8)}


def _shapes(cfg):
    h = int(cfg["hidden_size"])
    m = int(h * float(cfg.get("mlp_ratio", 4.0)))
    return h, m


def _convert_blocks(src, cfg, dtype, sd, layers):
    h, m = _shapes(cfg)
    dshape = {"qkv_proj": (3 * h, h), "qkv_proj_context": (3 * h, h), "out_proj": (h, h), "out_proj_context": (h, h),
              "mlp_fc1": (m, h), "mlp_fc2": (h, m), "mlp_context_fc1": (m, h), "mlp_context_fc2": (h, m)}
    for i in range(int(cfg["depth"])):
        theirs, ours = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for name, target in DOUBLE_LINEARS.items():
            t = _w4a4(src, f"{theirs}.{name}", dshape[name])
            if name in SHIFTED:
                unshift_bias(t, GELU_SHIFT)
            _put_layer(sd, layers, f"{ours}.{target}", t)
        for name, target, splits, plus_one in DOUBLE_MODS:
            _put_layer(sd, layers, f"{ours}.{target}",
                       awq_as_act16_layer(*_awq(src, f"{theirs}.{name}", (6 * h, h), splits, plus_one)))
        for name, target in DOUBLE_NORMS.items():
            sd[f"{ours}.{target}"] = src.get(f"{theirs}.{name}.weight")
    for i in range(int(cfg["depth_single_blocks"])):
        theirs, ours = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        qkv, fc1 = _w4a4(src, f"{theirs}.qkv_proj", (3 * h, h)), _w4a4(src, f"{theirs}.mlp_fc1", (m, h))
        joined = join_outputs(qkv, fc1)
        if joined is not None:
            _put_layer(sd, layers, f"{ours}.linear1", joined)
        else:  # never written by their tools (both share the input's smoothing), but keep such a file usable
            logging.warning(f"[svdquant] {src.path}: {theirs}.qkv_proj and mlp_fc1 have different smoothing; "
                            f"{ours}.linear1 is dequantized to 16 bits")
            sd[f"{ours}.linear1.weight"] = torch.cat([dequantize(qkv, dtype), dequantize(fc1, dtype)])
            sd[f"{ours}.linear1.bias"] = torch.cat([qkv["bias"], fc1["bias"]])
        out, fc2 = _w4a4(src, f"{theirs}.out_proj", (h, h)), _w4a4(src, f"{theirs}.mlp_fc2", (h, m))
        unshift_bias(fc2, GELU_SHIFT)
        _put_layer(sd, layers, f"{ours}.linear2", join_inputs(out, fc2))
        for name, target, splits, plus_one in SINGLE_MODS:
            _put_layer(sd, layers, f"{ours}.{target}",
                       awq_as_act16_layer(*_awq(src, f"{theirs}.{name}", (3 * h, h), splits, plus_one)))
        for name, target in SINGLE_NORMS.items():
            sd[f"{ours}.{target}"] = src.get(f"{theirs}.{name}.weight")


def _put_layer(sd, layers, name, t):
    for key, v in t.items():
        sd[f"{name}.{key}"] = v
    layers[name] = {"rank": t["proj_down"].shape[1], "scales": "float", "act16": ACT_BITS in t}


def _convert_top_level(src, sd):
    for theirs, ours in TOP_LEVEL.items():
        for leaf in ("weight", "bias"):
            if not src.has(f"{theirs}.{leaf}"):
                continue  # e.g. guidance_in on FLUX.1-schnell; ComfyUI reports what its class misses
            v = src.get(f"{theirs}.{leaf}")
            if theirs in SWAP_HALVES:
                v = torch.cat(v.chunk(2, dim=0)[::-1])
            sd[f"{ours}.{leaf}"] = v


def _source_dtype(src):
    v = src.f.get_slice(src.names["x_embedder.weight"])
    dt = {"BF16": torch.bfloat16, "F16": torch.float16}.get(v.get_dtype())
    if dt is None:
        raise NunchakuImportError(f"{src.path}: 16-bit tensors are {v.get_dtype()}; Nunchaku files hold float16 or bfloat16")
    return dt


def convert_nunchaku_flux(path: str):
    """A Nunchaku INT4 FLUX.1 file -> (state dict with ComfyUI names, our header metadata)."""
    meta = ckpt.read_metadata(path)
    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:
        raise NunchakuImportError(f"{path}: not a readable safetensors file ({e})") from e
    with handle as f:
        keys = list(f.keys())
        _refuse_variant(path, meta, keys)
        model_class, cfg = flux_config(meta, path)
        if model_class not in FLUX_CLASSES:
            raise NunchakuImportError(f"{path}: comfy_config model_class {model_class!r} is not a FLUX.1 class {FLUX_CLASSES}")
        src = _Source(f, path)
        for prefix, depth in (("transformer_blocks.", cfg.get("depth")), ("single_transformer_blocks.", cfg.get("depth_single_blocks"))):
            found = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
            if found != set(range(int(depth or 0))):
                raise NunchakuImportError(f"{path}: the config declares {depth} {prefix.rstrip('.')} but the file holds "
                                          f"{len(found)} (indices {sorted(found)[:5]}...)")
        dtype = _source_dtype(src)
        sd, layers = {}, {}
        _convert_blocks(src, cfg, dtype, sd, layers)
        _convert_top_level(src, sd)
        unknown = src.leftover()
        if unknown:
            raise NunchakuImportError(f"{path}: {len(unknown)} tensors of an unknown layout, e.g. {unknown[:4]}; "
                                      "this importer reads Nunchaku FLUX.1 INT4 files only")
    qc = json.loads(meta.get("quantization_config", "{}"))
    header = ckpt.build_metadata(layers, family="flux", source_dtype=dtype, group_size=GROUP, model_class=model_class,
                                 unet_config=cfg, extra={"default_rank": int(qc.get("rank", 32)),
                                                         "imported_from": {"format": "nunchaku", "file": os.path.basename(path),
                                                                           "model_class": meta.get("model_class"),
                                                                           "quantization_config": qc}})
    logging.info(f"[svdquant] converted Nunchaku INT4 {model_class} file {path}: {len(layers)} 4-bit layers, "
                 f"adaLN modulation kept 4-bit with 16-bit activations")
    return sd, header
