"""What is present under a dataset root, and for anything missing the command that fixes it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tkpbench.data.coco import COCOSegmentation
from tkpbench.data.common import DatasetError
from tkpbench.data.voc import VOCSegmentation
from tkpbench.device import usable_cpus


def _decode_one(ds, i: int) -> str | None:
    """None when image ``i`` and its mask decode and agree in size; else what is wrong, naming the file."""
    try:
        img = ds.image(i)
        if not getattr(ds, "has_masks", True):  # VOC test: images only
            return None
        if ds.mask_path(i).is_file() or not isinstance(ds, COCOSegmentation):
            mask = ds.mask(i)  # read_mask rejects colour masks and values >= num_classes other than 255
            if mask.shape != img.shape[:2]:
                return (
                    f"mask {ds.mask_path(i)} is {mask.shape[1]}x{mask.shape[0]} but its image {ds.image_path(i)} is "
                    f"{img.shape[1]}x{img.shape[0]}; a mask must have its image's size"
                )
    except DatasetError as e:
        return str(e)
    return None


def decode_all(ds, workers: int = 0, limit: int = 20) -> list[str]:
    """Decode every image and mask of ``ds`` (a truncated JPEG, a mask with a value out of range, an
    RGB mask or a mask of the wrong size is found); returns up to ``limit`` problems."""
    with ThreadPoolExecutor(workers or min(8, usable_cpus())) as pool:
        problems = [p for p in pool.map(lambda i: _decode_one(ds, i), range(len(ds))) if p]
    return problems[:limit]


def check_dataset(dataset: str, root: str | Path, splits: list[str], decode: bool = False) -> tuple[bool, list[str]]:
    """(all present, report lines). Builds each split's dataset object, which checks lists and files;
    with ``decode`` also decodes every image and mask (``decode_all``)."""
    root = Path(root)
    lines = [f"{dataset} root: {root}"]
    ok = True
    if dataset == "voc":
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations"):
            d = root / sub
            n = sum(1 for _ in d.iterdir()) if d.is_dir() else 0
            lines.append(f"  {sub + '/':24s} {n:6d} files" + ("" if n else "  (missing)"))
    for split in splits:
        try:
            ds = VOCSegmentation(root, split) if dataset == "voc" else COCOSegmentation(root, split)
            extra = f", {ds.num_unannotated} unannotated left out" if getattr(ds, "skip_unannotated", False) else ""
            if not getattr(ds, "has_masks", True):
                extra += ", no masks (labels withheld: scored by the evaluation server, tkpbench submit voc-test)"
            problems = decode_all(ds) if decode else []
            if problems:
                ok = False
                lines.append(f"  split {split:10s} {len(ds):6d} images  DAMAGED:")
                lines += [f"    {p}" for p in problems]
            else:
                lines.append(f"  split {split:10s} {len(ds):6d} images  ok{extra}" + (", all decoded" if decode else ""))
        except DatasetError as e:
            ok = False
            lines.append(f"  split {split:10s} MISSING: {e}")
    if not ok:
        lines.append("Fix:")
        if dataset == "voc":
            lines += [
                "  python -m tkpbench.data download voc --root DATA          # VOC 2012 devkit",
                "  python -m tkpbench.data download sbd --root DATA          # SBD, for train_aug",
                "  python -m tkpbench.data download voc-test --root DATA     # VOC 2012 test images (split test)",
                "  python -m tkpbench.data prepare-aug --root DATA/VOCdevkit/VOC2012 --sbd DATA/benchmark_RELEASE/dataset",
                "  (or copy the common SegmentationClassAug/ folder and ImageSets/Segmentation/train_aug.txt"
                " into the VOC2012 folder)",
            ]
        else:
            lines += [
                "  python -m tkpbench.data download coco --root DATA/coco    # train2014, val2014, annotations",
                "  python -m tkpbench.data coco-masks --root DATA/coco --split train2014   # semantic PNGs, once",
            ]
    return ok, lines
