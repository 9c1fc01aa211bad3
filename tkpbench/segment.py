"""DeepLab-v2 trained on pseudo masks, then evaluated (Tables 2 and 3).

    python -m tkpbench.segment train --run runs/topk_pce
    torchrun --nproc_per_node=8 -m tkpbench.segment train --run runs/topk_pce
    python -m tkpbench.segment eval --run runs/topk_pce --split val [--set seg.eval_scales=[0.75,1.0,1.25]] [--ladder]

Training uses the same loop, checkpoints and log as ``tkpbench.train`` (``tkpbench.engine``),
under ``<run>/seg/``. It reads only the (CRF-refined) pseudo masks of ``data.seg_train_split``,
never ground truth. Recipe (deeplab-pytorch's VOC): SGD momentum 0.9, lr 2.5e-4 (x10 for the
ASPP), poly 0.9, weight decay 5e-4, batch 10, crop 321 with random scale 0.5-1.5 and flip.

``eval`` scores one pass over the split at every rung of the evaluation ladder (``ladder``):
single scale, multi-scale + flip and, with ``--ladder`` or ``seg.eval_crf``, the dense CRF on the
multi-scale + flip probabilities; Table 2 reports the configured protocol (``seg.eval_*``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
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
from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD, DeepLabV2, init_name, resize_labels, resize_labels_pil
from tkpbench.device import stage_processes
from tkpbench.engine import Task, fit, fused_optimizer, unwrap
from tkpbench.errors import WeightsError
from tkpbench.metrics import ConfusionMatrix
from tkpbench.progress import track
from tkpbench.records import StageRecord, per_class_dict, stamp, write_stage
from tkpbench.runs import ResultsDir, RunDir, chain_settings, claim_outputs, load_final, mark_done, model_digest, run_config
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
        if m.init == "coco-deeplab-pytorch" and self.cfg.data.dataset == "coco":
            raise WeightsError(
                f"seg.weights = {self.cfg.seg.weights}: deeplab-pytorch's COCO init was trained on COCO's masks; a weakly "
                "supervised COCO result cannot start from it. Use torchvision's ImageNet ResNet (the default) on COCO."
            )
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(m.init_note, flush=True)
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
        # "output_stride" (deeplab-pytorch's main.py): each output at its output stride against the labels
        # resized to its size with PIL's nearest; "input": each output upsampled to its input's size,
        # labels resized with F.interpolate's nearest. Either way the cross-entropies are summed.
        at_input = self.cfg.seg.loss_at == "input"
        resize = resize_labels if at_input else resize_labels_pil
        scales = self.cfg.seg.msc_scales
        out = model(img, msc_scales=scales, upsample=at_input) if scales else [model(img, upsample=at_input)]
        ce = None
        for logits in out:
            term = F.cross_entropy(logits.float(), resize(mask, logits.shape[-2:]), ignore_index=255)
            ce = term if ce is None else ce + term
        return {"loss": ce}

    def resume_view(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return chain_settings("seg", cfg)


def _init_label(weights: str) -> str:
    """The init DeepLab started from, for the record ("imagenet-torchvision", "coco-deeplab-pytorch", ...)."""
    try:
        return init_name(weights)
    except WeightsError:
        return f"unknown ({weights} is absent at evaluation)"


EXAMPLES = 8  # eval images whose DeepLab prediction is kept (seg/examples/) for the report's Fig. 5

# the ladder's multi-scale + flip rung when seg.eval_scales is a single scale (the paper states no
# test protocol): 0.5-1.5 in steps of 0.25, each with its horizontal flip (a choice; mmsegmentation's
# ms+flip configs go on to 1.75)
MSF_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class Rung:
    """One column of the evaluation ladder: softmax averaged over ``scales`` (and their horizontal
    flips), optionally refined by the dense CRF; ``suffix`` names its arrays in counts_seg.npz
    (``inter{suffix}``, ...: "" is the configured protocol, the one Table 2 reports)."""

    name: str
    scales: tuple[float, ...]
    flip: bool
    crf: bool
    suffix: str


def ladder(cfg: Config, with_crf: bool) -> list[Rung]:
    """The rungs one evaluation computes, in one pass over the split:

    - ``ss``: single scale (1.0), no flip;
    - ``msf``: multi-scale + flip: ``seg.eval_scales`` when it holds several scales, else
      ``MSF_SCALES``, each with its horizontal flip;
    - ``msf_crf``: the dense CRF (``cfg.crf``) on the ``msf`` probabilities, only with
      ``seg.eval_crf`` or ``with_crf`` (``--ladder``): it is the costly one;
    - ``configured``: ``seg.eval_scales`` / ``seg.eval_flip`` when they are neither of the above.

    Table 2 reports the configured protocol (its arrays keep the keys without suffix; with
    ``seg.eval_crf`` the CRF on the configured probabilities keeps ``_crf``); a rung equal to it
    shares its arrays."""
    s = cfg.seg
    conf = (tuple(s.eval_scales), s.eval_flip)
    msf = (tuple(s.eval_scales) if len(s.eval_scales) > 1 else MSF_SCALES, True)
    rungs = [Rung("ss", (1.0,), False, False, "" if conf == ((1.0,), False) else "_ss")]
    rungs.append(Rung("msf", *msf, False, "" if conf == msf else "_msf"))
    if s.eval_crf or with_crf:
        rungs.append(Rung("msf_crf", *msf, True, "_crf" if conf == msf and s.eval_crf else "_msf_crf"))
    if all(r.suffix for r in rungs if not r.crf):
        rungs.insert(0, Rung("configured", *conf, False, ""))
    if s.eval_crf and all(r.suffix != "_crf" for r in rungs):
        rungs.append(Rung("configured_crf", *conf, True, "_crf"))
    return rungs


def _view_probs(model: nn.Module, img: torch.Tensor, scale: float, flip: bool, amp: bool) -> torch.Tensor:
    """Softmax of one view (scale, flip) at the image's own size, flip undone; as ``predict_probs``."""
    h, w = img.shape[-2:]
    x = img if scale == 1.0 else F.interpolate(img, scale_factor=scale, mode="bilinear", align_corners=False)
    with D.autocast(img.device, amp):
        logits = model(x.flip(-1) if flip else x)
    if flip:
        logits = logits.flip(-1)
    return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]


def ladder_probs(model: nn.Module, img: torch.Tensor, rungs: list[Rung], amp: bool) -> dict[tuple, torch.Tensor]:
    """The averaged softmax (C, H, W) of every distinct (scales, flip) of ``rungs``, each view
    computed once. The first rung's views come first, so its average adds in ``predict_probs``'s
    order (scale by scale, unflipped then flipped) and equals it."""
    sets = list(dict.fromkeys((r.scales, r.flip) for r in rungs))
    views = dict.fromkeys((v, f) for scales, flip in sets for v in scales for f in ((False, True) if flip else (False,)))
    sums: dict[tuple, torch.Tensor] = {}
    for v, f in views:
        p = _view_probs(model, img, v, f, amp)
        for scales, flip in sets:
            if v in scales and (flip or not f):
                q = p * scales.count(v) if scales.count(v) > 1 else p
                sums[(scales, flip)] = q if (scales, flip) not in sums else sums[(scales, flip)] + q
    return {(sc, fl): t / (len(sc) * (2 if fl else 1)) for (sc, fl), t in sums.items()}


@torch.no_grad()
def evaluate(
    run_dir: Path,
    split: str,
    dist: D.DistInfo,
    cfg: Config | None = None,
    progress: bool = True,
    results: Path = Path("results"),
    with_crf: bool = False,
) -> dict[str, Any]:
    """Full-resolution evaluation of ``<run>/seg/final.pt`` on ``split`` at every rung of ``ladder``
    (``with_crf``: the CRF rung even without ``seg.eval_crf``) in one pass; writes the "seg" record,
    whose ``protocol["ladder"]`` lists the rungs, and counts_seg.npz with each rung's per-image
    inter, pred, gt and union counts and its confusion matrix. Returns {"miou", "ladder": {rung: mIoU}}."""
    t0 = time.perf_counter()
    run = RunDir(run_dir)
    ck = load_final(run.seg)
    cfg = cfg or config_from_dict(ck["config"])
    base = build_dataset(cfg.data, split)
    model = DeepLabV2.from_state_dict(base.num_classes, cfg.seg.backbone, cfg.seg.output_stride, ck["model"])
    model = model.to(dist.device).eval()
    ds = Subset(
        EvalSet(base, eval_transform(None, IMAGENET_MEAN, IMAGENET_STD)), D.shard_indices(len(base), dist.rank, dist.world)
    )
    loader = DataLoader(ds, batch_size=1, num_workers=min(cfg.seg.workers, 4))
    rungs = ladder(cfg, with_crf)
    by_suffix: dict[str, Rung] = {}  # each stored measurement once, the configured protocol's first
    for r in sorted(rungs, key=lambda r: r.suffix not in ("", "_crf")):  # so it adds in predict_probs's order
        by_suffix.setdefault(r.suffix, r)
    measured = list(by_suffix)
    cms = {x: ConfusionMatrix(base.num_classes) for x in measured}
    crf_dev = str(crf_device(cfg.crf.device, dist.local_rank)) if any(r.crf for r in rungs) else ""  # this rank's GPU
    mine: dict[int, dict[str, tuple]] = {}  # image index -> suffix -> its (inter, pred, gt) counts
    for img, mask, _, idx in track(
        loader, total=len(loader), description=f"DeepLab eval {split}", enabled=progress and dist.is_main
    ):
        i = int(idx)
        probs = ladder_probs(model, img.to(dist.device), list(by_suffix.values()), cfg.train.amp)
        conf = probs[(tuple(cfg.seg.eval_scales), cfg.seg.eval_flip)]
        if i < EXAMPLES:  # the report's Fig. 5 shows these beside the pseudo masks
            save_mask(run.seg.examples / f"{base.ids[i]}.png", conf.argmax(0).cpu().numpy().astype(np.uint8))
        mine[i] = {}
        for x in measured:
            r = by_suffix[x]
            p = probs[(r.scales, r.flip)]
            if r.crf:
                q = dense_crf(base.image(i), p.cpu().numpy().astype(np.float32), cfg.crf, device=crf_dev)
                mine[i][x] = ConfusionMatrix.class_counts(cms[x].update(q.argmax(0), mask[0].numpy()))
            else:
                mine[i][x] = ConfusionMatrix.class_counts(cms[x].update(p.argmax(0), mask[0].to(dist.device)))
    for c in cms.values():
        c.all_reduce()
    per_image = {k: v for part in D.all_gather_object(mine) for k, v in part.items()}
    cm, cm_crf = cms[""], cms.get("_crf")
    out: dict[str, Any] = {"miou": cm.miou(), "ladder": {r.name: cms[r.suffix].miou() for r in rungs}}
    if dist.is_main:
        arrays = {}
        for x in measured:
            inter, pred, gt = (np.stack([per_image[i][x][k] for i in range(len(base))]) for k in range(3))
            arrays.update({f"inter{x}": inter, f"pred{x}": pred, f"gt{x}": gt, f"union{x}": pred + gt - inter})
            arrays[f"confusion{x}"] = cms[x].matrix()
        counts = ResultsDir(results).counts(run.name, "seg")
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
                "init": _init_label(cfg.seg.weights),
                "init_file": cfg.seg.weights or None,
                "loss_at": cfg.seg.loss_at,
                "train_masks": str(pseudo_mask_dir(run_dir, cfg).relative_to(run_dir)),  # in the run folder
                "train_split": cfg.data.seg_train_split,
                "iters": cfg.seg.iters,
                "batch": cfg.seg.batch_size,
                "crop": cfg.seg.crop,
                "eval_scales": list(cfg.seg.eval_scales),
                "eval_flip": cfg.seg.eval_flip,
                "eval_crf": cfg.seg.eval_crf,
                "resolution": "full",
                "ladder": [
                    {
                        "rung": r.name,
                        "scales": list(r.scales),
                        "flip": r.flip,
                        "crf": r.crf,
                        "counts_suffix": r.suffix,
                        "miou": round(100 * cms[r.suffix].miou(), 3),
                        "table2": r.suffix == "",
                    }
                    for r in rungs
                ],
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
    p.add_argument(
        "--ladder",
        action="store_true",
        help="eval: also the CRF rung of the evaluation ladder (CRF on the multi-scale + flip probabilities) "
        "without seg.eval_crf; single scale and multi-scale + flip are always computed",
    )
    args = p.parse_args(argv)
    cfg = run_config(args.run, args.config, args.overrides)
    with stage_processes(f"segment {args.cmd}", args.device, cfg.synthetic) as dist:
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
            r = evaluate(args.run, args.split or cfg.data.val_split, dist, cfg, not args.no_progress, args.results, args.ladder)
            if dist.is_main:
                rungs = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["ladder"].items())
                print(f"DeepLab-v2 mIoU on {args.split or cfg.data.val_split}: {100 * r['miou']:.2f} (ladder: {rungs})")
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
