"""An image folder as training data: file order, kohya repeats, captions and resizing.

No ComfyUI here (the Load Image Dataset node encodes what this returns). Images are read
with Pillow, which every ComfyUI install has; it is imported when first needed, so the rest
of the package imports without it.

Folder layout (kohya-ss style)::

    my_dataset/
        a.png  a.txt            # repeated once
        10_style/               # "<N>_<name>": every image in it counts N times
            b.jpg  b.txt
        extra/                  # any other subfolder: repeated once

Files are taken in sorted order (top-level images first, then each subfolder in sorted
order); a caption is the ``.txt`` file with the image's stem, else the default caption.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
RESIZE_MODES = ("crop", "pad", "stretch", "bucket")
BUCKET_STEP = 64  # bucket sides are multiples of this (pixels)
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DatasetImage:
    path: str       # absolute path of the image file
    name: str       # path relative to the dataset folder, "/"-separated (for messages)
    caption: str
    repeats: int


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_folders(root: str) -> list[str]:
    """The folders under ``root`` that hold images, themselves or in any subfolder, as sorted
    "/"-separated paths relative to ``root`` (``root`` itself is not listed).

    Hidden folders (".name") and what lies below them are skipped; symlinked folders are
    followed once. A missing ``root`` gives an empty list."""
    if not os.path.isdir(root):
        return []
    with_images: set[str] = set()
    seen: set[str] = set()
    for path, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(path, root)
        if rel != "." and any(_is_image(f) for f in files):
            parts = rel.split(os.sep)
            for depth in range(1, len(parts) + 1):
                with_images.add("/".join(parts[:depth]))
    return sorted(with_images)


def read_caption(image_path: str, default: str = "") -> str:
    """The text of ``<stem>.txt`` beside the image, stripped; ``default`` if absent or empty."""
    caption_path = os.path.splitext(image_path)[0] + ".txt"
    if os.path.isfile(caption_path):
        with open(caption_path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text:
            return text
    return default


def scan_folder(folder: str, default_caption: str = "") -> list[DatasetImage]:
    """Every image of ``folder`` and its direct subfolders, in sorted order, with captions."""
    if not os.path.isdir(folder):
        raise ValueError(f"The dataset folder {folder} does not exist; put your images in a "
                         "folder under ComfyUI's input directory and pick it.")
    found: list[DatasetImage] = []
    entries = sorted(os.listdir(folder))
    for name in entries:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and _is_image(name):
            found.append(DatasetImage(path, name, read_caption(path, default_caption), 1))
    for sub in entries:
        sub_path = os.path.join(folder, sub)
        if not os.path.isdir(sub_path) or sub.startswith("."):
            continue
        match = _REPEAT_FOLDER.match(sub)
        repeats = int(match.group(1)) if match else 1
        for name in sorted(os.listdir(sub_path)):
            path = os.path.join(sub_path, name)
            if os.path.isfile(path) and _is_image(name) and repeats > 0:
                found.append(DatasetImage(path, f"{sub}/{name}",
                                          read_caption(path, default_caption), repeats))
    if not found:
        raise ValueError(
            f"The dataset folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
            "neither at its top level nor in its subfolders; add images or pick another folder.")
    return found


def bucket_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """The bucket of an image of ``w`` x ``h`` for a target of about ``width`` x ``height``
    pixels: of the sizes with sides multiples of 64 and an area at most ``width x height``
    (each side as large as the area allows for the other), the one whose aspect ratio is
    closest to the image's (in log ratio; the larger area wins a tie). The bucket list is
    built as kohya sd-scripts' ``make_bucket_resolutions`` builds it
    (``library/model_util.py``)."""
    area = width * height
    step = BUCKET_STEP
    sizes = set()
    side = step
    while side * step <= area:
        other = area // side // step * step
        sizes.add((side, other))
        sizes.add((other, side))
        side += step
    if not sizes:
        sizes = {(step, step)}
    aspect = math.log(w / h)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1], s))


def resize(image, width: int, height: int, mode: str):
    """``image`` (a PIL RGB image) at exactly ``width`` x ``height``; ``bucket``: at its
    bucket's size (:func:`bucket_size`), cropped as ``crop`` does (only what the bucket's
    aspect ratio needs).

    - ``crop``: scaled (aspect kept) until it covers the target, then the centre is cut out;
    - ``pad``: scaled (aspect kept) until it fits the target, centred on black;
    - ``stretch``: scaled to the target, aspect not kept.

    Resampling is Lanczos from the source pixels (the crop box is passed to ``resize`` in
    source coordinates, so there is one resampling step and no double rounding).
    """
    from PIL import Image

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {mode!r} is not one of {', '.join(RESIZE_MODES)}.")
    if width < 1 or height < 1:
        raise ValueError(f"The target size {width}x{height} must be at least 1x1.")
    w, h = image.size
    if mode == "bucket":
        width, height = bucket_size(w, h, width, height)
        mode = "crop"
    lanczos = Image.Resampling.LANCZOS
    if mode == "stretch" or (w, h) == (width, height):
        return image.resize((width, height), lanczos)
    if mode == "crop":
        scale = max(width / w, height / h)
        box_w, box_h = width / scale, height / scale  # the source region that is kept
        left, top = (w - box_w) / 2, (h - box_h) / 2
        return image.resize((width, height), lanczos, box=(left, top, left + box_w, top + box_h))
    scale = min(width / w, height / h)
    new_w = min(width, max(1, round(w * scale)))
    new_h = min(height, max(1, round(h * scale)))
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), lanczos), ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def open_rgb(path: str):
    """The image at ``path`` as a PIL RGB image, upright (EXIF orientation applied);
    transparent pixels become white."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened) or opened
        if image.mode == "I":  # 16-bit PNG: as ComfyUI's Load Image reads it
            image = image.point(lambda v: v * (1 / 255))
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image)
        return image.convert("RGB")


def load_images(
    items: list[DatasetImage], width: int, height: int, mode: str,
) -> list[np.ndarray]:
    """One ``[height, width, 3]`` uint8 array per item (repeats not expanded; ``bucket``:
    each at its own bucket's size).

    Every file is tried; if any cannot be read, one ``ValueError`` names all of them.
    """
    images, failed = [], []
    for item in items:
        try:
            images.append(np.asarray(resize(open_rgb(item.path), width, height, mode), dtype=np.uint8))
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for bad files
            if isinstance(error, ValueError) and "resize_mode" in str(error):
                raise
            failed.append(f"{item.name} ({type(error).__name__}: {error})")
    if failed:
        raise ValueError(
            f"{len(failed)} image(s) in the dataset could not be read: " + "; ".join(failed)
            + ". Remove or re-save them and run again.")
    return images
