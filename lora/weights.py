"""LORA_MODEL values: a flat ``dict[str, Tensor]`` that can also carry training metadata."""

from __future__ import annotations

from typing import Callable, Mapping

import torch


class LoraWeights(dict):
    """The LoRA state dict (what ComfyUI's own LoRA nodes read) plus ``metadata``.

    ``metadata`` maps ``lora_lab.*`` names (steps, algorithm, rank, alpha, learning_rate,
    optimizer, loss_function, seed, training_dtype, lora_dtype, base_model, version) to
    strings; the Save LoRA node writes them into the safetensors header. A plain dict (e.g.
    from ComfyUI's own trainer) has no metadata and is accepted everywhere as well.

    ``namer``: ``namer(format, modules)`` gives the :class:`lora.export.ExportNames` of the
    model the LoRA was trained on, so Save LoRA can write other tools' names without being
    given that model again.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 namer: Callable | None = None):
        super().__init__(tensors)
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        self.namer = namer


def metadata_of(lora: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return dict(getattr(lora, "metadata", {}) or {})
