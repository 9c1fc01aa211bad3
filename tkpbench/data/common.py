"""Shared pieces of the data package: palette, image/mask readers with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tkpbench.errors import DatasetError
from tkpbench.io import atomic_save_png

IGNORE = 255

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map, flattened (R, G, B, R, G, B, ...)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    idx = np.arange(256)
    c = idx.copy()
    for j in range(8):
        for ch in range(3):
            pal[:, ch] |= (((c >> ch) & 1) << (7 - j)).astype(np.uint8)
        c >>= 3
    return pal.reshape(-1).tolist()


_PALETTE = voc_palette()


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB; a missing or corrupt file raises DatasetError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DatasetError(f"image {path} does not exist; the split list names it, so the image folder is incomplete") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"image {path} cannot be decoded ({e}); re-extract or re-download this file") from e


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """uint8 (H, W) class indices (255 = ignore) from a palette or greyscale PNG.

    Raises DatasetError naming the file when it is missing, corrupt, an RGB colour image, or
    holds a value >= num_classes other than 255.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DatasetError(
                    f"mask {path} has mode {im.mode}; expected a palette ('P') or greyscale ('L') PNG of class "
                    "indices (VOC's SegmentationClass format), not a colour rendering"
                )
            m = np.array(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError(f"mask {path} does not exist; the split list names it, so the mask folder is incomplete") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"mask {path} cannot be decoded ({e}); re-extract or rebuild it") from e
    bad = (m >= num_classes) & (m != IGNORE)
    if bad.any():
        vals = sorted(set(np.unique(m[bad]).tolist()))[:5]
        raise DatasetError(f"mask {path} holds values {vals} >= {num_classes} classes that are not {IGNORE} (ignore)")
    return m


def save_mask(path: Path, mask: np.ndarray) -> None:
    """Write class indices as a VOC palette PNG, atomically."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(_PALETTE)
    atomic_save_png(path, im)


def tags_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """bool (C,) class set of a mask, background forced on, 255 ignored."""
    t = np.zeros(num_classes, dtype=bool)
    vals = np.unique(mask)
    t[vals[vals < num_classes]] = True
    t[0] = True
    return t
