"""The one results record: ``results/<run>/summary.json``, read by ``tkpbench.report``.

A summary holds one entry per stage ("mask": pseudo masks, Table 1 / Table 4 mask column;
"seg": DeepLab, Tables 2-3 / Table 4 seg column). Each entry says how it was measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from tkpbench.distributed import precision_settings
from tkpbench.io import atomic_write_json
from tkpbench.runs import ResultsDir

SCHEMA_VERSION = 1


@dataclass
class StageRecord:
    stage: str  # "mask" | "seg"
    dataset: str  # "voc" | "coco"
    split: str
    miou: float  # before CRF for "mask"; the segmentation mIoU for "seg"
    per_class: dict[str, float]
    num_images: int
    miou_crf: float | None = None  # after CRF ("mask"), or with CRF post-processing ("seg")
    per_class_crf: dict[str, float] | None = None
    pixel_accuracy: float | None = None
    miou_all_background: float | None = None  # the trivial baseline on the same split
    protocol: dict[str, Any] = field(default_factory=dict)  # sizes, scales, flip, CRF values, weights
    synthetic: bool = False
    commit: str = ""
    device: str = ""
    date: str = ""
    wall_time_s: float = 0.0
    command: str = ""
    # sha256 (16 hex) of the weights measured: runs/<run>/final.pt ("mask") or runs/<run>/seg/final.pt
    # ("seg"). The pipeline reuses a record only for the model it measured, never for a retrained one.
    model_sha256: str = ""
    # the config values the measured outputs depend on (tkpbench.runs.chain_settings, from the keys
    # declared in tkpbench.config); a change re-measures
    settings: dict[str, Any] = field(default_factory=dict)
    # per-image intersection/union counts beside the record (tkpbench.stats), relative to summary.json
    counts_file: str = ""
    # what made the figure: CPU model and cores, torch threads, GPUs, package versions, determinism
    machine: dict[str, Any] = field(default_factory=dict)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        # "-dirty" when tracked code differs from the commit; results/ (this suite's own outputs) does not count
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/results"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name with its family and model numbers and the vector instructions torch's CPU
    kernels use: a name alone ("AMD EPYC" in a VM) covers generations whose kernels give other
    figures (measured: the demo retrained other models on two machines that both said "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def machine_info() -> dict[str, Any]:
    """Everything that can make one figure differ from another run of the same code: results are
    bit-identical on one kind of machine with one set of versions, not across them."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),  # the CPUs this process may use
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else "",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if cuda else "",
        "timm": timm.__version__,
        "numpy": np.__version__,
        "os": platform.platform(terse=True),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        **precision_settings(),  # TF32 (matmul, cuDNN), float32 matmul precision, determinism
    }


def machine_key(m: dict[str, Any]) -> str:
    """One line naming the machine kind and versions (what two comparable figures must share)."""
    if not m:
        return "unknown machine (record written before machine provenance)"
    where = f"{m.get('gpus')}x {m.get('gpu')}" if m.get("gpus") else f"{m.get('cpu')} ({m.get('cores')} cores)"
    if m.get("gpus") and (m.get("tf32_matmul") or m.get("tf32_cudnn")):
        where += ", TF32"  # cuDNN allows TF32 in convolutions by default: other numbers than fp32
    return f"{where}; torch {m.get('torch')}, timm {m.get('timm')}, numpy {m.get('numpy')}, Python {m.get('python')}"


def device_name() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({_cpu_model()}, {len(os.sched_getaffinity(0))} cores)"


def stamp(rec: StageRecord, wall_time_s: float) -> StageRecord:
    rec.commit = git_commit()
    rec.device = device_name()
    rec.machine = machine_info()
    rec.date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rec.wall_time_s = round(wall_time_s, 2)
    rec.command = command_line(sys.argv)
    return rec


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again, with no path of the machine it ran on: a
    module of this package run as a script (``python -m tkpbench.pipeline`` puts the module's
    absolute path in ``argv[0]``) is written ``python -m tkpbench.<module>``."""
    if not argv:
        return ""
    first = Path(argv[0])
    package = Path(__file__).resolve().parent
    if first.suffix == ".py" and first.is_absolute():
        try:
            parts = first.resolve().relative_to(package.parent).with_suffix("").parts
        except ValueError:
            head = ["python", first.name]  # a script outside the package: its name only
        else:
            module = ".".join(parts[:-1] if parts[-1] in ("__main__", "__init__") else parts)
            head = ["python", "-m", module]
    else:
        head = ["python", argv[0]] if first.suffix == ".py" else [argv[0]]
    return " ".join([*head, *argv[1:]])


def write_stage(results_dir: Path, run: str, rec: StageRecord, config: dict[str, Any]) -> Path:
    """Insert or replace ``rec`` in ``results_dir/run/summary.json`` (atomic read-modify-write)."""
    path = ResultsDir(results_dir).summary(run)
    data = load_summary(path) if path.is_file() else {"schema": SCHEMA_VERSION, "run": run, "stages": {}}
    data["config"] = config
    data.pop("cwd", None)  # records of earlier versions: nothing in a record depends on where it was made
    data["synthetic"] = bool(rec.synthetic)
    data["stages"][rec.stage] = asdict(rec)
    atomic_write_json(path, data)
    return path


def drop_stages(results_dir: Path, run: str, stages: list[str]) -> None:
    """Remove ``stages``' records (and their counts files) from ``run``'s summary.json (atomic)."""
    res = ResultsDir(results_dir)
    path = res.summary(run)
    data = load_summary(path)
    for stage in stages:
        data["stages"].pop(stage, None)
        res.counts(run, stage).unlink(missing_ok=True)
    atomic_write_json(path, data)


def load_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable summary.json ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION or "stages" not in data:
        raise ValueError(f"{path}: expected a tkpbench summary with schema {SCHEMA_VERSION} and 'stages'")
    return data


def per_class_dict(classes, iou) -> dict[str, float]:
    return {str(c): (None if v != v else round(float(v) * 100, 3)) for c, v in zip(classes, iou)}
