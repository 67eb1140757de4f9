"""Save LoRA: write a LORA_MODEL into the loras folder with its training metadata, under
ComfyUI's key names or kohya's/diffusers' (``format``)."""

from __future__ import annotations

import functools
import logging
import os

from comfy_api.latest import io, ui

import folder_paths

from .. import __version__
from ..lora.diff import SUFFIXES as DELTA_SUFFIXES
from ..lora.export import export_lora, split_key
from ..lora.io import IMPLEMENTATION_COMFYUI, lora_file_metadata, save_lora_file
from ..lora.weights import metadata_of
from .companion_spec import SAVE_LORA
from .lora_keys import export_names
from .schema import build_schema

log = logging.getLogger(__name__)
PREFIX = "diffusion_model."


def loras_folder() -> str:
    """The first folder ComfyUI lists LoRAs from (``models/loras`` unless configured)."""
    return folder_paths.get_folder_paths("loras")[0]


def exported(lora, format: str, model=None):
    """``(tensors, implementation)`` of ``lora`` under ``format``'s key names."""
    if format == "comfyui":
        return lora, IMPLEMENTATION_COMFYUI
    if format != "kohya":
        raise ValueError(f"format {format!r} is not known; choose comfyui or kohya.")
    namer = functools.partial(export_names, model) if model is not None else getattr(
        lora, "namer", None)
    if namer is None:
        raise ValueError(
            "format kohya names the LoRA's layers the way its model's other tools do, and this "
            "LORA_MODEL does not say which model it was trained on: connect that model to Save "
            "LoRA's model input (Train LoRA's lora output needs nothing).")
    modules = {split_key(key, PREFIX)[0] for key in lora}
    names = namer("kohya", modules)
    tensors = export_lora(lora, names, PREFIX)
    algorithm = metadata_of(lora).get("lora_lab.algorithm", "LoRA")
    if names.style == "kohya" and algorithm != "LoRA":
        log.warning(
            "Save LoRA: a %s in kohya names loads in ComfyUI, Forge and A1111 (LyCORIS); "
            "diffusers loads LoRA only from such files%s.", algorithm,
            " (it drops dora_scale, leaving a plain LoRA)" if algorithm == "DoRA" else "")
    deltas = [k for k in tensors if k.rsplit(".", 1)[-1] in DELTA_SUFFIXES]
    if deltas:
        log.warning(
            "Save LoRA: %d norm/bias delta keys (diff, diff_b; first %s) are saved under kohya "
            "names: ComfyUI, Forge and A1111 apply them, diffusers leaves them out.",
            len(deltas), deltas[0])
    return tensors, names.implementation


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
