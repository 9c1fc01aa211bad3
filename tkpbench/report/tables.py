"""Tables 1-4 of the paper, published next to measured with 95% intervals, the demo section and
the per-class tables; each table is ``(title, header, rows, notes)`` of strings."""

from __future__ import annotations

from typing import Any

import numpy as np

from tkpbench.report import published
from tkpbench.report.load import Group, make_groups
from tkpbench.stats import Estimate, paired_difference, verdict

Table = tuple[str, list[str], list[list[str]], list[str]]

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

COCO_PROTOCOL_TEXT = {
    "tkpbench": "every val2014 image, largest instance first, crowd 255",
    "vit_pcm": "ViT-PCM's parse_coco.py: images >= 256 px with annotations, first annotation wins, crowd keeps its class",
}

PM = (
    "± = half-width of the 95% interval over training seeds (Student t) and test images (bootstrap "
    "standard error), tkpbench.stats; n = seeds"
)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _prov(stage: dict[str, Any], run: str) -> str:
    return (
        f"{run} @ {stage.get('commit', '?')}, {stage.get('date', '?')[:10]}, {stage.get('device', '?')}, "
        f"{stage.get('dataset')}/{stage.get('split')}, {stage.get('num_images')} images"
    )


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


def _provenance(g: Group) -> list[str]:
    return [f"{r['run']} {st}: {_prov(r['stages'][st], r['run'])}" for r in g.runs for st in ("mask", "seg") if st in r["stages"]]


def build_tables(runs: list[dict]) -> list[Table]:
    """[(title, header, rows, notes)] for the real-data tables and the demo section."""
    figures = published.load()
    groups = make_groups(runs)
    real = [g for g in groups if not g.synthetic]
    demo = [g for g in groups if g.synthetic]

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

    def method_table(title: str, number: int, crf_cols: bool) -> Table:
        stage, dataset = published.COLUMNS[published.TABLE_COLUMNS[number][0]]
        header = (
            ["method", "pub.", "backbone", "published", "measured"]
            + (["measured +CRF"] if crf_cols else [])
            + ["paper inside 95% CI?"]
        )
        rows, notes, used = [], [PM], []
        for f in published.table(figures, number):
            name, var = f.method, METHOD_VARIANT.get(f.method)
            g = pick(var, dataset, stage) if var else None
            shown = _fmt(f.value) + (" †" if f.note else "")
            if f.note:
                notes.append(f"† {f.note}")
            if g is None:
                rows.append(
                    [name, f.venue, f.backbone, shown, "published" if not var else "not run"] + ([""] if crf_cols else []) + [""]
                )
                continue
            used.append(g)
            e = g.estimate(stage)
            ec = g.estimate(stage, crf=True) if crf_cols else None
            inside = "not comparable" if f.note else _inside(ec if crf_cols else e, f.value)
            rows.append([name, f.venue, f.backbone, shown, cell(e)] + ([cell(ec)] if crf_cols else []) + [inside])
            notes += [f"{name}: {_prov(st, g.name)}" for st in g.records(stage)]
            if dataset == "coco":
                protocols = sorted({r.get("config", {}).get("data", {}).get("coco_protocol", "tkpbench") for r in g.runs})
                notes.append(f"{name}: COCO protocol {', '.join(protocols)} ({COCO_PROTOCOL_TEXT[protocols[0]]})")
        return (title, header, rows, notes + _machine_notes(used))

    tables = [
        method_table(
            "Table 1. Pseudo masks on VOC train (mIoU %); 'measured' is before the CRF, "
            "'measured +CRF' after (the paper's column)",
            1,
            True,
        ),
        method_table("Table 2. DeepLab-v2 on VOC 2012 val, trained on pseudo masks only (mIoU %)", 2, False),
        method_table("Table 3. DeepLab-v2 on COCO 2014 val, trained on pseudo masks only (mIoU %)", 3, False),
        ablation_table(
            "Table 4. Ablation on VOC (mask = pseudo masks on train after CRF; seg = DeepLab "
            "on val); Δ = row - Max-Pooling, paired over shared seeds and images",
            real,
            published.ablation(figures),
        ),
    ]
    if demo:
        tables.append(demo_table(demo))
    return tables


def demo_table(groups: list[Group]) -> Table:
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
        notes += _provenance(g)
    return ("Demo runs on generated data (NOT a reproduction of the paper)", header, rows, notes + _machine_notes(groups))


def ablation_table(title: str, groups: list[Group], pub: dict[str, tuple[float, float]], dataset: str | None = "voc") -> Table:
    """Table 4: each variant's published mask and seg figures (``pub``: variant -> (mask, seg)),
    its measured groups and their paired difference from the max-pooling group."""
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
        for var in pub
    }
    base = cands["max"][0] if cands["max"] else None
    for var, (pm, ps) in pub.items():
        label = VARIANT_LABEL.get(var, var)
        if not cands[var]:
            rows.append([label, _fmt(pm), "not run", "", _fmt(ps), "not run", ""])
            continue
        for g in cands[var]:
            used.append(g)
            other = base is not None and g is not base
            rows.append(
                [
                    f"{label} [{g.name}]",
                    _fmt(pm),
                    cell(g.estimate("mask", crf=True)),
                    delta_cell(paired(g, base, "mask", True)) if other else "",
                    _fmt(ps),
                    cell(g.estimate("seg")),
                    delta_cell(paired(g, base, "seg", False)) if other else "",
                ]
            )
            notes += _provenance(g)
    notes.append(
        "published Δ (paper, Table 4 vs Max-Pooling): "
        + ", ".join(
            f"{VARIANT_LABEL.get(v, v)} {pub[v][0] - pub['max'][0]:+.1f} / {pub[v][1] - pub['max'][1]:+.1f}"
            for v in pub
            if v != "max"
        )
    )
    return (title, header, rows, notes + _machine_notes(used))


def per_class_tables(runs: list[dict]) -> list[Table]:
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
