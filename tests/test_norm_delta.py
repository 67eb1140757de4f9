"""Norm/bias deltas (``train_norm_bias``, lora/diff.py) in plain torch: zero at init, the
bypass forward equals the layer run with ``(weight + diff, bias + diff_b)``, gradients reach
the deltas, the ``diff`` / ``diff_b`` keys round-trip, and continuing a file that mixes LoRA
keys with delta keys rebuilds both."""

import copy
import logging

import pytest
import torch
from torch import nn

from lora_lab.lora import ADAPTERS, layer_geometry
from lora_lab.lora.diff import (NormDelta, create_norm_deltas, is_norm_delta_key,
                                norm_deltas_from_state_dict, norm_targets)
from lora_lab.lora.inject import ForwardPatches, adapter_patches, lora_state_dict
from lora_lab.lora.io import adapters_from_state_dict, lora_from_state_dict
from tiny_tasks import make_task

LAYERS = {
    "group_norm": (lambda: nn.GroupNorm(4, 12), (2, 12, 5, 5)),
    "layer_norm": (lambda: nn.LayerNorm(12), (2, 7, 12)),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm((3, 12)), (2, 3, 12)),
    "layer_norm_no_bias": (lambda: nn.LayerNorm(12, bias=False), (2, 7, 12)),
    "linear_bias": (lambda: nn.Linear(12, 20), (3, 5, 12)),
    "conv3x3_bias": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1), (2, 12, 7, 7)),
    "conv1d_bias": (lambda: nn.Conv1d(12, 20, 3, padding=1), (2, 12, 9)),
    "conv_transpose_bias": (lambda: nn.ConvTranspose2d(12, 20, 2, stride=2), (2, 12, 4, 4)),
}
RMS_NORM = getattr(nn, "RMSNorm", None)  # torch >= 2.4
if RMS_NORM is not None:
    LAYERS["rms_norm"] = (lambda: RMS_NORM(12, eps=1e-6), (2, 7, 12))
    LAYERS["rms_norm_default_eps"] = (lambda: RMS_NORM(12), (2, 7, 12))
CASES = [(layer, dtype) for layer in LAYERS for dtype in (torch.float32, torch.bfloat16)]


def build(name, dtype, seed=0):
    torch.manual_seed(seed)
    make, shape = LAYERS[name]
    layer = make()
    with torch.no_grad():  # affine parameters off their init (1, 0), as in a trained model
        for p in layer.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    layer.requires_grad_(False)
    return layer, NormDelta.for_module(layer, dtype), torch.randn(shape)


def perturb(delta, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def with_deltas(layer, delta):
    """A copy of ``layer`` with the (rounded) deltas added to its weight and bias."""
    other = copy.deepcopy(layer)
    with torch.no_grad():
        if delta.diff is not None:
            other.weight.add_(delta.diff.to(delta.compute_dtype).float())
        if delta.diff_b is not None:
            other.bias.add_(delta.diff_b.to(delta.compute_dtype).float())
    return other


@pytest.mark.parametrize("name,dtype", CASES)
def test_zero_delta_at_init(name, dtype):
    layer, delta, x = build(name, dtype)
    assert all(p.dtype == torch.float32 and not p.any() for p in delta.parameters())
    assert torch.equal(delta.bypass(layer.forward)(x), layer(x))


@pytest.mark.parametrize("name,dtype", CASES)
def test_bypass_equals_the_layer_with_modified_parameters(name, dtype):
    layer, delta, x = build(name, dtype)
    perturb(delta)
    expected = with_deltas(layer, delta)(x)
    got = delta.bypass(layer.forward)(x)
    assert not torch.allclose(got, layer(x), atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("name,dtype", CASES)
def test_gradients_reach_the_deltas_and_the_input(name, dtype):
    layer, delta, x = build(name, dtype)
    x.requires_grad_(True)
    target = torch.randn_like(layer(x))
    (delta.bypass(layer.forward)(x) - target).square().mean().backward()
    names = {n for n, _ in delta.named_parameters()}
    has_weight = name.endswith("norm") or "norm_" in name
    assert names == ({"diff"} if has_weight else set()) | (
        set() if name in ("layer_norm_no_bias",) or name.startswith("rms") else {"diff_b"})
    for n, p in delta.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, n
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.weight.grad is None


@pytest.mark.parametrize("name,dtype", CASES)
def test_state_dict_round_trip(name, dtype):
    layer, delta, x = build(name, dtype)
    perturb(delta)
    state = delta.to_state_dict("diffusion_model.block.layer")
    assert all(is_norm_delta_key(k) for k in state)
    if delta.diff is not None:
        assert state["diffusion_model.block.layer.diff"].shape == layer.weight.shape
    if delta.diff_b is not None:
        assert state["diffusion_model.block.layer.diff_b"].shape == layer.bias.shape
    assert all(v.dtype == dtype for v in state.values())
    loaded = NormDelta.from_state_dict(layer, state, "diffusion_model.block.layer", dtype)
    again = loaded.to_state_dict("diffusion_model.block.layer")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    assert torch.equal(loaded.bypass(layer.forward)(x), delta.bypass(layer.forward)(x))


def test_shape_and_type_mismatches_are_named():
    norm = nn.GroupNorm(4, 12)
    with pytest.raises(ValueError, match=r"m\.diff has shape \[8\]"):
        NormDelta.from_state_dict(norm, {"m.diff": torch.zeros(8)}, "m", torch.float32)
    with pytest.raises(ValueError, match=r"m\.diff is a delta of a 1-D weight"):
        NormDelta.from_state_dict(nn.Linear(3, 4), {"m.diff": torch.zeros(4, 3)}, "m", torch.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        NormDelta.from_state_dict(norm, {"m.diff_b": torch.full((12,), float("nan"))}, "m",
                                  torch.float32)
    assert is_norm_delta_key("a.b.diff") and is_norm_delta_key("a.diff_b")
    assert not is_norm_delta_key("a.lora_up.weight") and not is_norm_delta_key("a.diffx")


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_norm_targets_in_plain_torch(kind):
    task, _ = make_task(kind)
    targets = norm_targets(task.network)
    modules = dict(task.network.named_modules())
    for name, module in modules.items():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm) + ((RMS_NORM,) if RMS_NORM else ()))
        wanted = (norm and (weight is not None or bias is not None)) or (
            isinstance(module, (nn.Linear, nn.Conv2d)) and bias is not None)
        assert (name in targets) == wanted, name
    norms = norm_targets(task.network, layer_biases=False)
    assert norms and all(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in norms.values())


class _ComfyLinear(nn.Linear):
    weight_function = []
    bias_function = []


class _ComfyGroupNorm(nn.GroupNorm):
    weight_function = []
    bias_function = []


class _ComfyBatchNorm(nn.BatchNorm2d):
    weight_function = []
    bias_function = []


def test_norm_targets_in_a_comfyui_model_are_its_ops_only(caplog):
    """As ComfyUI's trainer: only modules with ``weight_function`` (ComfyUI ops) count."""
    net = nn.ModuleDict({
        "op_linear": _ComfyLinear(4, 4), "op_norm": _ComfyGroupNorm(2, 4),
        "plain_linear": nn.Linear(4, 4), "plain_norm": nn.LayerNorm(4),
        "op_batch_norm": _ComfyBatchNorm(4),
    })
    with caplog.at_level(logging.WARNING):
        targets = norm_targets(net)
    assert set(targets) == {"op_linear", "op_norm"}
    assert "op_batch_norm" in caplog.text
    deltas = create_norm_deltas(net, torch.float32, targets)
    assert {n: sorted(k.rsplit(".", 1)[1] for k in d.to_state_dict(n)) for n, d in deltas.items()} \
        == {"op_linear": ["diff_b"], "op_norm": ["diff", "diff_b"]}


def test_bias_delta_is_added_outside_a_rotation_of_the_same_layer():
    """OFT rotates ``base(x) - bias``; the bias delta's patch goes after it, as ComfyUI's merge
    (rotated weight, bias + diff_b) has it."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 8).requires_grad_(False)
    oft = ADAPTERS["OFT"](layer_geometry(layer), 4, 0.0, torch.float32, weight=layer.weight,
                          bias=layer.bias)
    delta = NormDelta.for_module(layer, torch.float32)
    perturb(oft, std=0.2)
    perturb(delta)
    net = nn.Sequential(layer)
    x = torch.randn(3, 12)
    with ForwardPatches(adapter_patches(net, {"0": oft}) + adapter_patches(net, {"0": delta})):
        got = net(x)
    merged = nn.functional.linear(x, oft.merged_weight(layer.weight), layer.bias + delta.diff_b)
    assert torch.allclose(got, merged, atol=1e-5)


def _network_and_file(kind, algorithm="LoRA"):
    """A tiny net with perturbed adapters and norm/bias deltas, and their saved keys."""
    from lora_lab.lora.inject import create_adapters

    task, latents = make_task(kind, count=2)
    net = task.network
    adapters = create_adapters(net, algorithm, 4, 1.0, torch.float32, torch.Generator().manual_seed(0))
    deltas = create_norm_deltas(net, torch.float32)
    for i, module in enumerate(list(adapters.values()) + list(deltas.values())):
        perturb(module, seed=i, std=0.05)
    state = {**lora_state_dict(adapters, "diffusion_model."), **lora_state_dict(deltas, "diffusion_model.")}
    return task, latents, adapters, deltas, state


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bypass_of_a_whole_network_equals_its_merged_weights(kind):
    task, latents, adapters, deltas, _ = _network_and_file(kind)
    net = task.network
    t, ctx = torch.tensor([10.0, 500.0]), task.context[:2]
    with torch.no_grad():
        base = net(latents, t, ctx)
        with ForwardPatches(adapter_patches(net, adapters) + adapter_patches(net, deltas)):
            bypass = net(latents, t, ctx)
        merged = copy.deepcopy(net)
        modules = dict(merged.named_modules())
        for name, adapter in adapters.items():
            modules[name].weight.copy_(adapter.merged_weight(modules[name].weight))
        for name, delta in deltas.items():
            if delta.diff is not None:
                modules[name].weight.add_(delta.diff)
            if delta.diff_b is not None:
                modules[name].bias.add_(delta.diff_b)
        expected = merged(latents, t, ctx)
    scale = expected.abs().max()
    assert (bypass - base).abs().max() > 1e-3 * scale
    assert (bypass - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_continuing_a_file_with_lora_and_delta_keys(kind, caplog):
    task, latents, adapters, deltas, state = _network_and_file(kind)
    net = task.network
    assert any(k.endswith(".diff") for k in state) and any(k.endswith(".diff_b") for k in state)
    with caplog.at_level(logging.WARNING):
        loaded, loaded_deltas = lora_from_state_dict(net, state, "diffusion_model.", torch.float32)
    assert "dropped" not in caplog.text
    again = {**lora_state_dict(loaded, "diffusion_model."),
             **lora_state_dict(loaded_deltas, "diffusion_model.")}
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    t, ctx = torch.tensor([10.0, 500.0]), task.context[:2]
    with torch.no_grad():
        with ForwardPatches(adapter_patches(net, adapters) + adapter_patches(net, deltas)):
            a = net(latents, t, ctx)
        with ForwardPatches(adapter_patches(net, loaded) + adapter_patches(net, loaded_deltas)):
            b = net(latents, t, ctx)
    assert torch.equal(a, b)

    # the adapters-only reader keeps working and says what it drops
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        only = adapters_from_state_dict(net, state, "diffusion_model.", torch.float32)
    assert only.keys() == adapters.keys()
    assert "norm/bias delta keys (diff, diff_b) are dropped" in caplog.text

    bad = dict(state)
    bad["diffusion_model.no_such_layer.diff_b"] = torch.zeros(3)
    with pytest.raises(ValueError, match="does not have"):
        norm_deltas_from_state_dict(net, bad, "diffusion_model.", torch.float32)
