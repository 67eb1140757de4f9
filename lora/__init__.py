"""Adapter algorithms: one file each, registered here by the name the node shows."""

from .base import Adapter, LayerGeometry, layer_geometry
from .lora import LoRA

ADAPTERS: dict[str, type[Adapter]] = {
    LoRA.NAME: LoRA,
}

__all__ = ["ADAPTERS", "Adapter", "LayerGeometry", "layer_geometry", "LoRA"]
