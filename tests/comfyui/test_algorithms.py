"""Every adapter algorithm trained through the node in real ComfyUI, on a tiny SD1.x (eps
UNet) and a tiny SD3 (flow MMDiT): saved with safetensors, loaded by the core
LoraLoaderModelOnly with no "not loaded" warning, equal to model_with_lora and to the
training forward, and continued from the saved file."""

import importlib
import logging
import os

import pytest
import torch

from test_train_node import FAMILIES, family_case, model_output, run_train

ALGORITHMS = ["LoRA", "LoHa", "LoKr", "OFT", "BOFT", "GLoRA", "DoRA"]
TOL = 1e-4
REPORT = {}  # (family, algorithm) -> relative differences, printed at the end


@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory):
    import folder_paths

    path = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(path), is_default=True)
    return path


class Warnings:
    def __enter__(self):
        self.records = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.records.append(record.getMessage())
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)

    def not_loaded(self):
        return [r for r in self.records if "not loaded" in r.lower() or "error" in r.lower()]


def sub(pack, name):
    return importlib.import_module(f"{pack.__name__}.{name}")


def training_forward_output(pack, model, lora, probe, positive):
    """The model's output with the saved keys rebuilt into adapters and run as in training."""
    io = sub(pack, "lora.io")
    inject = sub(pack, "lora.inject")
    model_output(model, probe, positive)  # base weights loaded and unpatched
    network = model.model.diffusion_model
    adapters = io.adapters_from_state_dict(network, lora, "diffusion_model.", torch.float32)
    with inject.ForwardPatches(inject.adapter_patches(network, adapters)):
        return model_output(model, probe, positive)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_save_load_continue(family, algorithm, train_node, pack, comfy, loras_dir):
    import comfy.utils
    import nodes

    model, latents, positive, probe = family_case(family)
    before = model_output(model, probe, positive)

    trained, lora, loss, steps = run_train(
        train_node, model, latents, positive, algorithm=algorithm, steps=3,
        learning_rate=5e-3, gradient_checkpointing=False)
    assert steps == 3 and all(k.startswith("diffusion_model.") for k in lora)
    with_lora = model_output(trained, probe, positive)
    scale = with_lora.abs().max()
    assert (with_lora - before).abs().max() > 1e-6 * scale, "the LoRA changes nothing"

    name = f"{family}_{algorithm}_3_steps_00001_.safetensors"
    comfy.utils.save_torch_file(dict(lora), str(loras_dir / name))
    core = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    with Warnings() as log:
        loaded = core.load_lora_model_only(model, name, 1.0)[0]
    assert not log.not_loaded(), log.records
    reloaded = model_output(loaded, probe, positive)
    reload_diff = float((reloaded - with_lora).abs().max() / scale)
    assert reload_diff <= TOL

    # ComfyUI's merge of the saved keys == the forward the adapters were trained with
    bypass = training_forward_output(pack, model, comfy.utils.load_torch_file(
        str(loras_dir / name), safe_load=True), probe, positive)
    train_diff = float((bypass - reloaded).abs().max() / scale)
    REPORT[(family, algorithm)] = (reload_diff, train_diff)
    assert train_diff <= TOL, train_diff
    assert torch.equal(model_output(model, probe, positive), before), "input model changed"

    # continuing: the algorithm comes from the file, whatever the algorithm input says
    other = "LoRA" if algorithm != "LoRA" else "LoKr"
    _, continued, _, total = run_train(
        train_node, model, latents, positive, algorithm=other, steps=2,
        learning_rate=5e-3, gradient_checkpointing=False, existing_lora=name)
    assert total == 5
    assert set(continued) == set(lora)
    assert continued.metadata["lora_lab.algorithm"] == algorithm
    assert any(not torch.equal(continued[k], lora[k]) for k in lora)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kohya_and_peft_names_resolve_to_our_keys(family, train_node, pack, comfy):
    import comfy.lora

    lora_keys = sub(pack, "nodes.lora_keys")
    build, cond, shape = FAMILIES[family]
    model = build(seed=1)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    _, lora, _, _ = run_train(train_node, model, latents, cond(seed=3), steps=1)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {}
    for alias, target in key_map.items():
        if isinstance(target, str):
            names.setdefault(target[:-len(".weight")], []).append(alias)

    def renamed(pick, suffixes):
        out = {}
        for key, value in lora.items():
            module, suffix = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
            if suffix == "alpha" or key.endswith(".alpha"):
                module, suffix = key[:-len(".alpha")], "alpha"
            out[f"{pick(names[module])}.{suffixes.get(suffix, suffix)}"] = value
        return out

    kohya = renamed(lambda a: next(n for n in a if n.startswith("lora_unet_")), {})
    peft_prefix = "unet." if family == "sd15" else "transformer."
    peft = renamed(lambda a: next((n for n in a if n.startswith(peft_prefix)), a[0]),
                   {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"})
    for other in (kohya, peft):
        assert set(other) != set(lora)
        back = lora_keys.to_diffusion_model_keys(model, other)
        assert set(back) == set(lora)
        assert all(torch.equal(back[k], lora[k]) for k in lora)
    io = sub(pack, "lora.io")
    adapters = io.adapters_from_state_dict(
        model.model.diffusion_model, lora_keys.to_diffusion_model_keys(model, kohya),
        "diffusion_model.", torch.float32)
    assert len(adapters) == len({k.rsplit(".", 2)[0] for k in lora if "lora_up" in k})


def test_report(capsys):
    """The per-algorithm fp32 reload differences: captured like any test output, so a normal
    run stays quiet; see them with -s or -rA, or with LORA_LAB_REPORT=1 in any run."""
    lines = [f"{family:5s} {algorithm:6s} reload/model_with_lora {reload_diff:.2e} "
             f"ComfyUI merge/training forward {train_diff:.2e}"
             for (family, algorithm), (reload_diff, train_diff) in sorted(REPORT.items())]
    if os.environ.get("LORA_LAB_REPORT") == "1":
        with capsys.disabled():
            print("\n" + "\n".join(lines))
    else:
        print("\n".join(lines))
