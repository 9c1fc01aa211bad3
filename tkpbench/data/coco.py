"""MS COCO 2014 (or 2017: file names come from the annotation file) as semantic segmentation.

``root`` holds ``<split>/`` (images) and ``annotations/instances_<split>.json``. The 80
categories map to 1..80 in the order of their ids; background is 0. Instances are painted
largest first so small objects stay visible; crowd regions become 255 where no (non-crowd)
instance covers them. Semantic masks are made once and cached as palette PNGs: in
``root/semantic/<split>/`` when that folder exists (``python -m tkpbench.data coco-masks`` builds
them all there in parallel), else in the cache folder (``$TKPBENCH_CACHE``, default
``~/.cache/tkpbench``), keyed by the annotation file, so a read-only dataset folder works.
Tags: categories with at least one annotation. Images without any annotation are left out
of training splits and counted in ``num_unannotated``.

``protocol = "vit_pcm"`` follows ViT-PCM's ``datasets/parse_coco.py`` instead, on every split:
images smaller than 256 px on a side or without annotations are left out; instances are painted
in annotation order where nothing is painted yet (the first annotation wins), crowd regions with
their class. Its masks are cached apart from the default protocol's. Two things it does are not
repeated: it also drops an image whose mask has a single value (one class covering every pixel,
which needs every mask decoded up front), and it derives tags from the mask (a category whose
pixels are all covered by earlier annotations drops out); here tags stay the annotated categories.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tkpbench.data.common import IGNORE, DatasetError, read_image, read_mask, save_mask
from tkpbench.data.tagcache import cache_dir
from tkpbench.device import usable_cpus
from tkpbench.progress import track

FIX_DOWNLOAD = "python -m tkpbench.data download coco --root DIR"


def _load_coco(ann_file: Path):
    if not ann_file.is_file():
        raise DatasetError(
            f"COCO annotation file {ann_file} does not exist; expected annotations/instances_<split>.json. Fix: {FIX_DOWNLOAD}"
        )
    from pycocotools.coco import COCO  # here: VOC runs need no pycocotools

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except Exception as e:
        raise DatasetError(f"{ann_file} is not a COCO instances file ({e})") from e


def semantic_mask(coco, image_id: int, cat_to_class: dict[int, int]) -> np.ndarray:
    """uint8 (H, W): largest instances painted first, crowd -> 255 where no instance is."""
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    out = np.zeros((h, w), dtype=np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
    crowd = np.zeros((h, w), dtype=bool)
    painted = np.zeros((h, w), dtype=bool)
    for a in sorted(anns, key=lambda a: -a["area"]):
        m = coco.annToMask(a).astype(bool)
        if a.get("iscrowd", 0):
            crowd |= m
        else:
            out[m] = cat_to_class[a["category_id"]]
            painted |= m
    out[crowd & ~painted] = IGNORE
    return out


def semantic_mask_vit_pcm(coco, image_id: int, cat_to_class: dict[int, int]) -> np.ndarray:
    """uint8 (H, W) as ViT-PCM's ``parse_coco.py``: annotation order, the first one wins, crowd keeps its class."""
    info = coco.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
        m = coco.annToMask(a).astype(bool) & (out == 0)
        out[m] = cat_to_class.get(a["category_id"], IGNORE)
    return out


PROTOCOLS = {"tkpbench": semantic_mask, "vit_pcm": semantic_mask_vit_pcm}
MIN_SIDE_VIT_PCM = 256  # parse_coco.py: images under 256 px on a side are skipped


def default_mask_dir(root: Path, split: str, ann_file: Path, protocol: str = "tkpbench") -> Path:
    """``root/semantic/<split>`` (``semantic_vit_pcm`` for that protocol) when it exists, else a
    folder of the cache keyed by the annotation file and the protocol."""
    in_root = root / ("semantic" if protocol == "tkpbench" else f"semantic_{protocol}") / split
    if in_root.is_dir():
        return in_root
    st = ann_file.stat()
    key = hashlib.sha256(f"{ann_file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    sub = "coco_semantic" if protocol == "tkpbench" else f"coco_semantic_{protocol}"
    return cache_dir() / sub / f"{split}_{key}"


class COCOSegmentation:
    """COCO semantic segmentation split (SPEC Sec. 4 interface)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        ann_file: str | Path | None = None,
        mask_dir: str | Path | None = None,
        skip_unannotated: bool | None = None,
        protocol: str = "tkpbench",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise DatasetError(f"COCO protocol {protocol!r} is unknown; expected one of {', '.join(PROTOCOLS)}")
        self.root = Path(root)
        self.split = split
        self.protocol = protocol
        if not self.root.is_dir():
            raise DatasetError(f"COCO root {self.root} does not exist; expected <split>/ and annotations/. Fix: {FIX_DOWNLOAD}")
        self.ann_file = Path(ann_file) if ann_file else self.root / "annotations" / f"instances_{split}.json"
        self.coco = _load_coco(self.ann_file)
        cat_ids = sorted(self.coco.cats)
        self.cat_to_class = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.classes = ("background",) + tuple(self.coco.cats[c]["name"] for c in cat_ids)
        self.num_classes = len(self.classes)
        self.image_dir = self.root / split
        self.mask_dir = Path(mask_dir) if mask_dir else default_mask_dir(self.root, split, self.ann_file, protocol)
        if skip_unannotated is None:
            skip_unannotated = "train" in split or protocol == "vit_pcm"
        self.skip_unannotated = skip_unannotated
        all_ids = sorted(self.coco.imgs)
        annotated = [i for i in all_ids if self.coco.getAnnIds(imgIds=i)]
        self.num_unannotated = len(all_ids) - len(annotated)
        self.image_ids = annotated if skip_unannotated else all_ids
        if protocol == "vit_pcm":
            imgs = self.coco.imgs
            self.image_ids = [i for i in self.image_ids if min(imgs[i]["height"], imgs[i]["width"]) >= MIN_SIDE_VIT_PCM]
        if not self.image_ids:
            raise DatasetError(f"split '{split}' of {self.ann_file} has no images")
        self.ids = [Path(self.coco.imgs[i]["file_name"]).stem for i in self.image_ids]
        missing = [i for i in self.image_ids if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} images of {self.ann_file} are missing from {self.image_dir} "
                f"(first: {self.coco.imgs[missing[0]]['file_name']}). Fix: {FIX_DOWNLOAD}"
            )
        self._tags = np.zeros((len(self.image_ids), self.num_classes), dtype=bool)
        self._tags[:, 0] = True
        index = {img: n for n, img in enumerate(self.image_ids)}
        for a in self.coco.dataset.get("annotations", []):
            n = index.get(a["image_id"])
            if n is not None:
                self._tags[n, self.cat_to_class[a["category_id"]]] = True

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (
            f"COCOSegmentation(split={self.split!r}, protocol={self.protocol!r}, n={len(self)}, unannotated_left_out="
            f"{self.num_unannotated if len(self) < len(self.coco.imgs) else 0}, root={str(self.root)!r})"
        )

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[i]]["file_name"]

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.ids[i]}.png"

    def image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def mask(self, i: int) -> np.ndarray:
        path = self.mask_path(i)
        if path.is_file():
            return read_mask(path, self.num_classes)
        m = PROTOCOLS[self.protocol](self.coco, self.image_ids[i], self.cat_to_class)
        try:
            save_mask(path, m)
        except OSError:
            pass  # read-only dataset: masks are recomputed on demand
        return m

    def tags(self, i: int) -> np.ndarray:
        return self._tags[i]

    def all_tags(self) -> np.ndarray:
        return self._tags


_WORKER_DS: COCOSegmentation | None = None


def _init_worker(root: str, split: str, ann_file: str, mask_dir: str, skip: bool, protocol: str) -> None:
    global _WORKER_DS
    _WORKER_DS = COCOSegmentation(root, split, ann_file, mask_dir, skip_unannotated=skip, protocol=protocol)


def _build_one(i: int) -> bool:
    assert _WORKER_DS is not None
    if _WORKER_DS.mask_path(i).is_file():
        return False
    _WORKER_DS.mask(i)
    return True


def build_masks(ds: COCOSegmentation, workers: int = 0, progress: bool = True) -> int:
    """Write every semantic mask of ``ds`` as a PNG (parallel, resumable). Returns how many were built."""

    workers = workers or usable_cpus()
    ds.mask_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(ds)) if not ds.mask_path(i).is_file()]
    initargs = (str(ds.root), ds.split, str(ds.ann_file), str(ds.mask_dir), ds.skip_unannotated, ds.protocol)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=initargs) as pool:
        built = pool.map(_build_one, todo, chunksize=16)
        return sum(track(built, total=len(todo), description=f"COCO {ds.split} masks", enabled=progress))
