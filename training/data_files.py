"""Training data as files: latents, masks and conditioning in a folder, without pickle.

A folder holds ``tensors.safetensors`` (every tensor) and ``dataset.json`` (the structure):
the LATENT batches in order (``latents.<b>``, ``mask.<b>`` when a batch has a noise mask),
and one CONDITIONING per batch, each a list of ``[tensor, extras]`` entries: the entry's
tensor is ``cond.<c>.<e>``, a tensor extra ``cond.<c>.<e>.<name>`` (a list of tensors:
``.<name>.<i>``), and any other extra (numbers, text, booleans, None, lists of them) is
JSON. Extras that are none of these (a control net, hooks: objects of a running graph)
cannot be stored and are a ValueError naming them.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

FORMAT = 1
TENSORS = "tensors.safetensors"
INDEX = "dataset.json"


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def save_training_data(folder: str, batches: Sequence[torch.Tensor],
                       masks: Sequence[torch.Tensor | None],
                       conditioning: Sequence[Sequence]) -> None:
    """Write a dataset into the new folder ``folder`` (which must not exist yet: nothing is
    overwritten); it appears only once complete (written beside it, then renamed)."""
    from safetensors.torch import save_file

    if os.path.exists(folder):
        raise FileExistsError(folder)
    tensors: dict[str, torch.Tensor] = {}
    index: dict = {"format": FORMAT, "latents": [], "conditioning": []}
    for b, (batch, mask) in enumerate(zip(batches, masks)):
        tensors[f"latents.{b}"] = batch
        if mask is not None:
            tensors[f"mask.{b}"] = mask
        index["latents"].append({"count": int(batch.shape[0]), "mask": mask is not None})
    for c, entries in enumerate(conditioning):
        described = []
        for e, (tensor, extras) in enumerate(entries):
            key = f"cond.{c}.{e}"
            tensors[key] = tensor
            stored = {}
            for name, value in extras.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{key}.{name}"] = value
                    stored[name] = {"tensor": True}
                elif (isinstance(value, (list, tuple)) and value
                      and all(isinstance(v, torch.Tensor) for v in value)):
                    for i, item in enumerate(value):
                        tensors[f"{key}.{name}.{i}"] = item
                    stored[name] = {"tensors": len(value)}
                elif _plain(value):
                    stored[name] = {"value": value}
                else:
                    raise ValueError(
                        f"positive[{c}][{e}] has the extra {name!r} ({type(value).__name__}), "
                        "which cannot be saved as training data; remove the node that adds it "
                        "(e.g. a ControlNet apply) before Save Training Data.")
            described.append(stored)
        index["conditioning"].append(described)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{os.path.basename(folder)}.{os.getpid()}.partial")
    os.makedirs(partial)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(partial, TENSORS))
        with open(os.path.join(partial, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
        os.rename(partial, folder)
    finally:
        if os.path.exists(partial):
            for name in os.listdir(partial):
                os.remove(os.path.join(partial, name))
            os.rmdir(partial)


def load_training_data(folder: str) -> tuple[list[dict], list[list]]:
    """The LATENTs (dicts with ``samples`` and ``noise_mask`` where saved) and their
    CONDITIONINGs of a folder :func:`save_training_data` wrote."""
    from safetensors.torch import load_file

    index_path = os.path.join(folder, INDEX)
    if not os.path.isfile(index_path):
        raise ValueError(f"{folder!r} holds no training data ({INDEX} is missing); give a "
                         "folder that Save Training Data wrote.")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{folder!r} has training data format {index.get('format')}; this "
                         f"version reads format {FORMAT}.")
    tensors = load_file(os.path.join(folder, TENSORS))
    latents = []
    for b, entry in enumerate(index["latents"]):
        latent = {"samples": tensors[f"latents.{b}"]}
        if entry.get("mask"):
            latent["noise_mask"] = tensors[f"mask.{b}"]
        latents.append(latent)
    conditioning = []
    for c, entries in enumerate(index["conditioning"]):
        rebuilt = []
        for e, extras in enumerate(entries):
            key = f"cond.{c}.{e}"
            values = {}
            for name, stored in extras.items():
                if stored.get("tensor"):
                    values[name] = tensors[f"{key}.{name}"]
                elif "tensors" in stored:
                    values[name] = [tensors[f"{key}.{name}.{i}"] for i in range(stored["tensors"])]
                else:
                    values[name] = stored["value"]
            rebuilt.append([tensors[key], values])
        conditioning.append(rebuilt)
    return latents, conditioning
