"""Training Options: the options of a Train LoRA run beyond its own widgets, as one socket."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.config import TrainConfig
from ..training.options import OPTIONS_NODE, changed, node_options
from .schema import build_schema
from .spec import TRAINING_OPTIONS


class TrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(TRAINING_OPTIONS)

    @classmethod
    def execute(cls, options=None, **values) -> io.NodeOutput:
        """This node's values over an earlier node's: the values changed here (different
        from their default) replace the earlier ones; the others are kept."""
        earlier = dict(options or {})
        merged = {option.name: option.default for option in node_options(OPTIONS_NODE)}
        merged.update(earlier)
        merged.update(changed(values))
        TrainConfig(**merged)  # a bad value or combination is a ValueError here, on this node
        return io.NodeOutput(merged)
