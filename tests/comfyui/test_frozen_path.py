"""The frozen-base path (nodes/bridge.py ``FrozenLayer``): ComfyUI's Linear and Conv layers
run without copying or saving their weights, and the adapters' gradients equal those of the
copying path (an identity weight function, which makes ComfyUI copy every weight per
forward) for every algorithm, with inference-mode weights stored in fp32, fp16, bf16 and
fp8, and on whole tiny models trained through the node."""

import pytest
import torch

from test_algorithms import ALGORITHMS, sub
from test_train_node import family_case, run_train

STORED = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8": torch.float8_e4m3fn}


def network(stored, seed=0):
    """ComfyUI-ops Linear -> Conv2d 3x3 -> Conv2d 1x1 -> Linear, weights made under
    inference mode as ComfyUI's loaders make them; manual-cast ops where the stored dtype is
    not float32 (computing in float32, as UNETLoader's fp8/fp16 choices do)."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init if stored == torch.float32 else comfy.ops.manual_cast
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        net = torch.nn.ModuleDict({
            "inp": ops.Linear(6, 8, dtype=stored),
            "conv": ops.Conv2d(8, 8, 3, padding=1, dtype=stored),
            "proj": ops.Conv2d(8, 8, 1, dtype=stored),
            "out": ops.Linear(8, 6, dtype=stored),
        })
        for p in net.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(stored))
    return net.requires_grad_(False)


def forward(net, x):
    h = net["inp"](x)  # [B, 4, 4, 8]
    h = h.permute(0, 3, 1, 2)
    h = net["proj"](torch.nn.functional.silu(net["conv"](h)))
    return net["out"](h.permute(0, 2, 3, 1))


def adapter_grads(pack, net, algorithm, frozen, x, autocast=False, checkpointed=False):
    bridge, inject = sub(pack, "nodes.bridge"), sub(pack, "lora.inject")
    adapters = inject.create_adapters(net, algorithm, 4, 1.0, torch.float32,
                                      torch.Generator().manual_seed(1),
                                      targets=inject.find_targets(net, "all"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with bridge.autograd_weights(net, frozen=frozen):
        with inject.ForwardPatches(inject.adapter_patches(net, adapters)):
            run = forward
            if checkpointed:  # the whole network as one checkpointed block
                run = sub(pack, "training.checkpointing").checkpointed(forward)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = run(net, x).float().square().mean()
            loss.backward()
    return {f"{n}.{k}": p.grad.clone() for n, a in adapters.items()
            for k, p in a.named_parameters()}


@pytest.mark.parametrize("stored", list(STORED))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_equal_the_copying_path(algorithm, stored, pack):
    net = network(STORED[stored])
    weights = {k: (v, v.clone()) for k, v in net.state_dict(keep_vars=True).items()}
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    old = adapter_grads(pack, net, algorithm, False, x)
    new = adapter_grads(pack, net, algorithm, True, x)
    assert old.keys() == new.keys()
    for key in old:
        scale = old[key].abs().max().item()
        assert scale > 0, key
        assert (new[key] - old[key]).abs().max().item() <= 1e-6 * scale, (key, stored)
    # the layers are as they were: same weight objects and values, nothing left on them
    for key, (tensor, value) in weights.items():
        now = net.state_dict(keep_vars=True)[key]
        assert now is tensor and torch.equal(now.float(), value.float()), key
    for module in net.values():
        assert "forward_comfy_cast_weights" not in vars(module)
        assert "comfy_cast_weights" not in vars(module)
        assert module.weight_function == [] and module.bias_function == []


def test_gradients_under_bf16_autocast_match_autograd(pack):
    net = network(torch.float32)
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    old = adapter_grads(pack, net, "LoRA", False, x, autocast=True)
    new = adapter_grads(pack, net, "LoRA", True, x, autocast=True)
    for key in old:  # the same bf16 input gradients, summed in the same order
        assert torch.allclose(new[key], old[key], rtol=1e-2, atol=1e-3 * old[key].abs().max()), key


@pytest.mark.parametrize("stored, autocast", [("fp16", False), ("fp8", False), ("fp32", True)])
@pytest.mark.parametrize("algorithm", ["LoRA", "OFT"])
def test_recomputed_layers_equal_the_copying_path(algorithm, stored, autocast, pack):
    """Under checkpointing the layers run twice, the second time inside backward, where the
    frozen path keeps the weight it cast for that block's backward: gradients unchanged."""
    net = network(STORED[stored])
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    old = adapter_grads(pack, net, algorithm, False, x, autocast=autocast)
    new = adapter_grads(pack, net, algorithm, True, x, autocast=autocast, checkpointed=True)
    for key in old:
        scale = old[key].abs().max().item()
        assert scale > 0, key
        tolerance = 1e-2 if autocast else 1e-6  # bf16: the same values, summed in another order
        assert (new[key] - old[key]).abs().max().item() <= tolerance * scale, (key, stored)


@pytest.mark.parametrize("stored, frozen", [("fp32", True), ("fp16", True), ("fp32", False),
                                            ("fp16", False)])
def test_no_weight_copy_is_saved_for_backward(stored, frozen, pack):
    """What autograd keeps for backward: the frozen path keeps no copy or cast of a base
    weight (at most a reference to the stored weight itself); the copying path keeps a copy
    of each. fp16 weights are cast to fp32 on every forward."""
    bridge, inject = sub(pack, "nodes.bridge"), sub(pack, "lora.inject")
    net = network(STORED[stored])
    adapters = inject.create_adapters(net, "LoRA", 2, 1.0, torch.float32,
                                      torch.Generator().manual_seed(1))
    shapes = {tuple(m.weight.shape) for m in net.values()}
    stored_at = {m.weight.data_ptr() for m in net.values()}
    saved = []

    def pack_hook(tensor):
        saved.append((tuple(tensor.shape), tensor.data_ptr()))
        return tensor

    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    with bridge.autograd_weights(net, frozen=frozen):
        with inject.ForwardPatches(inject.adapter_patches(net, adapters)):
            with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                loss = forward(net, x).square().mean()
            loss.backward()
    copies = [shape for shape, pointer in saved if shape in shapes and pointer not in stored_at]
    if frozen:
        assert not copies, copies
    else:
        assert copies  # the test can tell


@pytest.mark.parametrize("family, weight_dtype", [("sd15", None), ("sd3", None),
                                                  ("sd15", torch.float8_e4m3fn)])
@pytest.mark.parametrize("algorithm", ["LoRA", "DoRA", "OFT"])
def test_trained_loras_equal_the_copying_path(family, weight_dtype, algorithm, train_node, pack,
                                              monkeypatch):
    import tiny_models

    bridge = sub(pack, "nodes.bridge")
    model, latents, positive, _ = family_case(family)
    if weight_dtype is not None:
        model = tiny_models.tiny_sd15(seed=1, weight_dtype=weight_dtype)
    settings = dict(steps=3, learning_rate=1e-2, algorithm=algorithm,
                    gradient_checkpointing=True)
    calls = []
    frozen_forward = bridge._frozen_forward
    monkeypatch.setattr(bridge, "_frozen_forward",
                        lambda *a: calls.append(1) or frozen_forward(*a))
    _, new, new_loss, _ = run_train(train_node, model, latents, positive, **settings)
    assert calls  # the model's layers ran through the frozen path
    original = bridge.autograd_weights
    monkeypatch.setattr(bridge, "autograd_weights",
                        lambda base, frozen=True: original(base, frozen=False))
    _, old, old_loss, _ = run_train(train_node, model, latents, positive, **settings)
    assert new.keys() == old.keys()
    for key in old:
        scale = old[key].abs().max().item() or 1.0
        assert (new[key] - old[key]).abs().max().item() <= 1e-5 * scale, key
    assert new_loss["loss"] == pytest.approx(old_loss["loss"], rel=1e-5)
