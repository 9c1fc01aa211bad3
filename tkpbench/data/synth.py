"""Generated demo data: a VOC devkit layout and its COCO-layout twin, deterministic per seed.

Each of up to 20 classes has its own hue, shape and stripe texture, so a patch classifier can
learn it from image-level tags alone; images hold 1-3 objects over a cluttered, desaturated
background. Masks carry VOC's 255 boundary band. Never a reproduction of the paper.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, shift

from tkpbench.data.common import IGNORE, VOC_CLASSES, save_mask
from tkpbench.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SHAPES = ("ellipse", "rectangle", "triangle", "diamond")


def _class_style(c: int, num_classes: int) -> tuple[np.ndarray, str, float, float]:
    hue = (c - 1) / num_classes
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255
    shape = SHAPES[(c - 1) % len(SHAPES)]
    freq = 0.15 + 0.1 * ((c - 1) // len(SHAPES) % 5)
    angle = np.pi * ((c * 37) % 180) / 180
    return rgb, shape, freq, angle


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if shape == "ellipse":
        return dy**2 + dx**2 <= 1
    if shape == "rectangle":
        return (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.9)
    if shape == "triangle":
        return (dy <= 0.9) & (dy >= -1 + 2 * np.abs(dx))
    return np.abs(dy) + np.abs(dx) <= 1  # diamond


def _boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[1:] |= mask[:-1] != mask[1:]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:, 1:] |= mask[:, :-1] != mask[:, 1:]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def render(rng: np.random.Generator, h: int, w: int, num_classes: int, max_objects: int = 3):
    """Returns (image uint8 (h, w, 3), mask uint8 (h, w) without boundary band, instances)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # cluttered, desaturated background: smooth noise plus grey rectangles
    low = rng.uniform(60, 170, size=(4, 5))
    bg = np.array(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)
    img = np.repeat(bg[..., None], 3, axis=2) + rng.normal(0, 8, size=(h, w, 3))
    for _ in range(rng.integers(2, 6)):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0 : y0 + rng.integers(5, 25), x0 : x0 + rng.integers(5, 25)] = rng.uniform(50, 200)
    mask = np.zeros((h, w), dtype=np.uint8)
    instances = []
    n_obj = int(rng.integers(1, max_objects + 1))
    classes = rng.choice(np.arange(1, num_classes + 1), size=n_obj, replace=n_obj > num_classes)
    for c in classes:
        rgb, shape, freq, angle = _class_style(int(c), num_classes)
        ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.12, 0.25) * w
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        m = _shape_mask(shape, yy, xx, cy, cx, ry, rx)
        if m.sum() < 30:
            continue
        stripes = 0.8 + 0.2 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        img[m] = rgb * stripes[m, None] + rng.normal(0, 6, size=(int(m.sum()), 3))
        mask[m] = c
        instances.append((int(c), m))
    # instances painted later cover earlier ones: keep what is visible
    instances = [(c, m & (mask == c)) for c, m in instances]
    instances = [(c, m) for c, m in instances if m.sum() > 0]
    return np.clip(img, 0, 255).astype(np.uint8), mask, instances


def blurred_probs(mask: np.ndarray, num_classes: int, sigma: float, offset: int, seed: int = 0) -> np.ndarray:
    """A probability map (float32 (C, H, W)) whose boundaries are blurred and shifted off the true
    ones of ``mask`` (uint8 (H, W), 255 = ignore), plus a little noise: CRF inputs with a known answer."""

    m = np.where(mask == IGNORE, 0, mask)
    onehot = np.stack([(m == c).astype(np.float32) for c in range(num_classes)])
    onehot = shift(onehot, (0, offset, offset), order=0, mode="nearest")
    p = np.stack([gaussian_filter(o, sigma) for o in onehot]) + 1e-3
    p += np.random.default_rng(seed).uniform(0, 0.05, p.shape).astype(np.float32)
    return (p / p.sum(0, keepdims=True)).astype(np.float32)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _xml(image_id: str, h: int, w: int, instances) -> str:
    objs = []
    for c, m in instances:
        ys, xs = np.nonzero(m)
        objs.append(
            f"  <object><name>{VOC_CLASSES[c]}</name><difficult>0</difficult><bndbox><xmin>{xs.min() + 1}</xmin>"
            f"<ymin>{ys.min() + 1}</ymin><xmax>{xs.max() + 1}</xmax><ymax>{ys.max() + 1}</ymax></bndbox></object>"
        )
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size>\n" + "\n".join(objs) + "\n</annotation>\n"
    )


def make_synthetic(
    root: str | Path,
    n: int = 200,
    seed: int = 0,
    size: tuple[int, int] = (120, 160),
    num_classes: int = 20,
    val_every: int = 5,
    coco: bool = True,
) -> dict[str, int]:
    """Write ``root/VOC2012`` (devkit layout) and, with ``coco``, ``root/coco`` (COCO 2014 layout, the
    same images; it needs pycocotools). Returns the VOC split sizes; the VOC data is the same either way.

    Image sizes vary by +-20 % around ``size`` (h, w). Every ``val_every``-th image is val;
    of the rest, the first half is ``train`` and all of them are ``train_aug``.
    """
    if coco:  # here, not at the top: VOC-only machines need no pycocotools
        from pycocotools import mask as mask_utils

    if not 1 <= num_classes <= 20:
        raise ValueError(f"num_classes must be in [1, 20] (VOC's foreground classes), got {num_classes}")
    root = Path(root)
    voc = root / "VOC2012"
    coco_dir = root / "coco"
    rng = np.random.default_rng(seed)
    ids, val, rest = [], [], []
    coco_split: dict[str, dict] = {
        s: {
            "images": [],
            "annotations": [],
            "categories": [{"id": 2 * c + 1, "name": VOC_CLASSES[c], "supercategory": "synthetic"} for c in range(1, 21)],
        }
        for s in ("train2014", "val2014")
    }

    ann_id = 1
    for i in range(n):
        image_id = f"2026_{i:06d}"
        h = int(size[0] * rng.uniform(0.8, 1.2))
        w = int(size[1] * rng.uniform(0.8, 1.2))
        img, mask, instances = render(rng, h, w, num_classes)
        labelled = mask.copy()
        labelled[_boundary(mask)] = IGNORE
        jpg = _jpeg(img)
        atomic_write_bytes(voc / "JPEGImages" / f"{image_id}.jpg", jpg)
        save_mask(voc / "SegmentationClass" / f"{image_id}.png", labelled)
        save_mask(voc / "SegmentationClassAug" / f"{image_id}.png", labelled)
        atomic_write_text(voc / "Annotations" / f"{image_id}.xml", _xml(image_id, h, w, instances))
        ids.append(image_id)
        split = "val2014" if i % val_every == val_every - 1 else "train2014"
        (val if split == "val2014" else rest).append(image_id)
        if not coco:
            continue
        coco_id = i + 1
        fname = f"COCO_{split}_{coco_id:012d}.jpg"
        atomic_write_bytes(coco_dir / split / fname, jpg)
        coco_split[split]["images"].append({"id": coco_id, "file_name": fname, "height": h, "width": w})
        for c, m in instances:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            coco_split[split]["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": coco_id,
                    "category_id": 2 * c + 1,
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                    "area": float(m.sum()),
                    "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                }
            )
            ann_id += 1
    if coco:
        # one COCO training image without annotations: loaders must leave it out and count it
        empty_id = n + 1
        empty = np.full((size[0], size[1], 3), 128, dtype=np.uint8)
        fname = f"COCO_train2014_{empty_id:012d}.jpg"
        atomic_write_bytes(coco_dir / "train2014" / fname, _jpeg(empty))
        coco_split["train2014"]["images"].append({"id": empty_id, "file_name": fname, "height": size[0], "width": size[1]})
        for s, d in coco_split.items():
            atomic_write_json(coco_dir / "annotations" / f"instances_{s}.json", d)
    train = rest[: max(1, len(rest) // 2)]
    lists = {"train": train, "val": val, "trainval": sorted(train + val), "train_aug": rest}
    for name, lst in lists.items():
        atomic_write_text(voc / "ImageSets" / "Segmentation" / f"{name}.txt", "\n".join(lst) + "\n")
    atomic_write_json(
        root / "SYNTHETIC.json",
        {"generator": "tkpbench.data.synth", "n": n, "seed": seed, "size": list(size), "num_classes": num_classes},
    )
    return {k: len(v) for k, v in lists.items()}
