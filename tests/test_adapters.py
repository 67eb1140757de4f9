"""Adapter invariants over layer types and dtypes."""

import pytest
import torch
from torch import nn

from lora_lab.lora import ADAPTERS, layer_geometry
from lora_lab.lora.inject import ForwardPatches, adapter_patches, find_targets

LAYERS = {
    "linear": (lambda: nn.Linear(12, 20), (3, 5, 12)),
    "conv1x1": (lambda: nn.Conv2d(12, 20, 1), (2, 12, 6, 6)),
    "conv3x3_stride": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1), (2, 12, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(12, 20, 3, padding=1), (2, 12, 9)),
}
CASES = [(a, l, d) for a in ADAPTERS for l in LAYERS for d in (torch.float32, torch.bfloat16)]


def build(algorithm, layer_name, dtype, seed=0):
    torch.manual_seed(seed)
    make, shape = LAYERS[layer_name]
    layer = make()
    x = torch.randn(shape)
    adapter = ADAPTERS[algorithm](
        layer_geometry(layer), 4, 2.0, dtype, torch.Generator().manual_seed(seed),
        weight=layer.weight, bias=layer.bias)
    return layer, adapter, x


@pytest.mark.parametrize("algorithm,layer_name,dtype", CASES)
def test_zero_delta_at_init(algorithm, layer_name, dtype):
    layer, adapter, x = build(algorithm, layer_name, dtype)
    assert torch.equal(adapter.bypass(layer.forward)(x), layer(x))
    assert torch.count_nonzero(adapter.delta_weight(layer.weight.detach())) == 0


@pytest.mark.parametrize("algorithm,layer_name,dtype", CASES)
def test_bypass_forward_equals_merged_weight(algorithm, layer_name, dtype):
    layer, adapter, x = build(algorithm, layer_name, dtype)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    bypass = adapter.bypass(layer.forward)(x)
    weight = adapter.merged_weight(layer.weight.detach())
    if isinstance(layer, nn.Linear):
        expected = nn.functional.linear(x, weight, layer.bias)
    else:
        expected = layer._conv_forward(x, weight, layer.bias)
    # both paths compute in fp32 from the same (rounded) adapter weights
    assert torch.allclose(bypass, expected, atol=1e-4, rtol=1e-5), (bypass - expected).abs().max()


@pytest.mark.parametrize("algorithm,layer_name,dtype", CASES)
def test_every_parameter_gets_a_gradient(algorithm, layer_name, dtype):
    layer, adapter, x = build(algorithm, layer_name, dtype)
    layer.requires_grad_(False)
    adapter.bypass(layer.forward)(x).square().mean().backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.dtype == torch.float32, name
    # at init one factor is zero, so only some gradients are nonzero
    assert any(p.grad.abs().sum() > 0 for p in adapter.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_keys_and_shapes(dtype):
    layer, adapter, _ = build("LoRA", "conv3x3_stride", dtype)
    state = adapter.to_state_dict("diffusion_model.block.conv")
    assert set(state) == {
        "diffusion_model.block.conv.lora_up.weight",
        "diffusion_model.block.conv.lora_down.weight",
        "diffusion_model.block.conv.alpha",
    }
    assert state["diffusion_model.block.conv.lora_down.weight"].shape == (4, 12, 3, 3)
    assert state["diffusion_model.block.conv.lora_up.weight"].shape == (20, 4, 1, 1)
    assert state["diffusion_model.block.conv.lora_up.weight"].dtype == dtype
    assert state["diffusion_model.block.conv.alpha"].item() == 2.0


def test_comfyui_loader_formula_on_saved_keys():
    """W' = W + alpha/rank * up @ down (flattened), as ComfyUI's LoRA loader computes it."""
    layer, adapter, x = build("LoRA", "conv3x3_stride", torch.float32)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    s = adapter.to_state_dict("m")
    up, down, alpha = s["m.lora_up.weight"], s["m.lora_down.weight"], s["m.alpha"].item()
    rank = down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * (alpha / rank)
    expected = layer._conv_forward(x, layer.weight + delta, layer.bias)
    assert torch.allclose(adapter.bypass(layer.forward)(x), expected, atol=1e-4)


def test_targets_are_linear_and_1x1_conv(task_and_latents):
    task, _ = task_and_latents
    targets = find_targets(task.network)
    kinds = {type(m) for m, _ in targets.values()}
    assert nn.Linear in kinds
    for module, geometry in targets.values():
        assert isinstance(module, nn.Linear) or all(k == 1 for k in geometry.kernel_size)


def test_forward_patches_restore_the_module_exactly():
    layer = nn.Linear(4, 4)
    custom = lambda x: x  # noqa: E731  a forward someone else set on the instance
    layer.forward = custom
    _, adapter, _ = build("LoRA", "linear", torch.float32)
    other = nn.Linear(4, 4)
    with ForwardPatches([(layer, lambda f: f), (other, lambda f: f)]):
        assert "forward" in other.__dict__
    assert layer.__dict__["forward"] is custom
    assert "forward" not in other.__dict__
    assert adapter_patches(nn.Sequential(), {}) == []
