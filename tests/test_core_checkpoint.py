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


def _file(tmp_path, name="m.safetensors"):
    w, x = outlier_layer(n=64, k=128, rows=64)
    q = quantize_linear(w, torch.randn(64), x.abs().amax(0), x, QuantConfig(alpha_grid=(0.5,)), rank=8,
                        out_dtype=torch.bfloat16)
    tensors = {f"blocks.0.fc.{k}": v for k, v in q.tensors().items()}
    tensors["norm.weight"] = torch.randn(128, dtype=torch.bfloat16)
    meta = ckpt.build_metadata({"blocks.0.fc": {"rank": 8}}, family="sd15", source_dtype=torch.bfloat16,
                               model_class="SD15", unet_config={"model_channels": 320})
    path = str(tmp_path / name)
    ckpt.save_checkpoint(path, tensors, meta)
    return path, tensors


def test_save_load_roundtrip_is_exact(tmp_path):
    path, tensors = _file(tmp_path)
    sd, fmeta, layers = ckpt.load_checkpoint(path)
    assert set(sd) == set(tensors)
    for k in tensors:
        assert sd[k].dtype == tensors[k].dtype and torch.equal(sd[k], tensors[k]), k
    assert fmeta["family"] == "sd15" and fmeta["group_size"] == 64 and fmeta["source_dtype"] == "bfloat16"
    assert layers["blocks.0.fc"] == {"format": "svdquant_w4a4", "rank": 8, "group_size": 64}
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


@pytest.mark.parametrize("tensor,replacement,msg", [
    ("blocks.0.fc.proj_up", torch.zeros(64, 9, dtype=torch.bfloat16), "proj_up has shape"),
    ("blocks.0.fc.wscales", None, "wscales is missing"),
    ("blocks.0.fc.qweight", torch.zeros(64, 64, dtype=torch.float16), "qweight must be 2-D int8"),
])
def test_wrong_tensor_is_named(tmp_path, tensor, replacement, msg):
    path, tensors = _file(tmp_path)
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
