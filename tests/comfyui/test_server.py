"""One full training through ComfyUI's real HTTP server, with the pack installed as a custom node.

A throwaway ComfyUI base directory holds ``custom_nodes/ComfyUI-LoRA-Lab`` (a symlink to this
repository) and a tiny random UNet in ``models/diffusion_models``. ``main.py`` runs as a
subprocess on CPU; the test checks ``/object_info``, queues an API-format prompt over
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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "ComfyUI-LoRA-Lab"
MODEL_FILE = "tiny_sd20.safetensors"
START_TIMEOUT = 90
RUN_TIMEOUT = 180

EXPECTED_INPUTS = [
    "model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps",
    "learning_rate", "rank", "optimizer", "loss_function", "seed", "training_dtype",
    "lora_dtype", "algorithm", "gradient_checkpointing", "existing_lora",
]
EXPECTED_OUTPUTS = ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT"]
EXPECTED_OUTPUT_NAMES = ["model_with_lora", "lora", "loss", "steps"]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base, port, proc, log_path):
        self.base = base
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, lines=80):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"<no server log: {e}>"

    def request(self, path, data=None, timeout=30):
        """(status, body bytes) of a GET (data None) or a JSON POST."""
        body, headers = None, {}
        if data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path):
        status, body = self.request(path)
        assert status == 200, f"GET {path} -> {status}: {body[:2000]!r}"
        return json.loads(body)


def _make_base_dir(base):
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(REPO, os.path.join(base, "custom_nodes", PACK_DIR_NAME), target_is_directory=True)
    for sub in ("models/diffusion_models", "models/loras", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    sd = tiny_models.unet_state_dict(tiny_models.sd20_unet_config(), seed=0)
    save_file(sd, os.path.join(base, "models", "diffusion_models", MODEL_FILE))


def _stop(proc):
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _restore_sigint():
    # A shell without job control may start us with SIGINT ignored, and the child would
    # inherit that; Python only installs its KeyboardInterrupt handler if SIGINT is not ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def server(comfyui_dir, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy_server_base"))
    _make_base_dir(base)
    port = _free_port()
    log_path = os.path.join(base, "server.log")
    env = dict(os.environ)
    extra = [os.path.abspath(os.path.expanduser(p))
             for p in os.environ.get("COMFYUI_EXTRA_PATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", base, "--database-url", "sqlite:///:memory:"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=comfyui_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=_restore_sigint)
    srv = Server(base, port, proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {proc.returncode} during startup.\n"
                            f"--- server log tail ---\n{srv.log_tail()}")
            try:
                status, _ = srv.request("/object_info", timeout=10)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer /object_info within {START_TIMEOUT} s.\n"
                            f"--- server log tail ---\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        _stop(proc)
        log.close()


def _prompt():
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
        "5": {"class_type": "SaveLoRANode",
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


def _wait_for_history(server, prompt_id):
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None \
                and entry["status"].get("status_str") in ("success", "error"):
            return entry
        if server.proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with code {server.proc.returncode} while running the prompt")
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish within {RUN_TIMEOUT} s")


def _check_object_info(server):
    info = server.get_json("/object_info/LoRALab_TrainLoRA")
    assert "LoRALab_TrainLoRA" in info, f"node not registered: {sorted(info)[:20]}"
    node = info["LoRALab_TrainLoRA"]
    assert node["input_order"]["required"] == EXPECTED_INPUTS
    assert list(node["input"]["required"]) == EXPECTED_INPUTS
    assert not node["input_order"].get("optional")
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
                 "SaveLoRANode", "LossGraphNode", "KSampler", "SaveLatent"):
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

        status, body = server.request("/prompt", {"prompt": _prompt(), "client_id": uuid.uuid4().hex})
        assert status == 200, f"POST /prompt -> {status}: {body.decode(errors='replace')}"
        reply = json.loads(body)
        assert not reply.get("node_errors"), reply
        prompt_id = reply["prompt_id"]

        entry = _wait_for_history(server, prompt_id)
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

        assert glob.glob(os.path.join(server.base, "temp", "lora_lab_loss*.png")), \
            "Plot Loss wrote no image"

        _check_workflow_templates(server)
    except BaseException:
        print(f"--- ComfyUI server log tail ({server.log_path}) ---\n{server.log_tail()}")
        raise
