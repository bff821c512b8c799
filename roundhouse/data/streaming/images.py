"""Image folders: one subfolder per class, decoded with Pillow into uint8 `(C, H, W)` arrays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from roundhouse.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    files = {
        c.name: sorted(f for f in c.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        for c in classes
    }
    files = {name: paths for name, paths in files.items() if paths}
    if not files:
        raise DataError(
            f"{root} has no class subfolders with images",
            f"put images ({', '.join(IMAGE_SUFFIXES)}) in one subfolder per class",
        )
    return files


def _load(path: Path, mode: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size, size), Image.BILINEAR)
            pixels = np.asarray(image)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode image {path}: {err}", "remove or fix the file") from err
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _mode(first: Path) -> str:
    from PIL import Image

    with Image.open(first) as image:
        # Grey stays one channel; everything else (palette, RGBA, CMYK) becomes RGB.
        return "L" if image.mode in ("L", "1", "I;16") else "RGB"


def load_image_folder(root: Path, size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads every image of `root/<class>/...`.

    Args:
        root: The folder holding one subfolder per class.
        size: Resize every image to `size x size`; None keeps sizes, which must then agree.

    Returns:
        `(images (N, C, H, W) uint8, labels (N,) int64, class names)`; labels index the sorted
        class names.

    Raises:
        DataError: For a folder without classes, an undecodable file or images of different
            sizes without `size`.
    """
    files = _class_files(root)
    mode = _mode(next(iter(files.values()))[0])
    images, labels = [], []
    for label, paths in enumerate(files.values()):
        for path in paths:
            image = _load(path, mode, size)
            if images and image.shape != images[0].shape:
                raise DataError(
                    f"image {path} has shape {list(image.shape)}, the first one "
                    f"{list(images[0].shape)}",
                    "pass --image-size N to resize all images to N x N",
                )
            images.append(image)
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(files)
