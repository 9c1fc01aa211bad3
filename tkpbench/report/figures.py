"""The report's plots: Fig. 4 (the k and eps sweeps), each variant's seeds with its interval, the
per-class IoU bars, each run's training curves and the dataset confusion matrices, written as PNG
files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tkpbench.report.load import Group
from tkpbench.report.tables import STAGES


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


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """A confusion matrix (rows truth) in % of each true class's pixels: the diagonal is each
    class's recall, a row's other cells what the class is taken for; NaN rows for absent classes."""
    m = np.asarray(confusion, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, 100 * m / np.where(rows > 0, rows, 1), np.nan)


def fig_confusion(confusion: np.ndarray, classes: list[str], out: Path, title: str) -> Path:
    """The dataset's confusion matrix, row-normalised (``row_normalised``), as a heat map."""
    norm = row_normalised(confusion)
    n = len(classes)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.3 * n + 2.5), max(4.0, 0.3 * n + 1.8)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="% of the true class's pixels")
    fig.tight_layout()
    return _save(fig, out)


def confusion_figures(groups: list[Group], results: Path) -> list[Path]:
    """``fig_confusion`` of every group and stage whose counts files hold the confusion matrix
    (summed over the seeds): ``RESULTS/fig_confusion_<group>_<stage>.png``."""
    figs = []
    for g in groups:
        for stage, suffix, what in STAGES:
            m = g.measurement(stage, suffix)
            if m is None or m.confusion is None:
                continue
            classes = list(g.records(stage)[0].get("per_class") or []) or [str(c) for c in range(len(m.confusion))]
            rec = g.records(stage)[0]
            title = f"{g.name}: {what}, {rec['dataset']} {rec['split']} ({m.inter.shape[0]} seeds summed), row-normalised"
            figs.append(fig_confusion(m.confusion, classes, results / f"fig_confusion_{g.name}_{stage}.png", title))
    return figs
