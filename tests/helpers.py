"""Tiny configs shared by the training, pipeline and segmentation tests."""

from __future__ import annotations

from pathlib import Path

from tkpbench.config import Config, apply_overrides


def tiny_overrides(voc_root: Path) -> list[str]:
    """``--set`` values that make any config tiny (a 2-block ViT at 32 px, ResNet-18 DeepLab) on
    generated data at ``voc_root``, batches of 4; later ``--set`` values win."""
    return [
        "model.weights=",
        "seg.weights=",
        "model.encoder=vit_tiny_patch16_224",
        "model.encoder_kwargs={depth = 2}",
        "model.img_size=32",
        "model.hidden=8",
        "model.k=2",
        f"data.root={voc_root}",
        "data.train_split=train_aug",
        "data.val_split=val",
        "data.workers=0",
        "train.epochs=3",
        "train.warmup_epochs=1",
        "train.unfreeze_blocks=1",
        "train.batch_size=4",
        "train.log_every=1",
        "train.ckpt_every=100",
        "train.eval_every=0",
        "train.keep=last",
        "pseudo.infer_size=64",
        "pseudo.batch_size=4",
        "crf.workers=1",
        "seg.backbone=resnet18",
        "seg.crop=48",
        "seg.batch_size=4",
        "seg.iters=6",
        "seg.lr=0.01",
        "seg.msc_scales=[]",
        "seg.freeze_bn=false",
        "seg.workers=0",
        "seg.log_every=1",
        "seg.ckpt_every=100",
    ]


def tiny_config(voc_root: Path, name: str = "tiny", **extra: str) -> Config:
    cfg = Config()
    cfg.name = name
    cfg.synthetic = True
    apply_overrides(cfg, [*tiny_overrides(voc_root), *[f"{k.replace('__', '.')}={v}" for k, v in extra.items()]])
    return cfg


class SimulatedKill(Exception):
    """Raised by the test trainers below where a real job would have been killed."""


def trainer(task, cfg, run_dir, *, stop_after: int = 0, nan_at: int = -1, kill_after_eval: int = 0, **kw):
    """A ``Trainer`` with faults injected the way the engine allows (a subclass, never an option):
    ``stop_after`` checkpoints then 'dies' after that many steps; ``nan_at`` makes that step's loss
    NaN; ``kill_after_eval`` dies right after the evaluation (and checkpoint) of that epoch."""
    from tkpbench import distributed as D
    from tkpbench.engine import Trainer

    class Faulty(Trainer):
        def after_step(self) -> None:
            if stop_after and self.state.step >= stop_after:
                self.checkpoint()
                raise SimulatedKill(f"killed after step {self.state.step}")

        def losses(self, mb):
            out = super().losses(mb)
            if self.state.step == nan_at:
                out["loss"] = out["loss"] * float("nan")
            return out

        def end_epoch(self) -> None:
            super().end_epoch()
            if kill_after_eval and self.state.epoch == kill_after_eval:
                raise SimulatedKill(f"killed after the evaluation of epoch {self.state.epoch}")

    dist = kw.pop("dist", D.DistInfo())
    kw.setdefault("progress", False)
    return Faulty(task, cfg.to_dict(), run_dir, dist, **kw)


def run_until_killed(*args, **kw):
    try:
        return trainer(*args, **kw).fit()
    except SimulatedKill:
        return None
