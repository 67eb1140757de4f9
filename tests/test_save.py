"""Saving LoRA files (names, no overwrite, atomic write, path escapes, header metadata) and
the companion nodes' declared schemas."""

import os
import re

import pytest
import torch
from safetensors import safe_open

import lora_lab.lora.io as lora_io
from lora_lab import __version__
from lora_lab.lora.io import lora_file_metadata, save_lora_file
from lora_lab.lora.weights import LoraWeights, metadata_of
from lora_lab.nodes.companion_spec import COMPANION_NODES, LOAD_DATASET, SAVE_LORA

CORE_IDS = {  # ComfyUI's own node ids near ours (see shared/reference, section 1 and 6)
    "TrainLoraNode", "SaveLoRANode", "SaveLoRA", "LoraModelLoader", "LossGraphNode",
    "LoadImageSetFromFolderNode", "LoadImageTextSetFromFolderNode", "LoraLoader",
    "LoraLoaderModelOnly", "LoraSave", "LoadImageDataSetFromFolder",
    "LoadImageTextDataSetFromFolder", "MakeTrainingDataset", "LoadTrainingDataset",
}


def tiny_lora(rank=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {
        "diffusion_model.a.lora_up.weight": torch.randn(8, rank, generator=g).to(dtype),
        "diffusion_model.a.lora_down.weight": torch.randn(rank, 6, generator=g).to(dtype),
        "diffusion_model.a.alpha": torch.tensor(2.0),
    }


TRAINED_METADATA = {
    "lora_lab.steps": 120, "lora_lab.algorithm": "LoRA", "lora_lab.rank": 4,
    "lora_lab.alpha": 2.0, "lora_lab.learning_rate": 0.0005, "lora_lab.optimizer": "AdamW",
    "lora_lab.loss_function": "MSE", "lora_lab.seed": 7, "lora_lab.batch_size": 2,
    "lora_lab.grad_accumulation_steps": 1, "lora_lab.training_dtype": "bf16",
    "lora_lab.lora_dtype": "fp32", "lora_lab.base_model": "SDXL", "lora_lab.version": "0.1.0",
}


def header(path):
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def test_names_subfolders_steps_and_counter(tmp_path):
    lora = tiny_lora()
    paths = [
        save_lora_file(lora, str(tmp_path), "lora_lab/my_lora"),
        save_lora_file(lora, str(tmp_path), "lora_lab/my_lora", steps=200),
        save_lora_file(lora, str(tmp_path), "lora_lab/my_lora", steps=200),
        save_lora_file(lora, str(tmp_path), "lora_lab/my_lora_2"),
    ]
    names = [os.path.relpath(p, tmp_path).replace(os.sep, "/") for p in paths]
    assert names == [
        "lora_lab/my_lora_00001_.safetensors",
        "lora_lab/my_lora_200_steps_00002_.safetensors",
        "lora_lab/my_lora_200_steps_00003_.safetensors",
        "lora_lab/my_lora_2_00001_.safetensors",
    ]
    assert sorted(os.listdir(tmp_path / "lora_lab")) == sorted(os.path.basename(p) for p in paths)
    _, tensors = header(paths[1])
    assert all(torch.equal(tensors[k], lora[k]) for k in lora)


def test_a_name_taken_meanwhile_is_not_overwritten(tmp_path, monkeypatch):
    lora = tiny_lora()
    taken = tmp_path / "x_00001_.safetensors"
    taken.write_bytes(b"someone else's file")
    listdir = os.listdir
    monkeypatch.setattr(lora_io.os, "listdir", lambda p: [f for f in listdir(p) if f != taken.name])
    path = save_lora_file(lora, str(tmp_path), "x")
    assert os.path.basename(path) == "x_00002_.safetensors"
    assert taken.read_bytes() == b"someone else's file"


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_lora_file(tiny_lora(), str(tmp_path), "sub/x")
    assert os.listdir(tmp_path / "sub") == []


def test_final_file_appears_complete_under_its_name(tmp_path, monkeypatch):
    """The final name is claimed (hard link) only after the data is fully written."""
    seen = []
    link = os.link

    def watching_link(src, dst):
        seen.append((os.path.getsize(src), os.path.exists(dst)))
        return link(src, dst)

    monkeypatch.setattr(lora_io.os, "link", watching_link)
    path = save_lora_file(tiny_lora(), str(tmp_path), "x")
    assert seen == [(os.path.getsize(path), False)]
    assert os.listdir(tmp_path) == [os.path.basename(path)]


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/abs", "..", "",
                                    "lora_lab/", "a/..", "..\\escape"])
def test_prefix_outside_the_folder_is_value_error(tmp_path, prefix):
    inside = tmp_path / "loras"
    with pytest.raises(ValueError, match="filename_prefix"):
        save_lora_file(tiny_lora(), str(inside), prefix)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_dot_dot_that_stays_inside_is_allowed(tmp_path):
    path = save_lora_file(tiny_lora(), str(tmp_path), "a/../b/x")
    assert os.path.relpath(path, tmp_path) == os.path.join("b", "x_00001_.safetensors")


def test_trained_lora_metadata_and_kohya_keys(tmp_path):
    lora = LoraWeights(tiny_lora(), TRAINED_METADATA)
    meta = lora_file_metadata(lora, metadata_of(lora), 120, __version__)
    path = save_lora_file(lora, str(tmp_path), "m", meta, 120)
    saved, _ = header(path)
    for key, value in TRAINED_METADATA.items():
        assert saved[key] == str(value), key
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
        "ss_steps": "120", "ss_max_train_steps": "120", "ss_learning_rate": "0.0005",
        "ss_unet_lr": "0.0005", "ss_optimizer": "torch.optim.AdamW", "ss_seed": "7",
        "ss_loss_type": "l2", "ss_mixed_precision": "bf16", "ss_save_precision": "float",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_batch_size_per_device": "2",
        "ss_network_train_unet_only": "True",
    }
    assert {k: saved.get(k) for k in expected} == expected
    assert all(isinstance(v, str) for v in saved.values())


def test_steps_input_overrides_the_recorded_steps():
    lora = LoraWeights(tiny_lora(), {"lora_lab.steps": 10})
    meta = lora_file_metadata(lora, metadata_of(lora), 25)
    assert meta["lora_lab.steps"] == meta["ss_steps"] == "25"


def test_plain_dict_lora_gets_what_its_tensors_tell():
    meta = lora_file_metadata(tiny_lora(rank=3, dtype=torch.bfloat16), {}, None, "9.9",
                              title="mine")
    date = meta.pop("modelspec.date")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", date)
    assert meta == {
        "lora_lab.version": "9.9", "lora_lab.algorithm": "LoRA", "lora_lab.rank": "3",
        "lora_lab.alpha": "2.0", "lora_lab.lora_dtype": "bf16", "ss_network_module": "networks.lora",
        "ss_network_dim": "3", "ss_network_alpha": "2.0", "ss_network_train_unet_only": "True",
        "ss_save_precision": "bf16", "lora_lab.format": "comfyui",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "unknown/lora",
        "modelspec.implementation": "https://github.com/comfyanonymous/ComfyUI",
        "modelspec.title": "mine",
    }


def test_companion_schemas():
    ids = [spec.node_id for spec in COMPANION_NODES]
    assert ids == ["LoRALab_SaveLoRA", "LoRALab_PlotLoss", "LoRALab_ApplyLoRA", "LoRALab_LoadDataset",
                   "LoRALab_SaveTrainingData", "LoRALab_LoadTrainingData"]
    assert all(i.startswith("LoRALab_") and i not in CORE_IDS for i in ids)
    for spec in COMPANION_NODES:
        assert spec.display_name and spec.description
        for name, kind, options in spec.inputs:
            assert options.get("tooltip"), f"{spec.node_id}.{name} has no tooltip"
            if kind == "COMBO" and options["options"]:
                assert options["default"] in options["options"]
            if "default" in options and "min" in options:
                assert options["min"] <= options["default"] <= options["max"]
        for out_id, kind, display, tip in spec.outputs:
            assert tip, f"{spec.node_id} output {out_id} has no tooltip"
    save = {name: (kind, opts) for name, kind, opts in SAVE_LORA.inputs}
    assert save["lora"][0] == "LORA_MODEL" and save["filename_prefix"][1]["default"] == "lora_lab/my_lora"
    assert save["steps"][1]["optional"] and save["steps"][1]["force_input"]
    assert SAVE_LORA.outputs[0][1] == "STRING" and SAVE_LORA.flags["is_output_node"]
    dataset = {name: (kind, opts) for name, kind, opts in LOAD_DATASET.inputs}
    assert dataset["resize_mode"][1]["options"] == ["crop", "pad", "stretch", "bucket"]
    assert [k for _, k, *_ in LOAD_DATASET.outputs] == ["LATENT", "CONDITIONING"]
    assert LOAD_DATASET.output_lists  # one LATENT and CONDITIONING per size


def test_output_ids_differ_from_input_ids():
    for spec in COMPANION_NODES:
        assert not {o[0] for o in spec.outputs} & {i[0] for i in spec.inputs}, spec.node_id
