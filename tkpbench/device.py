"""Which device a stage runs on, said and never guessed, and how many CPUs it may use.

A real run (``synthetic = false``) on a machine without a usable GPU stops at once with the reason
(no driver, GPUs hidden, a CPU-only torch, or a torch CUDA build newer than the driver) and how to
insist (``--device cpu``): training ViT-B on the CPU by accident costs about 600 h for VOC. The
demo and the tests (generated data) run on the CPU without asking.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from tkpbench import distributed as D
from tkpbench.errors import UserError

# the oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA compatibility table)
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


class DeviceError(UserError):
    """No usable device for what was asked."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: what SLURM or taskset gave it), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpus_per_process() -> int:
    """This process's share of ``usable_cpus`` when torchrun started several on the node."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def driver_version(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), or None when none is loaded. From
    ``proc``, else from ``nvidia-smi`` (containers and sandboxes may hide /proc/driver/nvidia)."""
    try:
        text = proc.read_text()
    except OSError:
        text = ""
    if not text and shutil.which("nvidia-smi"):
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def why_no_cuda(warning: str = "") -> str:
    """Why ``torch.cuda.is_available()`` is False here, in one sentence with the fix."""
    build = torch.version.cuda
    if build is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build for your driver "
            "(README, 'Which torch for which driver')"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process"
    driver = driver_version()
    if driver is None:
        return "no NVIDIA driver is loaded (no /proc/driver/nvidia/version): this machine or job has no GPU"
    need = MIN_DRIVER.get(int(build.split(".")[0]))
    if need is not None and int(driver.split(".")[0]) < need:
        return (
            f"the NVIDIA driver {driver} is too old for this torch ({torch.__version__}, built for CUDA {build}, "
            f"which needs driver >= {need}); install a torch built for an older CUDA "
            "(README, 'Which torch for which driver') or update the driver"
        )
    detail = f" ({warning.strip()})" if warning.strip() else ""
    return f"CUDA did not initialise with driver {driver} and torch {torch.__version__} (CUDA {build}){detail}"


def cuda_usable() -> tuple[bool, str]:
    """(whether CUDA works here, why not). torch's own warning, if it gave one, is kept for the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    return ok, "" if ok else why_no_cuda(" ".join(str(w.message) for w in caught))


def resolve(requested: str | None, synthetic: bool) -> str:
    """The device a stage uses: ``requested`` ("cpu", "cuda", "cuda:N") when given; otherwise CUDA
    when it works, the CPU for generated data, and a DeviceError for a real run without a GPU."""
    if requested:
        if requested.startswith("cuda"):
            ok, why = cuda_usable()
            if not ok:
                raise DeviceError(f"--device {requested}: no usable GPU: {why}")
        elif requested != "cpu":
            raise DeviceError(f"--device {requested!r}: expected cpu, cuda or cuda:N")
        return requested
    ok, why = cuda_usable()
    if ok:
        return "cuda"
    if synthetic:
        return "cpu"
    raise DeviceError(
        f"no usable GPU: {why}. A real run on the CPU takes weeks (about 600 h for VOC on 2 cores); to insist, pass --device cpu"
    )


def describe(device: torch.device) -> str:
    """The device and, for a GPU, its name and the CUDA build ("cuda:0 (NVIDIA H200, CUDA 13.0)")."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, CUDA {torch.version.cuda})"
    return f"cpu ({usable_cpus()} usable cores, {torch.get_num_threads()} torch threads)"


def announce(stage: str, dist) -> None:
    """Log the device each rank of ``stage`` uses (every rank: a wrong GPU mapping shows at once)."""
    where = f"rank {dist.rank}/{dist.world}: " if dist.world > 1 else ""
    print(f"{stage}: {where}{describe(dist.device)}", flush=True)


@contextlib.contextmanager
def stage_processes(stage: str, requested: str | None, synthetic: bool) -> Iterator[D.DistInfo]:
    """This process's part of a stage: its device said (``resolve``), the process group when
    torchrun started several, each rank's device logged, and the group closed however it ends."""
    dist = D.setup(resolve(requested, synthetic))
    announce(stage, dist)
    try:
        yield dist
    finally:
        D.cleanup()
