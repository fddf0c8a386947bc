"""Bad input through the real server: each gives a clear error naming the cause, the server stays
up and runs the next prompt, and no half-written file is left behind."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import graphs
from test_e2e_nodes import calibrate_hook, load_source

pytestmark = pytest.mark.comfy


def _expect_error(srv, prompt, *needles):
    r = srv.run(prompt, timeout=900)
    assert not r.ok, "prompt should have failed"
    text = r.error_text()
    for n in needles:
        assert n in text, f"{n!r} not in:\n{text}"
    # the server is still up and runs the next prompt
    ok = srv.run(graphs.sd15(prefix="after_error", steps=1))
    assert ok.ok, ok.error_text()
    return text


def _no_partial_files(srv):
    folder = srv.models_dir / "svdquant"
    assert not [p for p in folder.glob("**/*") if p.name.endswith(".tmp")] if folder.exists() else True


def test_not_a_safetensors_file(comfy_server):
    bad = comfy_server.models_dir / "diffusion_models" / "bad_pickle.safetensors"
    bad.write_bytes(b"\x80\x04\x95 this is a pickle, not a safetensors file" * 10)
    _expect_error(comfy_server, graphs.sd15(model_source=load_source("diffusion_models/bad_pickle.safetensors")),
                  "bad_pickle.safetensors", "not a readable safetensors file")


def test_16bit_file_is_not_a_4bit_model(comfy_server):
    _expect_error(comfy_server, graphs.sd15(model_source=load_source(f"diffusion_models/{graphs.SD15_UNET}")),
                  graphs.SD15_UNET, "not an SVDQuant 4-bit file")


@pytest.fixture(scope="module")
def sd15_4bit(comfy_server):
    """A real 4-bit file made through the node (rank 8, no smoothing search: fast)."""
    r = comfy_server.run(graphs.sd15(prefix="bad_src", steps=1, model_hook=calibrate_hook(
        "sd15", "bad_input_src", rank=8, smoothing="off")), timeout=900)
    assert r.ok, r.error_text()
    return sorted((comfy_server.models_dir / "svdquant").glob("bad_input_src_*.safetensors"))[0]


def test_truncated_file(comfy_server, sd15_4bit):
    data = sd15_4bit.read_bytes()
    cut = comfy_server.models_dir / "svdquant" / "truncated.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _expect_error(comfy_server, graphs.sd15(model_source=load_source("svdquant/truncated.safetensors")),
                  "truncated.safetensors")


def test_tampered_tensor_is_named(comfy_server, sd15_4bit):
    sd = load_file(str(sd15_4bit))
    from safetensors import safe_open
    with safe_open(str(sd15_4bit), "pt") as f:
        meta = f.metadata()
    key = next(k for k in sd if k.endswith(".proj_up"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1, dtype=sd[key].dtype)
    bad = comfy_server.models_dir / "svdquant" / "tampered.safetensors"
    save_file(sd, str(bad), metadata=meta)
    _expect_error(comfy_server, graphs.sd15(model_source=load_source("svdquant/tampered.safetensors")),
                  key, "has shape")


def test_wrong_family_for_the_graph(comfy_server, sd15_4bit):
    _expect_error(comfy_server, graphs.sd15(model_source=load_source(f"svdquant/{sd15_4bit.name}", family="flux")),
                  "sd15 4-bit model, but the loader was set to flux")


def test_rank_larger_than_the_layer_allows(comfy_server):
    _expect_error(comfy_server, graphs.sd15(steps=1, model_hook=calibrate_hook("sd15", "bad_rank", rank=1024,
                                                                               smoothing="off")),
                  "rank 1024 is larger than layer")
    _no_partial_files(comfy_server)
    assert not list((comfy_server.models_dir / "svdquant").glob("bad_rank_*"))


def test_zero_calibration_samples(comfy_server):
    _expect_error(comfy_server, graphs.sd15(steps=1, model_hook=calibrate_hook("sd15", "bad_zero",
                                                                               calibration_samples=0)),
                  "calibration_samples is 0")


def test_non_finite_activations_name_the_layer(comfy_server):
    src = comfy_server.models_dir / "diffusion_models" / graphs.SD15_UNET
    sd = load_file(str(src))
    key = "input_blocks.1.1.proj_in.weight"
    sd[key] = torch.full_like(sd[key], float("inf"))
    nan_unet = comfy_server.models_dir / "diffusion_models" / "nan_unet.safetensors"
    save_file(sd, str(nan_unet))
    prompt = graphs.sd15_unet(unet="nan_unet.safetensors", steps=1,
                              model_hook=calibrate_hook("sd15", "bad_nan", smoothing="off"))
    _expect_error(comfy_server, prompt, "non-finite activations", "input_blocks.1.1")
    _no_partial_files(comfy_server)
    assert not list((comfy_server.models_dir / "svdquant").glob("bad_nan_*"))
