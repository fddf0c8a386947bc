"""The CUDA kernels reach users as a wheel: pip installs it, the pack finds the library in it.

kernels/build_wheel.py packs kernels/_build/libsvdq_kernels.so (built by nvcc on a maintainer's
machine) into `svdquant_kernels-*-py3-none-manylinux_2_28_x86_64.whl`. Here, without nvcc or a
GPU, a stand-in library with the same C ABI entry points (compiled by the system C compiler,
every kernel call returning an error) goes through the same script; the test checks the wheel
`pip install`s and that kernels/_lib.py, with nothing else to find, loads the library from it and
agrees on the ABI version. What the real kernels compute is tested on the GPU (tests/gpu/).
"""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

STAND_IN = r"""
int svdq_abi_version(void) { return ABI; }
const char *svdq_error_string(int code) { (void)code; return "stand-in library: no kernels"; }
int svdq_device_path(int device) { (void)device; return 0; }
int svdq_quant_workspace(int m, int k, int rp, int dev, long long *partials, int *counters)
{ (void)m; (void)k; (void)rp; (void)dev; *partials = 0; *counters = 0; return 0; }
int svdq_quantize_act_lora_down(void) { return 1; }
int svdq_w4a4_gemm(void) { return 1; }
"""


def test_wheel_installs_and_is_found(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in library")
    from comfyui_svdquant.kernels import _lib

    abi = _lib.ABI_VERSION
    # A copy of the kernels folder with the stand-in library where build.sh puts the real one.
    kdir = tmp_path / "repo" / "kernels"
    (kdir / "_build").mkdir(parents=True)
    (kdir / "csrc").mkdir()
    shutil.copy2(ROOT / "kernels" / "build_wheel.py", kdir)
    shutil.copy2(ROOT / "kernels" / "csrc" / "svdq.cu", kdir / "csrc")
    (tmp_path / "stand_in.c").write_text(STAND_IN)
    subprocess.run([cc, "-shared", "-fPIC", f"-DABI={abi}", "-o", str(kdir / "_build" / _lib.LIB_NAME),
                    str(tmp_path / "stand_in.c")], check=True)
    out = subprocess.run([sys.executable, str(kdir / "build_wheel.py"), "--no-build"], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    wheel = pathlib.Path(out)
    assert wheel.is_file() and wheel.name.endswith("-py3-none-manylinux_2_28_x86_64.whl"), out

    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                          "--no-index", "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    # kernels/_lib.py alone (no kernels/_build beside it, no SVDQ_KERNELS_LIB): only the wheel is left.
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy2(ROOT / "kernels" / "_lib.py", probe)
    code = ("import json, _lib; lib = _lib.load(); import svdquant_kernels as w; "
            "print(json.dumps({'loaded': lib is not None, 'error': _lib.load_error(), "
            "'abi': lib.svdq_abi_version() if lib else None, 'path': w.library_path()}))")
    env = {"PYTHONPATH": f"{probe}:{site}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["loaded"] and got["abi"] == abi, got
    assert pathlib.Path(got["path"]).is_relative_to(site), got
