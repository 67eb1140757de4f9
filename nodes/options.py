"""Training Options: the options of a Train LoRA run beyond its own widgets, as one socket."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.config import TrainConfig
from ..training.options import OPTIONS_NODE, changed, node_options
from .schema import build_schema
from .spec import OPTIONS_SOCKETS, TRAINING_OPTIONS

SOCKETS = [name for name, _, _ in OPTIONS_SOCKETS]


class TrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(TRAINING_OPTIONS)

    @classmethod
    def execute(cls, options=None, **values) -> io.NodeOutput:
        """This node's values over an earlier node's: the values changed here (different
        from their default) and the inputs connected here replace the earlier ones; the
        others are kept."""
        earlier = dict(options or {})
        merged = {option.name: option.default for option in node_options(OPTIONS_NODE)}
        merged.update(earlier)
        merged.update(changed(values))
        merged.update({name: values[name] for name in SOCKETS if values.get(name) is not None})
        # a bad value or combination is a ValueError here, on this node
        TrainConfig(**{k: v for k, v in merged.items() if k not in SOCKETS})
        return io.NodeOutput(merged)
