import sys, types, pathlib
ROOT = pathlib.Path(__file__).resolve().parents[1]
if "comfyui_svdquant" not in sys.modules:
    _pkg = types.ModuleType("comfyui_svdquant")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["comfyui_svdquant"] = _pkg

# --- ComfyUI harness: markers, skips, the session server (tests/harness/) ---------------
import os
import resource
import shutil
import subprocess
import time

import pytest

if str(ROOT / "tests") not in sys.path:  # `harness` is imported as a top-level package
    sys.path.insert(0, str(ROOT / "tests"))

from harness import config as harness_config  # noqa: E402  (stdlib only, no torch/comfy)

REQUIRE_COMFY = os.environ.get("SVDQ_REQUIRE_COMFY") == "1"
_TIMINGS = {}  # filled by tests through the comfy_timings fixture, printed at the end
_SERVER = []   # the session ComfyUI server, once the comfy_server fixture started it


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "comfy: needs the ComfyUI venv/tree (scripts/setup_comfyui.sh); slow")
    config.addinivalue_line("markers", "browser: the real ComfyUI frontend in Chromium (tests/browser); slow")


def _cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # get_closest_marker, not `in item.keywords`: keywords also hold path parts, and every test
    # under tests/gpu/ (the CPU fallback tests too) would match "gpu".
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip_gpu)
    reason = harness_config.comfyui_missing_reason()
    if reason and not REQUIRE_COMFY:  # with SVDQ_REQUIRE_COMFY=1 the comfy_server fixture fails instead
        skip_comfy = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker("comfy"):
                item.add_marker(skip_comfy)


def _skip_or_fail(reason):
    if REQUIRE_COMFY:
        pytest.fail(f"SVDQ_REQUIRE_COMFY=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _setup_problem():
    """Why the ComfyUI venv/tree cannot run a server, or None."""
    reason = harness_config.comfyui_missing_reason()
    if reason:
        return reason
    py = harness_config.venv_python()
    mods = "aiohttp av transformers comfyui_frontend_package requests torch torchvision safetensors"
    check = f"import importlib.util as u, sys; m=[x for x in {mods.split()!r} if u.find_spec(x) is None]; print(*m); sys.exit(bool(m))"
    proc = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"{py} lacks {proc.stdout.strip() or proc.stderr.strip()[-300:]} (run scripts/setup_comfyui.sh)"
    return None


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI imported into the test process (tests/comfy_inprocess.py), for in-process tests."""
    import comfy_inprocess as ci
    ci.import_comfy()
    return ci


@pytest.fixture(scope="session")
def comfy_timings():
    return _TIMINGS


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server for the session, with the tiny models and this repo as a custom node."""
    problem = _setup_problem()
    if problem:
        _skip_or_fail(problem)
    from harness.comfy_server import ComfyServer
    from harness.tiny_models import ensure_tiny_models

    srv = ComfyServer(base_dir=tmp_path_factory.mktemp("comfyui_base"))
    t0 = time.perf_counter()
    ensure_tiny_models(srv.models_dir)
    _TIMINGS["tiny models ready (s)"] = round(time.perf_counter() - t0, 1)
    srv.start()
    _TIMINGS["server start (s)"] = round(srv.startup_seconds, 1)
    _SERVER.append(srv)
    yield srv
    _SERVER.clear()
    _TIMINGS["server peak RSS (MB)"] = round(srv.peak_rss_mb() or 0)
    srv.stop()


def _saved_models(srv) -> set:
    folder = srv.models_dir / "svdquant"
    return set(folder.iterdir()) if folder.is_dir() else set()


@pytest.fixture(scope="module", autouse=True)
def _drop_saved_models_after_module():
    """Delete the 4-bit files (and unfinished .partial folders) a test module saved on the session
    server once the module is done: a tiny FLUX one is ~0.4 GB, and a dozen modules' worth filled
    a CI machine's disk. Tests that want a saved file make their own when none is there."""
    before = _saved_models(_SERVER[0]) if _SERVER else set()
    yield
    if _SERVER:
        for path in _saved_models(_SERVER[0]) - before:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _free_disk_lines(config) -> list:
    """Free disk where the tests write (basetemp, tiny-model cache): an out-of-space run names it."""
    lines = []
    for label, path in (("basetemp", config.option.basetemp or os.environ.get("TMPDIR") or "/tmp"),
                        ("tiny-model cache", harness_config.tiny_models_cache())):
        probe = pathlib.Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        lines.append(f"{'free disk at ' + label:40s} {shutil.disk_usage(probe).free / 2**30:.1f} GiB ({path})")
    return lines


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    srv = getattr(item, "funcargs", {}).get("comfy_server")
    if rep.failed and srv is not None:
        rep.sections.append(("ComfyUI server log (tail)", srv.log_tail(60)))


def pytest_terminal_summary(terminalreporter, config):
    terminalreporter.section("Disk")
    for line in _free_disk_lines(config):
        terminalreporter.write_line(line)
    if _TIMINGS:
        terminalreporter.section("ComfyUI harness timings")
        for k, v in _TIMINGS.items():
            terminalreporter.write_line(f"{k:40s} {v}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        terminalreporter.write_line(f"{'pytest process peak RSS (MB)':40s} {round(rss)}")
