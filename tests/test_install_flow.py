"""Install the pack the way users get it, then check what ComfyUI shows of it.

1. `comfy node validate` and `comfy node pack` (comfy-cli, offline) on a copy of the git-tracked
   files: the checks the registry runs at publish time, and the zip it would serve.
2. The zip extracted into a new ComfyUI base directory as `custom_nodes/comfyui-svdquant` (the
   folder a registry install creates), `pip install -r requirements.txt` with ComfyUI's Python
   (what ComfyUI-Manager runs after a clone or download): nothing to install.
3. A ComfyUI server on that base directory: the pack imports (no IMPORT FAILED), ComfyUI reads
   its pyproject.toml, and /object_info lists every node with a description and a tooltip on
   every input; each node's help page is served, documents exactly the node's inputs and shows
   a picture that exists.

The copy is of the working tree's tracked files (`git ls-files`): a new file that is not
`git add`-ed is not in the pack, as it would not be in a published one.
"""
import os
import re
import shutil
import subprocess
import time
import urllib.request
import zipfile

import pytest

from harness import config
from harness.comfy_server import ComfyServer

pytestmark = pytest.mark.comfy

NODE_ID = "comfyui-svdquant"  # pyproject [project] name: the registry's id and install folder
PACKED_OUT = ("tests/", "bench/", ".ci/", "scripts/")  # .comfyignore
NEEDED = ("__init__.py", "pyproject.toml", "requirements.txt", "nodes/__init__.py", "kernels/reference.py",
          "web/docs/SVDQuantLoadModel.md", "workflows/sd15_quantize.json")


def comfy_cli() -> list:
    exe = config.venv_python().parent / "comfy"
    if exe.is_file():
        return [str(exe)]
    if shutil.which("comfy"):
        return [shutil.which("comfy")]
    pytest.fail("comfy-cli is not installed in the ComfyUI venv (scripts/setup_comfyui.sh installs it)", pytrace=False)


def run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(node.zip path, comfy-cli outputs): the tracked files staged in a fresh git repo, validated, packed."""
    tmp = tmp_path_factory.mktemp("install_flow")
    src, home = tmp / "src", tmp / "home"
    home.mkdir()
    files = subprocess.run(["git", "-C", str(config.REPO_ROOT), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (config.REPO_ROOT / f).is_file():  # a tracked file deleted in the working tree is not packed
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(config.REPO_ROOT / f, src / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "staged"]):
        subprocess.run(git + args, check=True, capture_output=True)
    # comfy-cli keeps its config under $HOME; --skip-prompt: no tracking question.
    env = {"HOME": str(home)}
    cli = comfy_cli() + ["--skip-prompt", "--no-enable-telemetry"]
    t0 = time.perf_counter()
    outputs = {"validate": run(cli + ["node", "validate"], src, env), "pack": run(cli + ["node", "pack"], src, env)}
    outputs["seconds"] = time.perf_counter() - t0
    return src / "node.zip", outputs


def test_comfy_node_validate(packed):
    _, out = packed
    rc, text = out["validate"]
    assert rc == 0, text
    # Registry warnings (exec/eval, several statements on one line) become errors "soon", comfy-cli says.
    assert "All validation checks passed" in text, text[-3000:]


def test_comfy_node_pack(packed):
    zip_path, out = packed
    rc, text = out["pack"]
    assert rc == 0 and zip_path.is_file(), text
    names = zipfile.ZipFile(zip_path).namelist()
    assert set(NEEDED) <= set(names), sorted(set(NEEDED) - set(names))
    assert not [n for n in names if n.startswith(PACKED_OUT)], "development files in the pack"
    assert [n for n in names if n.startswith("web/docs/images/") and n.endswith(".png")], "no doc pictures packed"


@pytest.fixture(scope="module")
def installed(packed, tmp_path_factory):
    """A ComfyUI base directory with the pack extracted into custom_nodes/, requirements installed."""
    zip_path, _ = packed
    base = tmp_path_factory.mktemp("install_base")
    pack = base / "custom_nodes" / NODE_ID
    pack.mkdir(parents=True)
    zipfile.ZipFile(zip_path).extractall(pack)
    rc, text = run([str(config.venv_python()), "-m", "pip", "install", "--disable-pip-version-check",
                    "-r", str(pack / "requirements.txt")], base)
    return base, pack, rc, text


def test_requirements_install_is_a_noop(installed):
    """ComfyUI's environment already holds everything the pack needs: pip installs nothing."""
    _, _, rc, text = installed
    assert rc == 0, text
    assert "Successfully installed" not in text, text


@pytest.fixture(scope="module")
def server(installed, comfy_timings):
    base, pack, _, _ = installed
    srv = ComfyServer(base_dir=base, link_pack=False)
    srv.start()
    comfy_timings["install flow: server start (s)"] = round(srv.startup_seconds, 1)
    yield srv, pack
    srv.stop()


def pack_nodes(object_info) -> dict:
    return {k: v for k, v in object_info.items() if v.get("python_module") == f"custom_nodes.{NODE_ID}"}


def test_pack_imports_and_registers(server, comfy_timings):
    srv, pack = server
    log = srv.log_text()
    m = re.search(rf"^\s*([\d.]+) seconds( \(IMPORT FAILED\))?: {re.escape(str(pack))}\s*$", log, re.M)
    assert m, "no import-time line for the pack in the server log"
    assert not m.group(2), srv.log_tail(80)
    comfy_timings["install flow: pack import (s, ComfyUI's count)"] = float(m.group(1))
    assert float(m.group(1)) < 10, f"importing the pack took {m.group(1)} s"
    # ComfyUI parsed pyproject.toml ([tool.comfy] web).
    assert f"Automatically register web folder web for {NODE_ID}" in log


def doc_inputs(md: str) -> list:
    """Input names of the `## Inputs` table of a help page."""
    section = md.split("\n## Inputs", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\|([^|]*)\|", section, re.M)  # a row may document several: `width`, `height`
    return [name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)]


def test_every_node_is_listed_documented_and_explained(server):
    srv, pack = server
    nodes = pack_nodes(srv.object_info())
    docs = sorted(p.stem for p in (pack / "web" / "docs").glob("*.md"))
    assert sorted(nodes) == docs, "each node has a web/docs/<NodeName>.md page and each page a node"
    for name, info in nodes.items():
        assert info["category"] == "SVDQuant" and info["display_name"] and info["description"], name
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        untipped = [i for i, spec in inputs.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
        assert not untipped, f"{name}: inputs without a tooltip: {untipped}"
        assert len(info.get("output_tooltips") or []) == len(info["output"]), f"{name}: outputs without a tooltip"

        url = f"{srv.url}/extensions/{NODE_ID}/docs/{name}.md"  # where the frontend's help panel looks
        with urllib.request.urlopen(url, timeout=30) as r:
            md = r.read().decode()
        assert sorted(doc_inputs(md)) == sorted(inputs), f"{name}.md documents other inputs than the node has"
        pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)
        assert pictures, f"{name}.md shows no picture of its workflow"
        for pic in pictures:
            # The frontend resolves relative pictures against the page's folder.
            with urllib.request.urlopen(f"{srv.url}/extensions/{NODE_ID}/docs/{pic}", timeout=30) as r:
                assert r.read(8) == b"\x89PNG\r\n\x1a\n", pic


def test_import_does_not_touch_cuda_or_build(tmp_path, comfy_timings):
    """Importing the pack the way ComfyUI does (nodes.load_custom_node) loads no kernel library,
    compiles nothing, starts no process and initialises no CUDA of its own (on a GPU machine ComfyUI's
    own imports have initialised CUDA before; on a CPU one it must stay uninitialised); it is fast."""
    script = tmp_path / "import_pack.py"
    script.write_text(IMPORT_PROBE)
    proc = subprocess.run([str(config.venv_python()), str(script), str(config.comfyui_path()),
                           str(config.REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["nodes"], r
    assert not r["cuda_after"] or r["cuda_before"], "importing the pack initialised CUDA"
    assert not r["calls"], f"import ran {r['calls']}"
    assert not r["kernel_library_loaded"], "the CUDA kernel library was loaded at import (it should load on first use)"
    comfy_timings["pack import, ComfyUI already loaded (s)"] = round(r["seconds"], 2)
    assert r["seconds"] < 10, r


IMPORT_PROBE = r'''
import asyncio, ctypes, json, os, subprocess, sys, time
comfy, pack = sys.argv[1], sys.argv[2]
os.chdir(comfy)
sys.path.insert(0, comfy)
import torch
from comfy.cli_args import args
args.cpu = not torch.cuda.is_available()
import nodes  # what ComfyUI has imported by the time it loads custom nodes
import torch.utils.cpp_extension as cpp

calls = []
class SpyPopen(subprocess.Popen):
    def __init__(self, *a, **k):
        calls.append(["process", str(a[0] if a else k.get("args"))])
        super().__init__(*a, **k)
subprocess.Popen = SpyPopen
def spy(name, fn):
    def wrapper(*a, **k):
        calls.append([name, str(a[:1])])
        return fn(*a, **k)
    return wrapper
os.system = spy("os.system", os.system)
cpp.load, cpp.load_inline = spy("cpp_extension.load", cpp.load), spy("cpp_extension.load_inline", cpp.load_inline)
torch.compile = spy("torch.compile", torch.compile)

before = set(nodes.NODE_CLASS_MAPPINGS)
cuda_before = torch.cuda.is_initialized()
t0 = time.perf_counter()
ok = asyncio.run(nodes.load_custom_node(pack, set(before), module_parent="custom_nodes"))
seconds = time.perf_counter() - t0
libs = [m for name, m in sys.modules.items() if name.endswith("kernels._lib") and hasattr(m, "_tried")]
print(json.dumps({"ok": ok, "seconds": seconds, "cuda_before": cuda_before, "cuda_after": torch.cuda.is_initialized(),
                  "calls": calls, "kernel_library_loaded": any(m._tried for m in libs),
                  "nodes": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)}))
'''
