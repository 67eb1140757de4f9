"""Training data exported by the node and trained headless (python -m lora_lab train), with
one process and with two under torchrun (gloo, CPU), in real ComfyUI: the same LoRA as the
node, loaded by core's LoRA loader."""

import os
import subprocess
import sys

import pytest
import torch

from comfy_server import REPO
from test_train_node import core_reload, family_case, model_output, run_train

STEPS = 3
COMMON = ["--steps", str(STEPS), "--rank", "4", "--learning_rate", "0.001", "--seed", "0",
          "--training_dtype", "fp32", "--lora_dtype", "fp32", "--gradient_checkpointing",
          "false", "--ema_decay", "0.5", "--grad_accumulation_steps", "2"]


def node(pack_nodes, name):
    return pack_nodes[f"LoRALab_{name}"]


@pytest.fixture
def headless_env(tmp_path, comfy):
    """PYTHONPATH with the pack as ``lora_lab``, the stand-ins and ComfyUI."""
    packages = tmp_path / "packages"
    packages.mkdir()
    os.symlink(REPO, packages / "lora_lab", target_is_directory=True)
    extra = [p for p in os.environ.get("COMFYUI_EXTRA_PATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(packages), *extra]),
               OMP_NUM_THREADS="1")
    return env


def export(pack_nodes, family, tmp_path):
    """The tiny model as a file, and its training data saved by Save Training Data."""
    import folder_paths
    from safetensors.torch import save_file

    model, latents, positive, probe = family_case(family)
    path = str(tmp_path / f"{family}.safetensors")
    save_file({k: v.contiguous() for k, v in model.model.diffusion_model.state_dict().items()},
              path)
    with torch.inference_mode():
        [folder] = node(pack_nodes, "SaveTrainingData").execute(
            [{"samples": latents}], [positive], [f"{family}_set"]).result
    data = os.path.join(folder_paths.get_output_directory(), folder)
    return model, latents, positive, probe, path, data


def headless(env, args, processes=1):
    prefix = [sys.executable]
    if processes > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}"]
    done = subprocess.run(prefix + ["-m", "lora_lab", "train", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def read(folder):
    from safetensors.torch import load_file

    [name] = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    return load_file(os.path.join(folder, name)), name


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_exported_data_trains_headless_as_in_the_node(family, pack_nodes, train_node,
                                                      headless_env, tmp_path):
    model, latents, positive, probe, path, data = export(pack_nodes, family, tmp_path)
    # the data reads back as it was given, extras included
    with torch.inference_mode():
        [loaded], [conditioning] = node(pack_nodes, "LoadTrainingData").execute(
            os.path.basename(data)).result
    assert torch.equal(loaded["samples"], latents)
    assert torch.equal(conditioning[0][0], positive[0][0])
    assert conditioning[0][1].keys() == positive[0][1].keys()

    _, in_node, _, _ = run_train(
        train_node, model, latents, positive, steps=STEPS, batch_size=2, rank=4,
        learning_rate=1e-3, gradient_checkpointing=False, grad_accumulation_steps=2,
        options={"ema_decay": 0.5})
    one, two = tmp_path / "one", tmp_path / "two"
    headless(headless_env, ["--model", path, "--data", data, "--out", str(one),
                            "--batch_size", "2", *COMMON])
    done = headless(headless_env, ["--model", path, "--data", data, "--out", str(two),
                                   "--batch_size", "1", *COMMON], processes=2)
    assert done.stdout.count("wrote ") == 1  # rank 0 only
    single, name = read(one)
    double, _ = read(two)
    assert name == f"lora_{STEPS}_steps_00001_.safetensors"
    assert os.path.isfile(one / "loss.png")
    scale = max(float(t.abs().max()) for t in single.values())
    for key, value in single.items():
        # the node's engine: the same LoRA (up to the float rounding of other thread counts)
        assert float((value - in_node[key]).abs().max()) <= 1e-5 * scale, key
        assert float((double[key] - value).abs().max()) <= 1e-5 * scale, key
    loaded_model, lines = core_reload(model, double, tmp_path / "double.safetensors")
    assert not [line for line in lines if "not loaded" in line.lower()], lines
    assert not torch.equal(model_output(loaded_model, probe, positive),
                           model_output(model, probe, positive))


def test_a_two_process_checkpoint_resumes_in_one_process(pack_nodes, headless_env,
                                                         tmp_path):
    model, latents, positive, probe, path, data = export(pack_nodes, "sd15", tmp_path)
    full, part, rest = tmp_path / "full", tmp_path / "part", tmp_path / "rest"
    common = [a for a in COMMON if a != str(STEPS)]
    common.remove("--steps")
    headless(headless_env, ["--model", path, "--data", data, "--out", str(full),
                            "--batch_size", "2", "--steps", "4", *common])
    headless(headless_env, ["--model", path, "--data", data, "--out", str(part),
                            "--batch_size", "1", "--steps", "2", "--checkpoint_every", "2",
                            "--checkpoint_prefix", "ckpt", *common], processes=2)
    checkpoint = part / "ckpt_2_steps_00001_.safetensors"
    assert checkpoint.is_file() and (part / "ckpt_2_steps_00001_.training_state").is_file()
    headless(headless_env, ["--model", path, "--data", data, "--out", str(rest),
                            "--batch_size", "2", "--steps", "2", "--resume", str(checkpoint),
                            *common])
    # and the other way: a 1-process state with batch 2 continues in 2 processes of batch 1
    single, back = tmp_path / "single", tmp_path / "back"
    headless(headless_env, ["--model", path, "--data", data, "--out", str(single),
                            "--batch_size", "2", "--steps", "2", "--checkpoint_every", "2",
                            "--checkpoint_prefix", "ckpt", *common])
    headless(headless_env, ["--model", path, "--data", data, "--out", str(back),
                            "--batch_size", "1", "--steps", "2", "--resume",
                            str(single / "ckpt_2_steps_00001_.safetensors"), *common],
             processes=2)
    expected, _ = read(full)
    scale = max(float(t.abs().max()) for t in expected.values())
    for folder in (rest, back):
        resumed, name = read(folder)
        assert name == "lora_4_steps_00001_.safetensors"
        for key, value in expected.items():
            assert float((resumed[key] - value).abs().max()) <= 1e-5 * scale, (folder, key)


def test_headless_errors_are_one_line_argument_errors(headless_env, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lora_lab", "train", "--model", __file__,
                           "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--rank", "0"], env=headless_env, capture_output=True, text=True)
    assert done.returncode == 2 and "rank=0 is out of range" in done.stderr


def test_headless_writes_the_kohya_format(pack_nodes, pack, headless_env, tmp_path):
    import importlib

    model, _, positive, probe, path, data = export(pack_nodes, "sd15", tmp_path)
    comfyui, kohya = tmp_path / "comfyui", tmp_path / "kohya"
    for out, fmt in ((comfyui, "comfyui"), (kohya, "kohya")):
        headless(headless_env, ["--model", path, "--data", data, "--out", str(out),
                                "--batch_size", "2", "--format", fmt, *COMMON])
    plain, _ = read(comfyui)
    named, _ = read(kohya)
    assert all(k.startswith("lora_unet_") for k in named) and len(named) == len(plain)
    # the same tensors under kohya's names: ComfyUI's key map takes them back
    keys = importlib.import_module(f"{pack.__name__}.nodes.lora_keys")
    back = keys.to_diffusion_model_keys(model, named)
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k]) for k in plain)
    loaded_model, lines = core_reload(model, named, tmp_path / "named.safetensors")
    assert not [line for line in lines if "not loaded" in line.lower()], lines
    reference, _ = core_reload(model, plain, tmp_path / "plain.safetensors")
    assert torch.equal(model_output(loaded_model, probe, positive),
                       model_output(reference, probe, positive))
