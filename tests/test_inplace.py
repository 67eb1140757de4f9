"""Blocks that add into their inputs in place (Flux's ``img += gate * f(norm(img))``): exact
gradients with checkpointing on and off, and blocks that do not are left alone."""

import pytest
import torch
from torch import nn

from lora_lab.lora.inject import ForwardPatches, adapter_patches, create_adapters
from lora_lab.training.checkpointing import checkpoint_blocks, checkpointed
from lora_lab.training.config import TrainConfig
from lora_lab.training.inplace import checkpointable, find_mutating_blocks, inplace_patches
from lora_lab.training.loop import train
from lora_lab.training.task import TorchTask, flow_sigmas

DIM = 16


class Block(nn.Module):
    """A Flux-like block: modulation from the timestep, norm, residual adds."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.mod = nn.Linear(DIM, 2 * DIM)
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.attn = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, vec, context=None):
        """Saved-then-overwritten: ``norm1``'s input (a module), ``rms_norm``'s input (a
        function, as LTXV's blocks have) and the stream as a product's operand."""
        gate1, gate2 = self.mod(vec).chunk(2, dim=-1)
        if self.inplace:
            x += gate1 * self.attn(self.norm1(x) + context.mean(1, keepdim=True))
            x.addcmul_(self.mlp(self.norm2(x)), gate2)
            x += torch.nn.functional.rms_norm(x, (DIM,)) * x * 0.1
            return x
        x = x + gate1 * self.attn(self.norm1(x) + context.mean(1, keepdim=True))
        x = torch.addcmul(x, self.mlp(self.norm2(x)), gate2)
        return x + torch.nn.functional.rms_norm(x, (DIM,)) * x * 0.1


class Net(nn.Module):
    def __init__(self, inplace: bool, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(4, DIM)
        self.time = nn.Linear(1, DIM)
        self.ctx = nn.Linear(16, DIM)
        self.blocks = nn.ModuleList(Block(inplace) for _ in range(depth))
        self.out = nn.Linear(DIM, 4)

    def forward(self, x, timestep, context):
        b, c, h, w = x.shape
        tokens = self.inp(x.flatten(2).transpose(1, 2))
        vec = self.time(timestep.reshape(-1, 1, 1) / 1000.0)
        ctx = self.ctx(context)
        for block in self.blocks:
            tokens = block(tokens, vec, context=ctx)
        return self.out(tokens).transpose(1, 2).reshape(b, c, h, w)


def pair():
    """The same weights in an in-place and an out-of-place network."""
    torch.manual_seed(0)
    reference = Net(inplace=False)
    inplace = Net(inplace=True)
    inplace.load_state_dict(reference.state_dict())
    return inplace.requires_grad_(False), reference.requires_grad_(False)


def adapter_grads(network, gradient_checkpointing):
    """Gradients of fresh LoRA adapters (nonzero up weights) through one loss."""
    adapters = create_adapters(network, "LoRA", 4, 4.0, torch.float32, torch.Generator().manual_seed(1))
    for a in adapters.values():
        for p in a.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([300.0, 700.0])
    blocks = checkpoint_blocks(network)
    with ForwardPatches(adapter_patches(network, adapters)):
        mutating = find_mutating_blocks(blocks, lambda: network(x.clone(), t, context))
        patches = inplace_patches(mutating)
        if gradient_checkpointing:
            patches += [(b, checkpointed) for b in checkpointable(blocks, mutating)]
        with ForwardPatches(patches):
            network(x, t, context).square().mean().backward()
    return mutating, {f"{n}.{k}": p.grad for n, a in adapters.items() for k, p in a.named_parameters()}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_inplace_blocks_get_the_out_of_place_gradients(gradient_checkpointing):
    inplace, reference = pair()
    mutating, grads = adapter_grads(inplace, gradient_checkpointing)
    assert set(mutating) == set(inplace.blocks) and all(k == {0} for k in mutating.values())
    _, expected = adapter_grads(reference, False)
    for key, grad in expected.items():
        assert grad is not None and grads[key] is not None, key
        assert torch.allclose(grads[key], grad, rtol=1e-5, atol=1e-7), key


def test_without_the_guard_autograd_refuses_or_is_wrong():
    """The failure the guard prevents: plain in-place blocks fail in backward."""
    inplace, _ = pair()
    x = torch.randn(1, 4, 3, 3)
    inplace.blocks[0].mod.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        inplace(x, torch.tensor([500.0]), torch.randn(1, 5, 16)).sum().backward()


def test_blocks_that_do_not_mutate_are_not_patched():
    _, reference = pair()
    mutating = find_mutating_blocks(
        checkpoint_blocks(reference),
        lambda: reference(torch.randn(1, 4, 3, 3), torch.tensor([5.0]), torch.randn(1, 5, 16)))
    assert mutating == {}
    assert not [m for m in reference.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_an_inplace_network_equals_the_out_of_place_one(gradient_checkpointing):
    inplace, reference = pair()
    g = torch.Generator().manual_seed(4)
    latents, context = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 5, 16, generator=g)
    config = TrainConfig(steps=3, batch_size=2, optimizer="SGD", learning_rate=0.1,
                         training_dtype="fp32", lora_dtype="fp32",
                         gradient_checkpointing=gradient_checkpointing)
    results = [train(TorchTask(net, "flow", flow_sigmas(), context), latents, config)
               for net in (inplace, reference)]
    for key, value in results[1].lora.items():
        assert torch.allclose(results[0].lora[key], value, rtol=1e-5, atol=1e-7), key
    assert not [m for m in inplace.modules() if "forward" in m.__dict__], "patches left behind"


def test_checkpointed_inplace_blocks_are_still_recomputed():
    """The guard hands saved tensors on to the checkpoint's hooks, so a mutating block keeps
    its memory saving: its layers run again in backward."""
    inplace, _ = pair()
    calls = []
    mlp = inplace.blocks[0].mlp
    mlp.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    adapter_grads(inplace, gradient_checkpointing=True)
    # find_mutating_blocks + the forward + the recomputation in backward
    assert len(calls) == 3, calls
