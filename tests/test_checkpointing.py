"""Gradient checkpointing (training/checkpointing.py): a checkpointed block gives the same
gradients as the plain one for DiT-like calls (a stream passed by keyword, tuple outputs),
dropout, bf16 autocast, inference-mode arguments and tensors inside containers, and runs
again in backward only where something needs a gradient."""

import pytest
import torch
from torch import nn

from lora_lab.lora.inject import ForwardPatches, adapter_patches, create_adapters
from lora_lab.training.checkpointing import checkpoint_blocks, checkpointed


class Joint(nn.Module):
    """An MMDiT-like block: ``(x, context=...) -> (x, context)``, with dropout."""

    def __init__(self, dim, dropout=0.0):
        super().__init__()
        self.x_proj, self.c_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, context=None, options=None, steps=None, bias=None):
        if bias is not None:
            x = x + bias
        both = torch.cat([self.x_proj(x), self.c_proj(context)], dim=1)
        both = self.drop(torch.nn.functional.gelu(self.mix(both)))
        if options is not None:
            options["calls"] = options.get("calls", 0) + 1  # the caller's dict, not a copy
        return x + both[:, :x.shape[1]], context + both[:, x.shape[1]:], steps


class Net(nn.Module):
    def __init__(self, dim=8, depth=3, dropout=0.0):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([Joint(dim, dropout) for _ in range(depth)])

    def forward(self, x, context, options=None, bias=None):
        x = self.inp(x)
        steps = torch.arange(3)
        for block in self.blocks:
            x, context, steps = block(x, context=context, options=options, steps=steps,
                                      bias=bias)
        return x.square().mean() + context.square().mean() + steps.sum() * 0


def grads(checkpointing, dropout=0.0, autocast=False, bias=False, seed=5):
    """Adapter gradients of one loss; ``bias``: an argument made under inference mode (as
    ComfyUI makes conditioning), which autograd may use but not save."""
    torch.manual_seed(0)
    net = Net(dropout=dropout).requires_grad_(False)
    adapters = create_adapters(net, "LoRA", 2, 2.0, torch.float32,
                               torch.Generator().manual_seed(1))
    for a in adapters.values():
        nn.init.normal_(a.up, std=0.1, generator=torch.Generator().manual_seed(2))
        a.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    if bias:
        with torch.inference_mode():
            bias = torch.randn(8, generator=g)
    else:
        bias = None
    patches = [(b, checkpointed) for b in checkpoint_blocks(net)] if checkpointing else []
    options = {}
    torch.manual_seed(seed)
    with ForwardPatches(adapter_patches(net, adapters)), ForwardPatches(patches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = net(x, context, options, bias)
        loss.backward()
    return {f"{n}.{k}": p.grad for n, a in adapters.items() for k, p in a.named_parameters()}, \
        options


@pytest.mark.parametrize("case", [{}, {"dropout": 0.5}, {"autocast": True}, {"bias": True}])
def test_checkpointed_blocks_give_the_plain_gradients(case):
    expected, plain_options = grads(False, **case)
    got, options = grads(True, **case)
    assert expected.keys() == got.keys()
    # bf16: the same products, the streams' gradients summed in another order
    tolerance = 1e-2 if case.get("autocast") else 1e-6
    for key, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert got[key] is not None, key
        torch.testing.assert_close(got[key], grad, rtol=tolerance,
                                   atol=tolerance * grad.abs().max().item())
    # the block's dict argument is the caller's own object, in the first forward and the
    # recomputation alike
    assert plain_options["calls"] == 3 and options["calls"] == 6


def test_dropout_is_recomputed_with_the_same_masks():
    """Different seeds give different gradients, so the equality above is the masks'."""
    a, _ = grads(True, dropout=0.5, seed=5)
    b, _ = grads(True, dropout=0.5, seed=6)
    assert any(not torch.equal(a[k], b[k]) for k in a)


class Counting(nn.Module):
    def __init__(self, trainable):
        super().__init__()
        self.lin = nn.Linear(4, 4).requires_grad_(trainable)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("trainable", [False, True])
def test_a_block_runs_again_in_backward_only_when_it_needs_a_gradient(trainable):
    first, second = Counting(trainable), Counting(True)
    x = torch.randn(3, 4)  # needs no gradient
    with ForwardPatches([(first, lambda f: checkpointed(f, trainable=trainable)),
                         (second, checkpointed)]):
        second(first(x)).sum().backward()
    assert first.calls == (2 if trainable else 1)
    assert second.calls == 2
    assert (first.lin.weight.grad is not None) == trainable
    assert second.lin.weight.grad is not None


def test_a_tensor_inside_a_container_argument_gets_its_gradient():
    lin = nn.Linear(4, 4)

    def block(pair):
        return lin(pair[0]) * pair[1]

    a = torch.randn(2, 4, requires_grad=True)
    b = torch.randn(2, 4, requires_grad=True)
    checkpointed(block)([a, b]).sum().backward()
    expected_a, expected_b, expected_w = a.grad.clone(), b.grad.clone(), lin.weight.grad.clone()
    a.grad = b.grad = lin.weight.grad = None
    block([a, b]).sum().backward()
    torch.testing.assert_close(a.grad, expected_a)
    torch.testing.assert_close(b.grad, expected_b)
    torch.testing.assert_close(lin.weight.grad, expected_w)


def test_without_gradients_the_block_just_runs():
    block = Counting(True)
    with torch.no_grad():
        out = checkpointed(block.forward)(torch.randn(2, 4))
    assert block.calls == 1 and not out.requires_grad


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the 2.3 functions, on new torch
@pytest.mark.parametrize("old_torch", [False, True])
def test_autocast_state_is_read_and_reentered(old_torch, monkeypatch):
    from lora_lab.training import autocast

    if old_torch:  # torch 2.3: no per-device get_autocast_dtype, as the module sees torch
        class Torch23:
            def __getattr__(self, name):
                if name == "get_autocast_dtype":
                    raise AttributeError(name)
                return getattr(torch, name)

        monkeypatch.setattr(autocast, "torch", Torch23())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = autocast.autocast_state()
        with autocast.autocast_as({"cpu": None}):
            assert autocast.autocast_dtype("cpu") is None
    assert state["cpu"] == torch.bfloat16 and autocast.autocast_dtype("cpu") is None
    with autocast.autocast_as(state):
        assert autocast.autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
