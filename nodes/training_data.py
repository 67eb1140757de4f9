"""Save Training Data / Load Training Data: a run's latents and conditioning as files, for
the headless trainer (``python -m lora_lab train``, also under ``torchrun``)."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

import folder_paths

from ..training.data_files import INDEX, load_training_data, save_training_data
from .companion_spec import (
    LOAD_TRAINING_DATA, NO_TRAINING_DATA, SAVE_TRAINING_DATA, TRAINING_DATA_FOLDER,
)
from .schema import build_schema
from .train import latent_batches, per_sample_conditioning, single


def data_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), TRAINING_DATA_FOLDER)


def saved_folders() -> list[str]:
    root = data_root()
    if not os.path.isdir(root):
        return []
    return sorted(name for name in os.listdir(root)
                  if os.path.isfile(os.path.join(root, name, INDEX)))


class SaveTrainingData(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SAVE_TRAINING_DATA)

    @classmethod
    def execute(cls, latents, positive, name) -> io.NodeOutput:
        name = str(single(name)).strip()
        if not name or os.sep in name or "/" in name or name.startswith("."):
            raise ValueError(f"name {name!r} must be a plain folder name (no '/' or leading "
                             "'.'), such as 'my_dataset'.")
        batches, masks = latent_batches(latents)
        entries = per_sample_conditioning(positive, batches)
        count = sum(b.shape[0] for b in batches)
        if len(entries) not in (1, count):
            raise ValueError(f"positive holds {len(entries)} conditionings but latents hold "
                             f"{count} samples; give one for all or one per latent.")
        # one CONDITIONING per LATENT, an entry per latent: what Train LoRA reads back
        conditioning, start = [], 0
        for batch in batches:
            conditioning.append(entries[start:start + batch.shape[0]] if len(entries) > 1
                                else entries[:1])
            start += batch.shape[0]
        root = data_root()
        folder, counter = os.path.join(root, name), 1
        while True:
            try:
                save_training_data(folder, batches, masks, conditioning)
                break
            except FileExistsError:
                counter += 1
                folder = os.path.join(root, f"{name}_{counter:05d}")
        relative = os.path.relpath(folder, folder_paths.get_output_directory())
        relative = relative.replace(os.sep, "/")
        return io.NodeOutput(relative, ui=ui.PreviewText(
            f"Saved {count} latents in {len(batches)} LATENT(s) to output/{relative}"))


class LoadTrainingData(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(LOAD_TRAINING_DATA,
                            folder={"options": saved_folders() or [NO_TRAINING_DATA]})

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        if folder == NO_TRAINING_DATA or folder not in saved_folders():
            raise ValueError(
                f"folder {folder!r} is not training data under output/{TRAINING_DATA_FOLDER}/; "
                "save some with Save Training Data, refresh (R) and pick it.")
        latents, conditioning = load_training_data(os.path.join(data_root(), folder))
        return io.NodeOutput(latents, conditioning)
