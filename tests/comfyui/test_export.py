"""Save LoRA's ``kohya`` format in real ComfyUI: kohya ``lora_unet_`` names for SD1.x
(diffusers' layer names) and SDXL (LDM names), diffusers/PEFT names for transformer
families; each file loaded by ComfyUI's core loader reproduces ``model_with_lora``, and
``existing_lora`` reads it back. ``test_diffusers.py`` loads the same files in diffusers."""

import os

import pytest
import torch

from test_algorithms import ALGORITHMS, Warnings, sub, training_forward_output
from test_options import make_options
from test_train_node import family_case, model_output, run_train
import tiny_families

TOL = 1e-4


def save(pack_nodes, lora, folder, format, model=None, prefix="export/lora"):
    """Save LoRA's file: (its tensors, its header)."""
    from safetensors import safe_open

    with torch.inference_mode():
        name = pack_nodes["LoRALab_SaveLoRA"].execute(lora, prefix, 7, format, model).result[0]
    with safe_open(os.path.join(folder, name), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def core_load(model, tensors):
    """The model with the file applied by ComfyUI's core LoRA loader; fails on any key it
    reports as not loaded."""
    import comfy.sd

    with Warnings() as w:
        loaded = comfy.sd.load_lora_for_models(model, None, dict(tensors), 1.0, 0)[0]
    assert not w.not_loaded(), w.not_loaded()[:3]
    return loaded


def close(a, b):
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


def check_file(pack, model, trained, tensors, probe, positive):
    """Core loader == model_with_lora, and the pack's reader (existing_lora) gets the same."""
    expected = model_output(trained, probe, positive)
    assert close(model_output(core_load(model, tensors), probe, positive), expected)
    keys = sub(pack, "nodes.lora_keys").to_diffusion_model_keys(model, tensors)
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert close(training_forward_output(pack, model, keys, probe, positive), expected)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sd15_kohya_names_every_algorithm(algorithm, train_node, pack_nodes, pack, options_node,
                                          loras_dir):
    model, latents, positive, probe = family_case("sd15")
    options = make_options(options_node, target_layers="all")  # 3x3 convs too (LoCon)
    trained, lora, _, _ = run_train(train_node, model, latents, positive, algorithm=algorithm,
                                    steps=2, learning_rate=5e-3, gradient_checkpointing=False,
                                    options=options)
    tensors, meta = save(pack_nodes, lora, loras_dir, "kohya")
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in tensors)
    assert len(tensors) == len(lora)
    assert meta["lora_lab.format"] == "kohya" and meta["modelspec.sai_model_spec"] == "1.0.0"
    kind = "lora" if algorithm in ("LoRA", "DoRA") else "lycoris"
    assert meta["modelspec.architecture"] == f"stable-diffusion-v1/{kind}"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "lora" and meta["ss_steps"] == "7"
    check_file(pack, model, trained, tensors, probe, positive)


def test_comfyui_format_is_unchanged_and_carries_modelspec(train_node, pack_nodes, loras_dir):
    model, latents, positive, _ = family_case("sd15")
    _, lora, _, _ = run_train(train_node, model, latents, positive, steps=1)
    tensors, meta = save(pack_nodes, lora, loras_dir, "comfyui")
    assert tensors.keys() == lora.keys() and all(torch.equal(tensors[k], lora[k]) for k in lora)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "https://github.com/comfyanonymous/ComfyUI"
    assert meta["lora_lab.format"] == "comfyui" and meta["ss_network_module"] == "networks.lora"


def test_a_lora_without_its_model_needs_the_model_input(train_node, pack_nodes, pack, loras_dir):
    model, latents, positive, probe = family_case("sd15")
    trained, lora, _, _ = run_train(train_node, model, latents, positive, steps=2,
                                    learning_rate=5e-3)
    plain = dict(lora)  # what ComfyUI's own trainer gives: no model attached
    with pytest.raises(ValueError, match="connect that model to Save LoRA's model input"):
        save(pack_nodes, plain, loras_dir, "kohya")
    assert not os.listdir(os.path.join(loras_dir)) or not any(
        f.endswith(".safetensors") for _, _, fs in os.walk(loras_dir) for f in fs)
    tensors, _ = save(pack_nodes, plain, loras_dir, "kohya", model=model)
    assert all(k.startswith("lora_unet_") for k in tensors)
    check_file(pack, model, trained, tensors, probe, positive)


def test_sd3_diffusers_names_split_the_fused_qkv(train_node, pack_nodes, pack, loras_dir):
    model, latents, positive, probe = family_case("sd3")
    trained, lora, _, _ = run_train(train_node, model, latents, positive, steps=2,
                                    learning_rate=5e-3, lora_dtype="bf16")
    tensors, meta = save(pack_nodes, lora, loras_dir, "kohya")
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    q = "transformer.transformer_blocks.0.attn.to_q"
    k = "transformer.transformer_blocks.0.attn.to_k"
    assert torch.equal(tensors[f"{q}.lora_A.weight"], tensors[f"{k}.lora_A.weight"])
    assert tensors[f"{q}.lora_B.weight"].dtype == torch.bfloat16
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.architecture"] == "stable-diffusion-3/lora"
    check_file(pack, model, trained, tensors, probe, positive)


@pytest.mark.parametrize("algorithm, options, match", [
    ("LoHa", {}, "LoHa keys"),
    ("DoRA", {}, "DoRA keys"),
    ("LoRA", {"train_norm_bias": True}, "norm/bias deltas"),
])
def test_what_diffusers_names_cannot_carry_is_refused(algorithm, options, match, train_node,
                                                      pack_nodes, options_node, loras_dir):
    model, latents, positive, _ = family_case("sd3")
    made = make_options(options_node, **options) if options else None
    extra = {"options": made} if made is not None else {}
    _, lora, _, _ = run_train(train_node, model, latents, positive, steps=1,
                              algorithm=algorithm, **extra)
    with pytest.raises(ValueError, match=f"{match}.*Save this LoRA with format comfyui"):
        save(pack_nodes, lora, loras_dir, "kohya")
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(loras_dir) for f in fs)


def test_sd15_norm_bias_deltas_keep_kohya_names(train_node, pack_nodes, pack, options_node,
                                                loras_dir, caplog):
    model, latents, positive, probe = family_case("sd15")
    options = make_options(options_node, train_norm_bias=True)
    trained, lora, _, _ = run_train(train_node, model, latents, positive, steps=2,
                                    learning_rate=5e-3, options=options)
    tensors, _ = save(pack_nodes, lora, loras_dir, "kohya")
    assert any(k.endswith(".diff_b") for k in tensors) and any(k.endswith(".diff") for k in tensors)
    assert "diffusers leaves them out" in caplog.text
    expected = model_output(trained, probe, positive)
    assert close(model_output(core_load(model, tensors), probe, positive), expected)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_existing_lora_continues_a_kohya_file_as_the_comfyui_one(family, train_node, pack_nodes,
                                                                  loras_dir):
    """Train LoRA's existing_lora on the two files of one LoRA: the same continued LoRA."""
    model, latents, positive, _ = family_case(family)
    _, lora, _, _ = run_train(train_node, model, latents, positive, steps=2, learning_rate=5e-3)
    names = {}
    for format in ("comfyui", "kohya"):
        with torch.inference_mode():
            names[format] = pack_nodes["LoRALab_SaveLoRA"].execute(
                lora, f"continue/{format}", 2, format).result[0]
    continued = {format: run_train(train_node, model, latents, positive, steps=1,
                                   learning_rate=5e-3, existing_lora=name)
                 for format, name in names.items()}
    assert [c[3] for c in continued.values()] == [3, 3]  # 2 steps in the file + 1
    a, b = continued["comfyui"][1], continued["kohya"][1]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6 * a[key].abs().max()), key


@pytest.mark.parametrize("name", ["sdxl", "sd20_v", "flux", "wan21_t2v"])
def test_other_families(name, train_node, pack_nodes, pack, loras_dir):
    family = {**tiny_families.FAMILIES, **tiny_families.LARGE_FAMILIES}[name]
    reason = family.available()
    if reason:
        pytest.skip(reason)
    with torch.inference_mode():
        model = family.build(seed=1)
    shape = (2, *family.latent_shape[1:])
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(5))
    positive = family.cond(seed=3)
    trained, lora, _, _ = run_train(train_node, model, latents, positive, steps=2,
                                    learning_rate=5e-3)
    tensors, _ = save(pack_nodes, lora, loras_dir, "kohya")
    every, some = {"sdxl": ("lora_unet_", "lora_unet_input_blocks_"),  # LDM names
                   "sd20_v": ("lora_unet_", "lora_unet_down_blocks_0_attentions_0_"),
                   "flux": ("transformer.", "transformer.single_transformer_blocks.0.attn.to_q."),
                   "wan21_t2v": ("diffusion_model.", "diffusion_model.blocks.0.")}[name]
    assert all(k.startswith(every) for k in tensors)
    assert any(k.startswith(some) for k in tensors), sorted(tensors)[:3]
    check_file(pack, model, trained, tensors, probe, positive)
