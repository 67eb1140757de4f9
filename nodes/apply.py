"""Apply LoRA: a LORA_MODEL on a model, through ComfyUI's own LoRA loader."""

from __future__ import annotations

from comfy_api.latest import io

import comfy.sd

from .companion_spec import APPLY_LORA
from .schema import build_schema


class ApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(APPLY_LORA)

    @classmethod
    def execute(cls, model, lora, strength) -> io.NodeOutput:
        if strength == 0:  # as ComfyUI's LoRA loaders: the model itself, no patches
            return io.NodeOutput(model)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return io.NodeOutput(patched)
