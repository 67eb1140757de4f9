"""A real ComfyUI HTTP server for tests: ``main.py --cpu`` as a subprocess, with this
repository symlinked into a throwaway base directory's ``custom_nodes`` and a tiny random
SD2.x-style UNet in ``models/diffusion_models``.

``comfy_server`` (session scope, made available to every test module by conftest.py) starts
one server for the whole run; ``Server`` has small JSON helpers over the standard library.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "ComfyUI-LoRA-Lab"
MODEL_FILE = "tiny_sd20.safetensors"
START_TIMEOUT = 90
RUN_TIMEOUT = 180


def free_port():
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

    def wait_for_history(self, prompt_id, timeout=RUN_TIMEOUT):
        """The /history entry of a queued prompt once it has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {self.proc.returncode} while running "
                            "the prompt")
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s")


def make_base_dir(base):
    import tiny_models
    from safetensors.torch import save_file

    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(REPO, os.path.join(base, "custom_nodes", PACK_DIR_NAME), target_is_directory=True)
    for sub in ("models/diffusion_models", "models/loras", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    sd = tiny_models.unet_state_dict(tiny_models.sd20_unet_config(), seed=0)
    save_file(sd, os.path.join(base, "models", "diffusion_models", MODEL_FILE))


def stop(proc):
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


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy_server_base"))
    make_base_dir(base)
    port = free_port()
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
        stop(proc)
        log.close()
