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
import math
import re
from typing import Callable, Mapping

import torch
from torch import nn

from . import ADAPTERS
from .base import Adapter, LayerGeometry, layer_geometry

log = logging.getLogger(__name__)


# Layer names of attention and feed-forward blocks across families: SD's attn1/attn2 and ff,
# MMDiT/Flux's attn, img_attn/txt_attn and mlp, img_mlp/txt_mlp, Wan's self_attn/cross_attn
# and ffn, Flux single blocks' fused linear1/linear2. Embedders' MLPs (timestep, pooled
# text) are not feed-forward blocks.
_ATTENTION = re.compile(
    r"(^|\.)(attn\d*|attention|self_attn|cross_attn|img_attn|txt_attn|attn_\w+)(\.|$)")
_MLP = re.compile(r"(^|\.)(ff|ffn|mlp|img_mlp|txt_mlp|feed_forward|ff_context)(\.|$)"
                  r"|single_blocks\.\d+\.linear[12]$")
_EMBEDDER = re.compile(r"embed")
PRESETS = {
    "linear": None, "all": None,
    "attention": lambda name: bool(_ATTENTION.search(name)),
    "attention_and_mlp": lambda name: bool(
        _ATTENTION.search(name) or (_MLP.search(name) and not _EMBEDDER.search(name))),
}


def find_targets(
    network: nn.Module, layers: str = "linear", include: str = "", exclude: str = "",
) -> dict[str, tuple[nn.Module, LayerGeometry]]:
    """The layers that receive adapters, by module path, in the network's own order.

    ``layers``: ``linear`` (every Linear and 1x1 conv), ``all`` (also larger convs),
    ``attention`` or ``attention_and_mlp`` (the Linear/1x1 layers inside such blocks, by
    name). ``include`` / ``exclude``: regular expressions searched in the module path; a
    pattern that selects nothing is a ValueError naming it and a few real names.
    """
    if layers not in PRESETS:
        raise ValueError(f"target_layers={layers!r} is not available; choose one of "
                         f"{', '.join(PRESETS)}.")
    every = {}
    for name, module in network.named_modules():
        geometry = layer_geometry(module)
        if geometry is None:
            continue
        if layers != "all" and geometry.is_conv and any(k != 1 for k in geometry.kernel_size):
            continue
        every[name] = (module, geometry)
    targets = every
    if PRESETS[layers] is not None:
        targets = {n: t for n, t in targets.items() if PRESETS[layers](n)}
    for option, pattern, keep in (("include", include, True), ("exclude", exclude, False)):
        if not pattern:
            continue
        regex = re.compile(pattern)
        hits = {n for n in targets if regex.search(n)}
        if not hits:
            names = list(targets or every)[:4]
            raise ValueError(
                f"{option}={pattern!r} matches none of the {len(targets)} layers "
                f"target_layers={layers!r} selects, e.g. {', '.join(names)}; fix the pattern.")
        targets = {n: t for n, t in targets.items() if (n in hits) == keep}
        if not targets:
            raise ValueError(
                f"{option}={pattern!r} leaves no layer to train (it matches all "
                f"{len(hits)}, e.g. {', '.join(sorted(hits)[:4])}); make it narrower.")
    return targets


def create_adapters(
    network: nn.Module,
    algorithm: str,
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    generator: torch.Generator,
    *,
    targets: dict[str, tuple[nn.Module, LayerGeometry]] | None = None,
    rslora: bool = False,
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
    if rslora and not cls.ALPHA_OVER_RANK:
        raise ValueError(
            f"rslora scales alpha / sqrt(rank) for the algorithms whose scale is alpha / rank "
            f"({', '.join(n for n, c in ADAPTERS.items() if c.ALPHA_OVER_RANK)}); {algorithm} "
            "scales otherwise. Turn rslora off or pick one of those.")
    targets = find_targets(network) if targets is None else targets
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
        # rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(r), saved as alpha' = alpha sqrt(r)
        # so that ComfyUI's alpha' / r is the same scale
        layer_alpha = alpha * math.sqrt(layer_rank) if rslora else alpha
        adapters[name] = cls(
            geometry, layer_rank, layer_alpha, dtype, generator,
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
        self._applied = False

    def apply(self) -> None:
        if self._applied:
            return
        self._applied = True
        for module, make in self.patches:
            self._saved.append((module, module.__dict__.get("forward", self._MISSING)))
            module.forward = make(module.forward)

    def extend(self, patches: list[tuple[nn.Module, Callable[[Callable], Callable]]]) -> None:
        """Add ``patches`` after the others (applied at once if the others are)."""
        self.patches.extend(patches)
        if self._applied:
            for module, make in patches:
                self._saved.append((module, module.__dict__.get("forward", self._MISSING)))
                module.forward = make(module.forward)

    def remove(self) -> None:
        self._applied = False
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
