"""A :class:`~.companion_spec.NodeSpec` (plain data) as a V3 ``io.Schema``."""

from __future__ import annotations

from comfy_api.latest import io

from .companion_spec import CATEGORY, NodeSpec

IO_TYPES = {
    "MODEL": io.Model, "LATENT": io.Latent, "CONDITIONING": io.Conditioning, "INT": io.Int,
    "FLOAT": io.Float, "COMBO": io.Combo, "BOOLEAN": io.Boolean, "STRING": io.String,
    "IMAGE": io.Image, "VAE": io.Vae, "CLIP": io.Clip, "LORA_MODEL": io.LoraModel,
    "LOSS_MAP": io.LossMap, "LORALAB_OPTIONS": io.Custom("LORALAB_OPTIONS"),
}


def build_schema(spec: NodeSpec, **overrides: dict) -> io.Schema:
    """The schema of ``spec``; ``overrides[name]`` replaces options of one input (e.g. a
    combo's options read from disk when the node list is built)."""
    inputs = []
    for name, kind, options in spec.inputs:
        options = {**options, **overrides.get(name, {})}
        inputs.append(IO_TYPES[kind].Input(name, **options))
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=CATEGORY,
        description=spec.description,
        inputs=inputs,
        outputs=[IO_TYPES[kind].Output(id, display_name=display, tooltip=tip,
                                       is_output_list=spec.output_lists)
                 for id, kind, display, tip in spec.outputs],
        **spec.flags,
    )
