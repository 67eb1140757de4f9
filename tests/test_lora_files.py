"""LoRA files: save/load round trip, continuing, step counts, and validated reading."""

import os

import pytest
import torch
from safetensors.torch import save_file

from lora_lab.lora.inject import ForwardPatches, adapter_patches
from lora_lab.lora.io import adapters_from_state_dict, read_lora_file, save_lora_file, steps_of
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import train
from tiny_tasks import make_task


@pytest.fixture(scope="module")
def trained():
    task, latents = make_task("unet")
    result = train(task, latents, TrainConfig(steps=2, batch_size=2, training_dtype="fp32",
                                              lora_dtype="fp32", learning_rate=1e-2))
    return task, latents, result


def test_round_trip_is_exact_and_continues_identically(trained, tmp_path):
    task, latents, result = trained
    path = save_lora_file(result.lora, str(tmp_path), "my_lora", {"lora_lab.steps": "2"})
    tensors, metadata = read_lora_file(path)
    assert set(tensors) == set(result.lora)
    assert all(torch.equal(tensors[k], result.lora[k]) for k in tensors)
    assert steps_of(metadata, path) == 2
    adapters = adapters_from_state_dict(task.network, tensors, "diffusion_model.", torch.float32)
    x = latents[:2]
    t = torch.tensor([10.0, 500.0])
    ctx = task.context[:2]
    with torch.no_grad():
        with ForwardPatches(adapter_patches(task.network, result.adapters)):
            a = task.network(x, t, ctx)
        with ForwardPatches(adapter_patches(task.network, adapters)):
            b = task.network(x, t, ctx)
    assert torch.equal(a, b)
    continued = train(task, latents, TrainConfig(steps=1, training_dtype="fp32", lora_dtype="fp32"),
                      existing=adapters)
    assert set(continued.lora) == set(result.lora)


def test_save_never_overwrites_and_leaves_no_temporary(trained, tmp_path):
    _, _, result = trained
    first = save_lora_file(result.lora, str(tmp_path), "x")
    second = save_lora_file(result.lora, str(tmp_path), "x")
    assert first != second and os.path.exists(first) and os.path.exists(second)
    assert os.path.basename(first) == "x_00001_.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["x_00001_.safetensors", "x_00002_.safetensors"]


@pytest.mark.parametrize("metadata,name,expected", [
    ({"lora_lab.steps": "120"}, "a.safetensors", 120),
    ({"ss_steps": "40"}, "a.safetensors", 40),
    ({}, "loras/ComfyUI_trained_lora_200_steps_00001_.safetensors", 200),
    ({}, "plain.safetensors", 0),
])
def test_steps_of(metadata, name, expected):
    assert steps_of(metadata, name) == expected


def test_shape_mismatch_names_key_and_both_shapes(trained):
    task, _, result = trained
    bad = dict(result.lora)
    key = next(k for k in bad if k.endswith("lora_down.weight"))
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 3)
    with pytest.raises(ValueError, match=rf"{key} has shape \[.*\] but this model needs"):
        adapters_from_state_dict(task.network, bad, "diffusion_model.", torch.float32)


def test_lora_for_another_model_is_value_error(trained):
    task, _, _ = trained
    other = {"diffusion_model.joint_blocks.0.attn.qkv.lora_up.weight": torch.zeros(3, 2),
             "diffusion_model.joint_blocks.0.attn.qkv.lora_down.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="does not have"):
        adapters_from_state_dict(task.network, other, "diffusion_model.", torch.float32)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "missing"])
def test_damaged_files_are_value_errors(trained, tmp_path, damage):
    _, _, result = trained
    path = str(tmp_path / "l.safetensors")
    save_file({k: v.contiguous() for k, v in result.lora.items()}, path)
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"\xff" * 64)
    elif damage == "pickle":
        path = str(tmp_path / "l.pt")
        torch.save(result.lora, path)
    else:
        path = str(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="existing_lora"):
        read_lora_file(path)
