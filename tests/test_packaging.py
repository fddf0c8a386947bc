"""What the Comfy registry, ComfyUI-Manager and a README reader get, checked without a server.

- pyproject.toml has the fields the registry and Manager read, comfy-cli's own parser accepts it,
  and its dependencies are requirements.txt's;
- every picture in README.md and web/docs/*.md exists, is a small PNG and carries its workflow in
  the PNG text chunks ("workflow" = UI graph, "prompt" = API prompt), as ComfyUI's SaveImage writes
  them: a shipped workflow's picture holds exactly that file;
- on a machine without the CUDA kernels the 4-bit linear says once that it runs the reference.
"""
import json
import logging
import pathlib
import re
import tomllib

import pytest

from harness import png_workflow
from harness.workflow_convert import VIRTUAL_TYPES

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAX_PICTURE_BYTES = 400_000


def requirement_lines() -> list:
    return [ln.split("#", 1)[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.split("#", 1)[0].strip()]


def test_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"])  # the registry id and install folder
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # semver, as the registry demands
    assert project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert {"PublisherId", "DisplayName", "Icon", "includes"} <= set(comfy)
    assert comfy["DisplayName"]
    assert all((ROOT / p).exists() for p in comfy["includes"])
    assert (ROOT / comfy["web"] / "docs").is_dir()
    # The icon URL names a file of this repository (on its main branch).
    repo = project["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert comfy["Icon"].startswith(prefix)
    assert (ROOT / comfy["Icon"].removeprefix(prefix)).is_file()


def test_dependencies_match_requirements():
    assert sorted(PYPROJECT["project"]["dependencies"]) == sorted(requirement_lines())
    assert not [r for r in requirement_lines() if re.match(r"torch\b", r)], "ComfyUI brings torch: never pin it"


def test_comfy_cli_parses_pyproject(monkeypatch):
    parser = pytest.importorskip("comfy_cli.registry.config_parser", reason="comfy-cli not installed")
    monkeypatch.chdir(ROOT)
    cfg = parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert cfg.project.name == PYPROJECT["project"]["name"]
    assert cfg.project.supported_comfyui_version == PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    assert cfg.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert cfg.project.supported_os == ["OS Independent"]
    assert cfg.tool_comfy.icon == PYPROJECT["tool"]["comfy"]["Icon"]


def shown_pictures() -> list:
    """(markdown file, picture path) for every picture shown in README.md and the help pages."""
    out = []
    for md in [ROOT / "README.md", *sorted((ROOT / "web" / "docs").glob("*.md"))]:
        for ref in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md.read_text()):
            out.append((md, (md.parent / ref).resolve()))
    return out


def pictures() -> list:
    """The shown pictures, and those only linked (README: SDXL / FLUX): all must hold their workflows."""
    out = shown_pictures()
    shown = {pic for _, pic in out}
    return out + [(ROOT / "README.md", pic) for pic in sorted((ROOT / "web" / "docs" / "images").glob("*.png"))
                  if pic.resolve() not in shown]


def test_readme_and_help_pages_show_pictures():
    mds = {md.name for md, _ in shown_pictures()}
    assert {"README.md", "SVDQuantLoadModel.md", "SVDQuantCalibrateQuantize.md", "SVDQuantRankSelector.md"} <= mds


@pytest.mark.parametrize("md,picture", pictures(), ids=lambda v: v.name if isinstance(v, pathlib.Path) else v)
def test_picture_carries_its_workflow(md, picture):
    assert picture.is_file(), f"{md.name} shows {picture}, which is missing"
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) <= MAX_PICTURE_BYTES, (picture.name, len(data))
    chunks = png_workflow.read(picture)
    wf, prompt = chunks["workflow"], chunks["prompt"]
    assert wf and prompt, f"{picture.name} lacks the workflow/prompt chunks"
    real = {str(n["id"]): n["type"] for n in wf["nodes"] if n["type"] not in VIRTUAL_TYPES}
    assert {k: v["class_type"] for k, v in prompt.items()} == real, f"{picture.name}: prompt and workflow differ"
    stem = picture.stem.removesuffix("_run")
    shipped = ROOT / "workflows" / f"{stem}.json"
    assert shipped.is_file(), f"{picture.name} is named after no workflow in workflows/"
    shipped_wf = json.loads(shipped.read_text())
    if picture.stem == stem:  # the workflow as shipped: the picture must be regenerated when the file changes
        assert wf == shipped_wf, f"{picture.name} is stale: SVDQ_UPDATE_DOC_IMAGES=1 pytest tests/browser"
    else:  # a test run's screenshot: the shipped graph plus what the run changed
        assert {n["type"] for n in shipped_wf["nodes"]} <= {n["type"] for n in wf["nodes"]}


def test_reference_path_is_announced_once(monkeypatch, caplog):
    """No kernel for the device: the 4-bit linear falls back to the reference and logs it once."""
    import torch

    from comfyui_svdquant import kernels
    from comfyui_svdquant.kernels import reference as ref

    monkeypatch.setattr(kernels, "_BACKEND_LOGGED", set())
    g = torch.Generator().manual_seed(0)
    n, k, r = 64, 128, 16
    layer = {"qweight": ref.pack_int4(torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)),
             "wscales": torch.rand(k // 64, n, generator=g) * 0.02 + 0.002, "smooth_factor": torch.ones(k),
             "proj_down": torch.randn(k, r, generator=g) * 0.01, "proj_up": torch.randn(n, r, generator=g) * 0.01,
             "bias": None}
    prepared = kernels.prepare_weights(layer, torch.device("cpu"))
    caplog.set_level(logging.INFO, logger=kernels.__name__)
    for _ in range(3):
        kernels.linear(torch.randn(2, 5, k), prepared)
    said = [rec.getMessage() for rec in caplog.records if "reference path" in rec.getMessage()]
    assert said == ["svdquant: pure-torch reference path on cpu (no CUDA kernel for this device/dtype)"]
