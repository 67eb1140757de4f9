"""Choosing the layers that get adapters, building the adapters, and patching forwards.

Adapters go into every ``nn.Linear`` of the network and every 1x1 ``nn.Conv1d/2d/3d``
(a 1x1 conv is a Linear over channels, e.g. ``proj_in``/``proj_out`` of SD1.x attention
blocks). Larger conv kernels, embeddings and norms are left alone.

Patching never replaces a module: it sets the instance's ``forward`` attribute and removes
it again, so the module tree, ``state_dict`` keys and ``isinstance`` checks of the model are
unchanged while training and exactly restored afterwards.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import nn

from . import ADAPTERS
from .base import Adapter, LayerGeometry, layer_geometry

log = logging.getLogger(__name__)


def find_targets(network: nn.Module) -> dict[str, tuple[nn.Module, LayerGeometry]]:
    """The layers that receive adapters, by module path, in the network's own order."""
    targets = {}
    for name, module in network.named_modules():
        geometry = layer_geometry(module)
        if geometry is None:
            continue
        if geometry.is_conv and any(k != 1 for k in geometry.kernel_size):
            continue
        targets[name] = (module, geometry)
    return targets


def create_adapters(
    network: nn.Module,
    algorithm: str,
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> dict[str, Adapter]:
    """Fresh adapters (zero delta) for every target layer, initialised from ``generator``.

    A rank above what a layer can use (``min(in, out)`` for the low-rank algorithms) is
    clamped for that layer, with one warning listing how many layers were clamped. Each
    adapter gets the layer's weight and bias; those that need them keep a float32 copy.
    """
    if algorithm not in ADAPTERS:
        raise ValueError(
            f"algorithm {algorithm!r} is not available; choose one of {', '.join(ADAPTERS)}."
        )
    cls = ADAPTERS[algorithm]
    targets = find_targets(network)
    if not targets:
        raise ValueError(
            f"The model ({type(network).__name__}) has no Linear or 1x1 Conv layer that "
            f"{algorithm} can adapt; connect a diffusion model."
        )
    adapters, clamped, skipped = {}, 0, 0
    for name, (module, geometry) in targets.items():
        if not cls.supports(geometry):
            skipped += 1
            continue
        layer_rank = cls.layer_rank(geometry, rank)
        clamped += layer_rank < rank
        adapters[name] = cls(
            geometry, layer_rank, alpha, dtype, generator,
            weight=module.weight, bias=getattr(module, "bias", None))
    if clamped:
        log.warning(
            "rank %d is larger than %d of %d layers allow; those layers use rank min(in, out).",
            rank, clamped, len(targets),
        )
    if skipped:
        log.warning("%s cannot adapt %d of %d layers (their shape does not allow it); they are "
                    "left out.", algorithm, skipped, len(targets))
    if not adapters:
        raise ValueError(
            f"{algorithm} can adapt none of the {len(targets)} layers of this model; pick "
            "another algorithm.")
    return adapters


class ForwardPatches:
    """Set ``forward`` on module instances and restore exactly what was there before.

    ``patches`` maps a module to a function that receives the module's current forward and
    returns the replacement. Patches are applied in the given order, so a block patched
    after its children calls their patched forwards. ``remove`` restores in reverse order
    and is idempotent.
    """

    _MISSING = object()

    def __init__(self, patches: list[tuple[nn.Module, Callable[[Callable], Callable]]]) -> None:
        self.patches = patches
        self._saved: list[tuple[nn.Module, object]] = []

    def apply(self) -> None:
        if self._saved:
            return
        for module, make in self.patches:
            self._saved.append((module, module.__dict__.get("forward", self._MISSING)))
            module.forward = make(module.forward)

    def remove(self) -> None:
        while self._saved:
            module, previous = self._saved.pop()
            if previous is self._MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous

    def __enter__(self) -> "ForwardPatches":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def adapter_patches(
    network: nn.Module, adapters: Mapping[str, Adapter]
) -> list[tuple[nn.Module, Callable[[Callable], Callable]]]:
    """The forward patches that route each adapted layer through its adapter."""
    modules = dict(network.named_modules())
    return [(modules[name], adapter.bypass) for name, adapter in adapters.items()]


def lora_state_dict(adapters: Mapping[str, Adapter], prefix: str) -> dict[str, torch.Tensor]:
    """The LORA_MODEL dict: every adapter's keys under ``<prefix><module path>``."""
    state = {}
    for name, adapter in adapters.items():
        state.update(adapter.to_state_dict(prefix + name))
    return state
