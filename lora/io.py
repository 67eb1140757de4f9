"""Reading LoRA files to continue them: safetensors only, validated before use."""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping

import torch
from torch import nn

from . import ADAPTERS
from .base import Adapter
from .inject import find_targets

log = logging.getLogger(__name__)

STEPS_METADATA_KEYS = ("lora_lab.steps", "ss_steps")
_STEPS_IN_NAME = re.compile(r"_(\d+)_steps_")


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` LoRA (never unpickles anything)."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(
            f"existing_lora {name!r} is not a .safetensors file; only safetensors LoRAs can be "
            "continued (pickle formats can run code). Convert it or pick another file."
        )
    if not os.path.isfile(path):
        raise ValueError(f"existing_lora {name!r} was not found at {path}; pick a listed file.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"existing_lora {name!r} is not a readable safetensors file ({error}); it may be "
            "truncated or corrupted. Save it again or pick another file."
        ) from None
    return tensors, metadata


def steps_of(metadata: Mapping[str, str], filename: str) -> int:
    """Steps a LoRA already has: from its metadata, else its ``_<N>_steps_`` name, else 0."""
    for key in STEPS_METADATA_KEYS:
        value = metadata.get(key, "")
        if value.isdigit():
            return int(value)
    match = _STEPS_IN_NAME.search(os.path.basename(filename))
    if match:
        return int(match.group(1))
    log.warning(
        "%s has no step count in its metadata or name; counting its steps as 0.", filename
    )
    return 0


def detect_algorithm(tensors: Mapping[str, torch.Tensor]) -> type[Adapter]:
    """The adapter class whose key suffixes the file uses."""
    for cls in ADAPTERS.values():
        if any(key.endswith("." + cls.KEYS[0]) for key in tensors):
            return cls
    sample = ", ".join(sorted(tensors)[:3]) or "no tensors"
    raise ValueError(
        f"The LoRA holds no keys of a known algorithm ({', '.join(ADAPTERS)}); first keys: "
        f"{sample}. Pick a LoRA file saved for a diffusion model."
    )


def adapters_from_state_dict(
    network: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    dtype: torch.dtype,
) -> dict[str, Adapter]:
    """Adapters rebuilt from a saved LoRA, after checking every key fits ``network``."""
    cls = detect_algorithm(tensors)
    targets = find_targets(network)
    suffix = "." + cls.KEYS[0]
    modules = sorted(
        key[len(prefix): -len(suffix)]
        for key in tensors
        if key.startswith(prefix) and key.endswith(suffix)
    )
    if not modules:
        raise ValueError(
            f"The LoRA has no keys under {prefix!r}; it was made for another model or format."
        )
    adapters = {}
    for name in modules:
        if name not in targets:
            raise ValueError(
                f"The LoRA key {prefix}{name}{suffix} names a layer this model does not have; "
                "the LoRA was made for another model family. Pick a LoRA trained on this model."
            )
        geometry = targets[name][1]
        key_prefix = prefix + name
        for key in cls.KEYS:
            if f"{key_prefix}.{key}" not in tensors:
                raise ValueError(f"The LoRA lacks {key_prefix}.{key}; the file is incomplete.")
        for key, accepted in cls.expected_shapes(geometry, tensors, key_prefix).items():
            shape = tuple(tensors[key].shape)
            if shape not in accepted:
                want = " or ".join(str(list(s)) for s in sorted(accepted))
                raise ValueError(
                    f"The LoRA key {key} has shape {list(shape)} but this model needs {want}; "
                    "the LoRA was made for another model. Pick a LoRA trained on this model."
                )
        for key, value in tensors.items():
            if key.startswith(key_prefix + ".") and value.is_floating_point():
                if not torch.isfinite(value).all():
                    raise ValueError(f"The LoRA key {key} holds NaN or Inf; the file is damaged.")
        adapters[name] = cls.from_state_dict(geometry, dict(tensors), key_prefix, dtype)
    return adapters


def save_lora_file(
    tensors: Mapping[str, torch.Tensor],
    folder: str,
    stem: str,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``<folder>/<stem>_<counter>_.safetensors`` and return its path.

    Never overwrites: the counter starts after the highest one present, and the final name
    is claimed with a hard link, which fails instead of replacing an existing file. The
    data goes to a temporary file in the same folder first, so an interrupted save leaves
    no partial LoRA behind (at worst a ``.tmp`` file, removed on the next error path).
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(stem)
    pattern = re.compile(re.escape(base) + r"_(\d+)_\.safetensors$")
    used = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    counter = max(used, default=0) + 1
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(contiguous, tmp, metadata=dict(metadata or {}))
        while True:
            path = os.path.join(folder, f"{base}_{counter:05d}_.safetensors")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                counter += 1
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
