"""The one results record: ``results/<run>/summary.json``, read by ``tkpbench.report``.

A summary holds one entry per stage ("mask": pseudo masks, Table 1 / Table 4 mask column;
"seg": DeepLab, Tables 2-3 / Table 4 seg column). Each entry says how it was measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tkpbench.io import atomic_write_json

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
    # the config values the measured outputs depend on (tkpbench.runs.STAGE_KEYS); a change re-measures
    settings: dict[str, Any] = field(default_factory=dict)
    # per-image intersection/union counts beside the record (tkpbench.stats), relative to summary.json
    counts_file: str = ""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        # "-dirty" when tracked code differs from the commit; results/ (this suite's own outputs) does not count
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/results"],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def device_name() -> str:

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)"


def stamp(rec: StageRecord, wall_time_s: float) -> StageRecord:
    rec.commit = git_commit()
    rec.device = device_name()
    rec.date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rec.wall_time_s = round(wall_time_s, 2)
    rec.command = " ".join([Path(sys.executable).name, *sys.argv]) if sys.argv else ""
    return rec


def write_stage(results_dir: Path, run: str, rec: StageRecord, config: dict[str, Any]) -> Path:
    """Insert or replace ``rec`` in ``results_dir/run/summary.json`` (atomic read-modify-write)."""
    path = Path(results_dir) / run / "summary.json"
    data = load_summary(path) if path.is_file() else {"schema": SCHEMA_VERSION, "run": run, "stages": {}}
    data["config"] = config
    data["synthetic"] = bool(rec.synthetic)
    data["stages"][rec.stage] = asdict(rec)
    atomic_write_json(path, data)
    return path


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
