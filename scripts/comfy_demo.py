"""Start a real ComfyUI with this pack, run the stock graphs on the tiny models, print timings.

    .venv/bin/python scripts/comfy_demo.py [--graphs sd15,sdxl,flux] [--keep] [--dualclip]

Stdlib + tests/harness only; the server runs under SVDQ_VENV's Python (default .venv).
--keep leaves the base dir (models links, outputs, comfyui.log) for inspection.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from harness import graphs, tiny_models  # noqa: E402
from harness.comfy_server import ComfyServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", default="sd15,sdxl,flux",
                    help="comma list of: sd15 sdxl flux sd15_unet sdxl_unet flux_dualclip")
    ap.add_argument("--dualclip", action="store_true", help="also run FLUX with the full T5 path (~30 s)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    names = a.graphs.split(",") + (["flux_dualclip"] if a.dualclip else [])
    builders = {"sd15": graphs.sd15, "sdxl": graphs.sdxl, "flux": graphs.flux, "sd15_unet": graphs.sd15_unet,
                "sdxl_unet": graphs.sdxl_unet,
                "flux_dualclip": lambda **kw: graphs.flux(text="dualclip", **kw)}

    report = {}
    t0 = time.perf_counter()
    srv = ComfyServer(keep_base_dir=a.keep)
    try:
        tiny_models.ensure_tiny_models(srv.models_dir)
        report["tiny_models_s"] = round(time.perf_counter() - t0, 1)
        srv.start()
        report["server_start_s"] = round(srv.startup_seconds, 1)
        report["node_classes"] = len(srv.object_info())
        report["pack"] = srv.pack_status()
        if report["pack"] == "failed":
            report["pack_error"] = srv.pack_import_error()
        for name in names:
            r = srv.run(builders[name](prefix=f"demo_{name}"), timeout=900)
            report[name] = {"status": r.status, "seconds": round(r.seconds, 2),
                            "images": [str(p) for p in srv.output_images(r)]}
            if not r.ok:
                report[name]["error"] = r.error_text()[:2000]
        report["server_peak_rss_mb"] = round(srv.peak_rss_mb() or 0)
        report["log"] = str(srv.log_path)
    finally:
        srv.stop()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return 0 if all(report[n]["status"] == "success" for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
