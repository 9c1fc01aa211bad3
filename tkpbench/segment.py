"""DeepLab-v2 trained on pseudo masks, then evaluated (Tables 2 and 3).

    python -m tkpbench.segment train --run runs/topk_pce
    torchrun --nproc_per_node=8 -m tkpbench.segment train --run runs/topk_pce
    python -m tkpbench.segment eval --run runs/topk_pce --split val [--set seg.eval_scales=[0.75,1.0,1.25]]

Training uses the same loop, checkpoints and log as ``tkpbench.train`` (``tkpbench.engine``),
under ``<run>/seg/``. It reads only the (CRF-refined) pseudo masks of ``data.seg_train_split``,
never ground truth. Recipe (deeplab-pytorch's VOC): SGD momentum 0.9, lr 2.5e-4 (x10 for the
ASPP), poly 0.9, weight decay 5e-4, batch 10, crop 321 with random scale 0.5-1.5 and flip.
"""

from __future__ import annotations

import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from tkpbench import cli
from tkpbench import distributed as D
from tkpbench.config import Config, config_from_dict, dumps
from tkpbench.crf import crf_device, dense_crf
from tkpbench.data.common import save_mask
from tkpbench.data.transforms import EvalSet, PseudoMaskSet, build_dataset, eval_transform, seg_train_transform
from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD, DeepLabV2, predict_probs, resize_labels
from tkpbench.device import announce
from tkpbench.device import resolve as resolve_device
from tkpbench.engine import Task, fit, fused_optimizer, unwrap
from tkpbench.metrics import ConfusionMatrix
from tkpbench.progress import track
from tkpbench.records import StageRecord, per_class_dict, stamp, write_stage
from tkpbench.runs import RunDir, chain_settings, claim_outputs, load_final, mark_done, model_digest, run_config
from tkpbench.stats import save_counts


def pseudo_mask_dir(run_dir: Path, cfg: Config) -> Path:
    return RunDir(run_dir).mask_dir(cfg.seg.use_crf_masks)


class SegTask(Task):
    name = "deeplab-v2"

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        s = cfg.seg
        self.global_batch, self.seed, self.ckpt_every, self.log_every = s.batch_size, cfg.train.seed, s.ckpt_every, s.log_every
        self.amp, self.workers = cfg.train.amp, s.workers

    @cached_property
    def base(self):
        """The training split, built once (build_model and train_set both need it)."""
        return build_dataset(self.cfg.data, self.cfg.data.seg_train_split)

    def build_model(self) -> nn.Module:
        m = DeepLabV2(
            self.base.num_classes, self.cfg.seg.backbone, self.cfg.seg.weights or None, output_stride=self.cfg.seg.output_stride
        )
        if torch.cuda.is_available():
            m = m.to(memory_format=torch.channels_last)
        if self.cfg.seg.freeze_bn:
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    for p in mod.parameters():
                        p.requires_grad_(False)
        return m

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.cfg.seg.freeze_bn:
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.eval()

    def train_set(self):
        s = self.cfg.seg
        return PseudoMaskSet(
            self.base,
            pseudo_mask_dir(self.run_dir, self.cfg),
            seg_train_transform(s.crop, s.scale_range, IMAGENET_MEAN, IMAGENET_STD),
        )

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        s = self.cfg.seg
        groups = unwrap(model).param_groups(s.head_lr_mult, s.head_bias_lr_mult, s.weight_decay, s.bias_decay)
        self.lr_mults = [g["lr_mult"] for g in groups]
        for g in groups:
            g["lr"] = s.lr * g["lr_mult"]
        return torch.optim.SGD(
            groups, lr=s.lr, momentum=s.momentum, fused=fused_optimizer([p for g in groups for p in g["params"]])
        )

    def total_steps(self, batches_per_epoch: int) -> int:
        return self.cfg.seg.iters

    def lr_factors(self, step: int, epoch: int) -> list[float]:
        s = self.cfg.seg
        f = (1 - step / s.iters) ** s.poly_power
        return [s.lr * m * f for m in self.lr_mults]

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        img, mask = batch
        img = img.to(device, non_blocking=True)
        if device.type == "cuda":
            img = img.contiguous(memory_format=torch.channels_last)
        mask = mask.to(device, non_blocking=True)
        ce = None
        out = model(img, msc_scales=self.cfg.seg.msc_scales) if self.cfg.seg.msc_scales else [model(img)]
        for logits in out:
            # each output against the labels at its size, nearest (deeplab-pytorch's resize_labels); summed
            term = F.cross_entropy(logits.float(), resize_labels(mask, logits.shape[-2:]), ignore_index=255)
            ce = term if ce is None else ce + term
        return {"loss": ce}

    def resume_view(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return chain_settings("seg", cfg)


EXAMPLES = 8  # eval images whose DeepLab prediction is kept (seg/examples/) for the report's Fig. 5


@torch.no_grad()
def evaluate(
    run_dir: Path, split: str, dist: D.DistInfo, cfg: Config | None = None, progress: bool = True, results: Path = Path("results")
) -> dict[str, float]:
    """Full-resolution evaluation of ``<run>/seg/final.pt`` on ``split``; writes the "seg" record."""
    t0 = time.perf_counter()
    run = RunDir(run_dir)
    ck = load_final(run.seg)
    cfg = cfg or config_from_dict(ck["config"])
    base = build_dataset(cfg.data, split)
    model = DeepLabV2(base.num_classes, cfg.seg.backbone, output_stride=cfg.seg.output_stride)
    model.load_state_dict(ck["model"])
    model = model.to(dist.device).eval()
    ds = Subset(
        EvalSet(base, eval_transform(None, IMAGENET_MEAN, IMAGENET_STD)), D.shard_indices(len(base), dist.rank, dist.world)
    )
    loader = DataLoader(ds, batch_size=1, num_workers=min(cfg.seg.workers, 4))
    cm, cm_crf = ConfusionMatrix(base.num_classes), ConfusionMatrix(base.num_classes)
    mine: dict[int, tuple] = {}  # image index -> its (inter, union) counts, and with the CRF
    for img, mask, _, idx in track(
        loader, total=len(loader), description=f"DeepLab eval {split}", enabled=progress and dist.is_main
    ):
        probs = predict_probs(model, img.to(dist.device), list(cfg.seg.eval_scales), cfg.seg.eval_flip, cfg.train.amp)
        if int(idx) < EXAMPLES:  # the report's Fig. 5 shows these beside the pseudo masks
            save_mask(run.seg.examples / f"{base.ids[int(idx)]}.png", probs.argmax(0).cpu().numpy().astype(np.uint8))
        iu = ConfusionMatrix.inter_union(cm.update(probs.argmax(0), mask[0].to(dist.device)))
        if cfg.seg.eval_crf:
            device = str(crf_device(cfg.crf.device, dist.local_rank))  # this rank's GPU (torch backend)
            q = dense_crf(base.image(int(idx)), probs.cpu().numpy().astype(np.float32), cfg.crf, device=device)
            iu = iu + ConfusionMatrix.inter_union(cm_crf.update(q.argmax(0), mask[0].numpy()))
        mine[int(idx)] = iu
    cm.all_reduce()
    cm_crf.all_reduce()
    per_image = {k: v for part in D.all_gather_object(mine) for k, v in part.items()}
    out = {"miou": cm.miou()}
    if dist.is_main:
        names = ("inter", "union", "inter_crf", "union_crf")
        arrays = {n: np.stack([per_image[i][k] for i in range(len(base))]) for k, n in enumerate(names) if k < len(per_image[0])}
        counts = Path(results) / run.name / "counts_seg.npz"
        save_counts(counts, base.ids, **arrays)
        rec = StageRecord(
            stage="seg",
            dataset=cfg.data.dataset,
            split=split,
            miou=round(100 * cm.miou(), 3),
            per_class=per_class_dict(base.classes, cm.iou()),
            num_images=len(base),
            pixel_accuracy=round(100 * cm.pixel_accuracy(), 3),
            miou_all_background=round(100 * cm.all_background_miou(), 3),
            miou_crf=round(100 * cm_crf.miou(), 3) if cfg.seg.eval_crf else None,
            per_class_crf=per_class_dict(base.classes, cm_crf.iou()) if cfg.seg.eval_crf else None,
            protocol={
                "model": f"DeepLab-v2 {cfg.seg.backbone} OS{cfg.seg.output_stride} ASPP(6,12,18,24)",
                "init": cfg.seg.weights or "random",
                "train_masks": str(pseudo_mask_dir(run_dir, cfg)),
                "train_split": cfg.data.seg_train_split,
                "iters": cfg.seg.iters,
                "batch": cfg.seg.batch_size,
                "crop": cfg.seg.crop,
                "eval_scales": list(cfg.seg.eval_scales),
                "eval_flip": cfg.seg.eval_flip,
                "eval_crf": cfg.seg.eval_crf,
                "resolution": "full",
            },
            synthetic=cfg.synthetic,
            model_sha256=model_digest(run.seg.final),
            settings=chain_settings("seg_eval", cfg),
            counts_file=counts.name,
        )
        write_stage(results, Path(run_dir).name, stamp(rec, time.perf_counter() - t0), cfg.to_dict())
    return out


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser(
        "tkpbench segment",
        __doc__,
        cli.config_options(),
        cli.fit_options(),
        cli.run_dir_option("the TKP-PCL run whose pseudo masks DeepLab uses"),
    )
    p.add_argument("cmd", choices=["train", "eval"])
    p.add_argument("--split", default=None, help="eval split (default: data.val_split)")
    p.add_argument("--results", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    cfg = run_config(args.run, args.config, args.overrides)
    dist = D.setup(resolve_device(args.device, cfg.synthetic))
    announce(f"segment {args.cmd}", dist)
    try:
        if args.cmd == "train":
            run = RunDir(args.run)
            if dist.is_main:
                # a DeepLab folder (finished or partial) trained on other pseudo masks or settings is
                # removed; a partial one of the same model and settings resumes
                stale = claim_outputs(run.root, model_digest(run.final), chain_settings("seg", cfg), ("seg",))
                if stale:
                    print(f"DeepLab: removed {run.seg.root} ({'; '.join(stale)}): trained again", flush=True)
            D.barrier()
            fit(SegTask(cfg, args.run), cfg.to_dict(), run.seg.root, dist, config_text=dumps(cfg), **cli.fit_kwargs(args))
            if dist.is_main and run.seg.final.is_file():
                mark_done(run, "seg", cfg)
        else:
            r = evaluate(args.run, args.split or cfg.data.val_split, dist, cfg, not args.no_progress, args.results)
            if dist.is_main:
                print(f"DeepLab-v2 mIoU on {args.split or cfg.data.val_split}: {100 * r['miou']:.2f}")
    finally:
        D.cleanup()
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
