"""Tables 1-4 of the paper, published next to measured, and the Fig. 4 / Fig. 5 figures.

    python -m tkpbench.report [RESULTS_DIR]      # prints the tables, writes RESULTS_DIR/TABLES.md

Rows for methods this suite does not run are the paper's published figures, marked
"published". Rows the suite runs show the published figure, the measured one and the
difference, with the run, commit, date, device and dataset of each measured cell. Runs on
generated data (``synthetic = true``) are reported under their own heading, never as a
reproduction of the paper.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from tkpbench import cli
from tkpbench.config import config_from_dict
from tkpbench.data.common import read_mask, voc_palette
from tkpbench.data.transforms import build_dataset
from tkpbench.io import atomic_write_text
from tkpbench.records import load_summary, machine_key
from tkpbench.runs import RunDir
from tkpbench.stats import Estimate, load_counts, paired_difference, seed_and_image_interval, seed_interval, verdict

# SPEC Sec. 5 (the paper's tables), mIoU %.
TABLE1 = [
    ("MCTformer", "CVPR22", "DeiT-S", 61.7),
    ("PPC", "CVPR22", "ResNet38", 61.5),
    ("SIPE", "CVPR22", "ResNet50", 58.6),
    ("AFA", "CVPR22", "MiT-B1", 66.0),
    ("ViT-PCM", "ECCV22", "ViT-B/16", 71.4),
    ("ToCo", "CVPR23", "ViT-B/16", 72.2),
    ("TKP-PCL", "", "ViT-B/16", 74.6),
]
TABLE2 = [
    ("MCTformer", "CVPR22", "DeiT-S", 61.7),
    ("PPC", "CVPR22", "ResNet38", 61.5),
    ("SIPE", "CVPR22", "ResNet50", 58.6),
    ("AFA", "CVPR22", "MiT-B1", 63.8),
    ("ViT-PCM", "ECCV22", "ViT-B/16", 69.3),
    ("ToCo", "CVPR23", "ViT-B/16", 70.5),
    ("SAPC-CS", "ICME23", "MiT-B1", 67.5),
    ("TKP-PCL", "", "ViT-B/16", 72.2),
]
TABLE3 = [
    ("MCTformer", "CVPR22", "Resnet38", 42.0),
    ("SIPE", "CVPR22", "Resnet38", 43.6),
    ("AFA", "CVPR22", "MiT-B1", 38.9),
    ("ViT-PCM", "ECCV22", "ViT-B/16", 45.0),
    ("ToCo", "CVPR23", "ViT-B/16", 42.3),
    ("SAPC-CS", "ICME23", "MiT-B1", 39.9),
    ("TKP-PCL", "", "ViT-B/16", 45.6),
]
TABLE4 = {"avg": (60.5, 59.6), "max": (70.1, 68.6), "topk": (72.9, 69.8), "topk+pce": (74.6, 72.2)}
# Table 4's "Max-Pooling (ViT-PCM)" row is vit_pcm_max.toml: ViT-PCM's pooling in TKP-PCL's training
# (MCE only), which is what the paper's ablation varies; ViT-PCM itself is baselines/vit_pcm.toml
VARIANT_LABEL = {
    "avg": "Avg-Pooling",
    "max": "Max-Pooling (ViT-PCM's pooling, TKP-PCL's training)",
    "topk": "top-K",
    "topk+pce": "top-K + PCE",
}
# which measured variant a method row of Tables 1-3 corresponds to
METHOD_VARIANT = {"TKP-PCL": "topk+pce", "ViT-PCM": "vit_pcm"}
# Published cells that do not measure what the row's measured cell does (checked against the
# cited papers; the marker goes into the published cell, the text into the table's notes).
FOOTNOTES = {
    ("seg", "voc", "ViT-PCM"): "ViT-PCM's 69.3 is its baseline pseudo-masks (BPM) on VOC val (ViT-PCM paper, abstract: "
    "'we achieve 69.3% mIoU on PascalVOC 2012 val set' on BPM), not DeepLab-v2 trained on pseudo masks as the "
    "measured cell and TKP-PCL's 72.2: not like for like",
    ("seg", "coco", "ViT-PCM"): "ViT-PCM's 45.0 on COCO val comes from the same paper as its VOC BPM figure and is taken "
    "here as measured the same way (BPM, not DeepLab-v2; not verified against its COCO table): not like for like",
}


COCO_PROTOCOL_TEXT = {
    "tkpbench": "every val2014 image, largest instance first, crowd 255",
    "vit_pcm": "ViT-PCM's parse_coco.py: images >= 256 px with annotations, first annotation wins, crowd keeps its class",
}


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
    out = []
    for path in sorted(Path(results).glob("*/summary.json")):
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


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _prov(stage: dict[str, Any], run: str) -> str:
    return (
        f"{run} @ {stage.get('commit', '?')}, {stage.get('date', '?')[:10]}, {stage.get('device', '?')}, "
        f"{stage.get('dataset')}/{stage.get('split')}, {stage.get('num_images')} images"
    )


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

    def counts(self, stage: str, crf: bool, seeds: list[int] | None = None):
        """(S, N, C) inter and union of the given seeds, or None when a run has no counts file."""
        inters, unions, ids = [], [], None
        for r in self.runs:
            if seeds is not None and r["seed"] not in seeds:
                continue
            rec = r["stages"].get(stage)
            if not rec or not rec.get("counts_file") or not (r["_dir"] / rec["counts_file"]).is_file():
                return None
            c = load_counts(r["_dir"] / rec["counts_file"])
            key = "_crf" if crf else ""
            if f"inter{key}" not in c or (ids is not None and not np.array_equal(ids, c["ids"])):
                return None
            ids = c["ids"]
            inters.append(c[f"inter{key}"])
            unions.append(c[f"union{key}"])
        return (np.stack(inters), np.stack(unions)) if inters else None

    def estimate(self, stage: str, crf: bool = False) -> Estimate | None:
        """Mean over seeds with the 95% interval over seeds and images; from the records alone
        (no interval) when the per-image counts are missing."""
        c = self.counts(stage, crf)
        if c is not None:
            return seed_and_image_interval(*c)
        vals = [r.get("miou_crf" if crf else "miou") for r in self.records(stage)]
        vals = [v for v in vals if v is not None]
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


def cell(e: Estimate | None) -> str:
    """``73.1 ± 1.2 (n=3)``: mean over n seeds ± the half-width of its 95% interval; a bare value
    when there is no interval."""
    if e is None:
        return "-"
    if not np.isfinite(e.low):
        return f"{e.value:.1f} (n={e.n}, no interval)"
    return e.cell()


def _inside(e: Estimate | None, published: float) -> str:
    if e is None or not np.isfinite(e.low):
        return ""
    return "yes" if e.contains(published) else f"no ({e.value - published:+.1f})"


def paired(a: Group, b: Group, stage: str, crf: bool) -> Estimate | None:
    """Δ = a - b over the seeds both ran, on the same images (None without counts or shared seeds)."""
    shared = sorted(set(a.seeds) & set(b.seeds))
    ca, cb = a.counts(stage, crf, shared), b.counts(stage, crf, shared)
    if not shared or ca is None or cb is None or ca[0].shape[1] != cb[0].shape[1]:
        return None
    return paired_difference(*ca, *cb)


def delta_cell(d: Estimate | None) -> str:
    if d is None:
        return ""
    return f"{d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}] " + ("within noise" if verdict(d) == "within noise" else "excludes 0")


PM = (
    "± = half-width of the 95% interval over training seeds (Student t) and test images (bootstrap "
    "standard error), tkpbench.stats; n = seeds"
)


def _machine_notes(groups: list[Group]) -> list[str]:
    keys = sorted(set().union(*[g.machines() for g in groups])) if groups else []
    if not keys:
        return []
    notes = [f"machine: {k}" for k in keys]
    if len(keys) > 1:
        notes.insert(
            0,
            "WARNING: the figures in this table come from different machines or package versions; "
            "results are bit-identical only on one kind of machine with one set of versions, so "
            "differences between rows may be partly the machines'",
        )
    return notes


def build_tables(runs: list[dict]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """[(title, header, rows, notes)] for the real-data tables and the demo section."""
    groups = make_groups(runs)
    real = [g for g in groups if not g.synthetic]
    demo = [g for g in groups if g.synthetic]
    tables = []

    def pick(var: str, dataset: str, stage: str) -> Group | None:
        cands = [g for g in real if g.variant == var and g.dataset(stage) == dataset]
        return (
            max(
                cands,
                key=lambda g: (len(g.runs), max(r["stages"][stage].get("date", "") for r in g.runs if stage in r["stages"])),
            )
            if cands
            else None
        )

    def method_table(title, published, dataset, stage, crf_cols):
        header = (
            ["method", "pub.", "backbone", "published", "measured"]
            + (["measured +CRF"] if crf_cols else [])
            + ["paper inside 95% CI?"]
        )
        rows, notes, used = [], [PM], []
        for name, pub, bb, val in published:
            var = METHOD_VARIANT.get(name)
            g = pick(var, dataset, stage) if var else None
            note = FOOTNOTES.get((stage, dataset, name))
            shown = _fmt(val) + (" †" if note else "")
            if note:
                notes.append(f"† {note}")
            if g is None:
                rows.append([name, pub, bb, shown, "published" if not var else "not run"] + ([""] if crf_cols else []) + [""])
                continue
            used.append(g)
            e = g.estimate(stage)
            ec = g.estimate(stage, crf=True) if crf_cols else None
            inside = "not comparable" if note else _inside(ec if crf_cols else e, val)
            rows.append([name, pub, bb, shown, cell(e)] + ([cell(ec)] if crf_cols else []) + [inside])
            notes += [f"{name}: {_prov(st, g.name)}" for st in g.records(stage)]
            if dataset == "coco":
                protocols = sorted({r.get("config", {}).get("data", {}).get("coco_protocol", "tkpbench") for r in g.runs})
                notes.append(f"{name}: COCO protocol {', '.join(protocols)} ({COCO_PROTOCOL_TEXT[protocols[0]]})")
        return (title, header, rows, notes + _machine_notes(used))

    tables.append(
        method_table(
            "Table 1. Pseudo masks on VOC train (mIoU %); 'measured' is before the CRF, "
            "'measured +CRF' after (the paper's column)",
            TABLE1,
            "voc",
            "mask",
            True,
        )
    )
    tables.append(
        method_table("Table 2. DeepLab-v2 on VOC 2012 val, trained on pseudo masks only (mIoU %)", TABLE2, "voc", "seg", False)
    )
    tables.append(
        method_table("Table 3. DeepLab-v2 on COCO 2014 val, trained on pseudo masks only (mIoU %)", TABLE3, "coco", "seg", False)
    )
    tables.append(
        ablation_table(
            "Table 4. Ablation on VOC (mask = pseudo masks on train after CRF; seg = DeepLab "
            "on val); Δ = row - Max-Pooling, paired over shared seeds and images",
            real,
        )
    )
    if demo:
        tables.append(demo_table(demo))
    return tables


def demo_table(groups: list[Group]):
    """Runs on generated data: measured values with their spread, the all-background baseline, and
    each variant's paired difference from the max-pooling demo run; no published column."""
    header = ["run", "variant", "mask (pre-CRF)", "mask (CRF)", "all-bg", "seg", "Δ mask (CRF) vs max", "Δ seg vs max"]
    rows, notes = [], [PM, "all-bg: the mIoU of predicting background everywhere on the same pixels"]
    base = next((g for g in groups if g.variant == "max"), None)
    for g in groups:
        mk = g.records("mask")
        bg = np.mean([r["miou_all_background"] for r in mk if r.get("miou_all_background") is not None]) if mk else None
        dm = paired(g, base, "mask", True) if base is not None and g is not base else None
        ds = paired(g, base, "seg", False) if base is not None and g is not base else None
        rows.append(
            [
                g.name,
                VARIANT_LABEL.get(g.variant, g.variant),
                cell(g.estimate("mask")),
                cell(g.estimate("mask", crf=True)),
                _fmt(bg),
                cell(g.estimate("seg")),
                delta_cell(dm),
                delta_cell(ds),
            ]
        )
        notes += [
            f"{r['run']} {st}: {_prov(r['stages'][st], r['run'])}" for r in g.runs for st in ("mask", "seg") if st in r["stages"]
        ]
    return ("Demo runs on generated data (NOT a reproduction of the paper)", header, rows, notes + _machine_notes(groups))


def ablation_table(title: str, groups: list[Group], dataset: str | None = "voc"):
    header = [
        "variant",
        "published mask",
        "measured mask (CRF)",
        "Δ mask vs max",
        "published seg",
        "measured seg",
        "Δ seg vs max",
    ]
    rows, notes, used = [], [PM], []
    cands = {
        var: [
            g
            for g in groups
            if g.variant == var and (dataset is None or g.dataset("mask") == dataset or g.dataset("seg") == dataset)
        ]
        for var in TABLE4
    }
    base = cands["max"][0] if cands["max"] else None
    for var, (pm, ps) in TABLE4.items():
        if not cands[var]:
            rows.append([VARIANT_LABEL[var], _fmt(pm), "not run", "", _fmt(ps), "not run", ""])
            continue
        for g in cands[var]:
            used.append(g)
            other = base is not None and g is not base
            rows.append(
                [
                    f"{VARIANT_LABEL[var]} [{g.name}]",
                    _fmt(pm),
                    cell(g.estimate("mask", crf=True)),
                    delta_cell(paired(g, base, "mask", True)) if other else "",
                    _fmt(ps),
                    cell(g.estimate("seg")),
                    delta_cell(paired(g, base, "seg", False)) if other else "",
                ]
            )
            notes += [
                f"{r['run']} {st}: {_prov(r['stages'][st], r['run'])}"
                for r in g.runs
                for st in ("mask", "seg")
                if st in r["stages"]
            ]
    notes.append(
        "published Δ (paper, Table 4 vs Max-Pooling): "
        + ", ".join(
            f"{VARIANT_LABEL[v]} {TABLE4[v][0] - TABLE4['max'][0]:+.1f} / {TABLE4[v][1] - TABLE4['max'][1]:+.1f}"
            for v in TABLE4
            if v != "max"
        )
    )
    return (title, header, rows, notes + _machine_notes(used))


def per_class_tables(runs: list[dict]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """Per-class IoU of every measured run side by side, one table per (data, stage), as ToCo/AFA print them.
    Pseudo masks use the after-CRF column."""
    groups: dict[tuple, list[tuple[str, dict[str, float | None]]]] = {}
    for s in runs:
        for name, st in s["stages"].items():
            key = ("generated data" if s.get("synthetic") else st["dataset"], name, st["split"])
            per = st.get("per_class_crf") if name == "mask" and st.get("per_class_crf") else st.get("per_class")
            if per:
                groups.setdefault(key, []).append((s["run"], per))
    out = []
    for (data, stage, split), cols in sorted(groups.items()):
        classes = list(cols[0][1])
        rows = [[c] + [_fmt(per.get(c)) for _, per in cols] for c in classes]
        what = "pseudo masks after CRF" if stage == "mask" else "DeepLab-v2"
        out.append((f"Per-class IoU %, {what}, {data} {split}", ["class"] + [r for r, _ in cols], rows, []))
    return out


def to_markdown(tables) -> str:
    out = [
        "# TKP-PCL: published vs measured",
        "",
        "Generated by `python -m tkpbench.report`. Published figures are the paper's (SPEC Sec. 5); "
        "measured ones come from `results/<run>/summary.json`, with provenance under each table.",
        "",
    ]
    for title, header, rows, notes in tables:
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        if notes:
            out += ["", *[f"- {n}" for n in notes]]
        out.append("")
    return "\n".join(out)


def to_json(tables) -> str:
    """Every table as {title, header, rows, notes}: for scripts."""
    return json.dumps([{"title": t, "header": h, "rows": r, "notes": n} for t, h, r, n in tables], indent=2) + "\n"


def to_csv(tables) -> str:
    """Every table as CSV, one block per table after a '# title' line: for spreadsheets."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for title, header, rows, _ in tables:
        buf.write(f"# {title}\n")
        w.writerow(header)
        w.writerows(rows)
        buf.write("\n")
    return buf.getvalue()


def print_tables(tables, console: Console | None = None) -> None:
    """Tables that fold, never truncate: in a narrow terminal a cell wraps onto more lines, and
    when even that does not fit, each row is printed as 'header: value' lines instead."""
    con = console or Console()
    for title, header, rows, notes in tables:
        longest_word = max(len(w) for x in [*header, *[c for r in rows for c in r]] for w in (x.split() or [""]))
        if con.width < len(header) * (min(longest_word, 14) + 3):  # too narrow for a grid: one block per row
            con.print(f"[bold]{title}[/bold]", overflow="fold")
            for r in rows:
                con.print("  " + "\n    ".join(f"{h}: {v}" for h, v in zip(header, r) if v), overflow="fold", highlight=False)
            continue
        t = Table(title=title, title_justify="left", expand=False)
        for h in header:
            t.add_column(h, justify="left" if h in ("method", "variant", "pub.", "backbone", "run") else "right", overflow="fold")
        for r in rows:
            t.add_row(*r)
        con.print(t)


def fig4_sweep(runs: list[dict], out: Path) -> Path | None:
    """Fig. 4: pseudo-mask mIoU (after CRF) against k and against eps, from the sweep_* runs."""
    ks = sorted(
        (s["config"]["model"]["k"], s["stages"]["mask"]["miou_crf"])
        for s in runs
        if s["run"].startswith("sweep_k") and "mask" in s["stages"]
    )
    es = sorted(
        (s["config"]["model"]["eps"], s["stages"]["mask"]["miou_crf"])
        for s in runs
        if s["run"].startswith("sweep_eps") and "mask" in s["stages"]
    )
    if not ks and not es:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for ax, pts, label in ((axes[0], ks, "k (top-K)"), (axes[1], es, "eps (PCE threshold)")):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("mask mIoU % (CRF)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def fig_seeds(groups: list[Group], out: Path) -> Path | None:
    """Each variant's seeds as points and its 95% interval (seeds and images) as a bar, for the
    pseudo masks (after CRF) and DeepLab, real-data groups and demo groups side by side."""
    shown = [g for g in groups if g.records("mask") or g.records("seg")]
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, (stage, crf, label) in zip(axes, (("mask", True, "pseudo masks, after CRF"), ("seg", False, "DeepLab"))):
        for x, g in enumerate(shown):
            vals = [r.get("miou_crf" if crf else "miou") for r in g.records(stage)]
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            ax.plot([x] * len(vals), vals, "o", color="tab:blue", alpha=0.6, label="one seed" if x == 0 else None)
            e = g.estimate(stage, crf)
            if e is not None and np.isfinite(e.low):
                ax.errorbar(
                    [x + 0.15],
                    [e.value],
                    yerr=[[e.value - e.low], [e.high - e.value]],
                    fmt="s",
                    color="black",
                    capsize=4,
                    label="mean, 95% CI" if x == 0 else None,
                )
        ax.set_xticks(range(len(shown)), [f"{g.name}\n{'(demo)' if g.synthetic else ''}" for g in shown], fontsize=8)
        ax.set_ylabel("mIoU %")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def _pyplot():
    # lazy: matplotlib.pyplot takes about 0.4 s to import (measured, -X importtime); only figures need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    """Write a figure as PNG atomically (a temporary file, then rename) and close it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(out)
    return out


def fig_curves(run_dir: Path, out: Path) -> Path | None:
    """Training curves of one run from its ``log.jsonl``: each loss term, the learning rate and the
    validation metrics per epoch (TKP-PCL and, when present, its DeepLab)."""
    logs = [
        (name, p) for name, p in (("TKP-PCL", run_dir / "log.jsonl"), ("DeepLab", run_dir / "seg" / "log.jsonl")) if p.is_file()
    ]
    if not logs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(logs), 3, figsize=(12, 3.2 * len(logs)), dpi=90, squeeze=False)
    for row, (name, path) in zip(axes, logs):
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        steps = [r for r in recs if "lr" in r]
        terms = [k for k in steps[0] if k not in ("step", "epoch", "lr", "images_per_s", "peak_mem_gib")] if steps else []
        for k in terms:
            row[0].plot([r["step"] for r in steps], [r[k] for r in steps], label=k)
        row[0].set_title(f"{name}: loss terms", fontsize=10)
        row[0].legend(fontsize=8)
        row[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
        row[1].set_title(f"{name}: learning rate", fontsize=10)
        vals = [r for r in recs if any(k.startswith("val_") for k in r)]
        for k in sorted({k for r in vals for k in r if k.startswith("val_")}):
            pts = [(r["epoch"], r[k]) for r in vals if k in r]  # a metric may be missing from some epochs
            row[2].plot([e for e, _ in pts], [v for _, v in pts], "o-", label=k)
        row[2].set_title(f"{name}: validation per epoch", fontsize=10)
        if vals:
            row[2].legend(fontsize=8)
        else:
            row[2].set_visible(False)  # DeepLab is evaluated once, at the end
        for ax in row:
            ax.grid(alpha=0.3)
            ax.set_xlabel("step" if ax is not row[2] else "epoch")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    return _save(fig, out)


def fig_per_class(runs: list[dict], out: Path) -> Path | None:
    """Per-class IoU of the pseudo masks after the CRF, one bar per run side by side (the paper
    gives no per-class figures to put beside them)."""
    shown = [s for s in runs if s["stages"].get("mask", {}).get("per_class_crf")]
    if not shown:
        return None
    plt = _pyplot()
    classes = list(shown[0]["stages"]["mask"]["per_class_crf"])
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(classes) * max(1, len(shown) / 2)), 3.6), dpi=90)
    for n, s in enumerate(shown):
        per = s["stages"]["mask"]["per_class_crf"]
        ax.bar(np.arange(len(classes)) + n * width, [per.get(c) or 0 for c in classes], width, label=s["run"])
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU % (pseudo masks, CRF)")
    ax.legend(fontsize=7, ncol=min(4, len(shown)))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, out)


def fig5_grid(
    images,
    gts,
    preds_a,
    preds_b,
    out: Path,
    titles=("image", "ground truth", "ViT-PCM max", "TKP-PCL"),
    ids: list[str] | None = None,
    class_names: list[str] | None = None,
    extra_blocks: tuple = (),
) -> Path:
    """Fig. 5 style grid: a header row of column titles, then one row per image (its id in the
    image cell), columns image | GT | baseline | TKP-PCL (palette colours), then a legend of the
    classes that appear. ``extra_blocks``: further (images, gts, preds_a, preds_b, titles, ids)
    blocks stacked below with their own header (DeepLab's segmentation beside the pseudo masks)."""
    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    ch, cw = 160, 240  # every cell the same size, each picture fitted inside it (columns stay aligned)

    def cell(arr: np.ndarray, resample, label: str = "") -> np.ndarray:
        h, w = arr.shape[:2]
        f = min(ch / h, cw / w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        small = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
        canvas = np.full((ch, cw, 3), 255, np.uint8)
        y0, x0 = (ch - nh) // 2, (cw - nw) // 2
        canvas[y0 : y0 + nh, x0 : x0 + nw] = small
        if label:
            im = Image.fromarray(canvas)
            d = ImageDraw.Draw(im)
            d.rectangle([0, 0, 7 * len(label) + 6, 14], fill="white")
            d.text((3, 1), label, fill="black")
            canvas = np.asarray(im)
        return canvas

    blocks = [(images, gts, preds_a, preds_b, titles, ids), *extra_blocks]
    parts = []
    for b_images, b_gts, b_a, b_b, b_titles, b_ids in blocks:
        header = Image.new("RGB", (4 * cw, 22), "white")
        d = ImageDraw.Draw(header)
        for n, t in enumerate(b_titles):
            d.text((n * cw + 6, 5), t, fill="black")
        parts.append(np.asarray(header))
        parts += [
            np.concatenate([cell(img, Image.BILINEAR, i)] + [cell(pal[m], Image.NEAREST) for m in (gt, a, b)], axis=1)
            for img, gt, a, b, i in zip(b_images, b_gts, b_a, b_b, b_ids or [""] * len(b_images))
        ]
    masks = [m for blk in blocks for group in blk[1:4] for m in group]
    present = sorted({int(c) for m in masks for c in np.unique(m) if c != 255})
    if class_names:
        per_row = 6
        legend = Image.new("RGB", (4 * cw, 20 * ((len(present) + per_row - 1) // per_row) + 4), "white")
        d = ImageDraw.Draw(legend)
        for n, c in enumerate(present):
            x, y = (n % per_row) * (4 * cw // per_row) + 6, (n // per_row) * 20 + 4
            d.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in pal[c]), outline="black")
            d.text((x + 18, y), class_names[c] if c < len(class_names) else str(c), fill="black")
        parts.append(np.asarray(legend))
    grid = np.concatenate(parts, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(out)
    return out


def _deeplab_block(cfg, runs_dir: Path, baseline: str, ours: str, n: int) -> tuple:
    """The paper's Fig. 5 proper: DeepLab's segmentation of val images (``seg/examples/``, written by
    the DeepLab evaluation) of both runs, or nothing when either run has none."""
    a_dir, b_dir = RunDir(runs_dir / baseline).seg.examples, RunDir(runs_dir / ours).seg.examples
    if not (a_dir.is_dir() and b_dir.is_dir()):
        return ()
    ds = build_dataset(cfg.data, cfg.data.val_split)
    idx = [i for i in range(len(ds)) if (a_dir / f"{ds.ids[i]}.png").is_file() and (b_dir / f"{ds.ids[i]}.png").is_file()][:n]
    if not idx:
        return ()
    block = (
        [ds.image(i) for i in idx],
        [ds.mask(i) for i in idx],
        [read_mask(a_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        [read_mask(b_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        (f"{cfg.data.val_split} image (id)", "ground truth", f"DeepLab on {baseline}'s masks", f"DeepLab on {ours}'s masks"),
        [ds.ids[i] for i in idx],
    )
    return (block,)


def fig5_from_runs(results: Path, runs_dir: Path, baseline: str, ours: str, n: int = 4) -> Path | None:
    """Fig. 5 from two runs: their pseudo masks (after CRF) on the mask split and, below, DeepLab's
    segmentation of val images trained on each run's masks (as the paper's Fig. 5)."""

    a_dir, b_dir = runs_dir / baseline / "pseudo" / "crf", runs_dir / ours / "pseudo" / "crf"
    summ = results / ours / "summary.json"
    if not (a_dir.is_dir() and b_dir.is_dir() and summ.is_file()):
        return None
    summary = load_summary(summ)
    cfg = config_from_dict(summary["config"])
    root = Path(cfg.data.root)
    if not root.is_absolute():  # relative to where the run was measured, not to where the report runs
        cfg.data.root = str(Path(summary.get("cwd", ".")) / root)
    ds = build_dataset(cfg.data, cfg.data.mask_split)
    idx = [i for i in range(len(ds)) if (a_dir / f"{ds.ids[i]}.png").is_file() and (b_dir / f"{ds.ids[i]}.png").is_file()][:n]
    if not idx:
        return None
    return fig5_grid(
        [ds.image(i) for i in idx],
        [ds.mask(i) for i in idx],
        [read_mask(a_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        [read_mask(b_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
        results / f"fig5_{ours}_vs_{baseline}.png",
        titles=("image (id)", "ground truth", f"{baseline} (max, CRF)", f"{ours} (top-K + PCE, CRF)"),
        ids=[ds.ids[i] for i in idx],
        class_names=list(ds.classes),
        extra_blocks=_deeplab_block(cfg, runs_dir, baseline, ours, n),
    )


def _main(argv: list[str] | None = None) -> int:
    p = cli.parser("tkpbench report", __doc__)
    p.add_argument("results", nargs="?", type=Path, default=Path("results"))
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders (for Fig. 5 and the training curves)")
    p.add_argument(
        "--format",
        choices=["table", "md", "json", "csv"],
        default="table",
        help="what to print: rich tables (default), or Markdown / JSON / CSV to paste elsewhere; "
        "RESULTS/TABLES.md is always written whole",
    )
    args = p.parse_args(argv)
    runs = load_results(args.results)
    tables = build_tables(runs)
    if args.format == "table":
        print_tables(tables)
    else:
        print({"md": to_markdown, "json": to_json, "csv": to_csv}[args.format](tables + per_class_tables(runs)), end="")
    md = to_markdown(tables + per_class_tables(runs))
    figs = []
    f4 = fig4_sweep(runs, args.results / "fig4_sweep.png")
    if f4:
        figs.append(f4)
    groups = make_groups(runs)
    for synthetic in (False, True):
        base = next((g for g in groups if g.synthetic == synthetic and g.variant == "max"), None)
        ours = next((g for g in groups if g.synthetic == synthetic and g.variant == "topk+pce"), None)
        shared = sorted(set(base.seeds) & set(ours.seeds)) if base and ours else []
        if shared:
            pick = lambda g: next(r["run"] for r in g.runs if r["seed"] == shared[0])  # noqa: E731
            f5 = fig5_from_runs(args.results, args.runs, pick(base), pick(ours))
            if f5:
                figs.append(f5)
    figs.append(fig_seeds(groups, args.results / "fig_seeds.png"))
    figs.append(fig_per_class(runs, args.results / "fig_per_class.png"))
    for s in runs:  # the training curves of every run whose folder is here
        if (args.runs / s["run"] / "log.jsonl").is_file():
            figs.append(fig_curves(args.runs / s["run"], args.results / s["run"] / "curves.png"))
    figs = [f for f in figs if f]
    if figs:
        md += "\n## Figures\n\n" + "\n".join(f"![{f.stem}]({f.relative_to(args.results)})" for f in figs) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "TABLES.md", md)
    print(
        f"wrote {args.results / 'TABLES.md'}" + "".join(f", {f}" for f in figs),
        file=sys.stderr if args.format != "table" else sys.stdout,
    )
    return 0


main = cli.entry(_main)


if __name__ == "__main__":
    sys.exit(main())
