"""The main job, end to end on a real ComfyUI server with an embedded tiny SD1.5 model:
16-bit image -> Calibrate & Quantize (saves a 4-bit file) -> 4-bit image -> Load SVDQuant Model
-> image again. Prints where everything was written.

Run through scripts/demo.sh (which prepares the venv and the ComfyUI tree first).
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import graphs  # noqa: E402
from harness.comfy_server import ComfyServer  # noqa: E402
from harness.tiny_models import ensure_tiny_models  # noqa: E402

BASE = ROOT / ".comfyui" / "demo"


def calibrate(g, model_ref):
    cond = g.out("zero")
    g.add("quant", "SVDQuantCalibrateQuantize", model=model_ref, positive=cond, negative=cond,
          calibration_samples=2, steps=4, cfg=2.0, sampler_name="euler", scheduler="normal", seed=0,
          width=64, height=64, rank=32, smoothing="search", lowrank_iters=1, skip_layers="",
          save=True, filename_prefix="demo_sd15_svdq_int4")
    return g.out("quant")


def load_4bit(name):
    def source(g):
        g.add("q4", "SVDQuantLoadModel", model_name=f"svdquant/{name}", family="sd15",
              compute_dtype="auto", device="default")
        return g.out("q4")
    return source


def main():
    BASE.mkdir(parents=True, exist_ok=True)
    with ComfyServer(base_dir=BASE, keep_base_dir=True) as srv:
        ensure_tiny_models(srv.models_dir)
        print(f"ComfyUI server up on {srv.url} in {srv.startup_seconds:.1f} s (log: {srv.log_path})")
        if srv.pack_status() != "loaded":
            sys.exit(f"the SVDQuant pack did not load:\n{srv.pack_import_error()}")
        runs = [("16-bit SD1.5", graphs.sd15(prefix="demo_16bit", steps=8)),
                ("Calibrate & Quantize -> 4-bit", graphs.sd15(prefix="demo_4bit", steps=8, model_hook=calibrate))]
        for title, prompt in runs:
            r = srv.run(prompt, timeout=1800)
            if not r.ok:
                sys.exit(f"{title} failed: {r.error_text()}")
            print(f"{title}: {r.seconds:.1f} s -> {srv.output_images(r)[0]}")
            if "quant" in r.outputs:  # the report: layer lines, totals, "saved: <path>", time per phase
                text = r.outputs["quant"]["text"][0]
                saved = graphs.saved_path(text)
                print("\n".join(line for line in text.splitlines()[-3:] if not line.startswith("saved: ")))
        name = pathlib.Path(saved).name
        r = srv.run(graphs.sd15(prefix="demo_loaded", steps=8, model_source=load_4bit(name)), timeout=1800)
        if not r.ok:
            sys.exit(f"Load SVDQuant Model failed: {r.error_text()}")
        print(f"Load SVDQuant Model ({name}): {r.seconds:.1f} s -> {srv.output_images(r)[0]}")
        print(f"4-bit file: {saved}")


if __name__ == "__main__":
    main()
