"""Gradient checkpointing of a network's blocks, as forward patches that are fully undone.

The blocks are the outermost modules that are not containers (``ModuleList``,
``Sequential``, ``ModuleDict`` and their subclasses are looked into) and that have children
of their own: SD UNet res/attention blocks, DiT joint/single blocks. Leaf layers gain nothing
from checkpointing and are skipped. Recomputation uses ``use_reentrant=False``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

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


def checkpointed(forward: Callable) -> Callable:
    """A forward that stores only its inputs and recomputes its activations in backward."""

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
