"""Every workflow in workflows/, the way an artist uses it: in the real ComfyUI frontend, in Chromium.

Per workflow: drag the JSON onto the canvas; no dialog (missing nodes, missing models, load
error) and every node type known; shrink it to the tiny models through its widgets (64x64,
2 steps, one 1-step calibration run; see harness/tiny_runs.py) and zero the text
conditioning (the tiny text encoders are stubs); press Run; the frontend hears the run succeed,
the server's /history has it with one PNG, and that PNG carries the graph as the frontend sent
it (dropping it back loads that graph). The shipped model file names are links to the tiny
models, so the loaders keep the values the workflows ship with, and a quantize workflow's saved
file is the one its generate workflow names.

Screenshots (each with its graph in the PNG's "workflow"/"prompt" chunks) go to
$SVDQ_ARTIFACTS (default test-artifacts/browser/). SVDQ_UPDATE_DOC_IMAGES=1 also rewrites the
committed images in web/docs/images/ (README and node help pages).

Needs Chromium (apt-get install chromium) and the Python package playwright; without them the
tests skip, unless SVDQ_REQUIRE_BROWSER=1 (CI), which makes that a failure.
"""
import json
import os
import pathlib
import urllib.request

import pytest

from harness import config, png_workflow
from harness.tiny_runs import NAMES, TINY_MODELS, TINY_SIZE, WORKFLOW_DIR, family_of, load, size_and_steps
from harness.workflow_convert import VIRTUAL_TYPES, find_nodes

import comfy_page
from comfy_page import ComfyPage

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

ARTIFACTS = pathlib.Path(os.environ.get("SVDQ_ARTIFACTS") or config.REPO_ROOT / "test-artifacts" / "browser")
DOC_IMAGES = config.REPO_ROOT / "web" / "docs" / "images"
UPDATE_DOC_IMAGES = os.environ.get("SVDQ_UPDATE_DOC_IMAGES") == "1"
README_RUN_IMAGE = "sd15_quantize"  # its after-run screenshot is web/docs/images/<name>_run.png
DOC_COLORS = 64  # palette of the committed screenshots (full-colour ones are ~5x larger)
RUN_TIMEOUT_S = 1800

_saved = {}  # family -> "svdquant/<file>" that the quantize workflow saved in the browser run
_images = {}  # family -> pixels of the quantize workflow's image


@pytest.fixture(scope="module")
def browser():
    why = comfy_page.missing_reason()
    if why:
        if os.environ.get("SVDQ_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SVDQ_REQUIRE_BROWSER=1 but {why}", pytrace=False)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = comfy_page.launch(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shipped_model_files(comfy_server):
    """models/<folder>/<file the workflows name> -> the tiny model standing in for it."""
    object_info = comfy_server.object_info()
    from harness.workflow_convert import ui_to_api

    made = {}
    for name in NAMES:
        prompt = ui_to_api(load(name), object_info)
        for cls, inputs in TINY_MODELS[family_of(name)].items():
            for nid in find_nodes(prompt, cls):
                for inp, tiny in inputs.items():
                    shipped = prompt[nid]["inputs"][inp]
                    (tiny_path,) = comfy_server.models_dir.glob(f"*/{tiny}")
                    link = tiny_path.parent / shipped
                    if not link.exists():
                        link.symlink_to(tiny_path.resolve())
                    made[shipped] = tiny
    return made


@pytest.fixture(scope="module")
def ui(browser, comfy_server, shipped_model_files):
    # A returning user: no template browser on the first visit. For the screenshots: no minimap,
    # and node text drawn at every zoom (the default hides it when a whole workflow is in view).
    for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                           ("LiteGraph.Canvas.MinFontSizeForLOD", 0)):
        req = urllib.request.Request(f"{comfy_server.url}/settings/{setting}", data=json.dumps(value).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()
    page = ComfyPage.open(browser, comfy_server.url)
    yield page
    assert not page.errors, f"uncaught errors in the page: {page.errors}"
    page.page.close()


def _plain(v):
    """JSON value with integral floats as ints: JavaScript has one number type (1.0 comes back as 1)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def graph_shape(wf) -> tuple:
    """What must survive a load: node ids, types, widget values, links."""
    # A node without widgets serializes widgets_values as absent before a reload and [] after it.
    nodes = sorted((n["id"], n["type"], json.dumps(_plain(n.get("widgets_values") or []))) for n in wf["nodes"])
    links = sorted(tuple(l[:6]) if isinstance(l, list) else (l["id"], l["origin_id"], l["origin_slot"],
                                                                 l["target_id"], l["target_slot"], l["type"])
                   for l in wf.get("links") or [])
    return nodes, links


def save_screenshot(ui, stem, workflow, prompt, doc_name=None):
    """Artifact (full colour) and, when updating, the committed doc image (palette)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ui.screenshot()
    (ARTIFACTS / f"{stem}.png").write_bytes(png_workflow.embed(shot, workflow, prompt))
    if UPDATE_DOC_IMAGES and doc_name:
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        (DOC_IMAGES / doc_name).write_bytes(png_workflow.embed(shot, workflow, prompt, colors=DOC_COLORS))


def assert_nothing_reported(ui, what):
    problems, unknown = ui.problems(), ui.unknown_node_types()
    assert not problems and not unknown, f"{what}: dialogs/toasts {problems}, unknown node types {unknown}"


def test_missing_node_is_reported(ui, tmp_path):
    """The checks below can fail: an unknown node type gives the frontend's missing-nodes dialog."""
    wf = load("sd15_generate_4bit.json")
    wf["nodes"][1]["type"] = "SVDQuantNoSuchNode"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(wf))
    ui.drop_workflow(path)
    problems = ui.problems()
    assert ui.unknown_node_types() == ["SVDQuantNoSuchNode"]
    assert any("SVDQuantNoSuchNode" in p for p in problems), problems
    ui.close_dialogs()
    assert not ui.problems()


def run_in_browser(ui, srv, name):
    """Load, shrink, queue one shipped workflow; returns (PromptResult, output PNG path)."""
    import numpy as np
    from PIL import Image

    family, stem = family_of(name), name.removesuffix(".json")
    shipped = load(name)
    ui.drop_workflow(WORKFLOW_DIR / name)
    assert_nothing_reported(ui, f"loading {name}")
    assert graph_shape(ui.serialize()) == graph_shape(shipped), f"{name}: the canvas holds another graph"
    save_screenshot(ui, f"{stem}.loaded", shipped, ui.graph_to_prompt()["output"], doc_name=f"{stem}.png")

    types = ui.node_types()
    overrides = size_and_steps(name, types)
    if "SVDQuantLoadModel" in types and ui.widget_value("SVDQuantLoadModel", "model_name") != _saved[family]:
        overrides["SVDQuantLoadModel"] = {"model_name": _saved[family]}
    assert not ui.set_widgets(overrides)
    assert ui.zero_text_conditioning() >= 1

    folder = srv.models_dir / "svdquant"
    before = set(folder.glob("*.safetensors"))
    prompt_id = ui.queue()
    assert prompt_id, f"{name}: nothing was queued: {ui.problems()} {ui.nodes_with_errors()}"
    how, detail = ui.wait_finished(prompt_id, RUN_TIMEOUT_S)
    result = srv.wait(prompt_id, timeout=60)
    assert how == "execution_success" and result.ok, f"{name}: {how} {detail}\n{result.error_text()}"
    assert_nothing_reported(ui, f"running {name}")

    (png,) = srv.output_images(result)
    assert [i["filename"] for i in ui.executed_images(prompt_id)] == [png.name]
    with Image.open(png) as img:
        assert img.size == (TINY_SIZE, TINY_SIZE)
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    sent = png_workflow.read(png)  # what SaveImage embedded: the graph as the frontend sent it
    assert graph_shape(sent["workflow"]) == graph_shape(ui.serialize())
    assert {v["class_type"] for v in sent["prompt"].values()} == set(types) - VIRTUAL_TYPES | {"ConditioningZeroOut"}
    save_screenshot(ui, f"{stem}.done", sent["workflow"], sent["prompt"],
                    doc_name=f"{stem}_run.png" if stem == README_RUN_IMAGE else None)

    if "quantize" in name:
        new = sorted(set(folder.glob("*.safetensors")) - before)
        assert len(new) == 1, new
        _saved[family] = f"svdquant/{new[0].name}"
        _images[family] = pixels
        gen = load(f"{family}_generate_4bit.json")
        (loader,) = [n for n in gen["nodes"] if n["type"] == "SVDQuantLoadModel"]
        if not any(p.name.startswith(new[0].name.rsplit("_", 1)[0]) for p in before):
            # A fresh install: the file is the one the generate workflow ships with.
            assert loader["widgets_values"][0] == _saved[family]
        ui.refresh_combos()  # the r key: the new file shows up in Load SVDQuant Model's list
    else:
        diff = float(abs(pixels - _images[family]).mean())
        assert diff < 1.0, f"{name}: mean |loaded file - in-memory 4-bit| = {diff:.3f}/255"

    # Drag the output image back onto the canvas: the graph that made it comes back.
    ui.drop_workflow(png)
    assert_nothing_reported(ui, f"dropping the output of {name}")
    assert graph_shape(ui.serialize()) == graph_shape(sent["workflow"])
    return result, png


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_in_browser(ui, comfy_server, comfy_timings, name):
    import time

    family = family_of(name)
    if "generate" in name and family not in _saved:  # run alone (-k generate): make the 4-bit file first
        run_in_browser(ui, comfy_server, f"{family}_quantize.json")
    t0 = time.perf_counter()
    run_in_browser(ui, comfy_server, name)
    comfy_timings[f"browser {name} (s)"] = round(time.perf_counter() - t0, 1)


def doc_images():
    return sorted(DOC_IMAGES.glob("*.png"))


@pytest.mark.parametrize("image", doc_images(), ids=lambda p: p.name)
def test_doc_image_loads_its_workflow(ui, image):
    """Dragging a README / help-page picture onto the canvas loads the workflow it shows."""
    embedded = png_workflow.read(image)["workflow"]
    assert embedded, f"{image.name} has no workflow chunk"
    ui.drop_workflow(image)
    assert_nothing_reported(ui, f"dropping {image.name}")
    assert graph_shape(ui.serialize()) == graph_shape(embedded)


def test_reference_path_is_announced_once(comfy_server):
    """On CPU the pack runs the pure-torch reference and logs it once per server, not per layer or run."""
    if not _saved:
        pytest.skip("no 4-bit model ran in this session")
    log = comfy_server.log_text()
    assert log.count("svdquant: pure-torch reference path on cpu") == 1, \
        [line for line in log.splitlines() if "svdquant:" in line][:10]
