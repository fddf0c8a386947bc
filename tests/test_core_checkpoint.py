"""Checkpoint format: exact round trip, atomic save, and clear refusal of bad files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_svdquant.core import checkpoint as ckpt
from comfyui_svdquant.core.config import QuantConfig
from comfyui_svdquant.core.layer_quant import quantize_linear
from synthetic import outlier_layer


def _file(tmp_path, name="m.safetensors", scales="int_ratio"):
    w, x = outlier_layer(n=64, k=128, rows=64)
    q = quantize_linear(w, torch.randn(64), x.abs().amax(0), x, QuantConfig(alpha_grid=(0.5,), scale_mode=scales),
                        rank=8, out_dtype=torch.bfloat16)
    tensors = {f"blocks.0.fc.{k}": v for k, v in q.tensors().items()}
    tensors["norm.weight"] = torch.randn(128, dtype=torch.bfloat16)
    meta = ckpt.build_metadata({"blocks.0.fc": {"rank": 8, "scales": scales}}, family="sd15",
                               source_dtype=torch.bfloat16, model_class="SD15", unet_config={"model_channels": 320})
    path = str(tmp_path / name)
    ckpt.save_checkpoint(path, tensors, meta)
    return path, tensors


@pytest.mark.parametrize("scales", ["int_ratio", "float"])
def test_save_load_roundtrip_is_exact(tmp_path, scales):
    path, tensors = _file(tmp_path, scales=scales)
    sd, fmeta, layers = ckpt.load_checkpoint(path)
    assert set(sd) == set(tensors)
    for k in tensors:
        assert sd[k].dtype == tensors[k].dtype and torch.equal(sd[k], tensors[k]), k
    assert fmeta["family"] == "sd15" and fmeta["group_size"] == 64 and fmeta["source_dtype"] == "bfloat16"
    assert layers["blocks.0.fc"] == {"format": "svdquant_w4a4", "rank": 8, "group_size": 64, "scales": scales}
    if scales == "int_ratio":
        assert sd["blocks.0.fc.wscale_mult"].dtype == torch.uint8 and sd["blocks.0.fc.wscale_base"].dtype == torch.float32
        assert "blocks.0.fc.wscales" not in sd


def test_version1_float_file_still_loads(tmp_path):
    """Files written before int_ratio scales existed (version 1, no per-layer 'scales') read as float mode."""
    path, tensors = _file(tmp_path, scales="float")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    fm = json.loads(meta["svdquant"])
    fm["version"] = 1
    qm = json.loads(meta["_quantization_metadata"])
    del qm["layers"]["blocks.0.fc"]["scales"]
    meta["svdquant"], meta["_quantization_metadata"] = json.dumps(fm), json.dumps(qm)
    old = str(tmp_path / "v1.safetensors")
    save_file(tensors, old, metadata=meta)
    sd, fmeta, layers = ckpt.load_checkpoint(old)
    assert fmeta["version"] == 1 and torch.equal(sd["blocks.0.fc.wscales"], tensors["blocks.0.fc.wscales"])
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(str(tmp_path / "x.safetensors"), {"a": torch.ones(2)}, {})
    assert os.listdir(tmp_path) == []


def test_truncated_file_is_refused_naming_the_file(tmp_path):
    path, _ = _file(tmp_path)
    data = open(path, "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ckpt.CheckpointError, match="trunc.safetensors"):
        ckpt.load_checkpoint(str(bad))


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors")
    with pytest.raises(ckpt.CheckpointError, match="not a readable safetensors file"):
        ckpt.load_checkpoint(str(bad))


def test_plain_16bit_file_is_not_svdquant(tmp_path):
    p = str(tmp_path / "plain.safetensors")
    save_file({"a": torch.ones(2)}, p)
    with pytest.raises(ckpt.CheckpointError, match="not an SVDQuant 4-bit file"):
        ckpt.load_checkpoint(p)


@pytest.mark.parametrize("scales,tensor,replacement,msg", [
    ("int_ratio", "blocks.0.fc.proj_up", torch.zeros(64, 9, dtype=torch.bfloat16), "proj_up has shape"),
    ("float", "blocks.0.fc.wscales", None, "wscales is missing"),
    ("int_ratio", "blocks.0.fc.wscale_mult", None, "wscale_mult is missing"),
    ("int_ratio", "blocks.0.fc.wscale_mult", torch.full((2, 64), 19, dtype=torch.uint8), "multipliers above 18"),
    ("int_ratio", "blocks.0.fc.wscale_base", torch.ones(64, dtype=torch.bfloat16), "wscale_base must be torch.float32"),
    ("int_ratio", "blocks.0.fc.qweight", torch.zeros(64, 64, dtype=torch.float16), "qweight must be 2-D int8"),
])
def test_wrong_tensor_is_named(tmp_path, scales, tensor, replacement, msg):
    path, tensors = _file(tmp_path, scales=scales)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    if replacement is None:
        tensors.pop(tensor)
    else:
        tensors[tensor] = replacement
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match=msg):
        ckpt.load_checkpoint(bad)


def test_unsupported_version_is_refused(tmp_path):
    path, tensors = _file(tmp_path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    fm = json.loads(meta["svdquant"])
    fm["version"] = 99
    meta["svdquant"] = json.dumps(fm)
    bad = str(tmp_path / "v99.safetensors")
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        ckpt.load_checkpoint(bad)
