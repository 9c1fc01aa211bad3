"""PASCAL VOC 2012 (+ SBD train_aug) in the devkit layout (SPEC Sec. 3).

Layout under ``root`` (the VOC2012 folder)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png       palette PNGs, 255 on boundaries (train, val)
    SegmentationClassAug/<id>.png    train_aug masks (the common folder, or built from SBD)
    ImageSets/Segmentation/<split>.txt
    Annotations/<id>.xml             only for tags = "xml"

The test split (``test.txt``, 1,456 ids, from the separate VOC2012test.tar) has images only: its
labels are withheld and scored by the evaluation server (``tkpbench submit voc-test``).

train_aug = (SBD train + SBD val + VOC train) - VOC val, 10,582 ids; ``prepare_train_aug``
computes the list and converts SBD's ``cls/*.mat`` into palette PNGs once (parallel,
resumable, atomic).
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tkpbench.data.common import VOC_CLASSES, DatasetError, read_image, read_mask, save_mask, tags_from_mask
from tkpbench.data.tagcache import cached_tags
from tkpbench.device import usable_cpus
from tkpbench.errors import ConfigError
from tkpbench.io import atomic_write_text
from tkpbench.progress import track

FIX_DOWNLOAD = "python -m tkpbench.data download voc --root DIR (then point data.root at DIR/VOCdevkit/VOC2012)"
FIX_TEST_DOWNLOAD = "python -m tkpbench.data download voc-test --root DIR (the DIR of the trainval download)"
# splits whose masks are withheld: VOC 2012 test is scored by the evaluation server only
UNLABELLED_SPLITS = ("test",)


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split list {path} does not exist; expected one image id per line (e.g. 2007_000032)")
    ids = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DatasetError(f"split list {path} is empty; expected one image id per line")
    return ids


class VOCSegmentation:
    """VOC 2012 segmentation split. ``tags``: "mask" (class set of the mask) or "xml"."""

    num_classes = 21
    classes = VOC_CLASSES

    def __init__(self, root: str | Path, split: str, tags: str = "mask", sbd_root: str | Path | None = None) -> None:
        self.root = Path(root)
        self.split = split
        if tags not in ("mask", "xml"):
            raise ConfigError(f"data.tags must be 'mask' or 'xml', got {tags!r}")
        self.tag_source = tags
        if not self.root.is_dir():
            raise DatasetError(
                f"VOC root {self.root} does not exist; expected the VOC2012 folder with JPEGImages/, "
                f"SegmentationClass/ and ImageSets/Segmentation/. Fix: {FIX_DOWNLOAD}"
            )
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if split == "train_aug" and not list_file.is_file():
            if sbd_root is None:
                raise DatasetError(
                    f"{list_file} does not exist; train_aug is built from SBD. Fix: "
                    f"python -m tkpbench.data prepare-aug --root {self.root} --sbd SBD_DIR/benchmark_RELEASE/dataset"
                )
            prepare_train_aug(self.root, Path(sbd_root))
        self.has_masks = split not in UNLABELLED_SPLITS
        fix = FIX_DOWNLOAD if self.has_masks else FIX_TEST_DOWNLOAD
        if not self.has_masks and not list_file.is_file():
            raise DatasetError(f"{list_file} does not exist; VOC 2012's test images come in their own archive. Fix: {fix}")
        self.ids = read_id_list(list_file)
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        missing = [i for i in self.ids if not (self.image_dir / f"{i}.jpg").is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} images of split '{split}' listed in {list_file} are missing from {self.image_dir} "
                f"(first: {missing[0]}.jpg). Fix: {fix}"
            )
        self._tags: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VOCSegmentation(split={self.split!r}, n={len(self)}, tags={self.tag_source!r}, root={str(self.root)!r})"

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}.jpg"

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.ids[i]}.png"

    def image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def mask(self, i: int) -> np.ndarray:
        if not self.has_masks:
            raise DatasetError(
                f"split '{self.split}' has no masks: VOC's test labels are withheld and scored by the evaluation "
                "server (tkpbench submit voc-test --run-dir RUN); score on val here"
            )
        return read_mask(self.mask_path(i), self.num_classes)

    def _tags_of(self, i: int) -> np.ndarray:
        if self.tag_source == "mask":
            return tags_from_mask(self.mask(i), self.num_classes)
        return xml_tags(self.root / "Annotations" / f"{self.ids[i]}.xml")

    def all_tags(self) -> np.ndarray:
        """bool (N, C) tags of every image, computed once per split and cached on disk."""
        if self._tags is None:
            sources = (
                [self.mask_path(i) for i in range(len(self))]
                if self.tag_source == "mask"
                else [self.root / "Annotations" / f"{x}.xml" for x in self.ids]
            )
            self._tags = cached_tags(f"voc_{self.split}_{self.tag_source}", self.ids, sources, self._tags_of)
        return self._tags

    def tags(self, i: int) -> np.ndarray:
        return self.all_tags()[i]


def xml_tags(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"annotation {path} does not exist; tags = 'xml' needs VOC's Annotations/ folder")
    try:
        names = [o.findtext("name", "").strip() for o in ET.parse(path).getroot().iter("object")]
    except ET.ParseError as e:
        raise DatasetError(f"annotation {path} is not valid XML ({e})") from e
    t = np.zeros(len(VOC_CLASSES), dtype=bool)
    t[0] = True
    for n in names:
        if n not in VOC_CLASSES:
            raise DatasetError(f"annotation {path} names an unknown class {n!r}; expected one of the 20 VOC classes")
        t[VOC_CLASSES.index(n)] = True
    return t


def train_aug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """(SBD train + SBD val + VOC train) - VOC val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def _load_sbd_cls(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # here: every stage imports this module, only the SBD conversion reads .mat (0.3 s)

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError(f"SBD mask {path} does not exist; expected SBD's dataset/cls/<id>.mat") from e
    except Exception as e:
        raise DatasetError(f"SBD mask {path} cannot be read as a GTcls .mat ({e})") from e


def _convert_one(args: tuple[str, str, str, str]) -> str:
    image_id, voc_root, sbd_root, out_dir = args
    out = Path(out_dir) / f"{image_id}.png"
    if out.is_file():
        return "skipped"
    voc_mask = Path(voc_root) / "SegmentationClass" / f"{image_id}.png"
    if voc_mask.is_file():  # VOC's own annotation (with its 255 boundaries) wins over SBD's
        tmp = out.with_suffix(".png.tmp")
        shutil.copyfile(voc_mask, tmp)
        os.replace(tmp, out)
        return "voc"
    save_mask(out, _load_sbd_cls(Path(sbd_root) / "cls" / f"{image_id}.mat"))
    return "sbd"


def prepare_train_aug(voc_root: Path, sbd_root: Path, workers: int = 0, progress: bool = False) -> dict[str, int]:
    """Write ImageSets/Segmentation/train_aug.txt and fill SegmentationClassAug/ from VOC + SBD.

    Resumable (finished PNGs are skipped) and atomic per file. ``sbd_root`` is SBD's
    ``benchmark_RELEASE/dataset`` folder (holding train.txt, val.txt, cls/).
    """
    seg = voc_root / "ImageSets" / "Segmentation"
    ids = train_aug_ids(
        read_id_list(seg / "train.txt"),
        read_id_list(seg / "val.txt"),
        read_id_list(sbd_root / "train.txt"),
        read_id_list(sbd_root / "val.txt"),
    )
    out_dir = voc_root / "SegmentationClassAug"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(voc_root), str(sbd_root), str(out_dir)) for i in ids]
    counts = {"skipped": 0, "voc": 0, "sbd": 0}
    workers = workers or usable_cpus()

    with ProcessPoolExecutor(workers) as pool:
        converted = pool.map(_convert_one, jobs, chunksize=64)
        for r in track(converted, total=len(jobs), description="train_aug masks", enabled=progress):
            counts[r] += 1
    atomic_write_text(seg / "train_aug.txt", "\n".join(ids) + "\n")
    return counts
