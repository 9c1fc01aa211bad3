"""Score a folder of predicted masks against a split's ground truth.

python -m tkpbench.evaluate --run runs/topk_pce        # Table 1: pseudo masks before/after the CRF
python -m tkpbench.evaluate --pred runs/topk_pce/pseudo/crf --split train --root data/VOCdevkit/VOC2012
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from tkpbench import cli
from tkpbench.config import DataConfig
from tkpbench.data.common import DatasetError, read_mask
from tkpbench.data.transforms import build_dataset
from tkpbench.metrics import ConfusionMatrix
from tkpbench.records import StageRecord, per_class_dict, stamp, write_stage
from tkpbench.runs import (
    SELECTION_HELP,
    SELECTIONS,
    ResultsDir,
    RunDir,
    chain_settings,
    mask_stage,
    model_digest,
    run_config,
    weights_groups,
    weights_info,
)
from tkpbench.stats import save_counts


@dataclass
class Scores:
    """A confusion matrix and the per-image, per-class intersection, predicted and ground-truth
    pixel counts behind it (int64 (N, C) each)."""

    cm: ConfusionMatrix
    inter: np.ndarray
    pred: np.ndarray
    gt: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.pred + self.gt - self.inter

    def arrays(self, suffix: str = "") -> dict[str, np.ndarray]:
        """What ``stats.save_counts`` stores for this measurement: inter, pred, gt, union (for
        readers of files that held only inter and union) and the dataset's confusion matrix."""
        a = {"inter": self.inter, "pred": self.pred, "gt": self.gt, "union": self.union, "confusion": self.cm.matrix()}
        return {k + suffix: v for k, v in a.items()}


def evaluate_folder(pred_dir: Path, ds, workers: int = 4) -> Scores:
    """Confusion matrix of ``pred_dir/<id>.png`` against ``ds.mask(i)`` for every image of ``ds``,
    with every image's intersection, predicted and ground-truth counts (for ``tkpbench.stats``).

    A missing prediction, a size mismatch or a class index >= num_classes is a DatasetError naming the file.
    """
    pred_dir = Path(pred_dir)
    missing = [i for i in ds.ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(ds)} predictions are missing from {pred_dir} (first: {missing[0]}.png)")
    cm = ConfusionMatrix(ds.num_classes)

    def load(i: int):
        path = pred_dir / f"{ds.ids[i]}.png"
        pred = read_mask(path, ds.num_classes)
        if (pred == 255).any():
            raise DatasetError(f"prediction {path} holds 255; predictions must be class indices < {ds.num_classes}")
        gt = ds.mask(i)
        if pred.shape != gt.shape:
            with Image.open(ds.image_path(i)) as im:  # the header only: which of the two is wrong?
                w, h = im.size
            if gt.shape != (h, w):
                raise DatasetError(
                    f"ground-truth mask {ds.mask_path(i)} is {gt.shape[1]}x{gt.shape[0]} but its image "
                    f"{ds.image_path(i)} is {w}x{h}; the dataset's mask is damaged or from another "
                    "image (python -m tkpbench.data check finds all such files)"
                )
            raise DatasetError(
                f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} but its image is "
                f"{w}x{h}; predictions must have the image's own size"
            )
        return pred, gt

    inter, pred_px, gt_px = (np.zeros((len(ds), ds.num_classes), dtype=np.int64) for _ in range(3))
    with ThreadPoolExecutor(workers) as pool:
        for n, (pred, gt) in enumerate(pool.map(load, range(len(ds)))):
            inter[n], pred_px[n], gt_px[n] = ConfusionMatrix.class_counts(cm.update(pred, gt))
    return Scores(cm, inter, pred_px, gt_px)


def print_table(classes, columns: dict[str, np.ndarray], title: str) -> None:
    t = Table(title=title)
    t.add_column("class")
    for name in columns:
        t.add_column(name, justify="right")
    for n, c in enumerate(classes):
        t.add_row(c, *[("-" if np.isnan(v[n]) else f"{100 * v[n]:.1f}") for v in columns.values()])
    t.add_row("[bold]mean (mIoU)", *[f"[bold]{100 * np.nanmean(v):.2f}" for v in columns.values()])
    Console().print(t)


def selection_protocol(run: RunDir) -> dict:
    """How the scored weights were chosen: ``selection`` (final.pt names train.keep's choice, e.g.
    "best_miou": chosen with val pixel labels), every selection holding the same weights
    (``selections``), and their epoch and step."""
    info = weights_info(run.weights())
    same = next((g for g in weights_groups(run).values() if run.selection in g), [run.selection])
    selections = list(dict.fromkeys([info["selection"], *(s for s in same if s != "final")]))
    return {
        "selection": info["selection"],
        "selections": selections,
        "epoch": info["epoch"],
        "weights_step": info["weights_step"],
    }


def score_pseudo_masks(run_dir: Path, cfg, results: Path = Path("results"), selection: str = "final") -> dict:
    """Table 1 / Table 4 mask column: mIoU of ``<run>/pseudo/masks`` (before CRF) and
    ``<run>/pseudo/crf`` (after CRF) on ``data.mask_split``; writes the "mask" record. For another
    checkpoint selection, of ``<run>/pseudo/<selection>/``: the "mask@<selection>" record."""
    t0 = time.perf_counter()
    ds = build_dataset(cfg.data, cfg.data.mask_split)
    run = RunDir(run_dir, selection)
    stage = mask_stage(selection)
    before, after = evaluate_folder(run.masks, ds), evaluate_folder(run.crf, ds)
    cm, cm_crf = before.cm, after.cm
    counts = ResultsDir(results).counts(run.name, stage)
    save_counts(counts, ds.ids, **before.arrays(), **after.arrays("_crf"))
    rec = StageRecord(
        stage=stage,
        dataset=cfg.data.dataset,
        split=cfg.data.mask_split,
        miou=round(100 * cm.miou(), 3),
        per_class=per_class_dict(ds.classes, cm.iou()),
        num_images=len(ds),
        miou_crf=round(100 * cm_crf.miou(), 3),
        per_class_crf=per_class_dict(ds.classes, cm_crf.iou()),
        pixel_accuracy=round(100 * cm.pixel_accuracy(), 3),
        miou_all_background=round(100 * cm.all_background_miou(), 3),
        protocol={
            "infer_size": cfg.pseudo.infer_size,
            "merge": "ViT-PCM tag merge",
            "scales": [1.0],
            "flip": False,
            "crf": asdict(cfg.crf),
            "tags": cfg.data.tags,
            "encoder": cfg.model.encoder,
            "encoder_weights": cfg.model.weights or "random",
            "pooling": cfg.model.pooling,
            "k": cfg.model.k,
            "pce": cfg.model.pce,
            "eps": cfg.model.eps,
            "alpha": cfg.model.alpha,
            **selection_protocol(run),
        },
        synthetic=cfg.synthetic,
        model_sha256=model_digest(run.weights()),
        settings=chain_settings("mask", cfg),
        counts_file=counts.name,
    )
    write_stage(results, Path(run_dir).name, stamp(rec, time.perf_counter() - t0), cfg.to_dict())
    return {"miou": cm.miou(), "miou_crf": cm_crf.miou(), "miou_all_background": cm.all_background_miou()}


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench evaluate", __doc__, cli.config_options())
    p.add_argument(
        "--run-dir",
        dest="run",
        metavar="RUN",
        type=Path,
        default=None,
        help="score this run's pseudo masks (before and after the CRF) "
        "on data.mask_split and record them in RESULTS/<run>/summary.json",
    )
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--pred", type=Path, default=None, help="or: a folder of <id>.png predictions to score")
    p.add_argument("--split", default=None)
    p.add_argument("--dataset", default="voc", choices=["voc", "coco"])
    p.add_argument("--selection", choices=SELECTIONS, default="final", help="with --run-dir: " + SELECTION_HELP)
    p.add_argument("--root", default=None)
    args = p.parse_args(argv)
    if args.run is not None:
        r = score_pseudo_masks(args.run, run_config(args.run, args.config, args.overrides), args.results, args.selection)
        scores = f"mIoU {100 * r['miou']:.2f} (before CRF), {100 * r['miou_crf']:.2f} (after CRF)"
        print(f"pseudo masks of {args.run} ({args.selection}): {scores}")
        return 0
    if args.pred is None or args.split is None or args.root is None:
        p.error("give --run-dir RUN, or --pred DIR --split SPLIT --root DATA_ROOT")
    ds = build_dataset(DataConfig(dataset=args.dataset, root=args.root), args.split)
    cm = evaluate_folder(args.pred, ds).cm
    print_table(
        ds.classes,
        {"IoU %": cm.iou(), "precision %": cm.precision(), "recall %": cm.recall()},
        f"{args.pred} on {args.split} ({len(ds)} images)",
    )
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
