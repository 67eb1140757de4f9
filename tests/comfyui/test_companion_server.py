"""LoRA Lab's companion nodes and example workflows through ComfyUI's real HTTP server.

- ``/object_info`` lists every LoRA Lab node, each input and output with a tooltip;
- ``/api/workflow_templates`` lists the example workflows and serves each of them;
- every node of every example workflow exists (core or LoRA Lab), its widget values fit the
  node's inputs, and its links join outputs and inputs of the same type;
- one API-format prompt runs Train LoRA -> Save LoRA + Plot Loss -> Save Image, and the LoRA
  appears in the loras folder (and in the loaders' lists) with its metadata.
"""

import glob
import json
import os
import urllib.parse
import uuid

import pytest
from safetensors import safe_open

from comfy_server import MODEL_FILE, PACK_DIR_NAME, REPO

PACK_NODES = ["LoRALab_TrainLoRA", "LoRALab_SaveLoRA", "LoRALab_PlotLoss", "LoRALab_ApplyLoRA",
              "LoRALab_LoadDataset", "LoRALab_SaveTrainingData", "LoRALab_LoadTrainingData"]
WORKFLOW_DIR = os.path.join(REPO, "example_workflows")
WORKFLOWS = sorted(f[:-5] for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # nodes that live in the frontend, not /object_info
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name",
               "lora_name", "existing_lora", "folder"}  # lists that depend on the user's files
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info")


def input_specs(node_info):
    """[(name, type, options)] in the order the frontend creates the node's inputs."""
    specs = []
    for group in ("required", "optional"):
        for name in node_info["input_order"].get(group, []):
            spec = node_info["input"][group][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                options["options"] = spec[0]
            specs.append((name, kind, options))
    return specs


def widget_specs(node_info):
    """The widgets' (name, type, options), with the seed-style 'control after generate' value."""
    widgets = []
    for name, kind, options in input_specs(node_info):
        if kind in WIDGET_TYPES and not options.get("forceInput"):
            widgets.append((name, kind, options))
            if options.get("control_after_generate"):
                widgets.append((name + " (control)", "CONTROL", {}))
    return widgets


def value_fits(name, kind, options, value):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "INT":
        return number and value == int(value) and options.get("min", value) <= value <= options.get("max", value)
    if kind == "FLOAT":
        return number and options.get("min", value) <= value <= options.get("max", value)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    if kind == "CONTROL":
        return value in CONTROL_VALUES
    if name in FILE_INPUTS:
        return isinstance(value, str) and bool(value)
    return value in options.get("options", [])


def test_object_info_lists_every_node_with_tooltips(object_info):
    for node_id in PACK_NODES:
        assert node_id in object_info, f"{node_id} missing from /object_info"
        node = object_info[node_id]
        assert node["category"] == "LoRA Lab" and node["display_name"]
        for name, kind, options in input_specs(node):
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"])
    assert object_info["LoRALab_SaveLoRA"]["output_node"] is True
    assert object_info["LoRALab_PlotLoss"]["output"] == ["IMAGE"]
    assert object_info["LoRALab_LoadDataset"]["output"] == ["LATENT", "CONDITIONING"]
    assert object_info["LoRALab_LoadDataset"]["output_is_list"] == [True, True]
    assert object_info["LoRALab_LoadTrainingData"]["output_is_list"] == [True, True]
    assert object_info["LoRALab_SaveTrainingData"]["output_node"] is True
    # never shadows a core node: the core trainer's nodes are still the core ones
    core_ids = [c for c in ("TrainLoraNode", "SaveLoRANode", "SaveLoRA", "LoraModelLoader",
                            "LossGraphNode") if c in object_info]
    assert len(core_ids) == 4, core_ids  # the save node's id changed in 0.33, the rest did not
    for core in core_ids:
        assert not object_info[core]["python_module"].startswith("custom_nodes"), core


def test_template_route_lists_and_serves_the_workflows(comfy_server):
    assert len(WORKFLOWS) >= 3
    templates = comfy_server.get_json("/api/workflow_templates")
    # In their numbered order (the frontend shows this order; ComfyUI's own is glob order).
    assert templates.get(PACK_DIR_NAME) == WORKFLOWS
    for name in WORKFLOWS:
        path = f"/api/workflow_templates/{PACK_DIR_NAME}/{urllib.parse.quote(name)}.json"
        status, body = comfy_server.request(path)
        assert status == 200, f"GET {path} -> {status}"
        with open(os.path.join(WORKFLOW_DIR, name + ".json"), "rb") as f:
            assert json.loads(body) == json.loads(f.read())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_nodes_exist_and_widget_values_fit(name, object_info):
    with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        workflow = json.load(f)
    assert workflow["version"] == 0.4
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} <= set(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    notes = [n for n in nodes.values() if n["type"] in FRONTEND_ONLY]
    assert len(notes) >= 2 and all(n["widgets_values"][0].strip() for n in notes)
    types = {n["type"] for n in nodes.values()}
    assert {"LoRALab_TrainLoRA", "LoRALab_SaveLoRA", "LoRALab_PlotLoss", "KSampler"} <= types

    for node in nodes.values():
        for key in ("id", "type", "pos", "size", "widgets_values"):
            assert key in node, (name, node.get("id"), key)
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in object_info, f"{name}: unknown node type {node['type']}"
        info = object_info[node["type"]]
        module = info["python_module"]
        assert node["type"].startswith("LoRALab_") or not module.startswith("custom_nodes"), \
            f"{name}: {node['type']} is from another custom node pack ({module})"
        widgets = widget_specs(info)
        values = node["widgets_values"]
        assert len(values) == len(widgets), \
            f"{name}: {node['type']} has {len(values)} widget values for {[w[0] for w in widgets]}"
        for (wname, kind, options), value in zip(widgets, values):
            assert value_fits(wname, kind, options, value), \
                f"{name}: {node['type']}.{wname} = {value!r} does not fit {kind} {options}"
        # every socket the node needs is linked
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for iname, kind, options in input_specs(info):
            group_required = iname in info["input_order"].get("required", [])
            if group_required and (kind not in WIDGET_TYPES or options.get("forceInput")):
                assert iname in linked, f"{name}: {node['type']}.{iname} is not connected"

    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        source, target = nodes[src], nodes[dst]
        assert object_info[source["type"]]["output"][src_slot] == kind, (name, link_id)
        target_input = target["inputs"][dst_slot]
        assert target_input["link"] == link_id and target_input["type"] == kind, (name, link_id)
        spec = dict((n, k) for n, k, _ in input_specs(object_info[target["type"]]))
        assert spec[target_input["name"]] == kind, (name, link_id, target_input["name"])
        assert link_id in source["outputs"][src_slot]["links"], (name, link_id)


def _train_save_plot_prompt(prefix, seed=7):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "LotusConditioning", "inputs": {}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "LoRALab_TrainLoRA",
              "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0],
                         "batch_size": 2, "grad_accumulation_steps": 1, "steps": 3,
                         "learning_rate": 0.001, "rank": 4, "optimizer": "AdamW",
                         "loss_function": "MSE", "seed": seed, "training_dtype": "fp32",
                         "lora_dtype": "fp32", "algorithm": "LoRA",
                         "gradient_checkpointing": False, "existing_lora": "[None]"}},
        "5": {"class_type": "LoRALab_SaveLoRA",
              "inputs": {"lora": ["4", 1], "filename_prefix": prefix, "steps": ["4", 3]}},
        "6": {"class_type": "LoRALab_PlotLoss",
              "inputs": {"loss": ["4", 2], "smoothing": 0.6, "log_scale": False,
                         "width": 512, "height": 320}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0],
                                                    "filename_prefix": "lora_lab/server_loss"}},
    }


def test_train_save_and_plot_through_the_server(comfy_server):
    server = comfy_server
    try:
        status, body = server.request("/prompt", {"prompt": _train_save_plot_prompt("lora_lab/server"),
                                                  "client_id": uuid.uuid4().hex})
        assert status == 200, f"POST /prompt -> {status}: {body.decode(errors='replace')}"
        reply = json.loads(body)
        assert not reply.get("node_errors"), reply
        entry = server.wait_for_history(reply["prompt_id"])
        assert entry["status"]["status_str"] == "success", \
            "prompt failed:\n" + json.dumps(entry["status"].get("messages"), indent=1)[:6000]

        name = "lora_lab/server_3_steps_00001_.safetensors"
        path = os.path.join(server.base, "models", "loras", *name.split("/"))
        assert os.path.isfile(path), os.listdir(os.path.join(server.base, "models", "loras"))
        assert entry["outputs"]["5"]["text"] == [f"Saved to loras/{name}"]
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
        assert keys and all(k.startswith("diffusion_model.") for k in keys)
        expected = {"lora_lab.steps": "3", "lora_lab.rank": "4", "lora_lab.seed": "7",
                    "lora_lab.optimizer": "AdamW", "lora_lab.base_model": "SD20",
                    "ss_steps": "3", "ss_network_dim": "4", "ss_network_module": "networks.lora",
                    "ss_base_model_version": "sd_v2", "ss_learning_rate": "0.001"}
        assert {k: meta.get(k) for k in expected} == expected

        # listed at once by the loaders and by Train LoRA's existing_lora
        info = server.get_json("/object_info/LoraLoaderModelOnly")
        assert name in info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
        existing = server.get_json("/object_info/LoRALab_TrainLoRA")["LoRALab_TrainLoRA"]["input"]["required"]["existing_lora"]
        assert name in (existing[1]["options"] if existing[0] == "COMBO" else existing[0])

        shown = entry["outputs"]["6"]["images"]
        assert len(shown) == 1 and shown[0]["type"] == "temp"
        [saved_plot] = glob.glob(os.path.join(server.base, "output", "lora_lab", "server_loss*.png"))
        from PIL import Image
        assert Image.open(saved_plot).size == (512, 320)

        # a second run (another seed, so ComfyUI does not reuse its cached outputs) never
        # overwrites: the counter moves on
        status, body = server.request("/prompt", {"prompt": _train_save_plot_prompt("lora_lab/server", 8),
                                                  "client_id": uuid.uuid4().hex})
        entry = server.wait_for_history(json.loads(body)["prompt_id"])
        assert entry["outputs"]["5"]["text"] == ["Saved to loras/lora_lab/server_3_steps_00002_.safetensors"]
    except BaseException:
        print(f"--- ComfyUI server log tail ({server.log_path}) ---\n{server.log_tail()}")
        raise


def test_prefix_escaping_the_loras_folder_fails_the_prompt(comfy_server):
    prompt = _train_save_plot_prompt("../escaped")
    status, body = comfy_server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    entry = comfy_server.wait_for_history(json.loads(body)["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "filename_prefix" in errors[0][1]["exception_message"]
    assert errors[0][1]["exception_type"].endswith("ValueError")
    assert not glob.glob(os.path.join(comfy_server.base, "models", "escaped*"))
