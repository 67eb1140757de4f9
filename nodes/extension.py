"""Registration of LoRA Lab's nodes with ComfyUI (V3 schema)."""

from comfy_api.latest import ComfyExtension, io

from .train import TrainLoRA

NODES: list[type[io.ComfyNode]] = [TrainLoRA]


class LoRALabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LoRALabExtension:
    return LoRALabExtension()
