"""Builds the drag-and-drop workflows in this folder (ComfyUI frontend / litegraph format).

Each workflow is a compact spec below: nodes with readable keys, widget values by input
name, links as `"input": ("node_key", output_index)`. The UI layout (which inputs are
widgets and in what order, where control_after_generate sits, output slots and types)
comes from a running server's /object_info, so the JSON matches what the frontend itself
would save for these nodes.

    python workflows/build_workflows.py                        # starts a ComfyUI server (tests/harness)
    python workflows/build_workflows.py --url http://127.0.0.1:8188
    python workflows/build_workflows.py --object-info info.json
    python workflows/build_workflows.py --check ...             # compare with the files, write nothing

The importable part (`build_all(object_info)`) needs only the standard library.
"""
import argparse
import json
import pathlib
import sys
import urllib.request
import uuid

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

PACK_CNR_ID = "comfyui-svdquant"  # pyproject [project] name
PACK_VERSION = "0.1.0"
CORE_VERSION = "0.3.75"
FRONTEND_VERSION = "1.32.9"

# Frontend-only node types: no /object_info entry, never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# What a user downloads (properties.models lets the frontend offer the download of a missing file).
MODELS = {
    "v1-5-pruned-emaonly.safetensors": (
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors",
        "checkpoints"),
    "sd_xl_base_1.0.safetensors": (
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
        "checkpoints"),
    "flux1-dev.safetensors": (
        "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors", "diffusion_models"),
    "clip_l.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors", "text_encoders"),
    "t5xxl_fp16.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "text_encoders"),
    "ae.safetensors": (
        "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
        "vae"),
}

GREEN = {"color": "#232", "bgcolor": "#353"}  # the frontend's positive / negative prompt colours
RED = {"color": "#322", "bgcolor": "#533"}

# Calibration prompts: one per calibration sample (cycled), varied subjects and styles.
CALIBRATION_PROMPTS = "\n".join([
    "a photograph of a red fox sitting in fresh snow, morning light, shallow depth of field",
    "a busy street market in a coastal town at dusk, lanterns, people, detailed, 35mm photo",
    "an oil painting of a lighthouse on a cliff during a storm, dramatic clouds",
    "a close-up studio portrait of an elderly man with a white beard, soft light, high detail",
])


def node(type_, widgets=None, links=None, title=None, controls=None, style=None, size=None):
    return {"type": type_, "widgets": dict(widgets or {}), "links": dict(links or {}), "title": title,
            "controls": dict(controls or {}), "style": style or {}, "size": size}


def note(text, size=(440, 360)):
    return {"type": "MarkdownNote", "text": text, "size": size}


# ---------------------------------------------------------------------------- specs
SD15 = dict(family="sd15", ckpt="v1-5-pruned-emaonly.safetensors", size=512, steps=20, cfg=7.0,
            sampler="euler", scheduler="normal",
            positive="a photograph of an astronaut riding a horse on a beach at sunset, highly detailed",
            negative="blurry, low quality, watermark, text, deformed")
SDXL = dict(family="sdxl", ckpt="sd_xl_base_1.0.safetensors", size=1024, steps=25, cfg=7.0,
            sampler="dpmpp_2m", scheduler="karras",
            positive="a cozy cabin in a snowy pine forest at night, warm light in the windows, northern lights, "
                     "highly detailed photograph",
            negative="blurry, low quality, watermark, text, deformed")
FLUX = dict(family="flux", unet="flux1-dev.safetensors", size=1024, steps=28, guidance=3.5,
            sampler="euler", scheduler="simple",
            positive="a red vintage bicycle leaning against a blue wooden door in a sunny mediterranean alley, "
                     "flowers in pots, photograph")

SEED = 42


def q4_name(prefix):
    return f"svdquant/{prefix}_00001.safetensors"


def prefix_of(source_file):
    return source_file.rsplit(".safetensors", 1)[0] + "_svdq_int4"


def _calibrate(fam, model_link, pos_link, neg_link, clip_link, cfg, scheduler):
    src = fam.get("ckpt") or fam["unet"]
    return node("SVDQuantCalibrateQuantize", links={
        "model": model_link, "positive": pos_link, "negative": neg_link, "rank_policy": ("ranks", 0),
        "clip": clip_link,
    }, widgets={
        # The node's defaults, except: the family's guidance / scheduler / native resolution, and save.
        "calibration_samples": 4, "steps": 8, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler,
        "seed": 0, "width": fam["size"], "height": fam["size"], "rank": 32, "smoothing": "search",
        "lowrank_iters": 1, "skip_layers": "", "save": True, "filename_prefix": prefix_of(src),
        "prompts": CALIBRATION_PROMPTS,
    }, controls={"seed": "fixed"}, size=(360, 660))


def _tail(fam, model_link, pos, neg, latent_type, cfg, prefix):
    """Latent → KSampler → VAEDecode → SaveImage (shared by all six)."""
    return {
        "latent": node(latent_type, widgets={"width": fam["size"], "height": fam["size"], "batch_size": 1}),
        "sampler": node("KSampler", links={"model": model_link, "positive": pos, "negative": neg,
                                           "latent_image": ("latent", 0)},
                        widgets={"seed": SEED, "steps": fam["steps"], "cfg": cfg, "sampler_name": fam["sampler"],
                                 "scheduler": fam["scheduler"], "denoise": 1.0},
                        controls={"seed": "fixed"}),
        "decode": node("VAEDecode", links={"samples": ("sampler", 0), "vae": fam["vae_link"]}),
        "save": node("SaveImage", links={"images": ("decode", 0)}, widgets={"filename_prefix": prefix},
                     size=(512, 560)),
    }


def _ckpt_text(fam):
    return {
        "ckpt": node("CheckpointLoaderSimple", widgets={"ckpt_name": fam["ckpt"]}),
        "positive": node("CLIPTextEncode", links={"clip": ("ckpt", 1)}, widgets={"text": fam["positive"]},
                         title="CLIP Text Encode (Positive Prompt)", style=GREEN, size=(400, 200)),
        "negative": node("CLIPTextEncode", links={"clip": ("ckpt", 1)}, widgets={"text": fam["negative"]},
                         title="CLIP Text Encode (Negative Prompt)", style=RED, size=(400, 200)),
    }


def _flux_text():
    return {
        "clip": node("DualCLIPLoader", widgets={"clip_name1": "clip_l.safetensors",
                                                "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                "device": "default"}),
        "vae": node("VAELoader", widgets={"vae_name": "ae.safetensors"}),
        "positive": node("CLIPTextEncode", links={"clip": ("clip", 0)}, widgets={"text": FLUX["positive"]},
                         title="CLIP Text Encode (Positive Prompt)", style=GREEN, size=(400, 200)),
        "guidance": node("FluxGuidance", links={"conditioning": ("positive", 0)},
                         widgets={"guidance": FLUX["guidance"]}),
        # FLUX dev is guidance-distilled (cfg 1): the negative is not used; zeros cost no T5 encode.
        "negative": node("ConditioningZeroOut", links={"conditioning": ("positive", 0)}, style=RED),
    }


NOTE_QUANT = """## {title}: quantize to 4 bits (SVDQuant)

1. Put {files}.
2. Queue. **Calibrate & Quantize** runs {samples} short sampler passes (one per line of its
   `prompts`), quantizes every eligible linear layer to 4 bits (smoothing + 16-bit low-rank
   branch + INT4 residual) and saves the result to
   `models/svdquant/{prefix}_00001.safetensors` (a counter, never overwrites).
3. The KSampler then samples the **4-bit** model. *Preview as Text* shows the per-layer report.

**Low-Rank Rank Selector** is connected, so the rank widget of Calibrate & Quantize is ignored:
switch its mode to *size budget* or *error budget* to spend the rank where it helps most.
Smoothing `search` is slower but more accurate than `off`. Seeds are `fixed`, so re-queueing
reuses the quantized model instead of quantizing again.

Next: open `{family}_generate_4bit.json` to load the saved file.
"""

NOTE_GEN = """## {title}: generate with the 4-bit model

**Load SVDQuant Model** reads a file made by `{family}_quantize.json` from `models/svdquant/`
(or `models/diffusion_models/`). Pick yours in `model_name`.

Text encoders and VAE are the stock ones: {files}.

`family` = {family} refuses a file of another model family; `compute_dtype` auto follows
ComfyUI's choice for your device. With the same prompt and seed, this reproduces the image of
the quantize workflow.
"""


def _files_ckpt(fam, subject):
    return f"`{fam['ckpt']}` in `models/checkpoints/`" + (f" ({subject})" if subject else "")


FLUX_FILES = ("`clip_l.safetensors` and `t5xxl_fp16.safetensors` in `models/text_encoders/`, "
              "`ae.safetensors` in `models/vae/`")


def spec_ckpt_quantize(fam, title):
    nodes = {"note": note(NOTE_QUANT.format(title=title, files=_files_ckpt(fam, ""), samples=4,
                                           prefix=prefix_of(fam["ckpt"]), family=fam["family"]))}
    nodes.update(_ckpt_text(fam))
    nodes["ranks"] = node("SVDQuantRankSelector", widgets={"mode": "fixed", "rank": 32, "error_budget": 0.05,
                                                          "max_rank": 128})
    nodes["quantize"] = _calibrate(fam, ("ckpt", 0), ("positive", 0), ("negative", 0), ("ckpt", 1),
                                   cfg=4.0, scheduler="normal")
    nodes["report"] = node("PreviewAny", links={"source": ("quantize", 1)}, size=(420, 300))
    nodes.update(_tail(dict(fam, vae_link=("ckpt", 2)), ("quantize", 0), ("positive", 0), ("negative", 0),
                       "EmptyLatentImage", fam["cfg"], f"svdquant/{fam['family']}_4bit"))
    return nodes


def spec_ckpt_generate(fam, title):
    nodes = {"note": note(NOTE_GEN.format(title=title, family=fam["family"],
                                          files=_files_ckpt(fam, "only its CLIP and VAE are used")),
                          size=(440, 280))}
    nodes["q4"] = node("SVDQuantLoadModel", widgets={"model_name": q4_name(prefix_of(fam["ckpt"])),
                                                     "family": fam["family"], "compute_dtype": "auto",
                                                     "device": "default"}, size=(400, 154))
    nodes.update(_ckpt_text(fam))
    nodes.update(_tail(dict(fam, vae_link=("ckpt", 2)), ("q4", 0), ("positive", 0), ("negative", 0),
                       "EmptyLatentImage", fam["cfg"], f"svdquant/{fam['family']}_4bit_loaded"))
    return nodes


def spec_flux_quantize():
    fam = dict(FLUX, vae_link=("vae", 0))
    files = f"`{FLUX['unet']}` in `models/diffusion_models/`, " + FLUX_FILES
    nodes = {"note": note(NOTE_QUANT.format(title="FLUX.1 dev", files=files, samples=4,
                                           prefix=prefix_of(FLUX["unet"]), family="flux"))}
    nodes["unet"] = node("UNETLoader", widgets={"unet_name": FLUX["unet"], "weight_dtype": "default"})
    nodes.update(_flux_text())
    nodes["ranks"] = node("SVDQuantRankSelector", widgets={"mode": "fixed", "rank": 32, "error_budget": 0.05,
                                                          "max_rank": 128})
    nodes["quantize"] = _calibrate(fam, ("unet", 0), ("guidance", 0), ("negative", 0), ("clip", 0),
                                   cfg=1.0, scheduler="simple")
    nodes["report"] = node("PreviewAny", links={"source": ("quantize", 1)}, size=(420, 300))
    nodes.update(_tail(fam, ("quantize", 0), ("guidance", 0), ("negative", 0), "EmptySD3LatentImage", 1.0,
                       "svdquant/flux_4bit"))
    return nodes


def spec_flux_generate():
    fam = dict(FLUX, vae_link=("vae", 0))
    nodes = {"note": note(NOTE_GEN.format(title="FLUX.1 dev", family="flux", files=FLUX_FILES), size=(440, 280))}
    nodes["q4"] = node("SVDQuantLoadModel", widgets={"model_name": q4_name(prefix_of(FLUX["unet"])),
                                                     "family": "flux", "compute_dtype": "auto",
                                                     "device": "default"}, size=(400, 154))
    nodes.update(_flux_text())
    nodes.update(_tail(fam, ("q4", 0), ("guidance", 0), ("negative", 0), "EmptySD3LatentImage", 1.0,
                       "svdquant/flux_4bit_loaded"))
    return nodes


SPECS = {
    "sd15_quantize.json": lambda: spec_ckpt_quantize(SD15, "SD 1.5"),
    "sd15_generate_4bit.json": lambda: spec_ckpt_generate(SD15, "SD 1.5"),
    "sdxl_quantize.json": lambda: spec_ckpt_quantize(SDXL, "SDXL"),
    "sdxl_generate_4bit.json": lambda: spec_ckpt_generate(SDXL, "SDXL"),
    "flux_quantize.json": spec_flux_quantize,
    "flux_generate_4bit.json": spec_flux_generate,
}


# ---------------------------------------------------------------------------- layout from /object_info
def input_slots(info: dict):
    """[(name, type, options, optional, is_widget)] in the frontend's order (required, then optional)."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            is_combo = isinstance(typ, list) or typ == "COMBO"
            is_widget = (is_combo or typ in ("INT", "FLOAT", "STRING", "BOOLEAN")) and not opts.get("forceInput")
            out.append((name, "COMBO" if is_combo else typ, opts, section == "optional", is_widget))
    return out


def has_control(typ, name, opts) -> bool:
    """The frontend adds a control_after_generate widget after such an INT widget."""
    return typ == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")) is True


def _default(typ, spec_opts, raw_type):
    if "default" in spec_opts:
        return spec_opts["default"]
    if typ == "COMBO":
        options = raw_type if isinstance(raw_type, list) else spec_opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[typ]


def _depths(spec):
    depth = {}

    def d(key):
        if key not in depth:
            n = spec[key]
            depth[key] = 1 + max((d(src) for src, _ in n.get("links", {}).values()), default=-1)
        return depth[key]
    for k in spec:
        d(k)
    return depth


def build(name: str, spec: dict, object_info: dict) -> dict:
    keys = list(spec)
    ids = {k: i + 1 for i, k in enumerate(keys)}
    depth = _depths(spec)
    # execution order: by depth, then spec order (what the frontend's computeExecutionOrder gives here)
    order = {k: i for i, k in enumerate(sorted(keys, key=lambda k: (depth[k], keys.index(k))))}
    links, nodes, out_links = [], [], {}
    # links: numbered in spec order of the consumers
    for k in keys:
        n = spec[k]
        if n["type"] in VIRTUAL_NODES:
            continue
        info = object_info[n["type"]]
        slots = [s for s in input_slots(info) if not s[4]]
        slot_index = {s[0]: i for i, s in enumerate(slots)}
        for inp, (src, out_i) in n["links"].items():
            if inp not in slot_index:
                raise KeyError(f"{name}: {n['type']} has no linkable input {inp!r}")
            src_type = object_info[spec[src]["type"]]["output"][out_i]
            want = slots[slot_index[inp]][1]
            if want != "*" and src_type != want:
                raise TypeError(f"{name}: {src}[{out_i}] is {src_type}, {k}.{inp} wants {want}")
            lid = len(links) + 1
            links.append([lid, ids[src], out_i, ids[k], slot_index[inp], src_type])
            out_links.setdefault((src, out_i), []).append(lid)

    col_y = {}
    for k in keys:
        n = spec[k]
        if n["type"] == "MarkdownNote":
            col, size = -1, list(n["size"])
            entry = {"id": ids[k], "type": "MarkdownNote", "pos": None, "size": size, "flags": {},
                     "order": order[k], "mode": 0, "inputs": [], "outputs": [], "title": "How to use",
                     "properties": {}, "widgets_values": [n["text"]], "color": "#432", "bgcolor": "#653"}
        else:
            info = object_info[n["type"]]
            col = depth[k]
            inputs, widgets = [], []
            unknown = set(n["widgets"]) | set(n["links"]) | set(n["controls"])
            for (inp, typ, opts, optional, is_widget), raw in zip(input_slots(info), _raw_types(info)):
                unknown.discard(inp)
                if not is_widget:
                    link = None
                    if inp in n["links"]:
                        link = next(l[0] for l in links if l[3] == ids[k] and
                                    l[4] == len(inputs))
                    slot = {"name": inp, "type": typ, "link": link}
                    if optional:
                        slot["shape"] = 7
                    inputs.append(slot)
                    continue
                widgets.append(n["widgets"].get(inp, _default(typ, opts, raw)))
                if has_control(typ, inp, opts):
                    widgets.append(n["controls"].get(inp, "fixed"))
            if unknown:
                raise KeyError(f"{name}: {n['type']} has no input(s) {sorted(unknown)}")
            outputs = []
            for i, (otype, oname) in enumerate(zip(info["output"], info.get("output_name") or info["output"])):
                outputs.append({"name": oname, "type": otype, "links": out_links.get((k, i), []), "slot_index": i})
            n_widgets = len(widgets)
            multiline = any(s[2].get("multiline") for s in input_slots(info) if s[4])
            size = list(n["size"] or (315 if n_widgets else 225,
                                      26 + max(len(inputs), len(outputs), 1) * 22 + n_widgets * 26
                                      + (90 if multiline else 0)))
            props = {"Node name for S&R": n["type"]}
            if info.get("python_module", "").startswith("custom_nodes"):
                props.update({"cnr_id": PACK_CNR_ID, "ver": PACK_VERSION})
            else:
                props.update({"cnr_id": "comfy-core", "ver": CORE_VERSION})
            models = [{"name": v, "url": MODELS[v][0], "directory": MODELS[v][1]}
                      for v in n["widgets"].values() if isinstance(v, str) and v in MODELS]
            if models:
                props["models"] = models
            entry = {"id": ids[k], "type": n["type"], "pos": None, "size": size, "flags": {},
                     "order": order[k], "mode": 0, "inputs": inputs, "outputs": outputs}
            if n["title"]:
                entry["title"] = n["title"]
            entry["properties"] = props
            entry["widgets_values"] = widgets
            entry.update(n["style"])
        # layout: one column per depth, stacked
        x = 40 + (col + 1) * 460 if col >= 0 else -440
        y = col_y.get(col, 40)
        entry["pos"] = [x, y]
        col_y[col] = y + entry["size"][1] + 70
        nodes.append(entry)

    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-svdquant/workflows/{name}")),
        "revision": 0,
        "last_node_id": len(keys),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [480, 80]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def _raw_types(info):
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [info["input"][s][n][0] for s in ("required", "optional") for n in order.get(s, [])]


def build_all(object_info: dict) -> dict:
    return {name: build(name, make(), object_info) for name, make in SPECS.items()}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- CLI
def _object_info(args) -> dict:
    if args.object_info:
        return json.loads(pathlib.Path(args.object_info).read_text())
    if args.url:
        with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=120) as r:
            return json.loads(r.read())
    sys.path.insert(0, str(REPO / "tests"))
    from harness.comfy_server import ComfyServer  # stdlib only; runs ComfyUI under its venv
    with ComfyServer() as srv:
        if srv.pack_status() != "loaded":
            raise SystemExit(f"the pack did not load in ComfyUI:\n{srv.pack_import_error()}")
        return srv.object_info()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running ComfyUI server with this pack")
    ap.add_argument("--object-info", help="a saved /object_info JSON")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--check", action="store_true", help="exit 1 if a file differs from what would be written")
    args = ap.parse_args(argv)
    info = _object_info(args)
    out = pathlib.Path(args.out)
    stale = []
    for name, wf in build_all(info).items():
        path = out / name
        text = dumps(wf)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
            continue
        path.write_text(text)
        print(f"wrote {path} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)")
    if stale:
        print("out of date:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
