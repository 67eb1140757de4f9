"""Registration of LoRA Lab's nodes with ComfyUI (V3 schema)."""

from comfy_api.latest import ComfyExtension, io

from .apply import ApplyLoRA
from .dataset import LoadDataset
from .options import TrainingOptions
from .plot import PlotLoss
from .save import SaveLoRA
from .train import TrainLoRA

NODES: list[type[io.ComfyNode]] = [
    LoadDataset, TrainLoRA, TrainingOptions, SaveLoRA, PlotLoss, ApplyLoRA]


class LoRALabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LoRALabExtension:
    return LoRALabExtension()
