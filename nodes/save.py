"""Save LoRA: write a LORA_MODEL into the loras folder with its training metadata, under
ComfyUI's key names or kohya's/diffusers' (``format``)."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

import folder_paths

from .. import __version__
from ..lora.io import lora_file_metadata, save_lora_file
from ..lora.weights import metadata_of
from .companion_spec import SAVE_LORA
from .lora_keys import exported
from .schema import build_schema


def loras_folder() -> str:
    """The first folder ComfyUI lists LoRAs from (``models/loras`` unless configured)."""
    return folder_paths.get_folder_paths("loras")[0]


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SAVE_LORA)

    @classmethod
    def execute(cls, lora, filename_prefix, steps=None, format="comfyui", model=None) -> io.NodeOutput:
        if not isinstance(lora, dict) or not lora:
            raise ValueError("lora must be a LORA_MODEL (a non-empty dict of tensors); connect "
                             "Train LoRA's lora output.")
        folder = loras_folder()
        tensors, implementation = exported(lora, format, model)
        title = os.path.basename(filename_prefix.replace("\\", "/")) or "LoRA"
        metadata = lora_file_metadata(lora, metadata_of(lora), steps, __version__, title=title,
                                      format=format, implementation=implementation)
        path = save_lora_file(tensors, folder, filename_prefix, metadata, steps)
        # ComfyUI re-lists a folder when its mtime changes; drop the cache so the new file is
        # listed at once even where the file system's mtime is coarse.
        folder_paths.filename_list_cache.pop("loras", None)
        name = os.path.relpath(path, folder).replace(os.sep, "/")
        return io.NodeOutput(name, ui=ui.PreviewText(f"Saved to loras/{name}"))
