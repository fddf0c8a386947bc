"""Workflows inside PNG files, the way ComfyUI shares them.

ComfyUI's SaveImage writes two tEXt chunks: "prompt" (the API prompt, JSON) and "workflow" (the
UI graph, JSON); the frontend loads the "workflow" chunk of any PNG dropped onto the canvas.
json.dumps' ASCII escapes keep both in plain tEXt chunks, as SaveImage does.
"""
import io
import json


def embed(png: bytes, workflow: dict, prompt: dict | None = None, colors: int | None = None) -> bytes:
    """`png` re-encoded with the workflow (and prompt) chunks; `colors` quantizes it to a palette
    of that many colours (screenshots for the docs: a fraction of the size)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    img = Image.open(io.BytesIO(png))
    img = img.convert("RGB")
    if colors:
        img = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    out = io.BytesIO()
    img.save(out, format="PNG", pnginfo=info, optimize=True)
    return out.getvalue()


def read(path) -> dict:
    """{"workflow": dict | None, "prompt": dict | None} from a PNG's text chunks."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        text = dict(getattr(img, "text", {}) or {})
    return {k: json.loads(text[k]) if k in text else None for k in ("workflow", "prompt")}
