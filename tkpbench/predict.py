"""Masks for your own images from a trained run (the first thing people try).

    tkpbench predict --run runs/topk_pce photo.jpg other.png --out masks/
    tkpbench predict --run runs/topk_pce photo.jpg --out masks/ --tags cat,dog --crf
    tkpbench predict --run runs/topk_pce photo.jpg --out masks/ --seg        # the run's trained DeepLab

For each image: ``<stem>.png`` (a palette mask at the image's own size, class indices) and
``<stem>_overlay.jpg`` (the image blended with the mask, and a legend of the classes present).
TKP-PCL path: the image is resized to ``pseudo.infer_size``, its patch scores are merged with the
tags and upsampled as the pseudo-mask stage does. Without ``--tags`` the tags are predicted: a
class is present when its pooled image score y_c exceeds ``--threshold`` (default 0.5, the
threshold of the per-epoch F1). ``--crf`` refines with the run's CRF settings. ``--seg`` uses the
DeepLab-v2 trained on the run's pseudo masks instead (no tags needed). ``--device`` (default: the
GPU when there is one, else the CPU) runs the model there, and the CRF too when the run's
``crf.backend`` is torch (without ``--device`` the CRF keeps the run's ``crf.device``). Works on any
size and format Pillow reads; a file that is not an image is refused by name.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from tkpbench import cli
from tkpbench.config import Config, config_from_dict
from tkpbench.crf import crf_device, crf_labels
from tkpbench.data.common import VOC_CLASSES, save_mask, voc_palette
from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD, DeepLabV2, predict_probs
from tkpbench.errors import DatasetError, UserError
from tkpbench.io import atomic_write_bytes
from tkpbench.model import TKPPCL, patch_masks
from tkpbench.runs import RunDir, load_final

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def class_names(cfg: Config) -> list[str]:
    """The run's class names: VOC's, or 'class N' when the run was trained on another class set."""
    if cfg.model.num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class {i}" for i in range(1, cfg.model.num_classes)]


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of any format Pillow reads; anything else is refused by name."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{path} is not an image Pillow can read ({e})") from None


def parse_tags(text: str, names: list[str]) -> torch.Tensor:
    """bool (C,) from 'cat,dog' (background always on); an unknown name is refused with the list."""
    tags = torch.zeros(len(names), dtype=torch.bool)
    tags[0] = True
    for t in (x.strip() for x in text.split(",") if x.strip()):
        if t not in names:
            raise UserError(f"--tags: unknown class {t!r}; the run's classes are: {', '.join(names[1:])}")
        tags[names.index(t)] = True
    return tags


@torch.no_grad()
def tkp_probs(model: TKPPCL, cfg: Config, image: np.ndarray, tags: torch.Tensor | None, threshold: float):
    """Merged class probabilities (C, H, W) at the image's size, and the tags used (C,) bool."""
    x = torch.from_numpy(image).permute(2, 0, 1).to(next(model.parameters()).device)
    size = cfg.pseudo.infer_size
    x = TF.normalize(TF.resize(x, [size, size], antialias=True).float().div_(255), model.encoder.mean, model.encoder.std)
    out = model(x[None])
    if tags is None:
        tags = out.y[0] > threshold
        tags[0] = True
    tags = tags.to(out.z.device)
    _, probs = patch_masks(
        out.z, out.grid, tags[None], image.shape[:2], return_probs=True, align_corners=cfg.pseudo.align_corners
    )
    return probs[0], tags


@torch.no_grad()
def seg_probs(model: DeepLabV2, image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).to(next(model.parameters()).device).float().div_(255)
    x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return predict_probs(model, x[None], [1.0], False, amp=False)


def overlay(image: np.ndarray, mask: np.ndarray, names: list[str], alpha: float = 0.5) -> Image.Image:
    """The image blended with the palette colours of ``mask``, and a legend strip of the classes present."""
    blend = (image * (1 - alpha) + _PALETTE[mask] * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(mask) if c < len(names)]
    row = 18
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + row * len(present) + 4), "white")
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, c in enumerate(present):
        y = image.shape[0] + 2 + n * row
        draw.rectangle([4, y + 2, 18, y + 14], fill=tuple(int(v) for v in _PALETTE[c]), outline="black")
        draw.text((24, y + 2), names[c], fill="black")
    return canvas


def _save_jpeg(path: Path, im: Image.Image) -> None:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    atomic_write_bytes(path, buf.getvalue())


def predict_images(
    run_dir: Path,
    images: list[Path],
    out: Path,
    tags_text: str | None = None,
    crf: bool = False,
    seg: bool = False,
    threshold: float = 0.5,
    device: str | None = None,
) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>_overlay.jpg`` for every image; returns the mask paths.
    ``device``: where the model and the torch CRF run (``crf.crf_device``; None: the model on the GPU
    when there is one, the CRF on the run's ``crf.device``)."""
    dev = crf_device(device or "")
    run = RunDir(run_dir)
    model, cfg = TKPPCL.from_checkpoint(load_final(run))
    crf_cfg = cfg.crf if device is None else dataclasses.replace(cfg.crf, device=str(dev))
    model.to(dev)
    names = class_names(cfg)
    tags = parse_tags(tags_text, names) if tags_text else None
    deeplab = None
    if seg:
        ck = load_final(run.seg)
        scfg = config_from_dict(ck["config"], f"{run.seg.final}")
        deeplab = DeepLabV2.from_state_dict(cfg.model.num_classes, scfg.seg.backbone, scfg.seg.output_stride, ck["model"])
        deeplab.to(dev).eval()
    written = []
    for path in images:
        image = read_image(path)
        if deeplab is not None:
            probs = seg_probs(deeplab, image)
        else:
            probs, _ = tkp_probs(model, cfg, image, tags, threshold)
        p = probs.float().cpu().numpy()
        mask = crf_labels(image, p / p.sum(0, keepdims=True), crf_cfg) if crf else p.argmax(0).astype(np.uint8)
        stem = out / Path(path).stem
        save_mask(stem.with_suffix(".png"), mask)
        _save_jpeg(stem.with_name(stem.name + "_overlay.jpg"), overlay(image, mask, names))
        written.append(stem.with_suffix(".png"))
    return written


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench predict", __doc__, cli.run_dir_option("a trained run folder (holds final.pt)"))
    p.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    p.add_argument("--out", type=Path, required=True, help="folder for <stem>.png and <stem>_overlay.jpg")
    p.add_argument("--tags", default=None, help="the classes in the images, e.g. cat,dog (default: predicted)")
    p.add_argument("--threshold", type=float, default=0.5, help="pooled score above which a class is predicted")
    p.add_argument("--crf", action="store_true", help="refine with the run's dense-CRF settings")
    p.add_argument("--seg", action="store_true", help="use the run's trained DeepLab-v2 (runs/<run>/seg)")
    args = p.parse_args(argv)
    for path in predict_images(args.run, args.images, args.out, args.tags, args.crf, args.seg, args.threshold, args.device):
        print(f"wrote {path} and {path.with_name(path.stem + '_overlay.jpg')}")
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
