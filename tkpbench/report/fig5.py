"""Fig. 5: the pseudo masks (after CRF) of a max-pooling run and a TKP-PCL run beside the image and
its ground truth and, below, DeepLab's segmentation of val images trained on each run's masks; and
the same grid for the images whose pseudo masks gain and lose most between two runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tkpbench.config import config_from_dict
from tkpbench.data.common import read_mask, voc_palette
from tkpbench.data.transforms import build_dataset
from tkpbench.records import load_summary
from tkpbench.runs import ResultsDir, RunDir
from tkpbench.stats import ImageChanges


def fig5_grid(
    images,
    gts,
    preds_a,
    preds_b,
    out: Path,
    titles=("image", "ground truth", "ViT-PCM max", "TKP-PCL"),
    ids: list[str] | None = None,
    class_names: list[str] | None = None,
    extra_blocks: tuple = (),
) -> Path:
    """Fig. 5 style grid: a header row of column titles, then one row per image (its id in the
    image cell), columns image | GT | baseline | TKP-PCL (palette colours), then a legend of the
    classes that appear. ``extra_blocks``: further (images, gts, preds_a, preds_b, titles, ids)
    blocks stacked below with their own header (DeepLab's segmentation beside the pseudo masks)."""
    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    ch, cw = 160, 240  # every cell the same size, each picture fitted inside it (columns stay aligned)

    def cell(arr: np.ndarray, resample, label: str = "") -> np.ndarray:
        h, w = arr.shape[:2]
        f = min(ch / h, cw / w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        small = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
        canvas = np.full((ch, cw, 3), 255, np.uint8)
        y0, x0 = (ch - nh) // 2, (cw - nw) // 2
        canvas[y0 : y0 + nh, x0 : x0 + nw] = small
        if label:
            im = Image.fromarray(canvas)
            d = ImageDraw.Draw(im)
            d.rectangle([0, 0, 7 * len(label) + 6, 14], fill="white")
            d.text((3, 1), label, fill="black")
            canvas = np.asarray(im)
        return canvas

    blocks = [(images, gts, preds_a, preds_b, titles, ids), *extra_blocks]
    parts = []
    for b_images, b_gts, b_a, b_b, b_titles, b_ids in blocks:
        header = Image.new("RGB", (4 * cw, 22), "white")
        d = ImageDraw.Draw(header)
        for n, t in enumerate(b_titles):
            d.text((n * cw + 6, 5), t, fill="black")
        parts.append(np.asarray(header))
        parts += [
            np.concatenate([cell(img, Image.BILINEAR, i)] + [cell(pal[m], Image.NEAREST) for m in (gt, a, b)], axis=1)
            for img, gt, a, b, i in zip(b_images, b_gts, b_a, b_b, b_ids or [""] * len(b_images))
        ]
    masks = [m for blk in blocks for group in blk[1:4] for m in group]
    present = sorted({int(c) for m in masks for c in np.unique(m) if c != 255})
    if class_names:
        per_row = 6
        legend = Image.new("RGB", (4 * cw, 20 * ((len(present) + per_row - 1) // per_row) + 4), "white")
        d = ImageDraw.Draw(legend)
        for n, c in enumerate(present):
            x, y = (n % per_row) * (4 * cw // per_row) + 6, (n // per_row) * 20 + 4
            d.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in pal[c]), outline="black")
            d.text((x + 18, y), class_names[c] if c < len(class_names) else str(c), fill="black")
        parts.append(np.asarray(legend))
    grid = np.concatenate(parts, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(out)
    return out


def _deeplab_block(cfg, runs_dir: Path, baseline: str, ours: str, n: int) -> tuple:
    """The paper's Fig. 5 proper: DeepLab's segmentation of val images (``seg/examples/``, written by
    the DeepLab evaluation) of both runs, or nothing when either run has none."""
    a_dir, b_dir = RunDir(runs_dir / baseline).seg.examples, RunDir(runs_dir / ours).seg.examples
    if not (a_dir.is_dir() and b_dir.is_dir()):
        return ()
    ds = build_dataset(cfg.data, cfg.data.val_split)
    idx = [i for i in range(len(ds)) if (a_dir / f"{ds.ids[i]}.png").is_file() and (b_dir / f"{ds.ids[i]}.png").is_file()][:n]
    if not idx:
        return ()
    block = (
        [ds.image(i) for i in idx],
        [ds.mask(i) for i in idx],
        [read_mask(a_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        [read_mask(b_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        (f"{cfg.data.val_split} image (id)", "ground truth", f"DeepLab on {baseline}'s masks", f"DeepLab on {ours}'s masks"),
        [ds.ids[i] for i in idx],
    )
    return (block,)


def fig5_from_runs(results: Path, runs_dir: Path, baseline: str, ours: str, n: int = 4) -> Path | None:
    """Fig. 5 from two runs: their pseudo masks (after CRF) on the mask split and, below, DeepLab's
    segmentation of val images trained on each run's masks (as the paper's Fig. 5). The images
    come from the data of ``ours``'s config, a relative ``data.root`` read from the current folder;
    a DatasetError when they are not there."""

    a_dir, b_dir = runs_dir / baseline / "pseudo" / "crf", runs_dir / ours / "pseudo" / "crf"
    summ = ResultsDir(results).summary(ours)
    if not (a_dir.is_dir() and b_dir.is_dir() and summ.is_file()):
        return None
    cfg = config_from_dict(load_summary(summ)["config"])
    ds = build_dataset(cfg.data, cfg.data.mask_split)
    idx = [i for i in range(len(ds)) if (a_dir / f"{ds.ids[i]}.png").is_file() and (b_dir / f"{ds.ids[i]}.png").is_file()][:n]
    if not idx:
        return None
    return fig5_grid(
        [ds.image(i) for i in idx],
        [ds.mask(i) for i in idx],
        [read_mask(a_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        [read_mask(b_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        results / f"fig5_{ours}_vs_{baseline}.png",
        titles=("image (id)", "ground truth", f"{baseline} (max, CRF)", f"{ours} (top-K + PCE, CRF)"),
        ids=[ds.ids[i] for i in idx],
        class_names=list(ds.classes),
        extra_blocks=_deeplab_block(cfg, runs_dir, baseline, ours, n),
    )


def fig_image_changes(results: Path, runs_dir: Path, a: str, b: str, changes: ImageChanges, k: int = 3) -> Path | None:
    """The ``k`` images whose pseudo masks (after CRF) gain most from run ``b`` to run ``a`` and the
    ``k`` that lose most (``changes``: per-image mIoU of these two runs, ``stats.image_changes``):
    image (id and Δ), ground truth, ``a``'s mask, ``b``'s mask. The images come from the data of
    ``a``'s config (a relative ``data.root`` read from the current folder); a DatasetError when
    they are not there; None when a run's masks are not here or nothing changes."""
    a_dir, b_dir = runs_dir / a / "pseudo" / "crf", runs_dir / b / "pseudo" / "crf"
    summ = ResultsDir(results).summary(a)
    gains, losses = changes.top(k)
    if not (a_dir.is_dir() and b_dir.is_dir() and summ.is_file()) or not (gains or losses):
        return None
    cfg = config_from_dict(load_summary(summ)["config"])
    ds = build_dataset(cfg.data, cfg.data.mask_split)
    where = {i: n for n, i in enumerate(ds.ids)}
    blocks = []
    for picked, what in ((gains, "gain"), (losses, "loss")):
        idx = [where[str(changes.ids[p])] for p in picked if str(changes.ids[p]) in where]
        if not idx:
            continue
        blocks.append(
            (
                [ds.image(i) for i in idx],
                [ds.mask(i) for i in idx],
                [read_mask(a_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
                [read_mask(b_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
                (f"largest {what}s: id, mIoU change", "ground truth", f"{a} (CRF)", f"{b} (CRF)"),
                [f"{changes.ids[p]} {changes.delta[p]:+.1f}" for p in picked if str(changes.ids[p]) in where],
            )
        )
    if not blocks:
        return None
    first, *rest = blocks
    return fig5_grid(
        *first[:4],
        results / f"fig_changes_{a}_vs_{b}.png",
        titles=first[4],
        ids=first[5],
        class_names=list(ds.classes),
        extra_blocks=tuple(rest),
    )
