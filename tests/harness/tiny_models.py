"""Tiny random-weight models in the layouts ComfyUI's own loaders detect.

The build (tiny_build.py) runs in a subprocess under ComfyUI's Python, so this
module imports neither torch nor comfy. Files are built once per VERSION into a
cache (default .comfyui/tiny_models/<VERSION>/) and then symlinked into any
models dir: the FLUX file alone is 1 GB and takes ~12 s to build.
"""
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import time

from . import config

# Bump when tiny_build.py changes what it writes: old caches are then ignored.
VERSION = "v2"
SEED = 0

# <models subfolder>/<file> -> what ComfyUI detects it as (the build asserts it).
FILES = {
    "checkpoints/tiny_sd15.safetensors": "SD15 (CheckpointLoaderSimple: UNet + TAESD + CLIP-L stub)",
    "checkpoints/tiny_sdxl.safetensors": "SDXL (CheckpointLoaderSimple: UNet + TAESD + CLIP-L/G stubs)",
    "diffusion_models/tiny_sd15_unet.safetensors": "SD15 (UNETLoader)",
    "diffusion_models/tiny_sdxl_unet.safetensors": "SDXL (UNETLoader)",
    "diffusion_models/tiny_flux_unet.safetensors": "Flux dev, hidden 3072, 1 double + 1 single block (UNETLoader)",
    "text_encoders/tiny_clip_l.safetensors": "CLIP-L stub (CLIPLoader / DualCLIPLoader)",
    "text_encoders/tiny_clip_g.safetensors": "CLIP-G stub (DualCLIPLoader sdxl)",
    "text_encoders/tiny_t5xxl_stub.safetensors": "T5-XXL stub (DualCLIPLoader flux)",
    "vae/tiny_taesd.safetensors": "TAESD, 4 latent channels (SD15/SDXL)",
    "vae/tiny_taef1.safetensors": "TAESD, 16 latent channels (FLUX)",
}


def cache_dir() -> pathlib.Path:
    return config.tiny_models_cache() / VERSION


def manifest(directory=None) -> dict | None:
    """The build report (sizes, params, seconds, peak RSS), or None if not built."""
    path = pathlib.Path(directory or cache_dir()) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _complete(directory: pathlib.Path) -> bool:
    m = manifest(directory)
    return bool(m) and m.get("version") == VERSION and all((directory / f).is_file() for f in FILES)


def build_tiny_models(out_dir=None, python=None, comfyui=None, timeout=900) -> dict:
    """Build every file into out_dir (default: the cache). Returns the manifest."""
    out_dir = pathlib.Path(out_dir or cache_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(python or config.venv_python()), str(pathlib.Path(__file__).with_name("tiny_build.py")),
           "--comfyui", str(comfyui or config.comfyui_path()), "--out", str(out_dir),
           "--seed", str(SEED), "--version", VERSION]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny model build failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = manifest(out_dir)
    report["wall_seconds"] = round(time.perf_counter() - t0, 2)  # includes ComfyUI import (~3 s)
    (out_dir / "manifest.json").write_text(json.dumps(report, indent=1))
    return report


def ensure_cache(**build_kwargs) -> pathlib.Path:
    """Build the cache unless complete. A file lock lets parallel sessions share it."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(directory):
            build_tiny_models(directory, **build_kwargs)
    return directory


def ensure_tiny_models(models_dir, link=True, **build_kwargs) -> dict:
    """Put every tiny model under models_dir/<subfolder>/ and return {relpath: path}.

    Symlinks by default (ComfyUI follows them); link=False copies, for a models
    dir that must outlive the cache."""
    src = ensure_cache(**build_kwargs)
    models_dir = pathlib.Path(models_dir)
    placed = {}
    for rel in FILES:
        dst = models_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            if dst.is_symlink() and os.readlink(dst) == str(src / rel):
                placed[rel] = dst
                continue
            dst.unlink()
        if link:
            dst.symlink_to(src / rel)
        else:
            shutil.copy2(src / rel, dst)
        placed[rel] = dst
    return placed


if __name__ == "__main__":
    # `python -m tests.harness.tiny_models [models_dir]`: build (if needed) and report.
    import sys
    t = time.perf_counter()
    if len(sys.argv) > 1:
        ensure_tiny_models(sys.argv[1])
    else:
        ensure_cache()
    print(json.dumps(manifest(), indent=1))
    print(f"ready in {time.perf_counter() - t:.1f} s (cache: {cache_dir()})")
