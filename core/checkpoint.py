"""The 4-bit checkpoint file (docs/FORMAT.md): safetensors + a format declaration in the header.

Saving is atomic (temporary file beside the target, then rename). Loading validates every
quantized layer against the declaration and names the file and tensor at fault.
"""
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_NAME = "svdquant"
FORMAT_VERSION = 2            # 2 added int_ratio scales (docs/FORMAT.md §1); version-1 files are all "float"
UNSIGNED_VERSION = 3          # files with layers that declare their activations ("act"): older readers must refuse them
READABLE_VERSIONS = (1, 2, 3)
ACT_UNSIGNED = "unsigned"     # a layer's "act" declaration: X + act_shift quantized to [0, 15]
ACT_16BIT = "16bit"           # a layer's "act" declaration: activations not quantized (marker tensor act_bits = 16)
LAYER_FORMAT = "svdquant_w4a4"
QUANT_META_KEY = "_quantization_metadata"  # ComfyUI's per-layer declaration key
FILE_META_KEY = "svdquant"


class CheckpointError(ValueError):
    """A 4-bit file that cannot be used; the message names the file and what is wrong."""


def _layer_decl(v: dict, group_size: int) -> dict:
    d = {"format": LAYER_FORMAT, "rank": int(v["rank"]), "group_size": group_size, "scales": v.get("scales", "float")}
    if v.get("unsigned_acts"):
        d["act"] = ACT_UNSIGNED
    elif v.get("act16"):
        d["act"] = ACT_16BIT
    return d


def build_metadata(layers: dict, family: str, source_dtype: torch.dtype, group_size: int = 64,
                   model_class: str | None = None, unet_config: dict | None = None, extra: dict | None = None,
                   input_groups: list | None = None) -> dict:
    """layers: name -> {"rank": r, "scales": ..., "unsigned_acts": bool, "act16": bool}. input_groups: lists of
    layer names that share one input (and so one smooth_factor and proj_down). Returns the header metadata."""
    qmeta = {"format_version": "1.0", "layers": {n: _layer_decl(v, group_size) for n, v in layers.items()}}
    declares_act = any(v.get("unsigned_acts") or v.get("act16") for v in layers.values())
    groups = {"input_groups": [list(g) for g in input_groups]} if input_groups else {}
    fmeta = {"format": FORMAT_NAME, "version": UNSIGNED_VERSION if declares_act else FORMAT_VERSION,
             "weight_bits": 4, "act_bits": 4,
             "weight_dtype": "int4", "group_size": group_size, "family": family,
             "source_dtype": str(source_dtype).replace("torch.", ""), "model_class": model_class,
             "unet_config": unet_config or {}, **groups, **(extra or {})}
    return {QUANT_META_KEY: json.dumps(qmeta), FILE_META_KEY: json.dumps(fmeta)}


def save_checkpoint(path: str, tensors: dict, metadata: dict) -> None:
    """Write atomically: a failure at any point leaves no file at `path` (and no temp file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".svdq-", suffix=".safetensors.tmp", dir=d)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _expected(n: int, k: int, rank: int, group_size: int, scales: str, act=None) -> dict:
    """tensor -> (shape, dtype or None for 'any floating point') of one layer."""
    exp = {"qweight": ((n, k // 2), torch.int8), "smooth_factor": ((k,), None),
           "proj_down": ((k, rank), None), "proj_up": ((n, rank), None), "bias": ((n,), None)}
    if act == ACT_UNSIGNED:
        exp["act_shift"] = ((1,), torch.float32)
    if act == ACT_16BIT:
        exp["act_bits"] = ((1,), torch.uint8)
    if scales == "int_ratio":
        exp["wscale_mult"] = ((k // group_size, n), torch.uint8)
        exp["wscale_base"] = ((n,), torch.float32)
    else:
        exp["wscales"] = ((k // group_size, n), None)
    return exp


def read_metadata(path: str) -> dict:
    """Header metadata of a safetensors file; CheckpointError if it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def read_header(path: str):
    """(metadata, tensor names) of a safetensors file, without reading tensor data."""
    meta = read_metadata(path)
    with safe_open(path, framework="pt") as f:
        return meta, list(f.keys())


def parse_declaration(meta: dict, path: str):
    """(file_meta, layer_meta) from a header's string metadata; CheckpointError if it is not ours."""
    if FILE_META_KEY not in meta or QUANT_META_KEY not in meta:
        raise CheckpointError(f"{path}: not an SVDQuant 4-bit file (no '{FILE_META_KEY}' declaration in its header) "
                              "and not a Nunchaku INT4 checkpoint")
    try:
        fmeta = json.loads(meta[FILE_META_KEY])
        layers = json.loads(meta[QUANT_META_KEY])["layers"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed SVDQuant declaration in the header ({e})") from e
    if fmeta.get("format") != FORMAT_NAME or fmeta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format {fmeta.get('format')!r} version {fmeta.get('version')!r} "
                              f"is not supported (this pack reads {FORMAT_NAME!r} versions {READABLE_VERSIONS})")
    g = int(fmeta.get("group_size", 0))
    if g != 64:
        raise CheckpointError(f"{path}: group size {g} is not supported (INT4 group 64 only)")
    return fmeta, layers


def check_layers(sd: dict, layers: dict, group_size: int, path: str) -> None:
    """Every declared 4-bit layer's tensors: presence, shape and dtype; names the tensor at fault."""
    g = group_size
    for name, lm in layers.items():
        if lm.get("format") != LAYER_FORMAT:
            raise CheckpointError(f"{path}: layer {name} has format {lm.get('format')!r}, expected {LAYER_FORMAT!r}")
        qw = sd.get(f"{name}.qweight")
        if qw is None:
            raise CheckpointError(f"{path}: tensor {name}.qweight is missing")
        if qw.dtype != torch.int8 or qw.ndim != 2:
            raise CheckpointError(f"{path}: tensor {name}.qweight must be 2-D int8, got {qw.dtype} {tuple(qw.shape)}")
        n, k = qw.shape[0], qw.shape[1] * 2
        scales = lm.get("scales", "float")
        if scales not in ("float", "int_ratio"):
            raise CheckpointError(f"{path}: layer {name} declares scales {scales!r} (this pack reads float, int_ratio)")
        act = lm.get("act")
        if act not in (None, ACT_UNSIGNED, ACT_16BIT):
            raise CheckpointError(f"{path}: layer {name} declares activations {act!r} "
                                  f"(this pack reads signed, {ACT_UNSIGNED!r}, {ACT_16BIT!r})")
        for marker, decl in (("act_shift", ACT_UNSIGNED), ("act_bits", ACT_16BIT)):
            if act != decl and f"{name}.{marker}" in sd:
                raise CheckpointError(f"{path}: tensor {name}.{marker} is present but layer {name} does not declare "
                                      f"{decl!r} activations")
        for t, (shape, dtype) in _expected(n, k, int(lm["rank"]), g, scales, act).items():
            key = f"{name}.{t}"
            if key not in sd:
                if t == "bias":
                    continue
                raise CheckpointError(f"{path}: tensor {key} is missing")
            if tuple(sd[key].shape) != shape:
                raise CheckpointError(f"{path}: tensor {key} has shape {tuple(sd[key].shape)}, expected {shape}")
            if dtype is not None and sd[key].dtype != dtype:
                raise CheckpointError(f"{path}: tensor {key} must be {dtype}, got {sd[key].dtype}")
            if dtype is None and not sd[key].is_floating_point():
                raise CheckpointError(f"{path}: tensor {key} must be floating point, got {sd[key].dtype}")
        if act == ACT_16BIT and int(sd[f"{name}.act_bits"][0]) != 16:
            raise CheckpointError(f"{path}: tensor {name}.act_bits holds {int(sd[f'{name}.act_bits'][0])}, expected 16")
        if scales == "int_ratio":
            mult = sd[f"{name}.wscale_mult"]
            if int(mult.max()) > 18:
                raise CheckpointError(f"{path}: tensor {name}.wscale_mult holds multipliers above 18 "
                                      f"(max {int(mult.max())}); int_ratio allows 1..18")


def load_checkpoint(path: str, device="cpu"):
    """Returns (state_dict, file_meta, layer_meta). Every quantized layer is checked."""
    fmeta, layers = parse_declaration(read_metadata(path), path)
    sd = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or corrupt tensor data ({e})") from e
    check_layers(sd, layers, int(fmeta["group_size"]), path)
    _check_input_groups(path, fmeta.get("input_groups") or [], layers, sd)
    return sd, fmeta, layers


def _check_input_groups(path, groups, layers, sd) -> None:
    """Members of an input group are declared 4-bit layers with one smooth_factor and one proj_down."""
    for g in groups:
        if not isinstance(g, list) or len(g) < 2 or any(n not in layers for n in g):
            raise CheckpointError(f"{path}: input group {g!r} names layers that are not declared 4-bit")
        for t in ("smooth_factor", "proj_down"):
            first = sd[f"{g[0]}.{t}"]
            for n in g[1:]:
                if not torch.equal(sd[f"{n}.{t}"], first):
                    raise CheckpointError(f"{path}: layers {g[0]} and {n} are declared an input group but their "
                                          f"{t} differ")
