"""The drag-and-drop workflows in workflows/ against a real ComfyUI server.

For every file: it matches the server's node definitions (types, input names, widget values
and ranges, link types), it is what workflows/build_workflows.py writes, and, converted to
the API format and pointed at the tiny models (64x64, 2 steps, 1 calibration sample of 1
step), it runs and writes a PNG. A generate_4bit workflow loads the file that its family's
quantize workflow saved in this server's models/svdquant.
"""
import importlib.util
import json
import pathlib
import time
import urllib.parse
import urllib.request

import pytest

from harness import config, frontend_schema
from harness.tiny_runs import NAMES, TINY_MODELS, TINY_SIZE, WORKFLOW_DIR, family_of, load, size_and_steps
from harness.workflow_convert import check_ui_workflow, find_nodes, set_inputs, ui_to_api

pytestmark = pytest.mark.comfy

# Combo inputs naming model files: the workflows name the files a user has, not the server's.
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "model_name"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_quantized = {}  # family -> "svdquant/<file>" saved by that family's quantize workflow
_images = {}  # family -> the image the quantize workflow sampled with the in-memory 4-bit model


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_every_workflow_is_there():
    assert sorted(p.name for p in WORKFLOW_DIR.glob("*.json")) == sorted(NAMES)


def test_builder_writes_these_files(object_info):
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOW_DIR / "build_workflows.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built = builder.build_all(object_info)
    assert sorted(built) == sorted(NAMES)
    for name, wf in built.items():
        assert json.loads(builder.dumps(wf)) == load(name), f"{name} is stale: run workflows/build_workflows.py"


def test_frontend_schema_accepts_workflows():
    """The installed frontend's own workflow schema (zod) accepts every file (needs node + zod)."""
    why = frontend_schema.problem()
    if why:
        pytest.skip(why)
    issues = frontend_schema.validate([WORKFLOW_DIR / n for n in NAMES])
    bad = {pathlib.Path(k).name: v for k, v in issues.items() if v is not None}
    assert not bad, json.dumps(bad, indent=1)[:4000]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_matches_server_nodes(object_info, name):
    wf = load(name)
    assert wf["version"] == 0.4 and wf["nodes"] and wf["links"]
    problems = check_ui_workflow(wf, object_info, skip_combo=lambda _t, inp: inp in MODEL_FILE_INPUTS)
    assert not problems, "\n".join(problems)
    prompt = ui_to_api(wf, object_info)
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]
        required = set(info["input"].get("required", {}))
        assert required <= set(node["inputs"]), (nid, node["class_type"], required - set(node["inputs"]))
    # The pack's own nodes are in every workflow, and each workflow ends in a SaveImage.
    kinds = {n["class_type"] for n in prompt.values()}
    assert "SaveImage" in kinds and "KSampler" in kinds
    if "quantize" in name:
        assert {"SVDQuantCalibrateQuantize", "SVDQuantRankSelector"} <= kinds
        (q,) = find_nodes(prompt, "SVDQuantCalibrateQuantize")
        assert prompt[q]["inputs"]["save"] is True
    else:
        assert "SVDQuantLoadModel" in kinds and "SVDQuantCalibrateQuantize" not in kinds


PACK_NODES = ("SVDQuantLoadModel", "SVDQuantCalibrateQuantize", "SVDQuantRankSelector")


@pytest.mark.parametrize("node", PACK_NODES)
def test_node_doc_is_served(comfy_server, object_info, node):
    """The frontend's help panel fetches /extensions/<pack folder>/docs/<node>.md for custom nodes."""
    info = object_info[node]
    pack = info["python_module"].split(".")[1]
    assert pack == config.PACK_DIR_NAME
    url = f"{comfy_server.url}/extensions/{urllib.parse.quote(pack)}/docs/{node}.md"
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    assert text.startswith(f"# {info['display_name']}\n"), text[:100]
    # Every input and output of the node is documented.
    for section in ("required", "optional"):
        for name in info["input"].get(section, {}):
            assert f"`{name}`" in text, f"{node}.md does not mention input {name}"
    for name in info.get("output_name") or info["output"]:
        assert f"`{name}`" in text, f"{node}.md does not mention output {name}"


def zero_text(prompt):
    """CLIPTextEncode -> ConditioningZeroOut -> its consumers: the stub text encoders' output is garbage."""
    for nid in find_nodes(prompt, "CLIPTextEncode"):
        zid = f"{nid}_zero"
        for node in prompt.values():
            for k, v in node["inputs"].items():
                if v == [nid, 0]:
                    node["inputs"][k] = [zid, 0]
        prompt[zid] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [nid, 0]}}
    return prompt


def tiny_prompt(name, object_info, prefix, model_name=None, **calibration):
    prompt = ui_to_api(load(name), object_info)
    present = {n["class_type"] for n in prompt.values()}
    overrides = {cls: v for cls, v in TINY_MODELS[family_of(name)].items() if cls in present}
    overrides.update(size_and_steps(name, present))
    overrides["SaveImage"] = {"filename_prefix": prefix}
    if "SVDQuantCalibrateQuantize" in overrides:
        overrides["SVDQuantCalibrateQuantize"].update(filename_prefix=prefix, **calibration)
    if model_name:
        overrides["SVDQuantLoadModel"] = {"model_name": model_name}
    return zero_text(set_inputs(prompt, overrides))


def assert_png(srv, result, size=TINY_SIZE):
    """The one image the run saved, as a float array."""
    import numpy as np
    from PIL import Image
    paths = srv.output_images(result)
    assert len(paths) == 1 and paths[0].is_file(), paths
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    img = Image.open(paths[0])
    assert img.size == (size, size)
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def run_quantize(srv, object_info, timings, family):
    name = f"{family}_quantize.json"
    prefix = f"wf_{family}"
    folder = srv.models_dir / "svdquant"
    before = set(folder.glob("*.safetensors"))
    t0 = time.perf_counter()
    result = srv.run(tiny_prompt(name, object_info, prefix), timeout=1800)
    timings[f"workflow {name} (s)"] = round(time.perf_counter() - t0, 1)
    assert result.ok, result.error_text()
    _images[family] = assert_png(srv, result)
    new = sorted(set(folder.glob(f"{prefix}_*.safetensors")) - before)
    assert len(new) == 1, new
    (q,) = find_nodes(ui_to_api(load(name), object_info), "SVDQuantCalibrateQuantize")
    report = result.outputs[q]["text"][0]
    assert f"saved: {new[0]}" in report, report[-500:]
    _quantized[family] = f"svdquant/{new[0].name}"
    return result


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_tiny_models(comfy_server, object_info, comfy_timings, name):
    family = family_of(name)
    if "quantize" in name:
        run_quantize(comfy_server, object_info, comfy_timings, family)
        return
    if family not in _quantized:  # run alone (-k generate): make the 4-bit file first
        run_quantize(comfy_server, object_info, comfy_timings, family)
    # The loader's combo lists files at validation time; the file was saved after server start.
    t0 = time.perf_counter()
    result = comfy_server.run(tiny_prompt(name, object_info, f"wf_{family}_gen", model_name=_quantized[family]),
                              timeout=1800)
    comfy_timings[f"workflow {name} (s)"] = round(time.perf_counter() - t0, 1)
    assert result.ok, result.error_text()
    image = assert_png(comfy_server, result)
    # Same prompt, seed and sampler as the quantize workflow: the loaded file gives its image.
    diff = float(abs(image - _images[family]).mean())
    assert diff < 1.0, f"{name}: mean |loaded - in-memory 4-bit| = {diff:.3f}/255"
