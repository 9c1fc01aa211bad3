"""Tiny configs shared by the training, pipeline and segmentation tests."""

from __future__ import annotations

from pathlib import Path

from tkpbench.config import Config, apply_overrides


def tiny_config(voc_root: Path, name: str = "tiny", **extra: str) -> Config:
    cfg = Config()
    cfg.name = name
    cfg.synthetic = True
    apply_overrides(cfg, [
        "model.weights=", "seg.weights=", "model.encoder=vit_tiny_patch16_224", "model.encoder_kwargs={depth = 2}", "model.img_size=32",
        "model.hidden=8", "model.k=2", f"data.root={voc_root}", "data.train_split=train_aug", "data.val_split=val",
        "data.workers=0", "train.epochs=3", "train.warmup_epochs=1", "train.unfreeze_blocks=1", "train.batch_size=4",
        "train.log_every=1", "train.ckpt_every=100", "train.eval_every=0", "pseudo.infer_size=64", "pseudo.batch_size=4",
        "crf.workers=1", "seg.backbone=resnet18", "seg.crop=48", "seg.batch_size=4", "seg.iters=6", "seg.lr=0.01",
        "seg.freeze_bn=false", "seg.workers=0", "seg.log_every=1", "seg.ckpt_every=100",
        *[f"{k.replace('__', '.')}={v}" for k, v in extra.items()],
    ])
    return cfg
