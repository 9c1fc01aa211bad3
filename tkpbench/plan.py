"""How many processes each stage of a chain runs with, decided before the first stage starts.

A stage with a global batch (training: ``train.batch_size``; DeepLab: ``seg.batch_size``) runs
with the largest process count, at most the number of GPUs, that splits that batch exactly (and,
for ViT-PCM's ET, into per-process micro-batches that are multiples of 4). A global batch is never
changed: when no count works, the plan refuses before anything runs, naming the stage and the fix.
Stages without a batch to split (pseudo masks, DeepLab's evaluation, the torch CRF on GPUs) use
every GPU; the pydensecrf CRF and the mask scoring are one CPU process (the CRF's pool of workers
uses the CPUs). The plan is printed and written to ``<run>/plan.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tkpbench.config import Config
from tkpbench.errors import UserError


class PlanError(UserError):
    """No process count keeps a stage's global batch as configured."""


@dataclass(frozen=True)
class StagePlan:
    stage: str
    nproc: int
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


def _split(stage: str, key: str, batch: int, slots: int, micro: int = 0, multiple: int = 1, what: str = "") -> StagePlan:
    """The largest n <= gpus with batch % n == 0, the per-process batch divisible by ``micro`` (0:
    no micro-batches) and the micro-batch a multiple of ``multiple``."""
    for n in range(max(slots, 1), 0, -1):
        per = batch // n
        mb = micro or per
        if batch % n == 0 and per % mb == 0 and mb % multiple == 0:
            note = "" if n == slots or slots <= 1 else f" (not {slots}: {batch} does not split into {slots} equal parts{what})"
            return StagePlan(stage, n, f"{key} = {batch}: {per} per process{note}")
    need = f"a multiple of {multiple} per process{what}" if multiple > 1 else "whole per-process batches"
    raise PlanError(
        f"stage {stage}: {key} = {batch}"
        + (f" with train.micro_batch = {micro}" if micro else "")
        + f" cannot be split into {need} on any of 1..{max(slots, 1)} processes. "
        f"Fix: set {key} to a multiple of {max(micro, multiple)}" + (" (or train.micro_batch = 0)" if micro else "")
    )


def stage_plan(stage: str, cfg: Config, slots: int) -> StagePlan:
    """The process count of one declared stage (``config.STAGES``) with ``slots`` processes at most
    (the GPUs, or ``--nproc``; 1 on a CPU machine)."""
    if stage == "train":
        t = cfg.train
        et = " for model.et's 2 x 2 mosaics" if cfg.model.et else ""
        return _split(stage, "train.batch_size", t.batch_size, slots, t.micro_batch, 4 if cfg.model.et else 1, et)
    if stage == "seg":
        return _split(stage, "seg.batch_size", cfg.seg.batch_size, slots)
    if stage in ("pseudo", "seg_eval") or (stage == "crf" and cfg.crf.backend == "torch"):
        n = max(slots, 1)
        return StagePlan(stage, n, "images sharded over the processes" if n > 1 else "one process")
    if stage == "crf":
        return StagePlan(stage, 1, "pydensecrf: one process with a pool of CPU workers")
    return StagePlan(stage, 1, "one CPU process")


def chain_plan(cfg: Config, slots: int, stages: list[str]) -> dict[str, StagePlan]:
    """Every stage's plan; raises PlanError for the first stage that cannot run as configured."""
    return {s: stage_plan(s, cfg, slots) for s in stages}


def format_plan(name: str, plan: dict[str, StagePlan]) -> str:
    width = max(map(len, plan))
    return f"plan for {name}:\n" + "\n".join(f"  {s:<{width}}  {p.nproc} process(es): {p.why}" for s, p in plan.items())
