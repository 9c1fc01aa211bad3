"""The one training loop (TKP-PCL and DeepLab-v2 share it): DDP, accumulation, bf16 autocast,
atomic checkpoints with exact resume, signal handling, NaN guard, rich progress, JSONL log.

A ``Task`` says what is trained (model, data, optimiser, learning rate, loss); a ``Trainer`` does
the rest. ``Trainer.fit`` reads like the algorithm:

    lock the run folder; build; resume
    until the stop rule says stop: begin_epoch; train_step per batch; end_epoch (evaluate, log, checkpoint)
    save final.pt (and, for a task with ``also_keep``, last.pt beside the best.pt / best_<metric>.pt kept at evaluations)

``StopRule`` is the one place that decides when the loop ends and why: the schedule's last step
(``max_steps``), patience (no better evaluation for that many epochs) or a signal (SIGTERM/SIGINT
on any rank: checkpoint at the next step boundary, then exit with 128 + its number).
Checkpoints and the choice of the one to resume from are ``tkpbench.checkpoint``'s; the log
(``log.jsonl``, TensorBoard) is ``tkpbench.runlog``'s. Evaluations run with every RNG saved and
restored around them: how often a run evaluates never changes its weights.
Tests inject faults by subclassing ``Trainer`` (``after_step``, ``losses``), not through options.
"""

from __future__ import annotations

import abc
import contextlib
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
from tkpbench.checkpoint import Checkpointer, list_checkpoints, load_latest, resume_checkpoint
from tkpbench.config import diff_configs
from tkpbench.errors import RunLockedError, TrainingError, TrainingInterrupted
from tkpbench.io import atomic_torch_save, atomic_write_text
from tkpbench.progress import make_progress
from tkpbench.runlog import RunLog
from tkpbench.runs import CHECKPOINT_FORMAT, RunDir, RunLock, load_checkpoint

# list_checkpoints and load_latest live in tkpbench.checkpoint; they stay importable from here
__all__ = ["Task", "Trainer", "StopRule", "fit", "fused_optimizer", "unwrap", "list_checkpoints", "load_latest", "TrainingError"]


class Task(abc.ABC):
    """What a training run is about. Subclasses: ``tkpbench.train.TKPTask``, ``tkpbench.segment.SegTask``."""

    name = "task"
    global_batch = 16  # images per optimiser step over all processes
    micro_batch = 0  # per-process forward size; 0 = the whole per-process batch
    seed = 0
    ckpt_every = 500
    log_every = 20
    keep_checkpoints = 2
    amp = True
    workers = 0
    keep = "last"  # which weights become final.pt: "last", or "best" by evaluate()[best_metric]
    best_metric = "miou"
    # evaluate() metrics whose best epoch's weights are kept (best.pt for "miou", best_<metric>.pt
    # otherwise), with the last epoch's as last.pt, beside final.pt: checkpoint selection at no
    # extra training (runs.SELECTIONS). Ties keep the earlier epoch, as for best_metric.
    also_keep: tuple[str, ...] = ()
    patience = 0  # stop after this many epochs without a better evaluate()[best_metric]; 0 = never

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model with its initial weights, on the CPU."""

    @abc.abstractmethod
    def train_set(self) -> Dataset:
        """The training data; items are fetched by ``(index, sample_seed)`` keys."""

    @abc.abstractmethod
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """One optimiser over every parameter that ever trains (frozen ones get no gradient)."""

    @abc.abstractmethod
    def total_steps(self, batches_per_epoch: int) -> int:
        """How many optimiser steps the run takes."""

    @abc.abstractmethod
    def lr_factors(self, step: int, epoch: int) -> list[float]:
        """The learning rate of each optimiser group at ``step`` (a pure function)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch; ``"loss"`` is the one minimised, the others are logged."""

    def set_phase(self, model: nn.Module, epoch: int) -> bool:
        """Set requires_grad for ``epoch``; True when it changed (DDP is then re-wrapped)."""
        return False

    def reset_optimizer_at(self, epoch: int) -> bool:
        """Whether a fresh optimiser starts at the beginning of ``epoch`` (ViT-PCM: at the unfreeze)."""
        return False

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (a task may keep parts, e.g. frozen BatchNorm, in eval mode)."""
        model.train()

    def eval_due(self, epoch_done: int) -> bool:
        """Whether to evaluate after ``epoch_done`` whole epochs."""
        return False

    def evaluate(self, model: nn.Module, dist: D.DistInfo) -> dict[str, float]:
        """Validation metrics, reduced over ranks (called with all RNGs isolated)."""
        return {}

    def resume_view(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The part of the config that must match to resume."""
        return cfg


@dataclass
class RunState:
    epoch: int = 0  # whole epochs done
    batch_in_epoch: int = 0
    step: int = 0


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


class _Signals:
    """Remembers SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> _Signals:
        self.old = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT: SLURM signals every process of a job step and a
    terminal every process of its group, and a worker that died of it would fail the next batch
    before the training process could checkpoint. The trainer stops them when it exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRule:
    """When the training loop ends, and why; the only place that decides it. ``reason`` is None
    while training goes on, then ``MAX_STEPS`` (the schedule's last step is done), ``PATIENCE``
    (``patience`` epochs without a better evaluation; 0 = never) or ``SIGNAL`` (SIGTERM/SIGINT
    on any rank; ``signum`` says which: the loop checkpoints and exits with 128 + it)."""

    MAX_STEPS, PATIENCE, SIGNAL = "max_steps", "patience", "signal"

    def __init__(self, max_steps: int, patience: int) -> None:
        self.max_steps, self.patience = max_steps, patience
        self.reason: str | None = None
        self.signum: int | None = None

    def at_start(self, step: int, stopped_early: bool) -> None:
        """A run that starts (or resumes) at ``step``; ``stopped_early``: patience had already ended it."""
        self.reason = self.PATIENCE if stopped_early else (self.MAX_STEPS if step >= self.max_steps else None)

    def after_step(self, step: int, signum: int | None) -> bool:
        """After each optimiser step, with the signal any rank received (the same on every rank):
        whether to leave the epoch now."""
        if signum is not None:
            self.reason, self.signum = self.SIGNAL, signum
        elif step >= self.max_steps:
            self.reason = self.MAX_STEPS
        return self.reason is not None

    def after_evaluation(self, step: int, epoch: int, best_epoch: int) -> bool:
        """After the evaluation of whole epoch ``epoch``; the best one so far was ``best_epoch``."""
        if self.patience and step < self.max_steps and epoch - best_epoch >= self.patience:
            self.reason = self.PATIENCE
        return self.reason == self.PATIENCE

    @property
    def stopped_early(self) -> bool:
        return self.reason == self.PATIENCE


class Trainer:
    """Trains one ``Task`` in one run folder. ``resume``: "auto" continues the newest valid
    checkpoint, a path continues that file, None refuses a folder that already has checkpoints.
    ``config_text`` goes to ``config.toml`` once the run is known not to clash with the folder.
    ``cfg_dict["train"]["deterministic"]`` switches deterministic kernels on (``D.set_determinism``)."""

    def __init__(
        self,
        task: Task,
        cfg_dict: dict[str, Any],
        run_dir: Path,
        dist: D.DistInfo,
        resume: str | None = "auto",
        force: bool = False,
        progress: bool = True,
        config_text: str | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.task, self.cfg_dict, self.run, self.dist = task, cfg_dict, RunDir(run_dir), dist
        self.resume_from, self.force, self.show_progress, self.config_text = resume, force, progress, config_text
        self.main = dist.is_main
        self.runlog = RunLog(self.run.log, self.main, task.name, self.run.root / "tensorboard" if tensorboard else None)
        self.state = RunState()
        self.best: float | None = None  # the best evaluate()[best_metric] so far
        self.best_epoch = 0  # the epoch it was reached at
        self.bests: dict[str, tuple[float, int]] = {}  # best value and its epoch of best_metric and each also_keep
        self.signals = _Signals()
        self.signal_seen: int | None = None  # set by train_step when any rank received SIGTERM/SIGINT
        self.prog = None

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    # -- the algorithm -------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        D.set_determinism(bool(self.cfg_dict.get("train", {}).get("deterministic", False)))
        with self._lock(), self.signals, self._progress():
            try:
                self.build()
                self.resume()
                while self.stop.reason is None:
                    self.begin_epoch()
                    for batch in self.loader:
                        self.train_step(batch)
                        self.after_step()
                        if self.stop.after_step(self.state.step, self.signal_seen):
                            break
                    if self.stop.reason == StopRule.SIGNAL:
                        self.interrupted()
                    self.end_epoch()
                self.save_final()
            finally:
                self._stop_workers()
        return unwrap(self.model)

    def _stop_workers(self) -> None:
        """End the persistent DataLoader workers now, whatever ended the loop. They ignore SIGTERM
        (``_leave_signals_to_the_trainer``), so left to the interpreter's exit, which terminates
        children with SIGTERM and then joins them, they would keep the process from ever exiting
        while anything (a traceback) still holds this trainer. DataLoader has no public call for it."""
        it = getattr(getattr(self, "loader", None), "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            self.loader._iterator = None

    # -- pieces ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        """Rank 0 holds the run folder's lock; every rank learns whether it got it."""
        lock, error = None, None
        if self.main:
            try:
                lock = RunLock(self.run.root).__enter__()
            except RunLockedError as e:
                error = e
        failed = D.all_reduce_sum(torch.tensor([float(error is not None)], device=self.dist.device)).item()
        if failed:
            raise TrainingError(str(error) if error else "rank 0 could not lock the run folder")
        try:
            yield
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    @contextlib.contextmanager
    def _progress(self):
        if self.main and self.show_progress:
            self.prog = make_progress(transient=False)
            self.prog.start()
        try:
            yield
        finally:
            if self.prog is not None:
                self.prog.stop()
            self.runlog.close()

    def build(self) -> None:
        """Model (same initial weights on every rank), optimiser, data, geometry of the batch."""
        task, dist = self.task, self.dist
        if self.main:
            self.run.root.mkdir(parents=True, exist_ok=True)
        D.seed_everything(task.seed)
        self.model = task.build_model().to(dist.device)
        if dist.rank:  # each rank its own dropout stream; rank 0 keeps the single-process one
            D.seed_everything(D.rank_seed(task.seed, dist.rank))
        self.optimizer = task.optimizer(self.model)
        self.ckpt = Checkpointer(self.run, task.keep_checkpoints, self.main)
        if task.global_batch % dist.world:
            raise TrainingError(
                f"the global batch {task.global_batch} does not divide over {dist.world} processes; use a process "
                "count that divides it (the global batch is never changed silently)"
            )
        per_rank = task.global_batch // dist.world
        self.micro = task.micro_batch or per_rank
        if per_rank % self.micro:
            raise TrainingError(f"micro_batch {self.micro} must divide the per-process batch {per_rank}")
        self.accum = per_rank // self.micro
        train_set = task.train_set()
        self.sampler = D.ResumableSampler(len(train_set), task.global_batch, dist.rank, dist.world, task.seed)
        w = task.workers
        self.loader = DataLoader(
            train_set,
            batch_size=per_rank,
            sampler=self.sampler,
            num_workers=w,
            pin_memory=dist.device.type == "cuda",
            persistent_workers=w > 0,
            drop_last=True,
            prefetch_factor=4 if w > 0 else None,
            worker_init_fn=_leave_signals_to_the_trainer if w > 0 else None,
            # its own generator: an iterator made at resume must not draw from the global RNG
            generator=torch.Generator().manual_seed(task.seed),
        )
        self.total = task.total_steps(self.sampler.batches_per_epoch)
        self.stop = StopRule(self.total, task.patience)
        self.ddp: nn.Module = self.model
        self.wrapped = False
        self.t_last, self.imgs_since = time.perf_counter(), 0

    def resume(self) -> None:
        """Continue from a checkpoint (model, optimiser, position, RNG of every rank, log length);
        rank 0 chooses which (``checkpoint.resume_checkpoint``)."""
        ck = resume_checkpoint(self.resume_from, self.run.checkpoints, self.main, warn=self.say)
        if ck is not None:
            where = ck["_path"]
            diff = diff_configs(self.task.resume_view(ck["config"]), self.task.resume_view(self.cfg_dict))
            if diff and not self.force:
                raise TrainingError(
                    f"refusing to resume {where} with a different config (pass --force to override):\n  " + "\n  ".join(diff)
                )
            unwrap(self.model).load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.state = RunState(ck["epoch"], ck["batch_in_epoch"], ck["step"])
            self.best = ck.get("best_metric")
            self.best_epoch = int(ck.get("best_epoch", 0))
            self.bests = {m: (float(v), int(e)) for m, (v, e) in (ck.get("bests") or {}).items()}
            if self.best is not None and self.task.best_metric not in self.bests:  # a checkpoint of an earlier version
                self.bests[self.task.best_metric] = (self.best, self.best_epoch)
            if ck.get("world") == self.dist.world:
                D.set_rng_state(ck["rng"][self.dist.rank])
            else:
                self.say(
                    f"warning: checkpoint was written by {ck.get('world')} processes, this run has "
                    f"{self.dist.world}: the data order continues approximately, not exactly"
                )
            self.say(f"resumed from {where} at epoch {self.state.epoch + 1}, step {self.state.step}")
            self.runlog.truncate(ck.get("log_bytes"))
        elif self.run.log.is_file():
            self.runlog.truncate(0)  # a fresh start: the old lines belong to no checkpoint
        self.stop.at_start(self.state.step, bool(ck and ck.get("stopped_early")))
        if self.main and self.config_text is not None:
            atomic_write_text(self.run.config, self.config_text)
        if self.prog is not None:
            self.bar = self.prog.add_task(self.task.name, total=self.total, completed=self.state.step, info="")

    def begin_epoch(self) -> None:
        changed = self.task.set_phase(self.model, self.state.epoch)
        if self.state.batch_in_epoch == 0 and self.task.reset_optimizer_at(self.state.epoch):
            # at the start of that epoch, also when resuming there: the checkpoint holds the state before it
            self.optimizer = self.task.optimizer(self.model)
        if self.dist.enabled and (not self.wrapped or changed):
            self.ddp = DDP(self.model, device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None)
            self.wrapped = True
        self.task.train_mode(self.model)
        self.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)

    def losses(self, mb: tuple) -> dict[str, torch.Tensor]:
        """The task's loss terms of one micro-batch under autocast (tests override this to inject faults)."""
        with D.autocast(self.dist.device, self.task.amp):
            return self.task.loss(self.ddp, mb, self.dist.device)

    def train_step(self, batch: tuple) -> None:
        """One optimiser step over the global batch: micro-batches, one all-reduce, one host sync."""
        st, dist = self.state, self.dist
        lrs = self.task.lr_factors(st.step, st.epoch)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        summed = None  # the loss terms, accumulated on the device
        for i in range(self.accum):
            mb = tuple(x[i * self.micro : (i + 1) * self.micro] for x in batch)
            sync = i == self.accum - 1 or not dist.enabled
            with self.ddp.no_sync() if not sync else contextlib.nullcontext(), _explain_nondeterministic_ops():
                losses = self.losses(mb)
                (losses["loss"] / self.accum).backward()
            part = torch.stack([v.detach().float() for v in losses.values()]) / self.accum
            summed = part if summed is None else summed + part
        # the terms summed over ranks (a NaN on any rank stays non-finite, so every rank decides
        # alike) and the signal flag, in one all-reduce
        flag = torch.tensor([float(self.signals.signal is not None)], device=dist.device)
        *values, stop = D.all_reduce_sum(torch.cat([summed, flag])).tolist()
        terms = {k: v / dist.world for k, v in zip(losses, values)}  # means over ranks
        self.signal_seen = (self.signals.signal or signal.SIGTERM) if stop > 0 else None
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            path = self.checkpoint(f"diagnostic_nan_step{st.step:08d}.pt")
            raise TrainingError(
                f"non-finite loss at step {st.step} (epoch {st.epoch + 1}): "
                + ", ".join(f"{k}={terms[k]}" for k in bad)
                + f"; diagnostic checkpoint {path}"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        st.batch_in_epoch += 1
        self.imgs_since += self.task.global_batch
        if st.step % self.task.log_every == 0 or st.step == self.total:
            self._log_step(terms, lrs[0])
        if st.step % self.task.ckpt_every == 0:
            self.checkpoint()

    def after_step(self) -> None:
        """Called after every optimiser step (a hook for tests that simulate a killed job)."""

    def _log_step(self, terms: dict[str, float], lr: float) -> None:
        now = time.perf_counter()
        ips = self.imgs_since / max(now - self.t_last, 1e-9)
        self.t_last, self.imgs_since = now, 0
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.dist.device.type == "cuda" else 0.0
        self.runlog.write(
            {
                "step": self.state.step,
                "epoch": self.state.epoch + 1,
                **{k: round(v, 6) for k, v in terms.items()},
                "lr": lr,
                "images_per_s": round(ips, 2),
                "peak_mem_gib": round(mem, 3),
            }
        )
        if self.prog is not None:
            info = " ".join(f"{k}={v:.4f}" for k, v in terms.items()) + f" lr={lr:.1e} {ips:.1f} img/s"
            self.prog.update(self.bar, completed=self.state.step, info=f"ep {self.state.epoch + 1} {info}")

    def end_epoch(self) -> None:
        """After a whole epoch (or the run's last step): evaluate when due, log, checkpoint."""
        st = self.state
        whole = st.batch_in_epoch >= self.sampler.batches_per_epoch
        if whole:
            st.epoch += 1
            st.batch_in_epoch = 0
        if (whole and self.task.eval_due(st.epoch)) or (st.step >= self.total and self.task.eval_due(0)):
            with D.rng_isolated():
                metrics = self.task.evaluate(self.model, self.dist)
            self.runlog.write({"step": st.step, "epoch": st.epoch, **{f"val_{k}": v for k, v in metrics.items()}})
            self.say(f"epoch {st.epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self._keep_if_best(metrics)
            if self.stop.after_evaluation(st.step, st.epoch, self.best_epoch):
                self.say(
                    f"early stop after epoch {st.epoch}: no better val {self.task.best_metric} since epoch {self.best_epoch}"
                )
        self.checkpoint()

    def _keep_if_best(self, metrics: dict[str, float]) -> None:
        """Track the best evaluation of best_metric and of each also_keep metric (ties keep the
        earlier epoch). A kept metric's best weights go to its file (``RunDir.weights("best_<metric>")``):
        every also_keep metric's, and best_metric's with train.keep = "best"."""
        primary, epoch = self.task.best_metric, self.state.epoch
        for metric in dict.fromkeys([primary, *self.task.also_keep]):
            value, old = metrics.get(metric), self.bests.get(metric)
            if value is None or (old is not None and value <= old[0]):
                continue
            self.bests[metric] = (value, epoch)
            if self.main and (metric in self.task.also_keep or (metric == primary and self.task.keep == "best")):
                self._save_weights(
                    self.run.weights(f"best_{metric}"),
                    unwrap(self.model).state_dict(),
                    f"best {metric} {value:.4f} at epoch {epoch}",
                    f"best_{metric}",
                    epoch,
                    self.state.step,
                    **{metric: value},
                )
        if primary in self.bests:
            self.best, self.best_epoch = self.bests[primary]

    def _save_weights(self, path: Path, weights: dict, kept: str, selection: str, epoch: int, step: int, **extra: Any) -> None:
        """One weights file (final.pt, last.pt, best.pt, best_f1.pt), all in final.pt's format: the
        weights, the config, which selection they are and the epoch and step they were taken at
        (``weights_step``: two files with the same one hold the same weights), and the precision
        settings the run trained with (``D.precision_settings``) for its records."""
        atomic_torch_save(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "model": weights,
                "config": self.cfg_dict,
                "step": self.state.step,  # of final.pt: the run's last step, whichever weights it holds
                "task": self.task.name,
                "kept": kept,
                "selection": selection,
                "epoch": epoch,
                "weights_step": step,
                "precision": D.precision_settings(),  # TF32 and determinism as this run trained
                **extra,
            },
        )

    def interrupted(self) -> None:
        """The stop rule's SIGNAL: checkpoint where the loop is, then end with 128 + the signal."""
        path = self.checkpoint()
        sig = self.stop.signum
        raise TrainingInterrupted(
            f"stopped by signal {sig} ({signal.Signals(sig).name}) at step {self.state.step}; "
            f"saved {path}. Run the same command again to continue from there",
            sig,
        )

    def checkpoint(self, tag: str | None = None) -> Path:
        st = self.state
        return self.ckpt.save(
            {
                "task": self.task.name,
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": st.epoch,
                "batch_in_epoch": st.batch_in_epoch,
                "step": st.step,
                "config": self.cfg_dict,
                "world": self.dist.world,
                "log_bytes": self.runlog.size(),
                "best_metric": self.best,
                "best_epoch": self.best_epoch,
                "bests": {m: [v, e] for m, (v, e) in self.bests.items()},
                "stopped_early": self.stop.stopped_early,
            },
            st.step,
            tag,
        )

    def save_final(self) -> None:
        """final.pt: the last weights, or with train.keep = "best" those of the best evaluation
        (``"step"`` is the run's last step either way); with also_keep, last.pt too."""
        if self.main:
            st, metric = self.state, self.task.best_metric
            last = unwrap(self.model).state_dict()
            if self.task.also_keep:
                self._save_weights(self.run.weights("last"), last, f"last (step {st.step})", "last", st.epoch, st.step)
            chosen = (last, f"last (step {st.step})", "last", st.epoch, st.step)
            best_file = self.run.weights(f"best_{metric}")
            if self.task.keep == "best" and best_file.is_file():
                best = load_checkpoint(best_file)
                kept = f"best {metric} {best[metric]:.4f} at epoch {best['epoch']}"
                chosen = (best["model"], kept, f"best_{metric}", best["epoch"], best.get("weights_step", best["step"]))
                self.say(f"final.pt: the weights of epoch {best['epoch']} ({kept})")
            weights, kept, selection, epoch, step = chosen
            self._save_weights(self.run.final, weights, kept, selection, epoch, step)
        D.barrier()


@contextlib.contextmanager
def _explain_nondeterministic_ops():
    """With train.deterministic, an op without a deterministic CUDA kernel raises; say which
    setting made it so and what to do, instead of torch's traceback."""
    try:
        yield
    except RuntimeError as e:
        if not (torch.are_deterministic_algorithms_enabled() and "deterministic" in str(e)):
            raise
        raise TrainingError(
            f"train.deterministic = true, but this training runs an op that has no deterministic kernel on this device "
            f"({str(e).splitlines()[0][:300]}). Fix: --set train.deterministic=false (a resume is then exact up to "
            "float rounding, not bit for bit)"
        ) from e


def fit(task: Task, cfg_dict: dict[str, Any], run_dir: Path, dist: D.DistInfo, **options: Any) -> nn.Module:
    """Train ``task`` to the end under ``run_dir``; ``options`` are ``Trainer``'s (resume, force,
    progress, config_text, tensorboard). Returns the unwrapped model; raises ``TrainingInterrupted``
    after saving when a signal stops it."""
    return Trainer(task, cfg_dict, run_dir, dist, **options).fit()


def fused_optimizer(params) -> bool | None:
    """``fused=`` for Adam/SGD: True on CUDA, where one fused kernel replaces the default's chain of
    multi-tensor (foreach) kernels; None (torch's default choice) elsewhere."""
    return True if all(p.is_cuda for p in params) else None
