"""Tables 1-4 of the paper, published next to measured with 95% intervals, the demo section, the
per-class tables and the detail tables (``detail_tables``: the DeepLab evaluation ladder,
per-class precision and recall, which images change); each table is ``(title, header, rows,
notes)`` of strings."""

from __future__ import annotations

from typing import Any

import numpy as np

from tkpbench.report import published
from tkpbench.report.load import Group, make_groups
from tkpbench.runs import PIXEL_LABEL_SELECTIONS
from tkpbench.stats import Estimate, ImageChanges, class_intervals, image_changes, paired_difference, verdict

Table = tuple[str, list[str], list[list[str]], list[str]]


class Measured(tuple):
    """A ``Table`` whose measured cells name the checkpoint selection of the weights they come from:
    ``selections`` maps (row index, column header) -> "last", "best_miou", "best_f1" (``runs.SELECTIONS``)."""

    selections: dict[tuple[int, str], str]


def measured(title: str, header: list[str], rows: list[list[str]], notes: list[str], selections) -> Table:
    t = Measured((title, header, rows, notes))
    t.selections = selections
    return t


# the mark of a cell whose weights were chosen with val pixel labels, and its footnote
PIXEL_MARK = "§"
PIXEL_NOTE = (
    "§ chosen with val pixel labels: the epoch of these weights was picked by the best val mIoU (train.keep = "
    '"best", ViT-PCM\'s save_best_only), which weak supervision forbids; the checkpoint-selection table '
    "shows the label-free choices"
)
SELECTION_LABEL = {
    "last": "last epoch",
    "best_miou": "best val mIoU (val pixel labels)",
    "best_f1": "best val tag F1 (image-level tags only)",
}

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


def record_selections(rec: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The checkpoint selections whose weights a "mask" record measured: ``protocol.selections``;
    a record of an earlier version measured final.pt, train.keep's choice of its config."""
    p = rec.get("protocol", {})
    if p.get("selections"):
        return list(p["selections"])
    if p.get("selection"):
        return [p["selection"]]
    return ["best_miou" if run.get("config", {}).get("train", {}).get("keep") == "best" else "last"]


def final_selection(g: Group) -> str | None:
    """How final.pt's weights were chosen in ``g`` (its first "mask" record says; the DeepLab of a
    run trains on final.pt's pseudo masks, so its cells share it)."""
    for r in g.runs:
        if "mask" in r["stages"]:
            return record_selections(r["stages"]["mask"], r)[0]
    return "best_miou" if any(r.get("config", {}).get("train", {}).get("keep") == "best" for r in g.runs) else None


def flagged(text: str, selection: str | None) -> str:
    """``text`` with the § mark when its weights were chosen with val pixel labels."""
    return text + PIXEL_MARK if selection in PIXEL_LABEL_SELECTIONS and text not in ("-", "") else text


def selection_group(g: Group, selection: str) -> Group | None:
    """``g``'s runs with the record of ``selection``'s pseudo masks as their "mask" stage (the
    "mask" or "mask@<selection>" record that measured those weights); runs without one are left
    out; None when none has one."""
    runs = []
    for r in g.runs:
        st = next(
            (n for n, rec in r["stages"].items() if n.split("@")[0] == "mask" and selection in record_selections(rec, r)), None
        )
        if st is not None:
            runs.append({**r, "stages": {"mask": r["stages"][st]}})
    return Group(g.name, g.variant, g.synthetic, runs) if runs else None


def selection_tables(groups: list[Group]) -> list[Table]:
    """Per group whose runs scored more than one checkpoint selection: the mask mIoU after the CRF
    of the last epoch, the best val mIoU epoch and the best val tag F1 epoch, and the paired
    difference best_miou - last over seeds and images (what choosing with val pixel labels gains)."""
    out = []
    for g in groups:
        sg = {sel: selection_group(g, sel) for sel in SELECTION_LABEL}
        if sum(x is not None for x in sg.values()) < 2:
            continue
        rows, sels = [], {}
        for sel, label in SELECTION_LABEL.items():
            x = sg[sel]
            epochs = sorted({str(r["stages"]["mask"].get("protocol", {}).get("epoch", "?")) for r in x.runs}) if x else []
            delta = paired(x, sg["last"], "mask", True) if sel == "best_miou" and x and sg["last"] else None
            rows.append(
                [
                    sel,
                    label,
                    ", ".join(epochs) or "-",
                    flagged(cell(x.estimate("mask", crf=True)), sel) if x else "not kept",
                    delta_cell(delta),
                ]
            )
            sels[(len(rows) - 1, "mask (CRF)")] = sel
        notes = [
            PM,
            "epochs: the epoch of the weights in each seed's run; a selection holding the same weights as another "
            "(the same epoch) is measured once and shown in both rows",
            "Δ = best_miou - last, paired over seeds and images (tkpbench.stats.paired_difference)",
            PIXEL_NOTE,
        ]
        title = f"Checkpoint selection, pseudo masks of {g.name} ({_where(g, 'mask')}, mIoU % after CRF)"
        out.append(measured(title, ["selection", "chosen by", "epoch", "mask (CRF)", "Δ vs last"], rows, notes, sels))
    return out


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


def server_cell(g: Group) -> str:
    """Table 2's "VOC test (server)": the mIoU the PASCAL evaluation server gave the group's test
    submissions (``tkpbench submit voc-test --server-result URL --miou X``, stage "seg_test"), the mean
    over the seeds that have one; "-" when none was recorded."""
    vals = [r["miou"] for r in g.records("seg_test") if r.get("miou") is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.1f}" + (f" (n={len(vals)})" if len(vals) > 1 else "")


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

    def method_table(title: str, number: int, crf_cols: bool, test_col: bool = False) -> Table:
        stage, dataset = published.COLUMNS[published.TABLE_COLUMNS[number][0]]
        header = (
            ["method", "pub.", "backbone", "published", "measured"]
            + (["measured +CRF"] if crf_cols else [])
            + ["paper inside 95% CI?"]
            + (["VOC test (server)"] if test_col else [])
        )
        rows, notes, used, sels = [], [PM], [], {}
        if test_col:
            notes.append(
                "VOC test (server): the mIoU the PASCAL evaluation server gave the DeepLab test submission "
                "(tkpbench submit voc-test); the test labels are withheld, so it has no interval"
            )
        measured_cols = ["measured"] + (["measured +CRF"] if crf_cols else [])
        for f in published.table(figures, number):
            name, var = f.method, METHOD_VARIANT.get(f.method)
            g = pick(var, dataset, stage) if var else None
            shown = _fmt(f.value) + f.mark
            notes += f.footnotes
            if g is None:
                rows.append(
                    [name, f.venue, f.backbone, shown, "published" if not var else "not run"]
                    + ([""] if crf_cols else [])
                    + [""]
                    + ([""] if test_col else [])
                )
                continue
            used.append(g)
            e = g.estimate(stage)
            ec = g.estimate(stage, crf=True) if crf_cols else None
            inside = _inside(ec if crf_cols else e, f.value) if f.comparable else "not comparable"
            sel = final_selection(g)
            values = [flagged(cell(x), sel) for x in ([e, ec] if crf_cols else [e])]
            if sel in PIXEL_LABEL_SELECTIONS:
                notes.append(PIXEL_NOTE)
            sels.update({(len(rows), c): sel for c in measured_cols if sel})
            rows.append([name, f.venue, f.backbone, shown, *values, inside] + ([server_cell(g)] if test_col else []))
            notes += [f"{name}: {_prov(st, g.name)}" for st in g.records(stage)]
            if test_col:
                notes += [
                    f"{name} VOC test (server): {st['protocol'].get('server_result')}, recorded {st.get('date', '?')[:10]}, "
                    f"archive sha256 {st['protocol'].get('archive_sha256', '?')[:16]}, DeepLab {st.get('model_sha256')}"
                    for st in g.records("seg_test")
                ]
            if dataset == "coco":
                protocols = sorted({r.get("config", {}).get("data", {}).get("coco_protocol", "tkpbench") for r in g.runs})
                notes.append(f"{name}: COCO protocol {', '.join(protocols)} ({COCO_PROTOCOL_TEXT[protocols[0]]})")
        return measured(title, header, rows, list(dict.fromkeys(notes)) + _machine_notes(used), sels)

    tables = [
        method_table(
            "Table 1. Pseudo masks on VOC train (mIoU %); 'measured' is before the CRF, "
            "'measured +CRF' after (the paper's column)",
            1,
            True,
        ),
        method_table(
            "Table 2. DeepLab-v2 on VOC 2012 val, trained on pseudo masks only (mIoU %)",
            2,
            False,
            test_col=any(g.records("seg_test") for g in real),  # only once a server figure is recorded
        ),
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
    return tables + selection_tables(groups)


def demo_table(groups: list[Group]) -> Table:
    """Runs on generated data: measured values with their spread, the all-background baseline, and
    each variant's paired difference from the max-pooling demo run; no published column."""
    header = ["run", "variant", "mask (pre-CRF)", "mask (CRF)", "all-bg", "seg", "Δ mask (CRF) vs max", "Δ seg vs max"]
    rows, notes = [], [PM, "all-bg: the mIoU of predicting background everywhere on the same pixels"]
    base = next((g for g in groups if g.variant == "max"), None)
    sels = {}
    for g in groups:
        sel = final_selection(g)
        if sel in PIXEL_LABEL_SELECTIONS:
            notes.append(PIXEL_NOTE)
        sels.update({(len(rows), c): sel for c in ("mask (pre-CRF)", "mask (CRF)", "seg") if sel})
        mk = g.records("mask")
        bgs = [r["miou_all_background"] for r in mk if r.get("miou_all_background") is not None]
        bg = float(np.mean(bgs)) if bgs else None
        dm = paired(g, base, "mask", True) if base is not None and g is not base else None
        ds = paired(g, base, "seg", False) if base is not None and g is not base else None
        rows.append(
            [
                g.name,
                VARIANT_LABEL.get(g.variant, g.variant),
                flagged(cell(g.estimate("mask")), sel),
                flagged(cell(g.estimate("mask", crf=True)), sel),
                _fmt(bg),
                flagged(cell(g.estimate("seg")), sel),
                delta_cell(dm),
                delta_cell(ds),
            ]
        )
        notes += _provenance(g)
    title = "Demo runs on generated data (NOT a reproduction of the paper)"
    return measured(title, header, rows, list(dict.fromkeys(notes)) + _machine_notes(groups), sels)


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
    rows, notes, used, sels = [], [PM], [], {}
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
            sel = final_selection(g)
            if sel in PIXEL_LABEL_SELECTIONS:
                notes.append(PIXEL_NOTE)
            sels.update({(len(rows), c): sel for c in ("measured mask (CRF)", "measured seg") if sel})
            rows.append(
                [
                    f"{label} [{g.name}]",
                    _fmt(pm),
                    flagged(cell(g.estimate("mask", crf=True)), sel),
                    delta_cell(paired(g, base, "mask", True)) if other else "",
                    _fmt(ps),
                    flagged(cell(g.estimate("seg")), sel),
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
    return measured(title, header, rows, list(dict.fromkeys(notes)) + _machine_notes(used), sels)


def per_class_tables(runs: list[dict]) -> list[Table]:
    """Per-class IoU of every measured run side by side, one table per (data, stage), as ToCo/AFA print them.
    Pseudo masks use the after-CRF column."""
    groups: dict[tuple, list[tuple[str, dict[str, float | None]]]] = {}
    for s in runs:
        for name, st in s["stages"].items():
            key = ("generated data" if s.get("synthetic") else st["dataset"], name, st["split"])
            mask = name.split("@")[0] == "mask"
            per = st.get("per_class_crf") if mask and st.get("per_class_crf") else st.get("per_class")
            if per:
                groups.setdefault(key, []).append((s["run"], per))
    out = []
    for (data, stage, split), cols in sorted(groups.items()):
        classes = list(cols[0][1])
        rows = [[c] + [_fmt(per.get(c)) for _, per in cols] for c in classes]
        sel = f" ({stage.split('@')[1]} weights)" if "@" in stage else ""
        what = f"pseudo masks after CRF{sel}" if stage.split("@")[0] == "mask" else "DeepLab-v2"
        out.append((f"Per-class IoU %, {what}, {data} {split}", ["class"] + [r for r, _ in cols], rows, []))
    return out


# the pseudo masks are scored after the CRF (Table 1's and Table 4's column), DeepLab as configured
STAGES = (("mask", "_crf", "pseudo masks after CRF"), ("seg", "", "DeepLab-v2"))

RUNG_LABEL = {
    "ss": "single scale",
    "msf": "multi-scale + flip",
    "msf_crf": "multi-scale + flip + CRF",
    "configured": "configured",
    "configured_crf": "configured + CRF",
}


def _ci(v: float, lo: float, hi: float) -> str:
    """``61.2 [58.0, 64.1]``; ``-`` when undefined; the value alone when its interval is."""
    if not np.isfinite(v):
        return "-"
    return f"{v:.1f} [{lo:.1f}, {hi:.1f}]" if np.isfinite(lo) else f"{v:.1f}"


def _where(g: Group, stage: str) -> str:
    rec = g.records(stage)[0]
    return f"{'generated data' if g.synthetic else rec['dataset']} {rec['split']}"


def ladder_tables(groups: list[Group]) -> list[Table]:
    """One table per group with DeepLab records: mIoU ± its interval at each rung of the evaluation
    ladder (``tkpbench.segment.ladder``), the rung Table 2 reports marked."""
    out = []
    for g in groups:
        recs = g.records("seg")
        if not recs:
            continue
        header = ["rung", "scales", "flip", "CRF", "mIoU", "Table 2"]
        notes = [PM, "Table 2 reports the configured protocol (seg.eval_scales, seg.eval_flip); the paper does not state its own"]
        rungs = g.ladder()
        if rungs is None:
            p = recs[0].get("protocol", {})
            scales, flip = p.get("eval_scales", [1.0]), p.get("eval_flip", False)
            name = "single scale" if list(scales) == [1.0] and not flip else "configured"
            rows = [[name, ", ".join(map(str, scales)), "yes" if flip else "no", "no", cell(g.estimate("seg")), "yes"]]
            notes.append(
                "the other rungs were not computed: this record predates the ladder; "
                "`tkpbench segment eval --run-dir RUN [--ladder]` computes every rung in one pass over val"
            )
        else:
            rows = []
            for r in rungs:
                recorded = [
                    next((x["miou"] for x in rec["protocol"].get("ladder", []) if x["rung"] == r["rung"]), None) for rec in recs
                ]
                e = g.estimate_of("seg", r["counts_suffix"], recorded)
                rows.append(
                    [
                        RUNG_LABEL.get(r["rung"], r["rung"]),
                        ", ".join(map(str, r["scales"])),
                        "yes" if r["flip"] else "no",
                        "yes" if r["crf"] else "no",
                        cell(e),
                        "yes" if r["table2"] else "",
                    ]
                )
            if not any(r["crf"] for r in rungs):
                notes.append("no CRF rung: it runs with seg.eval_crf = true or `tkpbench segment eval --ladder`")
        out.append((f"Evaluation ladder, DeepLab-v2 of {g.name} ({_where(g, 'seg')}, mIoU %)", header, rows, notes))
    return out


def class_tables(groups: list[Group]) -> list[Table]:
    """Per-class IoU, precision and recall with 95% intervals over images, one table per group and
    stage; a counts file written before pred/gt were stored gives IoU only, and says so."""
    out = []
    for g in groups:
        for stage, suffix, what in STAGES:
            m = g.measurement(stage, suffix)
            if m is None:
                continue
            classes = list(g.records(stage)[0].get("per_class") or []) or [str(c) for c in range(m.inter.shape[-1])]
            notes = [
                "[low, high] = 95% percentile bootstrap over images of the seed-averaged value (tkpbench.stats."
                "class_intervals; the spread between seeds is not in it); precision = TP / predicted, recall = TP / ground truth"
            ]
            # without pred/gt the IoU interval still comes out: pred := union, gt := inter gives I / U
            ci = class_intervals(m.inter, m.pred, m.gt) if m.has_pr else class_intervals(m.inter, m.union, m.inter)
            keys = ("iou", "precision", "recall") if m.has_pr else ("iou",)
            cols = [
                [_ci(ci.value[k][c], ci.low[k][c], ci.high[k][c]) for k in keys] + ["n/a"] * (3 - len(keys))
                for c in range(len(classes))
            ]
            if not m.has_pr:
                notes.append(
                    "precision and recall unavailable, and no confusion-matrix figure: this counts file predates the "
                    "predicted and ground-truth counts (it holds intersection and union only); score the run again to get them"
                )
            rows = [[c, *v] for c, v in zip(classes, cols)]
            title = f"Per-class IoU, precision and recall %, {what}, {g.name} ({_where(g, stage)}, n={m.inter.shape[0]} seeds)"
            out.append((title, ["class", "IoU", "precision", "recall"], rows, notes))
    return out


def change_pairs(groups: list[Group], seeds: str = "shared") -> list[tuple[Group, Group, str, str, ImageChanges]]:
    """(A, B, stage, suffix, changes) for every variant A against the max-pooling group B of the same
    kind of data (Table 4's pairs; the demo's demo vs demo_max), at each stage both scored with
    counts on the same images. ``seeds``: "shared" averages the shared seeds, "first" takes the
    first shared seed alone (the one whose masks a figure shows)."""
    out = []
    for synthetic in (False, True):
        kind = [g for g in groups if g.synthetic == synthetic]
        base = next((g for g in kind if g.variant == "max"), None)
        for a in kind:
            shared = sorted(set(a.seeds) & set(base.seeds)) if base is not None and a is not base else []
            if not shared:
                continue
            use = shared if seeds == "shared" else shared[:1]
            for stage, suffix, _ in STAGES:
                ma, mb = a.measurement(stage, suffix, use), base.measurement(stage, suffix, use)
                if ma is None or mb is None or not np.array_equal(ma.ids, mb.ids):
                    continue
                out.append((a, base, stage, suffix, image_changes(ma.inter, ma.union, mb.inter, mb.union, ma.ids)))
    return out


def change_table(groups: list[Group]) -> list[Table]:
    """Which images change: for each pair of ``change_pairs``, the share of images A improves (Wilson
    95% interval), how many improve, worsen or tie, the mean per-image difference and the image
    that gains and that loses most."""
    rows = []
    for a, b, stage, _, ch in change_pairs(groups):
        gains, losses = ch.top(1)
        rows.append(
            [
                f"{a.name} vs {b.name}",
                dict((s, w) for s, _, w in STAGES)[stage],
                _ci(ch.share.value, ch.share.low, ch.share.high),
                f"{ch.improved} / {ch.worse} / {len(ch.delta) - ch.improved - ch.worse}",
                f"{ch.delta.mean():+.1f}",
                f"{ch.ids[gains[0]]} ({ch.delta[gains[0]]:+.1f})" if gains else "-",
                f"{ch.ids[losses[0]]} ({ch.delta[losses[0]]:+.1f})" if losses else "-",
            ]
        )
    if not rows:
        return []
    header = ["A vs B", "stage", "% images improved", "improved / worse / tied", "mean Δ", "largest gain", "largest loss"]
    notes = [
        "per-image mIoU = the mean, over the classes with a non-empty union in that image, of its IoU; "
        "averaged over the shared seeds; Δ = A - B in points, paired by image",
        "% images improved: images where A's per-image mIoU is higher, with Wilson's 95% interval over images",
    ]
    return [("Which images change (per-image mIoU, A vs the max-pooling run)", header, rows, notes)]


def detail_tables(runs: list[dict]) -> list[Table]:
    """The tables beyond the paper's: the evaluation ladder of every DeepLab group, which images
    change between each variant and max pooling, and per-class precision and recall."""
    groups = make_groups(runs)
    return ladder_tables(groups) + change_table(groups) + class_tables(groups)
