"""What is present under a dataset root, and for anything missing the command that fixes it."""

from __future__ import annotations

from pathlib import Path

from tkpbench.data.common import DatasetError


def check_dataset(dataset: str, root: str | Path, splits: list[str]) -> tuple[bool, list[str]]:
    """(all present, report lines). Builds each split's dataset object, which checks lists and files."""
    from tkpbench.data.coco import COCOSegmentation
    from tkpbench.data.voc import VOCSegmentation

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
            lines.append(f"  split {split:10s} {len(ds):6d} images  ok{extra}")
        except DatasetError as e:
            ok = False
            lines.append(f"  split {split:10s} MISSING: {e}")
    if not ok:
        lines.append("Fix:")
        if dataset == "voc":
            lines += [
                "  python -m tkpbench.data download voc --root DATA          # VOC 2012 devkit",
                "  python -m tkpbench.data download sbd --root DATA          # SBD, for train_aug",
                "  python -m tkpbench.data prepare-aug --root DATA/VOCdevkit/VOC2012 --sbd DATA/benchmark_RELEASE/dataset",
                "  (or copy the common SegmentationClassAug/ folder and ImageSets/Segmentation/train_aug.txt into the VOC2012 folder)",
            ]
        else:
            lines += [
                "  python -m tkpbench.data download coco --root DATA/coco    # train2014, val2014, annotations",
                "  python -m tkpbench.data coco-masks --root DATA/coco --split train2014   # semantic PNGs, once",
            ]
    return ok, lines
