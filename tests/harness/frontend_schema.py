"""Validate UI workflows with the installed ComfyUI frontend's own schema (zod `zComfyWorkflow`).

The frontend (pip package comfyui_frontend_package) validates every workflow it loads with a zod
schema compiled into its bundle. This module cuts that schema's source out of the bundle and runs
it under Node.js with the `zod` npm package (v3): the same checks, without a browser.

Needs: `node` on PATH and a directory whose node_modules holds zod 3 (env SVDQ_ZOD_DIR, e.g. after
`npm install --prefix DIR zod@3`). `problem()` says why it cannot run; tests skip then.
"""
import glob
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

from . import config

START, END = "zNodeId=z.union", ",zComfyWorkflow1="


def frontend_bundle() -> pathlib.Path | None:
    """The frontend's JS file that defines zComfyWorkflow, in the ComfyUI venv."""
    py = config.venv_python()
    venv = py.parent.parent
    for f in glob.glob(str(venv / "lib" / "python*" / "site-packages" / "comfyui_frontend_package" / "static"
                           / "assets" / "*.js")):
        try:
            text = pathlib.Path(f).read_text(errors="replace")
        except OSError:
            continue
        if START in text and END in text and "zComfyWorkflow=" in text:
            return pathlib.Path(f)
    return None


def zod_dir() -> pathlib.Path | None:
    d = os.environ.get("SVDQ_ZOD_DIR")
    if d and (pathlib.Path(d) / "node_modules" / "zod").is_dir():
        return pathlib.Path(d)
    return None


def problem() -> str | None:
    if shutil.which("node") is None:
        return "no node (Node.js) on PATH"
    if zod_dir() is None:
        return "set SVDQ_ZOD_DIR to a directory with node_modules/zod (npm install --prefix DIR zod@3)"
    if frontend_bundle() is None:
        return "no comfyui_frontend_package bundle with zComfyWorkflow in the ComfyUI venv"
    return None


def validate(paths) -> dict:
    """{path: None if valid else the zod issues (list)}."""
    text = frontend_bundle().read_text(errors="replace")
    schema = text[text.index(START):text.index(END)]
    script = ("const {z} = require('zod');\nconst fs = require('fs');\nlet zSubgraphDefinition;\nconst "
              + schema + ";\nconst out = {};\n"
              "for (const f of process.argv.slice(2)) {\n"
              "  const r = zComfyWorkflow.safeParse(JSON.parse(fs.readFileSync(f, 'utf8')));\n"
              "  out[f] = r.success ? null : r.error.issues;\n}\n"
              "console.log(JSON.stringify(out));\n")
    with tempfile.TemporaryDirectory() as tmp:
        js = pathlib.Path(tmp) / "check_workflows.js"
        js.write_text(script)
        env = {**os.environ, "NODE_PATH": str(zod_dir() / "node_modules")}
        proc = subprocess.run(["node", str(js), *map(str, paths)], capture_output=True, text=True, env=env,
                              timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"node failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
