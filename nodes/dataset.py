"""Load Image Dataset: an input folder of images and captions as LATENT + CONDITIONING."""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths

from ..training.dataset import image_folders, load_images, scan_folder
from .companion_spec import LOAD_DATASET, NO_IMAGE_FOLDER
from .schema import build_schema

log = logging.getLogger(__name__)


def dataset_folder(folder: str) -> str:
    """The absolute path of ``folder``, which must lie inside ComfyUI's input directory."""
    root = os.path.abspath(folder_paths.get_input_directory())
    if folder == NO_IMAGE_FOLDER:
        raise ValueError(f"No folder in ComfyUI's input directory {root} holds images: put your "
                         "training images in a subfolder of it (e.g. input/my_dataset/a.png, "
                         "with a.txt as caption), then refresh the page (R) and pick that folder.")
    path = os.path.normpath(os.path.join(root, folder))
    if not folder or os.path.isabs(folder) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"folder {folder!r} is not a folder inside ComfyUI's input directory "
                         f"{root}; pick one from the list.")
    return path


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = image_folders(folder_paths.get_input_directory()) or [NO_IMAGE_FOLDER]
        return build_schema(LOAD_DATASET, folder={"options": folders})

    @classmethod
    def execute(cls, folder, vae, clip, width, height, resize_mode, default_caption="") -> io.NodeOutput:
        if vae is None or clip is None:
            raise ValueError("vae and clip must be connected; a checkpoint without a VAE or text "
                             "encoder needs a VAE Loader / CLIP Loader.")
        path = dataset_folder(folder)
        items = scan_folder(path, default_caption or "")
        images = load_images(items, width, height, resize_mode)
        progress = comfy.utils.ProgressBar(len(images))
        latents = []
        for index, pixels in enumerate(images):
            comfy.model_management.throw_exception_if_processing_interrupted()
            batch = torch.tensor(pixels, dtype=torch.float32).div(255.0).unsqueeze(0)  # [1, H, W, 3]
            latents.append(vae.encode(batch))
            progress.update_absolute(index + 1, len(images))
        encoded: dict[str, list] = {}
        for item in items:
            if item.caption not in encoded:
                encoded[item.caption] = clip.encode_from_tokens_scheduled(clip.tokenize(item.caption))[0]
        # one LATENT (and its CONDITIONING, an entry per latent) per size, in order of
        # appearance: one in every mode but bucket
        groups: dict[tuple, tuple[list, list]] = {}
        for latent, item in zip(latents, items):
            group = groups.setdefault(tuple(latent.shape), ([], []))
            group[0].extend([latent] * item.repeats)
            group[1].extend([encoded[item.caption]] * item.repeats)
        outputs = [{"samples": torch.cat(group[0])} for group in groups.values()]
        positive = [group[1] for group in groups.values()]
        count = sum(out["samples"].shape[0] for out in outputs)
        uncaptioned = sum(1 for item in items if not item.caption)
        if uncaptioned:
            log.warning("%d image(s) in %s have no caption and no default caption; they train "
                        "with an empty prompt.", uncaptioned, folder)
        log.info("Load Image Dataset: %d images (%d with repeats) from %s at %dx%d (%s)%s.",
                 len(items), count, folder, width, height, resize_mode,
                 "" if len(outputs) == 1 else ", sizes " + ", ".join(
                     f"{out['samples'].shape[0]} x {list(out['samples'].shape[-2:])}"
                     for out in outputs))
        return io.NodeOutput(outputs, positive)
