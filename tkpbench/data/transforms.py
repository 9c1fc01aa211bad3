"""Paired image/mask augmentation with torchvision.transforms.v2 and the torch Datasets that use it.

Every random draw of a sample comes from a seed derived from (run seed, epoch, index), so the
augmentation of a sample does not depend on which DataLoader worker loads it: a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tkpbench.config import DataConfig
from tkpbench.data.coco import COCOSegmentation
from tkpbench.data.common import IGNORE, DatasetError, read_mask
from tkpbench.data.voc import VOCSegmentation
from tkpbench.equivariance import dihedral
from tkpbench.errors import ConfigError


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]


def _jitter_arg(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


class TKPViews:
    """The training views of one image (SPEC Sec. 1, ViT-PCM's ``dataloader.py``).

    Main view (the one MCE, PCE and REG see): with p = ``rrc_p`` a random resized crop (policy
    ``crop_tags``), resize to size x size, colour jitter and grayscale, then left-right flip,
    up-down flip and transposition (ViT-PCM's "rot90"; with both flips random it yields the same 8
    orientations as a 90-degree rotation) with p = ``hflip``, ``vflip``, ``rot90``.

    With ``et`` also the equivariance view (``tkpbench.equivariance``): from the resized image, its
    own colour jitter, with p = ``et_crop_p`` a crop of ``et_crop`` px starting on the patch grid,
    resize to size / 2, its own flips and transposition. Returns ``(image,)`` or ``(image, et_image,
    geometry, et_geometry)``, geometries as in ``tkpbench.equivariance``.

    ``crop_tags``: "keep" (a crop keeps the whole image's tags, even for an object it cut away) or
    "visible" (a crop is used only if every foreground class of the image's mask still shows in it,
    up to 10 draws, else no crop: the mask only rejects crops, it never makes a label).
    """

    def __init__(self, cfg: DataConfig, size: int, mean, std, et: bool = False, patch: int = 16) -> None:
        self.cfg, self.size, self.et, self.patch = cfg, size, et, patch
        b, c, s, h = (_jitter_arg(v) for v in cfg.color_jitter)
        self.jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
        self.normalize = v2.Compose(_normalize(mean, std))
        self.rrc = v2.RandomResizedCrop(size, scale=tuple(cfg.rrc_scale), antialias=True)

    @property
    def needs_mask(self) -> bool:
        return self.cfg.rrc_p > 0 and self.cfg.crop_tags == "visible"

    def _colour(self, img: Tensor) -> Tensor:
        img = self.jitter(img)
        if self.cfg.grayscale and float(torch.rand(())) < self.cfg.grayscale:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        return img

    def _flags(self) -> Tensor:
        p = torch.tensor([self.cfg.hflip, self.cfg.vflip, self.cfg.rot90])
        return (torch.rand(3) < p).to(torch.int64)

    def _main_crop(self, img: Tensor, mask: Tensor | None) -> Tensor:
        if not (self.cfg.rrc_p and float(torch.rand(())) < self.cfg.rrc_p):
            return img
        fg = _classes(mask) if mask is not None else set()
        for _ in range(10 if mask is not None else 1):
            p = self.rrc.make_params([img])
            t, l_, h, w = p["top"], p["left"], p["height"], p["width"]
            if mask is None or fg <= _classes(mask[..., t : t + h, l_ : l_ + w]):
                return TF.crop(img, t, l_, h, w)
        return img

    def __call__(self, img: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        s = self.size
        crop = self._main_crop(img, mask)
        # the whole image resized: the main view when not cropped, and the ET view's source
        resized = TF.resize(img, [s, s], antialias=True) if crop is img or self.et else None
        main = resized if crop is img else TF.resize(crop, [s, s], antialias=True)
        flags = self._flags()
        main = dihedral(self._colour(main)[None], flags[None])[0]
        out = self.normalize(tv_tensors.Image(main))
        if not self.et:
            return (out,)
        view = self._colour(resized)
        box = torch.tensor([0, 0, s, s])
        if self.cfg.et_crop_p and float(torch.rand(())) < self.cfg.et_crop_p:
            c = self.cfg.et_crop
            starts = torch.arange(0, s + 1, self.patch)
            y, x = (torch.minimum(starts[torch.randint(len(starts), (2,))], torch.tensor(s - c))).tolist()
            box = torch.tensor([y, x, y + c, x + c])
            view = view[:, y : y + c, x : x + c]
        view = TF.resize(view, [s // 2, s // 2], antialias=True)
        et_flags = self._flags()
        view = dihedral(view[None], et_flags[None])[0]
        main_geom = torch.cat([flags, torch.tensor([0, 0, s, s])])
        return out, self.normalize(tv_tensors.Image(view)), main_geom, torch.cat([et_flags, box])


def _classes(mask: Tensor) -> set[int]:
    """Foreground classes present in a mask (background 0 and ignore 255 left out)."""
    return {int(c) for c in torch.unique(mask).tolist() if c not in (0, IGNORE)}


def tkp_train_transform(cfg: DataConfig, size: int, mean, std, et: bool = False, patch: int = 16) -> TKPViews:
    """The TKP-PCL training views (``TKPViews``)."""
    return TKPViews(cfg, size, mean, std, et=et, patch=patch)


def eval_transform(size: int | None, mean, std) -> v2.Compose:
    """Resize image (bilinear) and mask (nearest) to size x size; size None keeps the image's own."""
    steps: list[Any] = [v2.Resize((size, size), antialias=True)] if size else []
    return v2.Compose([*steps, *_normalize(mean, std)])


class RandomScale(v2.Transform):
    """Rescale image and mask by a factor drawn uniformly from ``scale_range`` (DeepLab recipe)."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        self.lo, self.hi = float(scale_range[0]), float(scale_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        f = float(torch.empty(()).uniform_(self.lo, self.hi))
        return {"size": [max(1, round(h * f)), max(1, round(w * f))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)


def seg_train_transform(crop: int, scale_range: Sequence[float], mean, std) -> v2.Compose:
    """DeepLab-v2 recipe: random scale, pad (image with the mean pixel, so about 0 after
    normalisation, as Caffe's DeepLab; mask with 255), random crop, flip."""
    mean_pixel = [round(m * 255) for m in mean]
    fill = {tv_tensors.Image: mean_pixel, tv_tensors.Mask: IGNORE, "others": 0}
    return v2.Compose(
        [
            RandomScale(scale_range),
            v2.RandomCrop(crop, pad_if_needed=True, fill=fill),
            v2.RandomHorizontalFlip(0.5),
            *_normalize(mean, std),
        ]
    )


def _apply_seeded(transform: v2.Compose, key: Any, *inputs: Any) -> Any:
    if isinstance(key, tuple):
        index, seed = key
        # the CPU generator only: torch.manual_seed would also reseed every GPU's generator (in the
        # training process with data.workers = 0, outside the fork) and, before CUDA is initialised,
        # queue one lazy call with a formatted traceback per sample (8% of a demo step on the CPU)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return index, transform(*inputs)
    return key, transform(*inputs)


class TKPTrainSet(Dataset):
    """(image (3, S, S) float, tags (C,) bool), plus with the equivariance view (ET image, geometry,
    ET geometry), for TKP-PCL training. Only the class set of an image reaches the loss, never a
    pixel of its mask (``crop_tags = "visible"`` reads the mask only to reject crops)."""

    def __init__(self, base, transform: TKPViews, cache_size: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.tags = torch.from_numpy(np.asarray(base.all_tags()))
        self.cache: torch.Tensor | None = None
        if cache_size and not transform.needs_mask:
            self.cache = preload_images(base, cache_size)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"TKPTrainSet({self.base!r})"

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        if self.cache is not None:
            img = self.cache[index]
        else:
            img = torch.from_numpy(self.base.image(index)).permute(2, 0, 1)
        mask = torch.from_numpy(self.base.mask(index)) if self.transform.needs_mask else None
        _, views = _apply_seeded(self.transform, key, img, mask)
        return views[0], self.tags[index], *views[1:]


class EvalSet(Dataset):
    """(image, mask (H, W) long, tags, index) at a fixed size, or at the image's own size."""

    def __init__(self, base, transform: v2.Compose) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img = tv_tensors.Image(torch.from_numpy(self.base.image(index)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(self.base.mask(index)))
        img, mask = self.transform(img, mask)
        return img, mask.long(), torch.from_numpy(np.asarray(self.base.tags(index))), index


class PseudoMaskSet(Dataset):
    """(image, pseudo mask) pairs for DeepLab training: masks read from ``mask_dir/<id>.png``."""

    def __init__(self, base, mask_dir: Path, transform: v2.Compose) -> None:
        self.base = base
        self.mask_dir = Path(mask_dir)
        self.transform = transform
        missing = [i for i in base.ids if not (self.mask_dir / f"{i}.png").is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} pseudo masks of {len(base.ids)} are missing from {self.mask_dir} (first: {missing[0]}.png); "
                "run the pseudo-mask and CRF stages first (python -m tkpbench.pseudo / python -m tkpbench.crf)"
            )

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"PseudoMaskSet({self.base!r}, masks={str(self.mask_dir)!r})"

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        img = tv_tensors.Image(torch.from_numpy(self.base.image(index)).permute(2, 0, 1))
        m = read_mask(self.mask_dir / f"{self.base.ids[index]}.png", self.base.num_classes)
        mask = tv_tensors.Mask(torch.from_numpy(m))
        _, (img, mask) = _apply_seeded(self.transform, key, img, mask)
        return img, mask.long()


def preload_images(base, size: int, workers: int = 8) -> torch.Tensor:
    """uint8 (N, 3, size, size) in shared memory: VOC train_aug at 384 is about 4.7 GB."""
    out = torch.empty((len(base), 3, size, size), dtype=torch.uint8).share_memory_()

    def load(i: int) -> None:
        img = torch.from_numpy(base.image(i)).permute(2, 0, 1)
        out[i] = TF.resize(img, [size, size], antialias=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(load, range(len(base))))
    return out


def build_dataset(cfg: DataConfig, split: str):
    """The dataset object for ``cfg.dataset`` and ``split`` (SPEC Sec. 4 classes)."""

    if cfg.dataset == "voc":
        return VOCSegmentation(cfg.root, split, tags=cfg.tags)
    if cfg.dataset == "coco":
        return COCOSegmentation(cfg.root, split, protocol=cfg.coco_protocol)
    raise ConfigError(f"data.dataset must be 'voc' or 'coco', got {cfg.dataset!r}")
