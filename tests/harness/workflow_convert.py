"""ComfyUI UI workflows (what the frontend saves and loads) -> API prompts (what POST /prompt takes).

The UI format stores widget values positionally (`widgets_values`) and links by slot
number; the API format names every input. The mapping needs the node definitions from
/object_info, read the way the frontend reads them:
- inputs in `input_order` (required, then optional); COMBO / INT / FLOAT / STRING / BOOLEAN
  inputs are widgets (unless `forceInput`), every other type is a socket;
- an INT widget with `control_after_generate` (or, when that is unset, named seed or
  noise_seed) is followed by its control value ("fixed", "randomize", ...) in
  widgets_values, which is UI state, not an input;
- a widget converted to an input shows up in the node's `inputs` with a "widget" key and
  takes its value from the link when one is connected.
Frontend-only nodes are resolved away: Note/MarkdownNote are dropped, Reroute passes its
input through, PrimitiveNode's value goes into the widgets it feeds; muted nodes (mode 2)
are dropped and bypassed nodes (mode 4) pass their first input of the requested type through.
Subgraphs / group nodes are not supported (ValueError).

Stdlib only.
"""
import copy

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "mesh_upload")
NOTE_TYPES = {"Note", "MarkdownNote"}
VIRTUAL_TYPES = NOTE_TYPES | {"Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    pass


def input_specs(info: dict) -> list:
    """[{name, type, options, opts, optional, widget, control}] in the frontend's slot/widget order."""
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            raw = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_combo = isinstance(raw, list) or raw == "COMBO"
            typ = "COMBO" if is_combo else raw
            options = raw if isinstance(raw, list) else opts.get("options")
            widget = (is_combo or typ in WIDGET_TYPES) and not opts.get("forceInput", False)
            control = typ == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")) is True
            out.append({"name": name, "type": typ, "options": options, "opts": opts,
                        "optional": section == "optional", "widget": widget, "control": control,
                        "upload": widget and any(opts.get(f) for f in UPLOAD_FLAGS)})
    return out


def widget_values(node: dict, info: dict) -> list:
    """[(spec, value, control_value_or_None)] for every widget of a UI node, from widgets_values."""
    values = node.get("widgets_values")
    specs = [s for s in input_specs(info) if s["widget"]]
    if isinstance(values, dict):  # some custom-node frontends save widgets by name
        return [(s, values[s["name"]], values.get("control_after_generate") if s["control"] else None)
                for s in specs if s["name"] in values]
    values = list(values or [])
    out, i = [], 0
    for s in specs:
        if i >= len(values):
            break
        value, control = values[i], None
        i += 1
        if s["control"] and i < len(values):  # the frontend always saves the control widget's value
            control = values[i]
            i += 1
        if s["upload"] and i < len(values) and isinstance(values[i], str) and s["type"] == "COMBO" \
                and values[i] not in (s["options"] or []):
            i += 1  # the upload button's own value ("image")
        out.append((s, value, control))
    return out


class _Graph:
    def __init__(self, workflow: dict):
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported")
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # serialisation version 1
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = link

    def source(self, link_id, want_type=None, _seen=None):
        """What a link delivers: ("link", node_id, slot), ("value", v) or None (nothing connected)."""
        if link_id is None or link_id not in self.links:
            return None
        _, src_id, slot, _, _, ltype = self.links[link_id][:6]
        seen = _seen or set()
        if src_id in seen:
            raise WorkflowError(f"cycle through node {src_id}")
        seen.add(src_id)
        src = self.nodes.get(src_id)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from missing node {src_id}")
        typ = src.get("type")
        if typ == "Reroute":
            ins = src.get("inputs") or []
            return self.source(ins[0].get("link") if ins else None, want_type or ltype, seen)
        if typ == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if typ in VIRTUAL_TYPES or typ == "GroupNode" or str(typ).startswith("workflow>"):
            raise WorkflowError(f"node {src_id} of type {typ} is not supported")
        mode = src.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            want = want_type or ltype
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and (inp.get("type") == want or want in (None, "*")):
                    return self.source(inp["link"], want, seen)
            return None
        return ("link", src_id, slot)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a UI workflow: {"<id>": {"class_type", "inputs", "_meta": {"title"}}}."""
    g = _Graph(workflow)
    prompt = {}
    for nid, node in g.nodes.items():
        typ = node.get("type")
        if typ in VIRTUAL_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if typ not in object_info:
            raise WorkflowError(f"node {nid}: type {typ!r} is not known to the server (missing custom node?)")
        info = object_info[typ]
        specs = input_specs(info)
        ui_inputs = node.get("inputs") or []
        by_name = {i.get("name"): i for i in ui_inputs}
        sockets = [i for i in ui_inputs if "widget" not in i]
        inputs = {}

        def put(name, src):
            if src is None:
                return False
            inputs[name] = [str(src[1]), src[2]] if src[0] == "link" else src[1]
            return True

        for spec, value, _control in widget_values(node, info):
            ui = by_name.get(spec["name"])
            if ui is not None and ui.get("link") is not None and put(spec["name"], g.source(ui["link"])):
                continue  # widget converted to an input and linked
            inputs[spec["name"]] = value
        socket_specs = [s for s in specs if not s["widget"]]
        for k, spec in enumerate(socket_specs):
            ui = by_name.get(spec["name"])
            if ui is None and k < len(sockets) and not sockets[k].get("name"):
                ui = sockets[k]
            if ui is not None:
                put(spec["name"], g.source(ui.get("link"), spec["type"]))
        prompt[str(nid)] = {"class_type": typ, "inputs": inputs,
                            "_meta": {"title": node.get("title") or info.get("display_name") or typ}}
    return prompt


def set_inputs(prompt: dict, overrides: dict, strict: bool = True) -> dict:
    """Override input values in an API prompt, in place (also returned).

    overrides: {selector: {input_name: value}}, selector = a node id ("12"), a class_type
    ("KSampler": every node of it) or "class_type:title" (nodes of that type and title).
    Links are values too (["3", 0]). strict: a selector that matches nothing, or an input
    name the matched node does not have yet, raises KeyError (catches stale test overrides);
    with strict=False, unknown inputs are added.
    """
    for sel, values in overrides.items():
        if sel in prompt:
            targets = [sel]
        else:
            cls, _, title = sel.partition(":")
            targets = [k for k, n in prompt.items() if n["class_type"] == cls
                       and (not title or n.get("_meta", {}).get("title") == title)]
        if not targets:
            if strict:
                raise KeyError(f"no node matches {sel!r}")
            continue
        for t in targets:
            inputs = prompt[t]["inputs"]
            for name, value in values.items():
                if strict and name not in inputs:
                    raise KeyError(f"node {t} ({prompt[t]['class_type']}) has no input {name!r} set")
                inputs[name] = copy.deepcopy(value)
    return prompt


def find_nodes(prompt: dict, class_type: str) -> list:
    return [k for k, n in prompt.items() if n["class_type"] == class_type]


def check_ui_workflow(workflow: dict, object_info: dict, skip_combo=lambda node_type, name: False) -> list:
    """Problems of a UI workflow against /object_info (empty list = fine): unknown node types and
    input names, widget values out of range / not among the options / of the wrong type, bad
    control_after_generate values, extra or missing widget values, links whose ends disagree.
    skip_combo(node_type, input_name) -> True skips the options check (e.g. model file names)."""
    problems = []
    g = _Graph(workflow)
    for nid, node in g.nodes.items():
        typ = node.get("type")
        where = f"node {nid} ({typ})"
        if typ in NOTE_TYPES or typ in ("Reroute", "PrimitiveNode"):
            continue
        info = object_info.get(typ)
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        specs = input_specs(info)
        names = {s["name"] for s in specs}
        for inp in node.get("inputs") or []:
            if inp.get("name") not in names:
                problems.append(f"{where}: unknown input {inp.get('name')!r}")
        n_outputs = len(info.get("output", []))
        for i, out in enumerate(node.get("outputs") or []):
            if i >= n_outputs:
                problems.append(f"{where}: output slot {i} does not exist")
            elif out.get("type") != info["output"][i]:
                problems.append(f"{where}: output {i} is {info['output'][i]}, workflow says {out.get('type')}")
        widgets = widget_values(node, info)
        expected = sum(1 + s["control"] for s in specs if s["widget"])
        given = node.get("widgets_values")
        if isinstance(given, list) and len(given) != expected and not any(s["upload"] for s in specs):
            problems.append(f"{where}: {len(given)} widget values, the node has {expected} (with controls)")
        for spec, value, control in widgets:
            w = f"{where}.{spec['name']}={value!r}"
            t, o = spec["type"], spec["opts"]
            if spec["control"] and control not in CONTROL_VALUES:
                problems.append(f"{w}: control_after_generate {control!r} not in {CONTROL_VALUES}")
            if t == "COMBO":
                if not skip_combo(typ, spec["name"]) and value not in (spec["options"] or []):
                    problems.append(f"{w}: not among {spec['options']}")
            elif t == "BOOLEAN":
                if not isinstance(value, bool):
                    problems.append(f"{w}: not a boolean")
            elif t == "STRING":
                if not isinstance(value, str):
                    problems.append(f"{w}: not a string")
            elif t in ("INT", "FLOAT"):
                ok_type = isinstance(value, int) if t == "INT" else isinstance(value, (int, float))
                if isinstance(value, bool) or not ok_type:
                    problems.append(f"{w}: not {t}")
                    continue
                if "min" in o and value < o["min"]:
                    problems.append(f"{w}: below min {o['min']}")
                if "max" in o and value > o["max"]:
                    problems.append(f"{w}: above max {o['max']}")
    for lid, link in g.links.items():
        _, src_id, src_slot, dst_id, dst_slot, ltype = link[:6]
        src, dst = g.nodes.get(src_id), g.nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {lid}: missing node {src_id if src is None else dst_id}")
            continue
        outs, ins = src.get("outputs") or [], dst.get("inputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            problems.append(f"link {lid}: not listed on output {src_slot} of node {src_id}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: not on input {dst_slot} of node {dst_id}")
            continue
        want = ins[dst_slot].get("type")
        if src_slot < len(outs) and want not in ("*", outs[src_slot].get("type")):
            problems.append(f"link {lid}: {outs[src_slot].get('type')} into {want} input of node {dst_id}")
        if ltype not in (outs[src_slot].get("type") if src_slot < len(outs) else None, "*"):
            problems.append(f"link {lid}: type {ltype} differs from its output")
    ids = [n["id"] for n in workflow["nodes"]]
    if len(set(ids)) != len(ids):
        problems.append("duplicate node ids")
    if ids and workflow.get("last_node_id", 0) < max(ids):
        problems.append("last_node_id below a node id")
    if g.links and workflow.get("last_link_id", 0) < max(g.links):
        problems.append("last_link_id below a link id")
    return problems
