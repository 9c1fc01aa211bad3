"""The measured side: every ``results/<run>/summary.json``, grouped over training seeds, with the
per-image counts behind each interval and the machines each figure was made on."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tkpbench.records import load_summary, machine_key
from tkpbench.runs import ResultsDir
from tkpbench.stats import (
    Estimate,
    Measurement,
    load_counts,
    measurement,
    seed_and_image_interval,
    seed_interval,
    stack_measurements,
)


def variant(cfg: dict[str, Any]) -> str:
    """The Table 4 variant of a run's config; ViT-PCM's recipe (max pooling + ET/REG) is "vit_pcm"."""
    m = cfg.get("model", {})
    v = {"avg": "avg", "max": "max", "topk": "topk"}.get(m.get("pooling"), str(m.get("pooling")))
    if v == "topk" and m.get("k") == 1:
        v = "max"
    v += "+pce" if m.get("pce") else ""
    if m.get("et") or m.get("reg"):
        v = "vit_pcm" if v == "max" else v + "+et"
    return v


def group_name(run: str) -> str:
    """A run's seed group: ``demo-s2`` -> ``demo`` (runs of one config that differ only in the seed)."""
    return re.sub(r"-s\d+$", "", run)


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every readable ``results/*/summary.json`` with its variant, seed group, seed and folder
    added; an unreadable one is skipped with a warning."""
    out = []
    for path in ResultsDir(results).summaries():
        try:
            s = load_summary(path)
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        s["variant"] = variant(s.get("config", {}))
        s["group"] = group_name(s["run"])
        s["seed"] = s.get("config", {}).get("train", {}).get("seed", 0)
        s["_dir"] = path.parent
        out.append(s)
    return out


@dataclass
class Group:
    """The runs of one config over training seeds (``<name>-s<seed>``), and their statistics."""

    name: str
    variant: str
    synthetic: bool
    runs: list[dict[str, Any]]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]

    def records(self, stage: str) -> list[dict[str, Any]]:
        return [r["stages"][stage] for r in self.runs if stage in r["stages"]]

    def dataset(self, stage: str) -> str | None:
        recs = self.records(stage)
        return recs[0]["dataset"] if recs else None

    def measurement(self, stage: str, suffix: str = "", seeds: list[int] | None = None) -> Measurement | None:
        """The counts of one measurement (``suffix``: "", "_crf", a ladder rung's) of the given seeds,
        stacked (S, N, C) with its image ids; None when a run has no counts file,
        lacks the measurement or was scored on other images."""
        ms, ids = [], None
        for r in self.runs:
            if seeds is not None and r["seed"] not in seeds:
                continue
            rec = r["stages"].get(stage)
            if not rec or not rec.get("counts_file") or not (r["_dir"] / rec["counts_file"]).is_file():
                return None
            c = load_counts(r["_dir"] / rec["counts_file"])
            m = measurement(c, suffix)
            if m is None or (ids is not None and not np.array_equal(ids, c["ids"])):
                return None
            ids = c["ids"]
            ms.append(m)
        if not ms:
            return None
        return stack_measurements(ms)

    def counts(self, stage: str, crf: bool, seeds: list[int] | None = None):
        """(S, N, C) inter and union of the given seeds, or None when a run has no counts file."""
        m = self.measurement(stage, "_crf" if crf else "", seeds)
        return None if m is None else (m.inter, m.union)

    def ladder(self) -> list[dict[str, Any]] | None:
        """The DeepLab evaluation ladder's rungs (``segment.ladder``) of the first seed's record, or
        None for a record written before the ladder existed."""
        recs = self.records("seg")
        return recs[0].get("protocol", {}).get("ladder") if recs else None

    def estimate(self, stage: str, crf: bool = False) -> Estimate | None:
        """Mean over seeds with the 95% interval over seeds and images; from the records alone
        (no interval) when the per-image counts are missing."""
        return self.estimate_of(stage, "_crf" if crf else "", [r.get("miou_crf" if crf else "miou") for r in self.records(stage)])

    def estimate_of(self, stage: str, suffix: str, recorded: list[float | None]) -> Estimate | None:
        """``estimate`` of any measurement: from its counts, else from the recorded per-seed values."""
        m = self.measurement(stage, suffix)
        if m is not None:
            return seed_and_image_interval(m.inter, m.union)
        vals = [v for v in recorded if v is not None]
        if not vals:
            return None
        e = seed_interval(vals)
        return e if len(vals) > 1 else Estimate(vals[0], float("nan"), float("nan"), 1, method="no per-image counts")

    def machines(self) -> set[str]:
        return {machine_key(rec.get("machine", {})) for st in ("mask", "seg") for rec in self.records(st)}


def make_groups(runs: list[dict]) -> list[Group]:
    by: dict[tuple, list[dict]] = {}
    for s in runs:
        if s["run"].startswith("sweep_"):
            continue
        by.setdefault((s["group"], s["variant"], bool(s.get("synthetic"))), []).append(s)
    return [Group(n, v, syn, sorted(rs, key=lambda r: r["seed"])) for (n, v, syn), rs in sorted(by.items())]
