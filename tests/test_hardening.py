"""Hostile input and long-running use on tiny real networks: clear errors, no leaks."""

import gc
import json
import os
import logging
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.lora.inject import create_adapters
from lora_lab.lora.io import adapters_from_state_dict, read_lora_file
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import train
from tiny_tasks import make_task


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_ten_runs_keep_memory_flat_and_leave_no_patches():
    task, latents = make_task("unet", count=4)
    rss = []
    for _ in range(10):
        result = train(task, latents, TrainConfig(steps=2, batch_size=2))
        del result
        gc.collect()
        rss.append(_rss_mib())
        assert not [m for m in task.network.modules() if "forward" in m.__dict__]
        assert all(len(m._forward_hooks) == 0 for m in task.network.modules())
    assert rss[-1] <= rss[1] * 1.05, rss


def test_a_model_without_adaptable_layers_is_a_value_error():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="no Linear or 1x1 Conv layer"):
        create_adapters(net, "LoRA", 4, 1.0, torch.float32, torch.Generator())


def test_rank_above_a_layer_is_clamped_per_layer_with_a_warning(caplog):
    net = nn.Sequential(nn.Linear(3, 64), nn.Linear(64, 64))
    with caplog.at_level(logging.WARNING):
        adapters = create_adapters(net, "LoRA", 16, 1.0, torch.float32, torch.Generator())
    assert adapters["0"].rank == 3 and adapters["1"].rank == 16
    assert "rank 16 is larger than 1 of 2 layers allow" in caplog.text


def test_a_bad_batch_in_a_latents_list_is_named():
    task, _ = make_task("unet")
    with pytest.raises(ValueError, match=r"latents\[1\]: latents must be a tensor"):
        train(task, [torch.zeros(2, 4, 8, 8), torch.zeros(4, 16)], TrainConfig(steps=1))
    with pytest.raises(ValueError, match=r"latents\[0\]: latents contain NaN"):
        train(task, [torch.full((1, 4, 8, 8), float("nan")), torch.zeros(2, 4, 8, 8)],
              TrainConfig(steps=1))
    with pytest.raises(ValueError, match="non-empty list"):
        train(task, [], TrainConfig(steps=1))


# -- fuzzing the LoRA file reader --------------------------------------------------------------
_NET = None


def _network():
    global _NET
    if _NET is None:
        _NET = make_task("unet")[0].network
    return _NET


def _safetensors_bytes(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


_KEYS = st.sampled_from([
    "diffusion_model.down_attn.0.proj_in.lora_up.weight",
    "diffusion_model.down_attn.0.proj_in.lora_down.weight",
    "diffusion_model.down_attn.0.proj_in.alpha",
    "diffusion_model.time_embed.0.lora_down.weight",
    "diffusion_model.time_embed.0.lora_up.weight",
    "diffusion_model.nowhere.lora_up.weight",
    "lora_unet_x.lora_up.weight", "x", "__metadata__",
])
_DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX"])
_SHAPES = st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=4)


@st.composite
def lora_files(draw):
    header, payload, offset = {}, b"", 0
    for _ in range(draw(st.integers(0, 5))):
        key, dtype, shape = draw(_KEYS), draw(_DTYPES), draw(_SHAPES)
        size = 4
        for dim in shape:
            size *= dim
        size = draw(st.sampled_from([size, max(0, size - 4), size + 4]))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        payload += draw(st.binary(min_size=size, max_size=size)) if size < 4096 else b"\0" * size
        offset += size
    data = _safetensors_bytes(header, payload)
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "bad_len", "not_json"]))
    if mutation == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip" and len(data) > 9:
        i = draw(st.integers(8, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    elif mutation == "bad_len":
        data = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    elif mutation == "not_json":
        data = struct.pack("<Q", 4) + b"{{{{" + data[12:]
    return data


FUZZ_COUNT = {"n": 0}


# 300 inputs in CI; LORA_LAB_FUZZ_EXAMPLES=20000 for a longer local run.
@settings(max_examples=int(os.environ.get("LORA_LAB_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=lora_files())
def test_fuzzed_lora_files_raise_only_value_errors(tmp_path_factory, data):
    FUZZ_COUNT["n"] += 1
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(data)
    try:
        tensors, _ = read_lora_file(str(path))
        adapters_from_state_dict(_network(), tensors, "diffusion_model.", torch.float32)
    except ValueError:
        pass
    if FUZZ_COUNT["n"] % 1000 == 0:
        print(f"fuzzed {FUZZ_COUNT['n']} LoRA files")


_SAVER = r"""
import os, sys, time, torch, safetensors.torch
real_save = safetensors.torch.save_file

def save_then_hang(tensors, path, metadata=None):  # the process dies mid-write
    real_save(tensors, path, metadata=metadata)
    os.truncate(path, os.path.getsize(path) // 2)
    print("writing", flush=True)
    time.sleep(120)

safetensors.torch.save_file = save_then_hang
from lora_lab.lora.io import save_lora_file
save_lora_file({"diffusion_model.l.lora_up.weight": torch.ones(256, 256)}, sys.argv[1], "victim")
"""


def test_a_save_killed_mid_write_leaves_no_lora_and_the_next_save_cleans_up(tmp_path):
    import signal
    import subprocess
    import sys

    from lora_lab.lora.io import save_lora_file

    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")], "no partial write seen"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    path = save_lora_file({"a.lora_up.weight": torch.ones(2, 2)}, str(tmp_path), "victim")
    assert os.listdir(tmp_path) == [os.path.basename(path)]
