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
  and the input a checkpoint keeps, stay intact), and every tensor autograd saves inside the
  block that shares that argument's storage (the stream, or a view of it: a norm's input, a
  product's operand) is saved as a copy taken at that moment, through saved-tensor hooks
  that hand it on to any hooks already active (a checkpoint's). What backward reads is then
  what the forward saw, and the in-place adds still update the block's stream.

The copies are what the out-of-place form ``x = x + f(x)`` would allocate.
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


def find_mutating_blocks(
    blocks: Iterable[nn.Module], run: Callable[[], object]
) -> dict[nn.Module, set[Key]]:
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


def _storage(value) -> int | None:
    try:
        return value.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError, NotImplementedError):  # tensor subclasses, meta...
        return None


# The saved-tensor hooks active where a block runs: torch's checkpoint installs its own, and
# the block's hooks must hand each saved tensor on to them rather than replace them.
_current_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def guarded(keys: set[Key]) -> Callable[[Callable], Callable]:
    """A forward patch for a block that writes into its arguments ``keys``: those arguments
    are copied on entry, and whatever autograd saves inside the block that shares their
    storage (the stream itself, or a view of it) is saved as a copy taken then."""

    def make(forward: Callable) -> Callable:
        def run(*args, **kwargs):
            args = [a.clone() if i in keys and isinstance(a, torch.Tensor) else a
                    for i, a in enumerate(args)]
            kwargs = {k: v.clone() if k in keys and isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
            tensors = _tensor_args(args, kwargs)
            written = {_storage(tensors[k]) for k in keys if k in tensors}
            outer = _current_hooks(False) if _current_hooks is not None else None
            outer_pack, outer_unpack = outer if outer is not None else (None, None)

            def pack(tensor):
                if _storage(tensor) in written:
                    tensor = tensor.clone()
                return outer_pack(tensor) if outer_pack is not None else tensor

            def unpack(packed):
                return outer_unpack(packed) if outer_unpack is not None else packed

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return forward(*args, **kwargs)

        return run

    return make


def inplace_patches(mutating: dict[nn.Module, set[Key]]) -> list[tuple[nn.Module, Callable]]:
    """Forward patches (for :class:`lora.inject.ForwardPatches`) that make ``mutating`` blocks
    exact for autograd. Apply them before any checkpointing patch of the same blocks, so the
    copy on entry happens inside the checkpointed function."""
    return [(block, guarded(keys)) for block, keys in mutating.items()]


def checkpointable(blocks: list[nn.Module], mutating: dict[nn.Module, set[Key]]) -> list[nn.Module]:
    """The blocks that may be checkpointed: all, where this torch lets a block's hooks hand
    saved tensors on to the checkpoint's; else those that do not write into their inputs."""
    if _current_hooks is not None:
        return list(blocks)
    return [block for block in blocks if block not in mutating]
