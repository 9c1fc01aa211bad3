"""The one training loop (TKP-PCL and DeepLab-v2 share it): DDP, accumulation, bf16 autocast,
atomic checkpoints with exact resume, SIGTERM handling, NaN guard, rich progress, JSONL log.

A ``Task`` supplies the model, data, optimiser, learning rate and loss; this module does the rest.
One checkpoint format (a dict, see ``_checkpoint``) and one log format (``log.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from tkpbench import distributed as D
from tkpbench.config import diff_configs
from tkpbench.io import atomic_torch_save, atomic_write_text

CKPT_VERSION = 1


class TrainingError(RuntimeError):
    pass


class Task:
    """What a training run is about. Subclasses: ``tkpbench.train.TKPTask``, ``tkpbench.segment.SegTask``."""

    name = "task"
    global_batch = 16
    micro_batch = 0
    seed = 0
    ckpt_every = 500
    log_every = 20
    keep_checkpoints = 2
    amp = True

    def build_model(self) -> nn.Module: ...
    def train_set(self) -> Dataset: ...
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...
    def total_steps(self, batches_per_epoch: int) -> int: ...
    def lr_factors(self, step: int, epoch: int) -> list[float]:
        """The learning rate of each optimiser group at ``step`` (a pure function)."""
        ...
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]: ...

    def set_phase(self, model: nn.Module, epoch: int) -> bool:
        """Set requires_grad for ``epoch``; True when it changed (DDP is then re-wrapped)."""
        return False

    def evaluate(self, model: nn.Module, dist: D.DistInfo) -> dict[str, float]:
        return {}

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def resume_view(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The part of the config that must match to resume."""
        return cfg

    def eval_due(self, epoch_done: int) -> bool:
        return False


@dataclass
class RunState:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(Path(ckpt_dir).glob("step_*.pt"))


def load_latest(ckpt_dir: Path, warn=print) -> dict[str, Any] | None:
    """Newest loadable checkpoint; a corrupt one is skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            if ck.get("version") == CKPT_VERSION and "model" in ck:
                ck["_path"] = str(path)
                return ck
            warn(f"warning: {path} is not a tkpbench checkpoint; trying the previous one")
        except Exception as e:
            warn(f"warning: checkpoint {path} is corrupt ({e.__class__.__name__}: {e}); falling back to the previous one")
    return None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


class _Stop:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signal = signum


def fit(task: Task, cfg_dict: dict[str, Any], run_dir: Path, dist: D.DistInfo, resume: str | None = "auto",
        force: bool = False, progress: bool = True, stop_after: int = 0, nan_at: int = -1,
        config_text: str | None = None) -> nn.Module:
    """Train ``task`` to the end (or to a signal), checkpointing under ``run_dir/checkpoints``.

    ``resume``: "auto" continues from the newest valid checkpoint, a path continues from that
    file, None refuses to touch a run folder that already has checkpoints. ``stop_after`` (debug)
    saves and returns after that many steps, like a kill right after a checkpoint;
    ``nan_at`` (debug) replaces the loss by NaN at that step. ``config_text`` is written to
    ``run_dir/config.toml`` once the run is known not to clash with what the folder holds.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    log_path = run_dir / "log.jsonl"
    main = dist.is_main
    say = print if main else (lambda *a, **k: None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    D.seed_everything(task.seed)
    model = task.build_model().to(dist.device)
    optimizer = task.optimizer(model)
    state = RunState()
    ck = None
    if resume == "auto":
        ck = load_latest(ckpt_dir, warn=say)
    elif resume:
        ck = torch.load(resume, map_location="cpu", weights_only=False)
    elif list_checkpoints(ckpt_dir):
        raise TrainingError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, or choose another run name")
    if ck is not None:
        diff = diff_configs(task.resume_view(ck["config"]), task.resume_view(cfg_dict))
        if diff and not force:
            raise TrainingError(
                f"refusing to resume {ck.get('_path', resume)} with a different config (pass --force to override):\n  "
                + "\n  ".join(diff)
            )
        unwrap(model).load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        state = RunState(ck["epoch"], ck["batch_in_epoch"], ck["step"])
        if ck.get("world") == dist.world:
            D.set_rng_state(ck["rng"][dist.rank])
        else:
            say(f"warning: checkpoint was written by {ck.get('world')} processes, this run has {dist.world}: "
                "the data order continues approximately, not exactly")
        say(f"resumed from {ck.get('_path', resume)} at epoch {state.epoch + 1}, step {state.step}")
        if main and log_path.is_file():  # drop log lines of steps that will be run again
            keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= state.step]
            atomic_write_text(log_path, "".join(k + "\n" for k in keep))

    if main and config_text is not None:
        atomic_write_text(run_dir / "config.toml", config_text)
    if task.global_batch % dist.world:
        raise TrainingError(
            f"the global batch {task.global_batch} does not divide over {dist.world} processes; use a process count "
            f"that divides it (the global batch is never changed silently)"
        )
    per_rank = task.global_batch // dist.world
    micro = task.micro_batch or per_rank
    if per_rank % micro:
        raise TrainingError(f"micro_batch {micro} must divide the per-process batch {per_rank}")
    accum = per_rank // micro

    train_set = task.train_set()
    sampler = D.ResumableSampler(len(train_set), task.global_batch, dist.rank, dist.world, task.seed)
    workers = getattr(task, "workers", 0)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=workers,
                        pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0, drop_last=True,
                        prefetch_factor=4 if workers > 0 else None,
                        # the loader's own generator: creating an iterator (at resume) must not draw from
                        # the global RNG that dropout uses
                        generator=torch.Generator().manual_seed(task.seed))
    total = task.total_steps(sampler.batches_per_epoch)

    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def checkpoint(tag: str | None = None) -> Path:
        rngs = D.all_gather_object(D.rng_state())
        path = ckpt_dir / (tag or f"step_{state.step:08d}.pt")
        if main:
            atomic_torch_save(path, {
                "version": CKPT_VERSION, "task": task.name, "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                "step": state.step, "config": cfg_dict, "rng": rngs, "world": dist.world,
            })
            if tag is None:
                for old_ck in list_checkpoints(ckpt_dir)[: -task.keep_checkpoints]:
                    old_ck.unlink(missing_ok=True)
        D.barrier()
        return path

    def log(rec: dict[str, Any]) -> None:
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    ddp: nn.Module = model
    wrapped_phase = None
    prog = None
    if main and progress:
        from tkpbench.progress import make_progress

        prog = make_progress(transient=False)
        prog.start()
        bar = prog.add_task(task.name, total=total, completed=state.step, info="")
    t_last, imgs_since = time.perf_counter(), 0
    try:
        while state.step < total:
            changed = task.set_phase(model, state.epoch)
            if dist.enabled and (wrapped_phase is None or changed):
                ddp = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
                wrapped_phase = state.epoch
            task.train_mode(model)
            sampler.set_epoch(state.epoch, state.batch_in_epoch)
            for batch in loader:
                lrs = task.lr_factors(state.step, state.epoch)
                for g, lr in zip(optimizer.param_groups, lrs):
                    g["lr"] = lr
                summed: torch.Tensor | None = None  # the loss terms, accumulated on the device
                chunks = [tuple(x[i * micro:(i + 1) * micro] for x in batch) for i in range(accum)]
                for i, mb in enumerate(chunks):
                    sync = i == accum - 1 or not dist.enabled
                    ctx = ddp.no_sync() if (dist.enabled and not sync) else contextlib.nullcontext()
                    with ctx:
                        with D.autocast(dist.device, task.amp):
                            losses = task.loss(ddp, mb, dist.device)
                        if state.step == nan_at:
                            losses["loss"] = losses["loss"] * float("nan")
                        (losses["loss"] / accum).backward()
                    part = torch.stack([v.detach().float() for v in losses.values()]) / accum
                    summed = part if summed is None else summed + part
                # One all-reduce and one host sync per step: the terms summed over ranks (a NaN or inf
                # on any rank stays non-finite, so every rank decides alike) and the stop flag.
                flag = torch.tensor([float(stop.signal is not None)], device=dist.device)
                *values, stop_flag = D.all_reduce_sum(torch.cat([summed, flag])).tolist()
                terms = {k: v / dist.world for k, v in zip(losses, values)}  # means over ranks
                any_stop = stop_flag > 0
                bad = [k for k, v in terms.items() if not math.isfinite(v)]
                if bad:
                    path = checkpoint(f"diagnostic_nan_step{state.step:08d}.pt")
                    raise TrainingError(
                        f"non-finite loss at step {state.step} (epoch {state.epoch + 1}): "
                        + ", ".join(f"{k}={terms[k]}" for k in bad) + f"; diagnostic checkpoint {path}"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                imgs_since += task.global_batch
                if state.step % task.log_every == 0 or state.step == total:
                    now = time.perf_counter()
                    ips = imgs_since / max(now - t_last, 1e-9)
                    t_last, imgs_since = now, 0
                    mem = torch.cuda.max_memory_allocated() / 2**30 if dist.device.type == "cuda" else 0.0
                    rec = {"step": state.step, "epoch": state.epoch + 1, **{k: round(v, 6) for k, v in terms.items()},
                           "lr": lrs[0], "images_per_s": round(ips, 2), "peak_mem_gib": round(mem, 3)}
                    log(rec)
                    info = " ".join(f"{k}={v:.4f}" for k, v in terms.items()) + f" lr={lrs[0]:.1e} {ips:.1f} img/s"
                    if prog is not None:
                        prog.update(bar, completed=state.step, info=f"ep {state.epoch + 1} {info}")
                if state.step % task.ckpt_every == 0:
                    checkpoint()
                if stop_after and state.step >= stop_after:
                    checkpoint()
                    return unwrap(model)
                if any_stop:
                    path = checkpoint()
                    say(f"received signal {stop.signal}: saved {path}; run the same command to continue")
                    return unwrap(model)
                if state.step >= total:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                checkpoint()
                if task.eval_due(state.epoch):
                    metrics = task.evaluate(model, dist)
                    log({"step": state.step, "epoch": state.epoch, **{f"val_{k}": v for k, v in metrics.items()}})
                    say(f"epoch {state.epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                continue
            break
        if state.batch_in_epoch:
            checkpoint()
    finally:
        if prog is not None:
            prog.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if main:
        atomic_torch_save(run_dir / "final.pt", {"model": unwrap(model).state_dict(), "config": cfg_dict,
                                                   "step": state.step, "task": task.name})
    D.barrier()
    return unwrap(model)


def fused_optimizer(params) -> bool | None:
    """``fused=`` for Adam/SGD: True on CUDA, where one fused kernel replaces the default's chain of
    multi-tensor (foreach) kernels; None (torch's default choice) elsewhere."""
    return True if all(p.is_cuda for p in params) else None


def add_fit_args(p) -> None:
    """The command-line options every training entry point shares."""
    import argparse

    p.add_argument("--resume", default="auto", help="'auto' (newest valid checkpoint), a checkpoint path, or 'no'")
    p.add_argument("--force", action="store_true", help="resume even if the config differs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--debug-nan-at", type=int, default=-1, help=argparse.SUPPRESS)


def fit_from_args(task: Task, cfg, run_dir: Path, dist: D.DistInfo, args) -> nn.Module:
    """``fit`` with the options of ``add_fit_args``; the resolved config goes to ``run_dir/config.toml``."""
    from tkpbench.config import dumps

    return fit(task, cfg.to_dict(), run_dir, dist, resume=None if args.resume == "no" else args.resume,
               force=args.force, progress=not args.no_progress, stop_after=args.stop_after, nan_at=args.debug_nan_at,
               config_text=dumps(cfg))


def load_final(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "final.pt"
    if not path.is_file():
        raise TrainingError(f"{path} does not exist; train the run first (python -m tkpbench.train --config ...)")
    return torch.load(path, map_location="cpu", weights_only=False)

