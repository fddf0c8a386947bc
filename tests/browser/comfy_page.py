"""The real ComfyUI frontend in headless Chromium, driven the way a user works with it.

The frontend is the `comfyui-frontend-package` that the server serves (ComfyUI 0.3.75 pins
1.32.9). Chromium is Debian's (`apt-get install chromium`), driven by Playwright for Python
through `executable_path` (Playwright's own browser downloads are never used).

What a user does, and what this class does for it:
- drag a workflow file (JSON or PNG) onto the canvas -> `drop_file` (a real `drop` event with
  the file in its DataTransfer; the frontend's own drop handler reads it);
- edit widget values -> `set_widgets`; press *r* after a new model file was saved ->
  `refresh_combos`; press *Run* -> `queue` (the frontend's `app.queuePrompt`, which turns the
  graph into the API prompt itself);
- see dialogs and error toasts -> `problems()` lists every visible one.
"""
import base64
import os
import pathlib
import shutil
import time

CHROMIUM = os.environ.get("SVDQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 2400, "height": 1000}
EXEC_EVENTS = ("execution_start", "execution_success", "execution_error", "execution_interrupted",
               "executed", "execution_cached")


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not pathlib.Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SVDQ_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed in this venv (scripts/setup_comfyui.sh)"
    return None


def launch(playwright):
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


class ComfyPage:
    def __init__(self, page):
        self.page = page
        self.errors = []  # uncaught page exceptions

    @classmethod
    def open(cls, browser, url, timeout_s=120):
        """A fresh page on the server's UI, ready once `window.app` has a graph."""
        page = browser.new_page(viewport=VIEWPORT)
        # The "Nodes 2.0" banner is a one-time notice; with it dismissed screenshots show the canvas.
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self = cls(page)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=timeout_s * 1000)
        page.evaluate("""(names) => {
            const api = window.comfyAPI.api.api;
            window.__svdq = {events: []};
            for (const n of names) api.addEventListener(n, (e) => window.__svdq.events.push([n, e.detail]));
        }""", list(EXEC_EVENTS))
        self.close_dialogs()  # anything a first visit opens (e.g. the template browser)
        return self

    # -- what the user sees ----------------------------------------------
    def problems(self) -> list:
        """Texts of every visible dialog and error/warning toast."""
        return self.page.evaluate("""() => {
            const seen = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
            const out = [];
            for (const d of document.querySelectorAll('.p-dialog')) if (seen(d)) out.push('dialog: ' + d.innerText.trim());
            for (const t of document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn'))
                if (seen(t)) out.push('toast: ' + t.innerText.trim());
            return out;
        }""")

    def close_dialogs(self):
        self.page.evaluate("""() => { for (const b of document.querySelectorAll('.p-dialog .p-dialog-close-button')) b.click(); }""")
        self.page.wait_for_function("() => !document.querySelector('.p-dialog')", timeout=10000)

    def node_types(self) -> list:
        return self.page.evaluate("() => window.app.graph.nodes.map((n) => n.type)")

    def unknown_node_types(self) -> list:
        """Node types in the graph that the frontend has no definition for."""
        return self.page.evaluate("""() => window.app.graph.nodes
            .filter((n) => !(n.type in window.LiteGraph.registered_node_types)).map((n) => n.type)""")

    def nodes_with_errors(self) -> dict:
        """The server's node_errors from the last queue, as the frontend holds them."""
        return self.page.evaluate("() => window.app.lastNodeErrors || {}")

    def serialize(self) -> dict:
        return self.page.evaluate("() => window.app.graph.serialize()")

    def graph_to_prompt(self) -> dict:
        """{"workflow": UI json, "output": API prompt}: what the frontend sends on Run."""
        return self.page.evaluate("async () => JSON.parse(JSON.stringify(await window.app.graphToPrompt()))")

    def command(self, command_id):
        """Run a frontend command (what a menu entry or shortcut does)."""
        self.page.evaluate("async (id) => { await window.app.extensionManager.command.execute(id); }", command_id)

    def screenshot(self, path=None) -> bytes:
        """The whole graph, fitted to the window, in focus mode (no menus or panels over it)."""
        self.page.evaluate("() => window.app.canvas.deselectAll()")
        self.command("Comfy.Canvas.FitView")
        self.command("Workspace.ToggleFocusMode")
        try:
            self.page.wait_for_timeout(600)  # the fit animation
            # Cut to the nodes' bounding box (plus a margin): the canvas around it is empty.
            clip = self.page.evaluate("""() => {
                const c = window.app.canvas, ds = c.ds, r = c.canvas.getBoundingClientRect();
                c.render_info = false;
                let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                for (const n of window.app.graph.nodes) {
                    const [x, y, w, h] = n.boundingRect;
                    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
                }
                c.setDirty(true, true); c.draw(true, true);
                const m = 16, sx = (v) => (v + ds.offset[0]) * ds.scale + r.left, sy = (v) => (v + ds.offset[1]) * ds.scale + r.top;
                const left = Math.max(r.left, sx(x0) - m), top = Math.max(r.top, sy(y0) - m);
                return {x: left, y: top, width: Math.min(r.right, sx(x1) + m) - left, height: Math.min(r.bottom, sy(y1) + m) - top};
            }""")
            return self.page.screenshot(path=str(path) if path else None, clip=clip)
        finally:
            self.command("Workspace.ToggleFocusMode")

    # -- what the user does ----------------------------------------------
    def drop_file(self, name, data: bytes, mime, timeout_s=60):
        """Drag a file onto the canvas; returns when the frontend has loaded a new graph from it."""
        before = self.page.evaluate("() => { window.app.graph.clear(); return window.app.graph.nodes.length; }")
        self.page.evaluate("""([name, b64, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: mime}));
            const canvas = document.querySelector('#graph-canvas');
            for (const type of ['dragenter', 'dragover', 'drop'])
                canvas.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", [name, base64.b64encode(data).decode(), mime])
        self.page.wait_for_function(
            "(n) => window.app.graph.nodes.length > n && !window.app.configuringGraph"
            " || document.querySelector('.p-dialog, .p-toast-message-error')", arg=before, timeout=timeout_s * 1000)
        self.page.wait_for_timeout(500)  # afterConfigureGraph callbacks, missing-model checks

    def drop_workflow(self, path):
        path = pathlib.Path(path)
        mime = "image/png" if path.suffix == ".png" else "application/json"
        self.drop_file(path.name, path.read_bytes(), mime)

    def set_widgets(self, overrides: dict) -> list:
        """{node type: {widget name: value}} on every node of that type; returns what it could not set."""
        return self.page.evaluate("""(overrides) => {
            const missing = [];
            for (const [type, values] of Object.entries(overrides)) {
                const nodes = window.app.graph.nodes.filter((n) => n.type === type);
                if (!nodes.length) missing.push(type);
                for (const node of nodes) for (const [name, value] of Object.entries(values)) {
                    const w = (node.widgets || []).find((w) => w.name === name);
                    if (!w) { missing.push(type + '.' + name); continue; }
                    w.value = value;
                    w.callback?.(w.value, window.app.canvas, node);
                }
            }
            window.app.graph.setDirtyCanvas(true, true);
            return missing;
        }""", overrides)

    def widget_value(self, node_type, name):
        return self.page.evaluate("""([type, name]) => {
            const n = window.app.graph.nodes.find((n) => n.type === type);
            return n ? n.widgets.find((w) => w.name === name)?.value : undefined;
        }""", [node_type, name])

    def zero_text_conditioning(self) -> int:
        """Put a ConditioningZeroOut after every CLIPTextEncode (the tiny text encoders are stubs whose
        output is garbage; see harness/graphs.py). Returns how many it inserted."""
        return self.page.evaluate("""() => {
            const g = window.app.graph;
            const link = (id) => (g.links instanceof Map ? g.links.get(id) : g.links[id]);
            let count = 0;
            for (const enc of g.nodes.filter((n) => n.type === 'CLIPTextEncode')) {
                const targets = (enc.outputs[0].links || []).map(link).map((l) => [g.getNodeById(l.target_id), l.target_slot]);
                const zero = window.LiteGraph.createNode('ConditioningZeroOut');
                zero.pos = [enc.pos[0] + 40, enc.pos[1] + enc.size[1] + 40];
                g.add(zero);
                enc.connect(0, zero, 0);
                for (const [node, slot] of targets) zero.connect(0, node, slot);
                count++;
            }
            g.setDirtyCanvas(true, true);
            return count;
        }""")

    def refresh_combos(self):
        """The *r* key: re-read the model lists from the server."""
        self.page.evaluate("async () => { await window.app.refreshComboInNodes(); }")

    def events(self) -> list:
        return self.page.evaluate("() => window.__svdq.events")

    def queue(self, timeout_s=60) -> str | None:
        """Press Run; returns the prompt id the server runs, or None when nothing was queued
        (then `problems()` / `nodes_with_errors()` say why)."""
        n0 = len(self.events())
        self.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        if self.nodes_with_errors() or self.problems():
            return None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, detail in self.events()[n0:]:
                if name == "execution_start":
                    return detail["prompt_id"]
            self.page.wait_for_timeout(200)
        return None

    def wait_finished(self, prompt_id, timeout_s) -> tuple:
        """(event name, detail) of how the run ended as the frontend heard it over its websocket."""
        done = ("execution_success", "execution_error", "execution_interrupted")
        self.page.wait_for_function(
            """([id, done]) => window.__svdq.events.some(([n, d]) => done.includes(n) && d && d.prompt_id === id)""",
            arg=[prompt_id, list(done)], timeout=timeout_s * 1000, polling=500)
        for name, detail in self.events():
            if name in done and detail and detail.get("prompt_id") == prompt_id:
                return name, detail
        raise AssertionError("unreachable")

    def executed_images(self, prompt_id) -> list:
        """Images the frontend was told about ('executed' events of this prompt)."""
        out = []
        for name, detail in self.events():
            if name == "executed" and detail.get("prompt_id") == prompt_id:
                out += (detail.get("output") or {}).get("images", [])
        return out
