"""Train TKP-PCL (paper Sec. 4.1) with the shared loop of ``tkpbench.engine``.

    python -m tkpbench.train --config baselines/topk_pce.toml --set data.root=/data/VOC2012
    torchrun --nproc_per_node=8 -m tkpbench.train --config baselines/topk_pce.toml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m tkpbench.train ...

Schedule (SPEC Sec. 1): Adam; epochs 1-2 at lr 1e-3 with the encoder frozen (HV-BiLSTM and
classifier learn); from epoch 3 lr 1e-4 with the last 5 encoder blocks and the final norm
unfrozen. Global batch 16 however many processes. Each epoch: image-level F1 and the mIoU of
the merged patch predictions on val at the training size. Everything goes to ``runs/<name>/``.
"""

from __future__ import annotations

import re
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from tkpbench import cli
from tkpbench import distributed as D
from tkpbench.config import Config, dumps, load_config
from tkpbench.data.transforms import EvalSet, TKPTrainSet, build_dataset, eval_transform, tkp_train_transform
from tkpbench.device import stage_processes
from tkpbench.encoder import encoder_mean_std
from tkpbench.engine import Task, TrainingError, fit, fused_optimizer, unwrap
from tkpbench.equivariance import equivariance_loss, mosaic, realign, tiles
from tkpbench.metrics import ConfusionMatrix
from tkpbench.model import TKPPCL, TKPOutput, merge_with_tags, patch_masks, score_grid, tkp_loss
from tkpbench.runs import training_view


class TKPTask(Task):
    name = "tkp-pcl"
    # checkpoint selection (runs.SELECTIONS): besides final.pt (train.keep's choice) every run keeps
    # last.pt, best.pt (best val patch mIoU: needs val pixel labels) and best_f1.pt (best val
    # image-tag F1: image-level tags only, the label-free choice)
    also_keep = ("miou", "f1")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        self.global_batch, self.micro_batch, self.seed = t.batch_size, t.micro_batch, t.seed
        self.ckpt_every, self.log_every, self.keep_checkpoints, self.amp = t.ckpt_every, t.log_every, t.keep_checkpoints, t.amp
        self.workers = cfg.data.workers
        self.keep, self.patience = t.keep, t.patience
        self._phase: str | None = None

    def build_model(self) -> nn.Module:
        return TKPPCL(self.cfg.model)

    def train_set(self):
        base = build_dataset(self.cfg.data, self.cfg.data.train_split)
        if base.num_classes != self.cfg.model.num_classes:
            raise TrainingError(
                f"model.num_classes is {self.cfg.model.num_classes} but {base!r} has {base.num_classes} classes "
                f"(background included); set --set model.num_classes={base.num_classes}"
            )
        mean, std = encoder_mean_std(self.cfg.model.encoder)
        tf = tkp_train_transform(self.cfg.data, self.cfg.model.img_size, mean, std, et=self.cfg.model.et, patch=self.patch)
        return TKPTrainSet(base, tf, cache_size=self.cfg.model.img_size if self.cfg.data.cache_images else 0)

    @cached_property
    def patch(self) -> int:
        """The encoder's patch size (16 for every ViT the paper and ViT-PCM use)."""
        found = re.search(r"patch(\d+)", self.cfg.model.encoder)
        return int(found.group(1)) if found else 16

    @cached_property
    def val_set(self):
        """Built once per run, not once per epoch (COCO's annotation file takes seconds to load)."""
        return build_dataset(self.cfg.data, self.cfg.data.val_split)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        m: TKPPCL = unwrap(model)
        n = len(m.encoder.vit.blocks)
        k = min(self.cfg.train.unfreeze_blocks, n)
        enc = [p for b in list(m.encoder.vit.blocks)[n - k :] for p in b.parameters()] + list(m.encoder.vit.norm.parameters())
        # one Adam over everything that ever trains; frozen parameters get no gradient and are skipped
        params = m.trainable_head_parameters() + enc
        return torch.optim.Adam(
            params, lr=self.cfg.train.lr_warmup, weight_decay=self.cfg.train.weight_decay, fused=fused_optimizer(params)
        )

    def total_steps(self, batches_per_epoch: int) -> int:
        total = self.cfg.train.epochs * batches_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def lr_factors(self, step: int, epoch: int) -> list[float]:
        t = self.cfg.train
        return [t.lr_warmup if epoch < t.warmup_epochs else t.lr]

    def reset_optimizer_at(self, epoch: int) -> bool:
        t = self.cfg.train
        return t.reset_optimizer_at_unfreeze and t.warmup_epochs > 0 and epoch == t.warmup_epochs

    def set_phase(self, model: nn.Module, epoch: int) -> bool:
        m: TKPPCL = unwrap(model)
        phase = "warmup" if epoch < self.cfg.train.warmup_epochs else "finetune"
        if phase == self._phase:
            return False
        if phase == "warmup":
            m.encoder.freeze()
        else:
            m.encoder.unfreeze(min(self.cfg.train.unfreeze_blocks, len(m.encoder.vit.blocks)))
        self._phase = phase
        return True

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, tags = (x.to(device, non_blocking=True) for x in batch[:2])
        m: TKPPCL = unwrap(model)
        weight = m.classifier.weight if self.cfg.model.reg else None
        if not self.cfg.model.et:
            return tkp_loss(model(images), tags, self.cfg.model, classifier_weight=weight)
        et_images, geom, et_geom = (x.to(device, non_blocking=True) for x in batch[2:])
        b = images.shape[0]
        if b % 4:
            raise TrainingError(
                f"model.et tiles 4 images into each mosaic, but this process's micro-batch has {b}; "
                "make train.batch_size / processes (and train.micro_batch) a multiple of 4"
            )
        ref = self.et_reference(model, images)
        g = ref.grid[0] // 2
        target = merge_with_tags(realign(score_grid(ref.z, ref.grid), geom, et_geom, self.patch, g), tags)
        # one forward over the main views and the mosaics (both img_size): one DDP call per step
        out = model(torch.cat([images, mosaic(et_images)]))
        main = TKPOutput(z=out.z[:b], y=out.y[:b], features=out.features[:b], grid=out.grid)
        pred = tiles(score_grid(out.z[b:], out.grid))
        return tkp_loss(main, tags, self.cfg.model, et=equivariance_loss(pred, target), classifier_weight=weight)

    def et_reference(self, model: nn.Module, images: torch.Tensor) -> TKPOutput:
        """The ET target's forward: the main view in eval mode, without gradient (ViT-PCM:
        ``training=False``, outside its gradient tape), in an autocast cache region of its own.

        Autocast caches the low-precision copy of each weight it casts until the outermost
        autocast region ends. A copy made here, under ``no_grad``, has no autograd history; on
        torch < 2.10 the training forward that follows in the engine's region would reuse it, and
        the unfrozen encoder blocks would get no gradient (pytorch#112583, pytorch#105211).
        Clearing the cache after this forward makes the training forward cast afresh.
        """
        m: TKPPCL = unwrap(model)
        try:
            with torch.no_grad():
                m.eval()
                return m(images)
        finally:
            self.train_mode(model)
            torch.clear_autocast_cache()

    def eval_due(self, epoch_done: int) -> bool:
        e = self.cfg.train.eval_every
        return bool(e) and epoch_done % e == 0

    def resume_view(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return training_view(cfg)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dist: D.DistInfo) -> dict[str, float]:
        return evaluate_patch_predictions(unwrap(model), self.cfg, dist, self.val_set)


@torch.no_grad()
def evaluate_patch_predictions(model: TKPPCL, cfg: Config, dist: D.DistInfo, base) -> dict[str, float]:
    """Image-level F1 (foreground, y > 0.5) and the mIoU of the tag-merged patch predictions on
    ``base`` (the val dataset), both at the training size (cheap, as ViT-PCM's per-epoch check)."""
    was_training = model.training
    model.eval()
    size = cfg.model.img_size
    ds = Subset(
        EvalSet(base, eval_transform(size, model.encoder.mean, model.encoder.std)),
        D.shard_indices(len(base), dist.rank, dist.world),
    )
    loader = DataLoader(ds, batch_size=8, num_workers=min(cfg.data.workers, 4))
    cm = ConfusionMatrix(base.num_classes)
    counts = torch.zeros(3, dtype=torch.float64, device=dist.device)  # tp, fp, fn
    for img, mask, tags, _ in loader:
        img, mask, tags = img.to(dist.device), mask.to(dist.device), tags.to(dist.device)
        with D.autocast(dist.device, cfg.train.amp):
            out = model(img)
        pred_tags = out.y[:, 1:] > 0.5
        t = tags[:, 1:]
        counts += torch.stack([(pred_tags & t).sum(), (pred_tags & ~t).sum(), (~pred_tags & t).sum()]).double()
        pred = patch_masks(out.z, out.grid, tags, (size, size), align_corners=cfg.pseudo.align_corners)
        cm.update(pred, mask)
    counts = D.all_reduce_sum(counts)
    cm.all_reduce()
    tp, fp, fn = counts.tolist()
    model.train(was_training)
    return {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "miou": cm.miou()}


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench train", __doc__, cli.config_options(required=True), cli.fit_options())
    p.add_argument("--name", default=None, help="run name (default: the config's name, else its file name)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run folders (default: runs)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.name:
        cfg.name = args.name
    with stage_processes("train", args.device, cfg.synthetic) as dist:
        fit(TKPTask(cfg), cfg.to_dict(), Path(args.runs) / cfg.name, dist, config_text=dumps(cfg), **cli.fit_kwargs(args))
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
