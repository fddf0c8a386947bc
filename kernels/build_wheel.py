"""Builds the wheel that carries the compiled CUDA library: one command, no `build` package needed.

    python3 kernels/build_wheel.py            # runs kernels/build.sh (all archs), then packs
    python3 kernels/build_wheel.py --no-build # packs the existing kernels/_build/libsvdq_kernels.so

Output: dist/svdquant_kernels-<version>-py3-none-manylinux_2_28_x86_64.whl holding the package
`svdquant_kernels` (library_path() -> the .so). The library has a C ABI and links no libtorch and no
Python, so one wheel serves every Python 3 and every torch version; CUDA's runtime is linked statically
(needs an NVIDIA driver for CUDA 13.0 or newer). kernels/_lib.py finds it after `pip install`.
"""
import base64
import hashlib
import pathlib
import subprocess
import sys
import zipfile

VERSION = "0.1.0"
NAME = "svdquant_kernels"
TAG = "py3-none-manylinux_2_28_x86_64"
HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def _record_line(arcname, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def main():
    if "--no-build" not in sys.argv:
        subprocess.run(["bash", str(HERE / "build.sh")], check=True)
    lib = HERE / "_build" / "libsvdq_kernels.so"
    if not lib.is_file():
        sys.exit(f"{lib} missing: run kernels/build.sh")
    files = {
        f"{NAME}/__init__.py": (
            '"""Compiled SVDQuant W4A4 CUDA kernels (C ABI; see ComfyUI-SVDQuant kernels/csrc/svdq.cu)."""\n'
            "import pathlib\n\n"
            f'__version__ = "{VERSION}"\n\n\n'
            "def library_path() -> str:\n"
            '    return str(pathlib.Path(__file__).with_name("libsvdq_kernels.so"))\n').encode(),
        f"{NAME}/libsvdq_kernels.so": lib.read_bytes(),
    }
    files.update({f"{NAME}/{src.name}": src.read_bytes() for src in sorted((HERE / "csrc").glob("*.cu"))
                  + sorted((HERE / "csrc").glob("*.h"))})
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files[f"{dist_info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        f"Name: {NAME.replace('_', '-')}\nVersion: {VERSION}\n"
        "Summary: SVDQuant W4A4 CUDA kernels (sm_80/86/89/90a/120) behind a C ABI, for ComfyUI-SVDQuant\n"
        "License: Apache-2.0\nRequires-Python: >=3.8\n").encode()
    files[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: ComfyUI-SVDQuant kernels/build_wheel.py\n"
        f"Root-Is-Purelib: false\nTag: {TAG}\n").encode()
    record = [_record_line(k, v) for k, v in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = ROOT / "dist" / f"{NAME}-{VERSION}-{TAG}.whl"
    out.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    print(out)


if __name__ == "__main__":
    main()
