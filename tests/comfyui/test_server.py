"""One full training through ComfyUI's real HTTP server, with the pack installed as a custom node.

The server (``comfy_server.py``, shared by the session) runs ``main.py --cpu`` on a throwaway
base directory holding ``custom_nodes/ComfyUI-LoRA-Lab`` (a symlink to this repository) and a
tiny random UNet in ``models/diffusion_models``. The test checks ``/object_info``, queues an API-format prompt over
``POST /prompt`` (UNETLoader -> Train LoRA -> Save LoRA, Plot Loss and KSampler -> SaveLatent),
polls ``/history`` and checks the saved LoRA file and ``/api/workflow_templates``.

Conditioning: there is no text encoder offline, and the only core node that makes a
CONDITIONING from nothing is ``LotusConditioning`` ([1, 2, 1024]), which does not fit SD1.x
(context 768). The model is therefore a tiny SD2.x-style UNet (context 1024, linear proj_in),
which ComfyUI detects as ``SD20``.

Skipped, like everything under tests/comfyui, when COMFYUI_DIR is unset (see conftest.py).
Only the standard library is used for HTTP.
"""

import glob
import json
import os
import urllib.parse
import uuid

import pytest
import torch
from safetensors.torch import load_file

from comfy_server import MODEL_FILE, PACK_DIR_NAME

EXPECTED_INPUTS = [
    "model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps",
    "learning_rate", "rank", "optimizer", "loss_function", "seed", "training_dtype",
    "lora_dtype", "algorithm", "gradient_checkpointing", "existing_lora",
]
# the contract's four outputs, then the previews grid
EXPECTED_OUTPUTS = ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "IMAGE"]
EXPECTED_OUTPUT_NAMES = ["model_with_lora", "lora", "loss", "steps", "previews"]


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's ComfyUI server (tests/comfyui/comfy_server.py)."""
    return comfy_server


def core_save_lora(object_info):
    """Core "Save LoRA Weights": ``SaveLoRANode`` until ComfyUI 0.3.x, ``SaveLoRA`` since."""
    return "SaveLoRA" if "SaveLoRA" in object_info else "SaveLoRANode"


def _prompt(save_lora):
    """API-format prompt: the trained model and LoRA flow into core nodes."""
    return {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": MODEL_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "LotusConditioning", "inputs": {}},
        "3": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "LoRALab_TrainLoRA",
              "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0],
                         "batch_size": 1, "grad_accumulation_steps": 1, "steps": 3,
                         "learning_rate": 0.001, "rank": 4, "optimizer": "AdamW",
                         "loss_function": "MSE", "seed": 0, "training_dtype": "fp32",
                         "lora_dtype": "fp32", "algorithm": "LoRA",
                         "gradient_checkpointing": True, "existing_lora": "[None]"}},
        "5": {"class_type": save_lora,
              "inputs": {"lora": ["4", 1], "prefix": "loras/lora_lab_server_test",
                         "steps": ["4", 3]}},
        "6": {"class_type": "LossGraphNode",
              "inputs": {"loss": ["4", 2], "filename_prefix": "lora_lab_loss"}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                         "sampler_name": "euler", "scheduler": "normal",
                         "positive": ["2", 0], "negative": ["2", 0],
                         "latent_image": ["3", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent",
              "inputs": {"samples": ["7", 0], "filename_prefix": "latents/lora_lab_server_test"}},
    }


def _check_object_info(server):
    info = server.get_json("/object_info/LoRALab_TrainLoRA")
    assert "LoRALab_TrainLoRA" in info, f"node not registered: {sorted(info)[:20]}"
    node = info["LoRALab_TrainLoRA"]
    assert node["input_order"]["required"] == EXPECTED_INPUTS
    assert list(node["input"]["required"]) == EXPECTED_INPUTS
    # Training Options and the empty prompt for caption dropout, after the 16
    assert node["input_order"].get("optional") == ["options", "empty_conditioning"]
    assert node["input"]["optional"]["options"][0] == "LORALAB_OPTIONS"
    assert node["input"]["optional"]["empty_conditioning"][0] == "CONDITIONING"
    options_node = server.get_json("/object_info/LoRALab_TrainingOptions")["LoRALab_TrainingOptions"]
    assert options_node["output"] == ["LORALAB_OPTIONS"]
    assert options_node["input"]["optional"]["options"][0] == "LORALAB_OPTIONS"
    assert {name: spec[0] for name, spec in options_node["input"]["optional"].items()} == {
        "options": "LORALAB_OPTIONS", "vae": "VAE", "preview_conditioning": "CONDITIONING",
        "validation_latents": "LATENT", "validation_conditioning": "CONDITIONING"}
    assert list(node["output"]) == EXPECTED_OUTPUTS
    assert list(node["output_name"]) == EXPECTED_OUTPUT_NAMES
    required = node["input"]["required"]
    for name, kind in (("model", "MODEL"), ("latents", "LATENT"), ("positive", "CONDITIONING"),
                       ("steps", "INT"), ("learning_rate", "FLOAT"),
                       ("gradient_checkpointing", "BOOLEAN")):
        assert required[name][0] == kind, (name, required[name])
    # A combo lists its options (V1 style: a list, or V3 style: "COMBO" with "options").
    existing = required["existing_lora"]
    options = existing[0] if isinstance(existing[0], list) else existing[1].get("options")
    assert options and options[0] == "[None]", existing
    # The full listing has it too, next to the core nodes the prompt uses.
    full = server.get_json("/object_info")
    for name in ("LoRALab_TrainLoRA", "UNETLoader", "LotusConditioning", "EmptyLatentImage",
                 core_save_lora(full), "LossGraphNode", "KSampler", "SaveLatent"):
        assert name in full, f"{name} missing from /object_info"
    assert MODEL_FILE in full["UNETLoader"]["input"]["required"]["unet_name"][0]


def _check_workflow_templates(server):
    templates = server.get_json("/api/workflow_templates")
    assert isinstance(templates, dict), templates
    for name in templates.get(PACK_DIR_NAME, []):
        path = f"/api/workflow_templates/{PACK_DIR_NAME}/{urllib.parse.quote(name)}.json"
        status, body = server.request(path)
        assert status == 200, f"GET {path} -> {status}"
        json.loads(body)


def test_train_lora_through_http_server(server):
    try:
        _check_object_info(server)

        prompt = _prompt(core_save_lora(server.get_json("/object_info")))
        status, body = server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        assert status == 200, f"POST /prompt -> {status}: {body.decode(errors='replace')}"
        reply = json.loads(body)
        assert not reply.get("node_errors"), reply
        prompt_id = reply["prompt_id"]

        entry = server.wait_for_history(prompt_id)
        status = entry["status"]
        assert status["status_str"] == "success" and status["completed"], \
            "prompt failed:\n" + json.dumps(status.get("messages"), indent=1)[:6000]

        out_dir = os.path.join(server.base, "output")
        saved = glob.glob(os.path.join(out_dir, "loras", "lora_lab_server_test*.safetensors"))
        assert len(saved) == 1, os.listdir(out_dir)
        assert "_3_steps_" in os.path.basename(saved[0]), saved  # steps output wired to Save LoRA
        lora = load_file(saved[0])
        assert lora, "saved LoRA is empty"
        suffixes = (".lora_up.weight", ".lora_down.weight", ".alpha")
        for key, value in lora.items():
            assert key.startswith("diffusion_model."), key
            assert key.endswith(suffixes), key
            assert torch.isfinite(value.float()).all(), key
        for suffix in suffixes:
            assert any(k.endswith(suffix) for k in lora), f"no *{suffix} key in {sorted(lora)[:6]}"
        downs = [v for k, v in lora.items() if k.endswith(".lora_down.weight")]
        assert all(v.shape[0] == 4 for v in downs), [tuple(v.shape) for v in downs]  # rank 4

        latents = glob.glob(os.path.join(out_dir, "latents", "lora_lab_server_test*.latent"))
        assert len(latents) == 1, os.listdir(out_dir)
        sampled = load_file(latents[0])["latent_tensor"]
        assert sampled.shape == (2, 4, 8, 8) and torch.isfinite(sampled).all()

        # core Plot Loss shows its image (0.3.x names it by filename_prefix, 0.33 as a preview)
        images = entry["outputs"].get("6", {}).get("images", [])
        assert images, f"Plot Loss showed no image: {entry['outputs']}"
        for image in images:
            assert os.path.isfile(os.path.join(
                server.base, image["type"], image.get("subfolder", ""), image["filename"]))

        _check_workflow_templates(server)
    except BaseException:
        print(f"--- ComfyUI server log tail ({server.log_path}) ---\n{server.log_tail()}")
        raise


def _run(server, prompt):
    status, body = server.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, f"POST /prompt -> {status}: {body.decode(errors='replace')}"
    entry = server.wait_for_history(json.loads(body)["prompt_id"])
    assert entry["status"]["status_str"] == "success", \
        "prompt failed:\n" + json.dumps(entry["status"].get("messages"), indent=1)[:6000]
    return entry


def test_checkpoints_validation_and_resume_through_http_server(server):
    """Checkpoints land in the loras folder with their state, the validation series reaches
    core's Plot Loss, the previews output feeds Preview Image, and a second prompt resumes
    from a checkpoint picked in existing_lora."""
    try:
        info = server.get_json("/object_info/LoRALab_TrainingOptions")["LoRALab_TrainingOptions"]
        options = {name: spec[1]["default"] for name, spec in info["input"]["required"].items()}
        options.update(checkpoint_every=2, checkpoint_prefix="server_ckpt/run",
                       validation_every=1, warmup_steps=1, ema_decay=0.5)
        prompt = _prompt(core_save_lora(server.get_json("/object_info")))
        prompt["4"]["inputs"].update(steps=4, options=["9", 0])
        prompt["9"] = {"class_type": "LoRALab_TrainingOptions", "inputs": options}
        prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 4]}}
        prompt["5"]["inputs"]["prefix"] = "loras/lora_lab_server_long"
        _run(server, prompt)
        folder = os.path.join(server.base, "models", "loras", "server_ckpt")
        assert sorted(os.listdir(folder)) == [
            "run_2_steps_00001_.safetensors", "run_2_steps_00001_.training_state",
            "run_4_steps_00002_.safetensors", "run_4_steps_00002_.training_state"]

        resume = _prompt(core_save_lora(server.get_json("/object_info")))
        resume["4"]["inputs"].update(steps=2, options=["9", 0],
                                     existing_lora="server_ckpt/run_2_steps_00001_.safetensors")
        options.update(checkpoint_every=0, validation_every=0)
        resume["9"] = {"class_type": "LoRALab_TrainingOptions", "inputs": options}
        resume["5"]["inputs"]["prefix"] = "loras/lora_lab_server_resumed"
        _run(server, resume)
        out = os.path.join(server.base, "output", "loras")
        [resumed] = glob.glob(os.path.join(out, "lora_lab_server_resumed*.safetensors"))
        assert "_4_steps_" in os.path.basename(resumed)  # 2 resumed + 2 new steps
        direct = load_file(os.path.join(folder, "run_4_steps_00002_.safetensors"))
        again = load_file(resumed)
        assert direct.keys() == again.keys()
        assert all(torch.equal(direct[k], again[k]) for k in direct)
    except BaseException:
        print(f"--- ComfyUI server log tail ({server.log_path}) ---\n{server.log_tail()}")
        raise

