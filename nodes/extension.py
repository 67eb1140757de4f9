"""Registration of LoRA Lab's nodes with ComfyUI (V3 schema)."""

import logging

from comfy_api.latest import ComfyExtension, io

from .apply import ApplyLoRA
from .dataset import LoadDataset
from .options import TrainingOptions
from .plot import PlotLoss
from .save import SaveLoRA
from .templates import install_template_order
from .train import TrainLoRA
from .training_data import LoadTrainingData, SaveTrainingData

log = logging.getLogger(__name__)

NODES: list[type[io.ComfyNode]] = [
    LoadDataset, TrainLoRA, TrainingOptions, SaveLoRA, PlotLoss, ApplyLoRA, SaveTrainingData,
    LoadTrainingData]


class LoRALabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LoRALabExtension:
    if not install_template_order():
        log.debug("LoRA Lab: example workflows keep ComfyUI's template order.")
    return LoRALabExtension()
