"""UI -> API conversion (tests/harness/workflow_convert.py) on hand-written graphs; no server needed."""
import pytest

from harness.workflow_convert import WorkflowError, check_ui_workflow, set_inputs, ui_to_api

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"]]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"]},
    "Encode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
               "input_order": {"required": ["text", "clip"]}, "output": ["COND"], "output_name": ["COND"]},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0}]}},
              "input_order": {"required": ["model", "strength"]}, "output": ["MODEL"], "output_name": ["MODEL"]},
    "Sampler": {
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0, "min": 0, "max": 100}],
                               "steps": ["INT", {"default": 20, "min": 1, "max": 50}],
                               "noise": ["INT", {"default": 0, "control_after_generate": True}],
                               "positive": ["COND", {}], "mode": ["COMBO", {"options": ["x", "y"]}],
                               "forced": ["INT", {"forceInput": True}]},
                  "optional": {"flag": ["BOOLEAN", {"default": False}], "extra": ["COND", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "noise", "positive", "mode", "forced"],
                        "optional": ["flag", "extra"]},
        "output": ["LATENT"], "output_name": ["LATENT"]},
}


def node(id_, type_, inputs=(), outputs=(), widgets=(), mode=0, title=None):
    n = {"id": id_, "type": type_, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": 0, "mode": mode,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {},
         "widgets_values": list(widgets)}
    if title:
        n["title"] = title
    return n


def workflow():
    nodes = [
        node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]},
                                   {"name": "CLIP", "type": "CLIP", "links": [2]}], widgets=["a.safetensors"]),
        node(2, "Encode", inputs=[{"name": "clip", "type": "CLIP", "link": 2}],
             outputs=[{"name": "COND", "type": "COND", "links": [5]}], widgets=["a cat"]),
        node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
             outputs=[{"name": "", "type": "MODEL", "links": [3]}]),
        node(4, "Patch", inputs=[{"name": "model", "type": "MODEL", "link": 3}],
             outputs=[{"name": "MODEL", "type": "MODEL", "links": [4]}], widgets=[0.5], mode=4),  # bypassed
        node(5, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [6],
                                          "widget": {"name": "steps"}}], widgets=[7, "fixed"]),
        node(6, "Sampler", title="My sampler", inputs=[
            {"name": "model", "type": "MODEL", "link": 4},
            {"name": "positive", "type": "COND", "link": 5},
            {"name": "forced", "type": "INT", "link": None},
            {"name": "extra", "type": "COND", "shape": 7, "link": None},
            {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 6}],
            outputs=[{"name": "LATENT", "type": "LATENT", "links": []}],
            widgets=[5, "randomize", 20, 9, "increment", "y", True]),
        node(7, "MarkdownNote", widgets=["# hello"]),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 3, 0, 4, 0, "MODEL"], [4, 4, 0, 6, 0, "MODEL"],
             [5, 2, 0, 6, 1, "COND"], [6, 5, 0, 6, 4, "INT"]]
    return {"last_node_id": 7, "last_link_id": 6, "nodes": nodes, "links": links, "version": 0.4}


def test_convert_resolves_widgets_controls_and_virtual_nodes():
    api = ui_to_api(workflow(), INFO)
    assert set(api) == {"1", "2", "6"}  # reroute, primitive, note and the bypassed node are gone
    assert api["1"]["inputs"] == {"name": "a.safetensors"}
    assert api["2"]["inputs"] == {"text": "a cat", "clip": ["1", 1]}
    s = api["6"]
    assert s["_meta"]["title"] == "My sampler"
    # seed and noise are followed by their control values; steps comes from the PrimitiveNode;
    # the bypassed Patch passes the loader's MODEL through the Reroute.
    assert s["inputs"] == {"seed": 5, "steps": 7, "noise": 9, "mode": "y", "flag": True,
                           "model": ["1", 0], "positive": ["2", 0]}


def test_muted_source_drops_the_input():
    wf = workflow()
    wf["nodes"][3]["mode"] = 2  # mute Patch
    api = ui_to_api(wf, INFO)
    assert "model" not in api["6"]["inputs"]


def test_unknown_node_type_is_named():
    wf = workflow()
    wf["nodes"][1]["type"] = "Nope"
    with pytest.raises(WorkflowError, match="Nope"):
        ui_to_api(wf, INFO)


def test_check_reports_bad_values_and_links():
    wf = workflow()
    assert check_ui_workflow(wf, INFO) == []
    wf["nodes"][5]["widgets_values"] = [500, "sometimes", 20, 9, "increment", "z", "yes"]
    wf["links"][4][5] = "MODEL"
    problems = "\n".join(check_ui_workflow(wf, INFO))
    assert "above max 100" in problems
    assert "control_after_generate 'sometimes'" in problems
    assert "not among ['x', 'y']" in problems
    assert "not a boolean" in problems
    assert "link 5: type MODEL" in problems
    wf = workflow()
    wf["nodes"][0]["widgets_values"] = ["c.safetensors"]
    assert check_ui_workflow(wf, INFO, skip_combo=lambda t, n: n == "name") == []
    assert check_ui_workflow(wf, INFO)


def test_set_inputs_by_class_title_and_id():
    api = ui_to_api(workflow(), INFO)
    set_inputs(api, {"Sampler": {"steps": 2}, "Loader": {"name": "b.safetensors"}, "2": {"text": "dog"}})
    assert api["6"]["inputs"]["steps"] == 2 and api["1"]["inputs"]["name"] == "b.safetensors"
    assert api["2"]["inputs"]["text"] == "dog"
    set_inputs(api, {"Sampler:My sampler": {"seed": 1}})
    assert api["6"]["inputs"]["seed"] == 1
    with pytest.raises(KeyError):
        set_inputs(api, {"Missing": {"x": 1}})
    with pytest.raises(KeyError):
        set_inputs(api, {"Sampler": {"typo": 1}})
    set_inputs(api, {"Sampler": {"new": 1}, "Missing": {"x": 1}}, strict=False)
    assert api["6"]["inputs"]["new"] == 1
