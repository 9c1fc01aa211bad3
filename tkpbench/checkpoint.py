"""Training checkpoints: which file a run resumes from, and writing and pruning ``step_*.pt``.

One format: a dict of tensors and plain values that loads with ``weights_only=True``
(``runs.load_checkpoint``). Rank 0 writes; every rank contributes its RNG state.

Which checkpoint to resume is decided once, by rank 0, and broadcast: on several nodes a shared
file system may show a lagging rank an older listing, and ranks that each picked "the newest"
themselves would resume from different steps. Every rank then loads that very file; if any rank
cannot, all of them stop with the same error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tkpbench import distributed as D
from tkpbench.errors import CheckpointError, TrainingError
from tkpbench.io import atomic_torch_save, remove_stale_temporaries
from tkpbench.runs import CHECKPOINT_FORMAT, RunDir, load_checkpoint


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``step_*.pt`` files of a run, oldest first."""
    return sorted(Path(ckpt_dir).glob("step_*.pt"))


def load_latest(ckpt_dir: Path, warn: Callable[[str], Any] = print) -> dict[str, Any] | None:
    """Newest loadable checkpoint; a damaged or foreign one is skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ck = load_checkpoint(path)
            ck["_path"] = str(path)
            return ck
        except CheckpointError as e:
            warn(f"warning: checkpoint {path} is corrupt or not usable ({e}); falling back to the previous one")
    return None


def _choose(resume: str | None, ckpt_dir: Path, warn: Callable[[str], Any]) -> dict[str, Any] | None:
    """Rank 0's choice: ``resume`` "auto" (the newest loadable), a path, or None (a fresh start,
    refused when the folder already has checkpoints)."""
    if resume == "auto":
        return load_latest(ckpt_dir, warn)
    if resume:
        try:
            ck = load_checkpoint(resume)
        except CheckpointError as e:
            raise TrainingError(str(e)) from e
        ck["_path"] = str(resume)
        return ck
    if list_checkpoints(ckpt_dir):
        raise TrainingError(
            f"{Path(ckpt_dir).parent} already holds checkpoints; pass --resume auto to continue it, or choose another run name"
        )
    return None


def resume_checkpoint(
    resume: str | None, ckpt_dir: Path, main: bool, warn: Callable[[str], Any] = print
) -> dict[str, Any] | None:
    """The checkpoint this run continues from, the same file on every rank (``"_path"`` names
    it), or None for a fresh start. Rank 0 chooses (see ``_choose``) and broadcasts the path;
    an error, rank 0's or any rank's failure to load the chosen file, is raised on every rank."""
    ck, choice = None, None
    if main:
        try:
            ck = _choose(resume, ckpt_dir, warn)
            choice = {"path": ck["_path"] if ck else None}
        except TrainingError as e:
            choice = {"error": str(e)}
    choice = D.broadcast_object(choice)
    if "error" in choice:
        raise TrainingError(choice["error"])
    path, failed = choice["path"], None
    if path is not None and ck is None:
        try:
            ck = load_checkpoint(path)
            ck["_path"] = path
        except CheckpointError as e:
            failed = str(e)
    failures = [(rank, why) for rank, why in enumerate(D.all_gather_object(failed)) if why]
    if failures:
        rank, why = failures[0]
        raise TrainingError(
            f"rank {rank} cannot load {path}, the checkpoint rank 0 chose to resume from ({why}). Fix: every node must "
            "see the same run folder (a shared file system); run again once it does, or pass --resume with a path every "
            "node can read"
        )
    return ck


class Checkpointer:
    """Writes and prunes ``step_*.pt`` (rank 0 writes; every rank contributes its RNG state)."""

    def __init__(self, run: RunDir, keep: int, main: bool) -> None:
        self.dir, self.keep, self.main = run.checkpoints, keep, main
        if main and self.dir.is_dir():
            remove_stale_temporaries(self.dir)  # left by a job killed while writing

    def save(self, payload: dict[str, Any], step: int, tag: str | None = None) -> Path:
        rngs = D.all_gather_object(D.rng_state())
        path = self.dir / (tag or f"step_{step:08d}.pt")
        if self.main:
            atomic_torch_save(path, {"format": CHECKPOINT_FORMAT, **payload, "rng": rngs})
            if tag is None:
                for old in list_checkpoints(self.dir)[: -self.keep]:
                    old.unlink(missing_ok=True)
        D.barrier()
        return path
