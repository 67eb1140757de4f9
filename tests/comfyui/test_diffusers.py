"""Files saved with Save LoRA's ``kohya`` format, loaded by diffusers' own LoRA loading.

A diffusers model (SD1.x UNet2DConditionModel, SD3Transformer2DModel) is built with the
configuration of ComfyUI's tiny test model and its
weights (renamed with ComfyUI's own ``comfy.utils.unet_to_diffusers`` / ``mmdit_to_diffusers``
maps); its output must equal ComfyUI's, then, with the LoRA file loaded by diffusers, equal
Train LoRA's ``model_with_lora`` on the same input (within 1e-4 of the output scale, fp32).

diffusers and peft are test-only dependencies (the ``test`` extra); without them these tests
are skipped with that reason.
"""

import pytest
import torch

from test_export import save
from test_options import make_options
from test_train_node import run_train

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install "
                                "'.[test]'); it is what these tests load the files with")
pytest.importorskip("peft", reason="peft is not installed (pip install '.[test]'); diffusers "
                    "loads LoRAs through it")
TOL = 1e-4


def comfy_output(patcher, x, t, context, **extra):
    """The diffusion network's raw output, with the patcher's LoRA patches applied."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.diffusion_model(x, t, context=context, **extra).float().clone()


def close(a, b):
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


def converted(comfy_sd, mapping, prefix=""):
    """diffusers' state dict from ComfyUI's through one of ComfyUI's ``*_to_diffusers`` maps
    (a value is a key, a (key, (dim, offset, size)) slice, or (key, None, function))."""
    out = {}
    for name, target in mapping.items():
        if isinstance(target, str):
            key, rows, function = target, None, None
        else:
            key, rows, function = (tuple(target) + (None, None))[:3]
        key = key[len(prefix):]
        if key not in comfy_sd:
            continue
        value = comfy_sd[key]
        if rows is not None:
            value = value.narrow(*rows)
        if function is not None:
            value = function(value)
        out[name] = value.clone()
    return out


@pytest.fixture(scope="module")
def sd15():
    """Tiny SD1.x (two levels, attention everywhere: a layout diffusers' blocks express) and
    the diffusers UNet2DConditionModel with its weights."""
    import comfy.utils
    import tiny_models

    with torch.inference_mode():
        model = tiny_models.tiny_sd15(seed=1, medium=True)
    config = model.model.model_config.unet_config
    assert config["channel_mult"] == [1, 1] and config["transformer_depth_output"] == [1] * 4
    unet = diffusers.UNet2DConditionModel(
        sample_size=config["image_size"], in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        block_out_channels=(320, 320), cross_attention_dim=tiny_models.SD15_CONTEXT_DIM,
        attention_head_dim=config["num_heads"])
    weights = converted(model.model.diffusion_model.state_dict(),
                        comfy.utils.unet_to_diffusers(config))
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    return model, unet.eval()


def sd15_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0]),
            torch.randn(1, 77, 768, generator=g))


@pytest.mark.parametrize("target_layers", ["linear", "all"])
def test_sd15_kohya_file_in_diffusers_equals_model_with_lora(
        target_layers, sd15, train_node, pack_nodes, options_node, loras_dir):
    model, unet = sd15
    x, t, context = sd15_inputs()
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=context).sample
    assert close(base, comfy_output(model, x, t, context))  # same network, same weights

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    positive = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3)), {}]]
    options = make_options(options_node, target_layers=target_layers)
    trained, lora, _, _ = run_train(train_node, model, latents, positive, steps=3,
                                    learning_rate=2e-2, options=options)
    tensors, _ = save(pack_nodes, lora, loras_dir, "kohya")
    expected = comfy_output(trained, x, t, context)
    assert not close(expected, base)  # the LoRA changes the output

    pipeline = diffusers.StableDiffusionPipeline
    state, alphas = pipeline.lora_state_dict(dict(tensors))
    pipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="lab")
    try:
        with torch.no_grad():
            got = unet(x, t, encoder_hidden_states=context).sample
    finally:
        unet.delete_adapters("lab")
    assert close(got, expected), ((got - expected).abs().max(), expected.abs().max())


@pytest.fixture(scope="module")
def sd3():
    """Tiny SD3 MMDiT and diffusers' SD3Transformer2DModel with its weights (the fused qkv
    split into to_q/to_k/to_v by ComfyUI's map)."""
    import comfy.utils
    import tiny_models

    with torch.inference_mode():
        model = tiny_models.tiny_sd3(seed=1)
    config = model.model.model_config.unet_config
    depth = config["depth"]
    net = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=config["patch_size"], in_channels=16, out_channels=16,
        num_layers=depth, attention_head_dim=64, num_attention_heads=depth,
        joint_attention_dim=tiny_models.SD3_CONTEXT_DIM, caption_projection_dim=64 * depth,
        pooled_projection_dim=tiny_models.SD3_POOLED_DIM,
        pos_embed_max_size=config["pos_embed_max_size"])
    weights = converted(model.model.diffusion_model.state_dict(),
                        comfy.utils.mmdit_to_diffusers(config, output_prefix="diffusion_model."),
                        "diffusion_model.")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    return model, net.eval()


def test_sd3_diffusers_named_file_in_diffusers_equals_model_with_lora(
        sd3, train_node, pack_nodes, options_node, loras_dir):
    import tiny_models

    model, net = sd3
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.6])
    context = torch.randn(1, 8, tiny_models.SD3_CONTEXT_DIM, generator=g)
    pooled = torch.randn(1, tiny_models.SD3_POOLED_DIM, generator=g)

    def diffusers_output():
        with torch.no_grad():
            return net(hidden_states=x, encoder_hidden_states=context,
                       pooled_projections=pooled, timestep=t).sample

    base = diffusers_output()
    assert close(base, comfy_output(model, x, t, context, y=pooled))

    latents = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    trained, lora, _, _ = run_train(train_node, model, latents, tiny_models.sd3_cond(seed=3),
                                    steps=3, learning_rate=2e-2,
                                    options=make_options(options_node, target_layers="linear"))
    tensors, _ = save(pack_nodes, lora, loras_dir, "kohya")
    assert any(".attn.to_q.lora_A" in k for k in tensors)
    expected = comfy_output(trained, x, t, context, y=pooled)
    assert not close(expected, base)

    pipeline = diffusers.StableDiffusion3Pipeline
    state = pipeline.lora_state_dict(dict(tensors))
    pipeline.load_lora_into_transformer(state, transformer=net, adapter_name="lab")
    try:
        got = diffusers_output()
    finally:
        net.delete_adapters("lab")
    assert close(got, expected), ((got - expected).abs().max(), expected.abs().max())

