"""Blocks that add into their own inputs in place, made exact for autograd.

Some networks update the residual stream in place inside a block: Flux's blocks do
``img += gate * attn(norm1(img))`` then ``img += gate * mlp(norm2(img))``. ``norm1`` saved
``img`` for its backward, and the ``+=`` overwrote it, so backward fails ("one of the variables
needed for gradient computation has been modified by an inplace operation"). Under gradient
checkpointing it is worse: the block input kept for recomputation is overwritten, and the
recomputed activations are overwritten in turn, which gives wrong gradients without an error.

The fix keeps the network's code and its in-place adds, and gives autograd its own copies:

- :func:`find_mutating_blocks` runs one forward and records which blocks changed which of
  their tensor arguments (by the tensor version counter), so blocks that do not mutate their
  inputs (SD UNet blocks, most DiT blocks) are left exactly as they are;
- inside a mutating block, the argument it mutates is copied on entry (so the caller's tensor,
  and the input a checkpoint keeps, stay intact) and every module the block calls with that
  tensor, or a view of it, receives a copy taken at the call. What a layer saves for backward
  is then a tensor nobody writes to, and the in-place adds still update the block's stream.

The copies are exactly what the out-of-place form ``x = x + f(x)`` would allocate.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Key = int | str  # a positional index or a keyword name


def _tensor_args(args, kwargs) -> dict[Key, torch.Tensor]:
    """The tensor arguments that can be written to (inference tensors cannot, outside
    inference mode, and have no version counter)."""
    found: dict[Key, object] = dict(enumerate(args))
    found.update(kwargs)
    return {k: v for k, v in found.items()
            if isinstance(v, torch.Tensor) and not v.is_inference()}


def find_mutating_blocks(blocks: Iterable[nn.Module], run: Callable[[], object]) -> dict[nn.Module, set[Key]]:
    """Call ``run`` once with each of ``blocks`` watched; return the blocks that modified a
    tensor argument in place, with the keys of those arguments."""
    mutating: dict[nn.Module, set[Key]] = {}

    def watch(block: nn.Module, forward: Callable) -> Callable:
        def run_block(*args, **kwargs):
            tensors = _tensor_args(args, kwargs)
            versions = {k: t._version for k, t in tensors.items()}
            out = forward(*args, **kwargs)
            changed = {k for k, t in tensors.items() if t._version != versions[k]}
            if changed:
                mutating.setdefault(block, set()).update(changed)
            return out

        return run_block

    watched = []
    try:
        for block in blocks:
            watched.append((block, block.__dict__.get("forward")))
            block.forward = watch(block, block.forward)
        run()
    finally:
        for block, previous in reversed(watched):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
    return mutating


class _Guard:
    """The storages a mutating block is writing to, while it runs (a stack: blocks nest)."""

    def __init__(self) -> None:
        self.stack: list[set[int]] = []

    def aliases(self, value) -> bool:
        return (bool(self.stack) and isinstance(value, torch.Tensor)
                and value.untyped_storage().data_ptr() in self.stack[-1])

    def block(self, keys: set[Key]) -> Callable[[Callable], Callable]:
        def make(forward: Callable) -> Callable:
            def run(*args, **kwargs):
                args = [a.clone() if i in keys and isinstance(a, torch.Tensor) else a
                        for i, a in enumerate(args)]
                kwargs = {k: v.clone() if k in keys and isinstance(v, torch.Tensor) else v
                          for k, v in kwargs.items()}
                tensors = _tensor_args(args, kwargs)
                self.stack.append({tensors[k].untyped_storage().data_ptr()
                                   for k in keys if k in tensors})
                try:
                    return forward(*args, **kwargs)
                finally:
                    self.stack.pop()

            return run

        return make

    def inner(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if self.stack:
                args = [a.clone() if self.aliases(a) else a for a in args]
                kwargs = {k: v.clone() if self.aliases(v) else v for k, v in kwargs.items()}
                self.stack.append(set())  # the module's own tensors are its business
                try:
                    return forward(*args, **kwargs)
                finally:
                    self.stack.pop()
            return forward(*args, **kwargs)

        return run


def inplace_patches(mutating: dict[nn.Module, set[Key]]) -> list[tuple[nn.Module, Callable]]:
    """Forward patches (for :class:`lora.inject.ForwardPatches`) that make ``mutating`` blocks
    exact for autograd. Apply them before any checkpointing patch of the same blocks, so the
    copy on entry happens inside the checkpointed function."""
    guard = _Guard()
    patches: list[tuple[nn.Module, Callable]] = []
    for block, keys in mutating.items():
        patches += [(module, guard.inner) for module in block.modules() if module is not block]
        patches.append((block, guard.block(keys)))
    return patches
