"""LoRA files under other tools' names: kohya (``lora_unet_...``) and diffusers/PEFT.

A saved LoRA names modules ``diffusion_model.<module>``. Other tools name them otherwise, and
a few split what is one fused layer in ComfyUI (SD3's and Flux's ``qkv`` are diffusers'
``to_q``/``to_k``/``to_v``). :class:`ExportNames` says, for each module, the names it takes
in a format and which rows of the module each name covers; it is built from the model (the
ComfyUI side does that) and applied here to plain tensors.

- ``kohya`` style: the module name changes, every key suffix stays (``lora_up.weight``,
  ``hada_w1_a``, ``lokr_w1``, ``oft_blocks``, ``dora_scale``, ``alpha``, ``diff``...), so every
  algorithm and the norm/bias deltas keep their meaning: ``<name>.<suffix>``. A module must
  have exactly one name and no slice.
- ``peft`` style: ``<name>.lora_A.weight`` / ``<name>.lora_B.weight`` (diffusers' and PEFT's
  names for LoRA's down and up), no ``alpha`` key: the scale ``alpha / rank`` is folded into
  ``lora_B`` (computed in float32, stored in the LoRA's dtype), which is how a file without
  alpha reads in both ComfyUI and diffusers (scale 1). A sliced name gets the rows of
  ``lora_B`` it covers (passed through the name's row transform, if any) and the whole
  ``lora_A``: ``B[rows] @ A`` is exactly the rows of ``B @ A``. Only LoRA's keys can be
  written this way; anything else is a ValueError that says which format keeps it.

:func:`merge_slices` is the inverse for reading: the parts of one fused layer become one
LoRA (the same ``lora_A`` everywhere: ``up`` is the parts' rows stacked; different ones: a
LoRA of the summed rank whose ``up`` is block-diagonal), exact in both cases.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import ADAPTERS, DETECTION_ORDER
from .base import alpha_value
from .diff import SUFFIXES as DELTA_SUFFIXES

FORMATS = ("comfyui", "kohya")
PEFT_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


@dataclass(frozen=True)
class Slice:
    """Rows ``offset : offset + size`` of a module's output, as another tool names them;
    ``transform``: a row permutation the other tool applies on top (SD3's last adaLN)."""

    offset: int
    size: int
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class ExportName:
    name: str
    rows: Slice | None = None


@dataclass
class ExportNames:
    """How one model's modules are named in one format (see the module docstring)."""

    style: str  # "kohya" or "peft"
    names: dict[str, tuple[ExportName, ...]] = field(default_factory=dict)
    family: str = "this model"
    implementation: str = ""


@functools.cache
def known_suffixes() -> tuple[str, ...]:
    """Every key suffix a saved module can have, longest first (so ``lora_up.weight`` is
    matched before ``weight``-like shorter ones)."""
    suffixes = {"alpha", *DELTA_SUFFIXES}
    for cls in ADAPTERS.values():
        for saved in cls.SAVED:
            suffixes.update((saved.key, *saved.factored))
    return tuple(sorted(suffixes, key=len, reverse=True))


def split_key(key: str, prefix: str) -> tuple[str, str]:
    """``(module, suffix)`` of a ``<prefix><module>.<suffix>`` key; a ValueError otherwise."""
    if not key.startswith(prefix):
        raise ValueError(
            f"The LoRA key {key} does not start with {prefix!r}; only a LoRA with ComfyUI's "
            "module names can be converted. Save it with format comfyui.")
    rest = key[len(prefix):]
    for suffix in known_suffixes():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    raise ValueError(
        f"The LoRA key {key} is not a key of a known algorithm or delta; it cannot be renamed "
        "for another tool. Save it with format comfyui.")


def export_lora(
    tensors: Mapping[str, torch.Tensor], names: ExportNames, prefix: str = "diffusion_model.",
) -> dict[str, torch.Tensor]:
    """``tensors`` (``<prefix><module>.<suffix>`` keys) under ``names``' module names."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, suffix = split_key(key, prefix)
        modules.setdefault(module, {})[suffix] = value
    out: dict[str, torch.Tensor] = {}
    for module, own in sorted(modules.items()):
        targets = names.names.get(module)
        if not targets:
            raise ValueError(
                f"The LoRA key {prefix}{module}.{next(iter(own))} names a layer that has no "
                f"{names.style} name in {names.family}; save it with format comfyui.")
        written = (_kohya(module, own, targets, names) if names.style == "kohya"
                   else _peft(module, own, targets, names, prefix))
        for key in written:
            if key in out:
                raise ValueError(f"Two layers would both be saved as {key}; save with format comfyui.")
        out.update(written)
    return out


def _kohya(module, own, targets, names) -> dict[str, torch.Tensor]:
    if len(targets) != 1 or targets[0].rows is not None:
        raise ValueError(
            f"The layer {module} is split into {len(targets)} layers in kohya's names for "
            f"{names.family}; save it with format comfyui.")
    return {f"{targets[0].name}.{suffix}": value for suffix, value in own.items()}


def _peft(module, own, targets, names, prefix) -> dict[str, torch.Tensor]:
    carried = {"lora_down.weight", "lora_up.weight", "alpha"}
    extra = sorted(set(own) - carried)
    if extra:
        what = ("norm/bias deltas (train_norm_bias)" if set(extra) <= set(DELTA_SUFFIXES)
                else f"{_algorithm(own)} keys")
        raise ValueError(
            f"The LoRA key {prefix}{module}.{extra[0]} is one of its {what}; the diffusers/PEFT "
            f"names that {names.family} is exported with carry LoRA's matrices only. Save this "
            "LoRA with format comfyui (ComfyUI and Forge load it), or train a LoRA without them.")
    if "lora_up.weight" not in own or "lora_down.weight" not in own:
        raise ValueError(f"The LoRA lacks {prefix}{module}.lora_up.weight or lora_down.weight.")
    down, up = own["lora_down.weight"], own["lora_up.weight"]
    alpha = alpha_value(own.get("alpha"), f"{prefix}{module}.alpha")
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    scaled = up.float() * scale
    out = {}
    for target in targets:
        rows = scaled
        if target.rows is not None:
            rows = scaled[target.rows.offset: target.rows.offset + target.rows.size]
            if target.rows.transform is not None:
                rows = target.rows.transform(rows)
        out[f"{target.name}.{PEFT_SUFFIXES['lora_down.weight']}"] = down.clone()
        out[f"{target.name}.{PEFT_SUFFIXES['lora_up.weight']}"] = rows.to(up.dtype).contiguous()
    return out


def _algorithm(own: Mapping[str, torch.Tensor]) -> str:
    keyed = {f"m.{k}": v for k, v in own.items()}
    return next((cls.NAME for cls in DETECTION_ORDER if cls.identifies(keyed, "m")), "non-LoRA")


@dataclass(frozen=True)
class Part:
    """One slice of a fused layer as a file holds it: rows ``offset : offset + size`` get
    ``up @ down * scale``."""

    offset: int
    size: int
    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0


def merge_slices(parts: Sequence[Part], out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` of one LoRA (scale 1) equal to the parts on a layer of ``out_features``.

    Parts sharing one ``down`` (what :func:`export_lora` writes) give that ``down`` and the
    parts' rows stacked in ``up``; otherwise ``down`` stacks every part's and ``up`` is
    block-diagonal. Rows no part covers stay zero. Float32.
    """
    first = parts[0].down
    for part in parts:
        if part.offset < 0 or part.offset + part.size > out_features or part.up.shape[0] != part.size:
            raise ValueError(
                f"A LoRA slice covers rows {part.offset}:{part.offset + part.size} with "
                f"{part.up.shape[0]} rows of lora_B, on a layer of {out_features} outputs; the "
                "file was made for another model.")
        if part.down.shape[1:] != first.shape[1:]:
            raise ValueError("The LoRA slices of one layer have lora_A of different shapes "
                             f"({list(first.shape)}, {list(part.down.shape)}); the file is damaged.")
    shared = all(p.down.shape == first.shape and torch.equal(p.down, first) for p in parts)
    spatial = (1,) * (first.ndim - 2)
    if shared:
        up = torch.zeros(out_features, first.shape[0], *spatial)
        for part in parts:
            up[part.offset: part.offset + part.size] = part.up.float().reshape(
                part.size, first.shape[0], *spatial) * part.scale
        return first.float().clone(), up
    rank = sum(p.down.shape[0] for p in parts)
    down = torch.cat([p.down.float() for p in parts])
    up = torch.zeros(out_features, rank, *spatial)
    column = 0
    for part in parts:
        r = part.down.shape[0]
        up[part.offset: part.offset + part.size, column: column + r] = part.up.float().reshape(
            part.size, r, *spatial) * part.scale
        column += r
    return down, up
