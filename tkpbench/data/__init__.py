"""Datasets (SPEC Sec. 3-4): VOC 2012 + SBD train_aug, COCO 2014, generated demo data, transforms,
download and check. ``python -m tkpbench.data --help`` lists the commands."""

from tkpbench.data.coco import COCOSegmentation
from tkpbench.data.common import IGNORE, VOC_CLASSES, DatasetError, read_image, read_mask, save_mask
from tkpbench.data.transforms import build_dataset
from tkpbench.data.voc import VOCSegmentation

__all__ = [
    "COCOSegmentation",
    "VOCSegmentation",
    "DatasetError",
    "IGNORE",
    "VOC_CLASSES",
    "read_image",
    "read_mask",
    "save_mask",
    "build_dataset",
]
