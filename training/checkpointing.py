"""Gradient checkpointing of a network's blocks, as forward patches that are fully undone.

The blocks are the outermost modules that are not containers (``ModuleList``,
``Sequential``, ``ModuleDict`` and their subclasses are looked into) and that have children
of their own: SD UNet res/attention blocks, DiT joint/single blocks. Leaf layers gain nothing
from checkpointing and are skipped.

A checkpointed block runs its forward without a graph (as inference does: nothing saved,
no autograd bookkeeping) and keeps only its inputs; backward runs it again with a graph
and back-propagates through that, accumulating into the adapters' gradients and returning
its inputs' gradients. This is the recomputation scheme of Chen et al. 2016 ("Training Deep
Nets with Sublinear Memory Cost") as torch's reentrant checkpoint implements it, with
keyword arguments and nested outputs (DiT blocks pass the text stream by keyword and return
tuples). torch's non-reentrant checkpoint builds the graph in the first forward too and
drops what it saves through hooks; on small layers that bookkeeping costs about as much as
the layers. The global CPU and CUDA random states and the autocast state of the first
forward are restored for the recomputation, so dropout and mixed precision recompute
exactly what the first forward computed.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from .autocast import autocast_as, autocast_state

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def checkpoint_blocks(network: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                visit(child)
            elif any(True for _ in child.children()):
                blocks.append(child)

    visit(network)
    return blocks


class _Recompute(torch.autograd.Function):
    """``apply(run, layout, anchor, *leaves)``: ``leaves`` are the block's arguments
    (``layout`` rebuilds ``(args, kwargs)`` and receives the output's structure),
    ``anchor`` an empty tensor that requires grad so that backward runs for a block with
    trainable layers whose inputs need no gradient."""

    @staticmethod
    def forward(ctx, run, layout, anchor, *leaves):
        ctx.run, ctx.layout, ctx.autocast = run, layout, autocast_state()
        ctx.cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in leaves)
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state() if ctx.cuda else None
        # normal tensors go through save_for_backward (an in-place change before backward is
        # an error there); inference tensors (ComfyUI's conditioning) cannot, and are kept
        ctx.saved_at = [i for i, v in enumerate(leaves)
                        if isinstance(v, torch.Tensor) and not v.is_inference()]
        ctx.save_for_backward(*(leaves[i] for i in ctx.saved_at))
        ctx.others = list(leaves)  # the rest as they are; saved tensors are read back
        for i in ctx.saved_at:
            ctx.others[i] = None
        args, kwargs = layout.arguments(leaves)
        out = layout.output(run(*args, **kwargs))
        ctx.mark_non_differentiable(*(v for v in out if isinstance(v, torch.Tensor)
                                      and not v.is_floating_point()))
        return out

    @staticmethod
    def backward(ctx, *grads):
        leaves = list(ctx.others)
        for i, tensor in zip(ctx.saved_at, ctx.saved_tensors):
            leaves[i] = tensor.detach().requires_grad_(tensor.requires_grad)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if ctx.cuda else None
        torch.set_rng_state(ctx.rng)
        if ctx.cuda:
            torch.cuda.set_rng_state(ctx.cuda_rng)
        try:
            with torch.enable_grad(), autocast_as(ctx.autocast):
                args, kwargs = ctx.layout.arguments(leaves)
                out = pytree.tree_leaves(ctx.run(*args, **kwargs))
        finally:
            torch.set_rng_state(rng)
            if ctx.cuda:
                torch.cuda.set_rng_state(cuda_rng)
        pairs = [(o, g) for o, g in zip(out, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, *(v.grad if isinstance(v, torch.Tensor) and v.requires_grad
                                    else None for v in leaves))


class _Layout:
    """A call's top-level arguments as a flat list (containers such as ComfyUI's
    ``transformer_options`` are passed as they are, the same object), and the structure
    of its output."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.count, self.names = len(args), list(kwargs)
        self.out_spec = None

    def arguments(self, leaves) -> tuple[list, dict]:
        leaves = list(leaves)
        return leaves[:self.count], dict(zip(self.names, leaves[self.count:]))

    def output(self, value) -> tuple:
        out, self.out_spec = pytree.tree_flatten(value)
        return tuple(out)


def _nested_grad(values: Iterable) -> bool:
    """Whether a tensor that needs a gradient sits inside a container argument."""
    return any(isinstance(leaf, torch.Tensor) and leaf.requires_grad
               for value in values if not isinstance(value, torch.Tensor)
               for leaf in pytree.tree_leaves(value))


def checkpointed(forward: Callable, trainable: bool = True) -> Callable:
    """A forward that stores only its inputs and recomputes its activations in backward.
    ``trainable``: the block holds something that needs a gradient (an adapter, a trainable
    parameter); without it, backward runs only for inputs that need a gradient. A call with
    a tensor that needs a gradient inside a container argument uses torch's non-reentrant
    checkpoint, which follows such tensors."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        leaves = [*args, *kwargs.values()]
        if _nested_grad(leaves):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        layout = _Layout(args, kwargs)
        device = next((v.device for v in leaves if isinstance(v, torch.Tensor)), None)
        anchor = torch.empty(0, device=device, requires_grad=trainable)
        out = _Recompute.apply(forward, layout, anchor, *leaves)
        return pytree.tree_unflatten(list(out), layout.out_spec)

    return run
