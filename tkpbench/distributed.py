"""torch.distributed helpers: process group from torchrun's environment, samplers, precision.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain ``python -m ...`` is one process.
NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from tkpbench.errors import TrainingError

# How long a collective may wait for the slowest rank before the job is aborted. NCCL's default
# (10 minutes) is too short here: ranks with no pseudo-mask work left wait at a barrier for the
# others, and a slow shared file system can hold one rank in a checkpoint write or load. A hung job
# still ends, two hours later.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None, timeout=PROCESS_GROUP_TIMEOUT
        )
    return DistInfo(rank, local, world, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (a decision one rank makes for all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context on CPU (fp32)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain numbers only, so that a checkpoint
    holding it loads with ``torch.load(weights_only=True)``. On CUDA only this process's own device
    (the current one): a resume on another node layout (1 x 8 GPUs -> 2 x 4) restores it onto
    whichever device that rank has there."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned; the CUDA state goes to the current device only."""
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"], torch.cuda.current_device())
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


@contextlib.contextmanager
def rng_isolated():
    """Run a block (an evaluation) without moving any RNG that training draws from: its DataLoader,
    augmentation or sampling cannot change the trained weights, and a resume stays exact."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def set_determinism(on: bool) -> None:
    """``train.deterministic``: deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN
    deterministic, no cuDNN autotuning, ``CUBLAS_WORKSPACE_CONFIG``), which a bit-for-bit resume
    on CUDA needs. An op that has no deterministic CUDA kernel then raises instead of running.
    Call it before the process's first CUDA matmul: cuBLAS reads its workspace setting once. Off
    restores torch's defaults (also after an earlier call in the same process); CPU kernels are
    deterministic either way."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=False)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def precision_settings() -> dict[str, Any]:
    """The settings that decide which float kernels run, for records: TF32 in matmuls and in cuDNN
    convolutions (a run in TF32 computes different numbers than one in full fp32), the float32
    matmul precision, and the determinism switches of ``set_determinism``."""
    return {
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s dropout stream (rank 0 keeps ``seed``'s own stream)."""
    return seed + 1_000_003 * rank


class ResumableSampler(Sampler):
    """Training sampler: one permutation per (seed, epoch) shared by all ranks, cut to a multiple
    of the global batch (drop_last) and split by rank. Yields ``(index, sample_seed)`` so each
    sample's augmentation depends only on its position in the schedule. ``start`` skips the
    batches already done in this epoch (resume). ``what`` names the training set in the error
    raised when it holds less than one global batch."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, what: str = "the training split") -> None:
        if n < global_batch:
            raise TrainingError(
                f"{what} has {n} images, fewer than one global batch of {global_batch}: set the batch size "
                f"(train.batch_size; seg.batch_size for segment train) to at most {n}, or train on a bigger split"
            )
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.epoch = 0
        self.start_batch = 0
        self.per_rank = global_batch // world

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _mine(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches_per_epoch * self.global_batch]
        # batch b of rank r: perm[b*G + r*per_rank : b*G + (r+1)*per_rank]
        perm = perm.view(self.batches_per_epoch, self.world, self.per_rank)[:, self.rank]
        return perm[self.start_batch :].reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._mine():
            yield (i, sample_seed(self.seed, self.epoch, i))

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of its place in the schedule only."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**63)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Evaluation shard: every image exactly once over all ranks (no padding, no shuffle)."""
    return list(range(rank, n, world))
