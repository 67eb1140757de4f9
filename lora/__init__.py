"""Adapter algorithms: one file each, registered here by the name the node shows.

The order is the node's option order (LoRA first: the default). Every class's docstring
states what ``rank`` and ``alpha`` mean for it, its init, its training forward and the keys
ComfyUI's loader reads.
"""

from .base import Adapter, LayerGeometry, layer_geometry
from .boft import BOFT
from .dora import DoRA
from .glora import GLoRA
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT

ADAPTERS: dict[str, type[Adapter]] = {
    cls.NAME: cls for cls in (LoRA, LoHa, LoKr, OFT, BOFT, GLoRA, DoRA)
}

__all__ = [
    "ADAPTERS", "Adapter", "LayerGeometry", "layer_geometry",
    "LoRA", "LoHa", "LoKr", "OFT", "BOFT", "GLoRA", "DoRA",
]
