"""Adapter algorithms: one file each, registered here by the name the node shows.

The order is the node's option order (LoRA first: the default). Every class's docstring
states what ``rank`` and ``alpha`` mean for it, its init, its training forward and the keys
ComfyUI's loader reads; its ``SAVED`` declaration is all that saving, loading and detecting
files use. A new algorithm is one file and one entry in ``ADAPTERS``.
"""

from .base import Adapter, LayerGeometry, Saved, layer_geometry
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

# The order a file's modules are matched in, most specific first: an algorithm that saves
# more tensors is asked before one whose tensors it includes (DoRA's are LoRA's plus
# dora_scale), so no algorithm needs to know another's keys.
DETECTION_ORDER: tuple[type[Adapter], ...] = tuple(
    sorted(ADAPTERS.values(), key=lambda cls: -len(cls.SAVED)))

__all__ = [
    "ADAPTERS", "DETECTION_ORDER", "Adapter", "LayerGeometry", "Saved", "layer_geometry",
    "LoRA", "LoHa", "LoKr", "OFT", "BOFT", "GLoRA", "DoRA",
]
