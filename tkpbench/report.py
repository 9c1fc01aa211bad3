"""Tables 1-4 of the paper, published next to measured, and the Fig. 4 / Fig. 5 figures.

    python -m tkpbench.report [RESULTS_DIR]      # prints the tables, writes RESULTS_DIR/TABLES.md

Rows for methods this suite does not run are the paper's published figures, marked
"published". Rows the suite runs show the published figure, the measured one and the
difference, with the run, commit, date, device and dataset of each measured cell. Runs on
generated data (``synthetic = true``) are reported under their own heading, never as a
reproduction of the paper.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from tkpbench.config import config_from_dict
from tkpbench.data.common import read_mask, voc_palette
from tkpbench.data.transforms import build_dataset
from tkpbench.io import atomic_write_text
from tkpbench.records import load_summary

# SPEC Sec. 5 (the paper's tables), mIoU %.
TABLE1 = [("MCTformer", "CVPR22", "DeiT-S", 61.7), ("PPC", "CVPR22", "ResNet38", 61.5), ("SIPE", "CVPR22", "ResNet50", 58.6),
          ("AFA", "CVPR22", "MiT-B1", 66.0), ("ViT-PCM", "ECCV22", "ViT-B/16", 71.4), ("ToCo", "CVPR23", "ViT-B/16", 72.2),
          ("TKP-PCL", "", "ViT-B/16", 74.6)]
TABLE2 = [("MCTformer", "CVPR22", "DeiT-S", 61.7), ("PPC", "CVPR22", "ResNet38", 61.5), ("SIPE", "CVPR22", "ResNet50", 58.6),
          ("AFA", "CVPR22", "MiT-B1", 63.8), ("ViT-PCM", "ECCV22", "ViT-B/16", 69.3), ("ToCo", "CVPR23", "ViT-B/16", 70.5),
          ("SAPC-CS", "ICME23", "MiT-B1", 67.5), ("TKP-PCL", "", "ViT-B/16", 72.2)]
TABLE3 = [("MCTformer", "CVPR22", "Resnet38", 42.0), ("SIPE", "CVPR22", "Resnet38", 43.6), ("AFA", "CVPR22", "MiT-B1", 38.9),
          ("ViT-PCM", "ECCV22", "ViT-B/16", 45.0), ("ToCo", "CVPR23", "ViT-B/16", 42.3), ("SAPC-CS", "ICME23", "MiT-B1", 39.9),
          ("TKP-PCL", "", "ViT-B/16", 45.6)]
TABLE4 = {"avg": (60.5, 59.6), "max": (70.1, 68.6), "topk": (72.9, 69.8), "topk+pce": (74.6, 72.2)}
VARIANT_LABEL = {"avg": "Avg-Pooling", "max": "Max-Pooling (ViT-PCM)", "topk": "top-K", "topk+pce": "top-K + PCE"}
# which measured variant a method row of Tables 1-3 corresponds to
METHOD_VARIANT = {"TKP-PCL": "topk+pce", "ViT-PCM": "max"}


def variant(cfg: dict[str, Any]) -> str:
    m = cfg.get("model", {})
    v = {"avg": "avg", "max": "max", "topk": "topk"}.get(m.get("pooling"), str(m.get("pooling")))
    if v == "topk" and m.get("k") == 1:
        v = "max"
    return v + ("+pce" if m.get("pce") else "")


def load_results(results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(results).glob("*/summary.json")):
        try:
            s = load_summary(path)
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        s["variant"] = variant(s.get("config", {}))
        out.append(s)
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _diff(measured: float | None, published: float | None) -> str:
    if measured is None or published is None:
        return ""
    return f"{measured - published:+.1f}"


def _prov(stage: dict[str, Any], run: str) -> str:
    return f"{run} @ {stage.get('commit', '?')}, {stage.get('date', '?')[:10]}, {stage.get('device', '?')}, {stage.get('dataset')}/{stage.get('split')}"


def _pick(runs: list[dict], dataset: str, stage: str, var: str) -> tuple[dict, dict] | None:
    """The most recent measured record of ``var`` for ``dataset``/``stage`` (excluding sweeps)."""
    best = None
    for s in runs:
        st = s["stages"].get(stage)
        if st and st["dataset"] == dataset and s["variant"] == var and not s["run"].startswith("sweep_"):
            if best is None or st.get("date", "") > best[1].get("date", ""):
                best = (s, st)
    return best


def build_tables(runs: list[dict]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """[(title, header, rows, notes)] for the real-data tables and the demo section."""
    real = [s for s in runs if not s.get("synthetic")]
    demo = [s for s in runs if s.get("synthetic")]
    tables = []

    def method_table(title, published, dataset, stage, crf_cols):
        header = ["method", "pub.", "backbone", "published", "measured"] + (["measured +CRF"] if crf_cols else []) + ["diff"]
        rows, notes = [], []
        for name, pub, bb, val in published:
            var = METHOD_VARIANT.get(name)
            hit = _pick(real, dataset, stage, var) if var else None
            if hit is None:
                rows.append([name, pub, bb, _fmt(val), "published" if not var else "not run"] + ([""] if crf_cols else []) + [""])
                continue
            s, st = hit
            measured = st["miou"]
            final = st.get("miou_crf") if crf_cols else measured
            rows.append([name, pub, bb, _fmt(val), _fmt(measured)] + ([_fmt(st.get("miou_crf"))] if crf_cols else [])
                        + [_diff(final, val)])
            notes.append(f"{name}: {_prov(st, s['run'])}; protocol {st.get('protocol', {})}")
        return (title, header, rows, notes)

    tables.append(method_table("Table 1. Pseudo masks on VOC train (mIoU %); 'measured' is before the CRF, "
                               "'measured +CRF' after; diff = after CRF - published", TABLE1, "voc", "mask", True))
    tables.append(method_table("Table 2. DeepLab-v2 on VOC 2012 val, trained on pseudo masks only (mIoU %)",
                               TABLE2, "voc", "seg", False))
    tables.append(method_table("Table 3. DeepLab-v2 on COCO 2014 val, trained on pseudo masks only (mIoU %)",
                               TABLE3, "coco", "seg", False))
    tables.append(ablation_table("Table 4. Ablation on VOC (mask = pseudo masks on train after CRF; seg = DeepLab on val)", real))
    if demo:
        tables.append(demo_table(demo))
    return tables


def demo_table(runs: list[dict]):
    """Runs on generated data: measured values next to the all-background baseline, no published column."""
    header = ["run", "variant", "mask mIoU (pre-CRF)", "mask mIoU (CRF)", "all-background", "seg mIoU", "seg all-background"]
    rows, notes = [], []
    for s in runs:
        mk, sg = s["stages"].get("mask"), s["stages"].get("seg")
        rows.append([s["run"], VARIANT_LABEL.get(s["variant"], s["variant"]), _fmt(mk and mk["miou"]),
                     _fmt(mk and mk.get("miou_crf")), _fmt(mk and mk.get("miou_all_background")),
                     _fmt(sg and sg["miou"]), _fmt(sg and sg.get("miou_all_background"))])
        for st in (mk, sg):
            if st:
                notes.append(f"{s['run']} {st['stage']}: {_prov(st, s['run'])}")
    return ("Demo runs on generated data (NOT a reproduction of the paper)", header, rows, notes)


def ablation_table(title: str, runs: list[dict], dataset: str | None = "voc"):
    header = ["variant", "published mask", "measured mask (pre-CRF)", "measured mask (CRF)", "diff",
              "published seg", "measured seg", "diff"]
    rows, notes = [], []
    for var, (pm, ps) in TABLE4.items():
        cand = [s for s in runs if s["variant"] == var and not s["run"].startswith("sweep_")
                and (dataset is None or any(st["dataset"] == dataset for st in s["stages"].values()))]
        if not cand:
            rows.append([VARIANT_LABEL[var], _fmt(pm), "not run", "", "", _fmt(ps), "not run", ""])
            continue
        for s in cand:
            mk, sg = s["stages"].get("mask"), s["stages"].get("seg")
            rows.append([f"{VARIANT_LABEL[var]} [{s['run']}]", _fmt(pm), _fmt(mk and mk["miou"]),
                         _fmt(mk and mk.get("miou_crf")), _diff(mk and mk.get("miou_crf"), pm),
                         _fmt(ps), _fmt(sg and sg["miou"]), _diff(sg and sg["miou"], ps)])
            for st in (mk, sg):
                if st:
                    notes.append(f"{s['run']} {st['stage']}: {_prov(st, s['run'])}")
    return (title, header, rows, notes)


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
    out = ["# TKP-PCL: published vs measured", "",
           "Generated by `python -m tkpbench.report`. Published figures are the paper's (SPEC Sec. 5); "
           "measured ones come from `results/<run>/summary.json`, with provenance under each table.", ""]
    for title, header, rows, notes in tables:
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        if notes:
            out += ["", *[f"- {n}" for n in notes]]
        out.append("")
    return "\n".join(out)


def print_tables(tables) -> None:

    con = Console()
    for title, header, rows, _ in tables:
        t = Table(title=title, title_justify="left")
        for h in header:
            t.add_column(h, justify="left" if h in ("method", "variant", "pub.", "backbone") else "right")
        for r in rows:
            t.add_row(*r)
        con.print(t)


def fig4_sweep(runs: list[dict], out: Path) -> Path | None:
    """Fig. 4: pseudo-mask mIoU (after CRF) against k and against eps, from the sweep_* runs."""
    ks = sorted((s["config"]["model"]["k"], s["stages"]["mask"]["miou_crf"]) for s in runs
                if s["run"].startswith("sweep_k") and "mask" in s["stages"])
    es = sorted((s["config"]["model"]["eps"], s["stages"]["mask"]["miou_crf"]) for s in runs
                if s["run"].startswith("sweep_eps") and "mask" in s["stages"])
    if not ks and not es:
        return None
    # lazy: matplotlib.pyplot takes about 0.4 s to import (measured, -X importtime); only figures need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for ax, pts, label in ((axes[0], ks, "k (top-K)"), (axes[1], es, "eps (PCE threshold)")):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("mask mIoU % (CRF)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def fig5_grid(images, gts, preds_a, preds_b, out: Path, titles=("image", "ground truth", "ViT-PCM max", "TKP-PCL")) -> Path:
    """Fig. 5 style grid: one row per image, columns image | GT | baseline | TKP-PCL (palette colours)."""


    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    ch, cw = 160, 240  # every cell the same size, each picture fitted inside it (columns stay aligned)

    def cell(arr: np.ndarray, resample) -> np.ndarray:
        h, w = arr.shape[:2]
        f = min(ch / h, cw / w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        small = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
        canvas = np.full((ch, cw, 3), 255, np.uint8)
        y0, x0 = (ch - nh) // 2, (cw - nw) // 2
        canvas[y0:y0 + nh, x0:x0 + nw] = small
        return canvas

    rows = [np.concatenate([cell(img, Image.BILINEAR)] + [cell(pal[m], Image.NEAREST) for m in (gt, a, b)], axis=1)
            for img, gt, a, b in zip(images, gts, preds_a, preds_b)]
    grid = np.concatenate(rows, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(out)
    return out


def fig5_from_runs(results: Path, runs_dir: Path, baseline: str, ours: str, n: int = 4) -> Path | None:
    """Fig. 5 from two runs' pseudo masks (after CRF) on their mask split."""

    a_dir, b_dir = runs_dir / baseline / "pseudo" / "crf", runs_dir / ours / "pseudo" / "crf"
    summ = results / ours / "summary.json"
    if not (a_dir.is_dir() and b_dir.is_dir() and summ.is_file()):
        return None
    cfg = config_from_dict(load_summary(summ)["config"])
    ds = build_dataset(cfg.data, cfg.data.mask_split)
    idx = [i for i in range(len(ds)) if (a_dir / f"{ds.ids[i]}.png").is_file() and (b_dir / f"{ds.ids[i]}.png").is_file()][:n]
    if not idx:
        return None
    return fig5_grid([ds.image(i) for i in idx], [ds.mask(i) for i in idx],
                     [read_mask(a_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
                     [read_mask(b_dir / f"{ds.ids[i]}.png", ds.num_classes) for i in idx],
                     results / f"fig5_{ours}_vs_{baseline}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tkpbench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=Path("results"))
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders (for the Fig. 5 grid)")
    args = p.parse_args(argv)
    runs = load_results(args.results)
    tables = build_tables(runs)
    print_tables(tables)
    md = to_markdown(tables + per_class_tables(runs))
    figs = []
    f4 = fig4_sweep(runs, args.results / "fig4_sweep.png")
    if f4:
        figs.append(f4)
    for base, ours in (("vit_pcm_max", "topk_pce"), ("demo_max", "demo")):
        f5 = fig5_from_runs(args.results, args.runs, base, ours)
        if f5:
            figs.append(f5)
    if figs:
        md += "\n## Figures\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figs) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "TABLES.md", md)
    print(f"wrote {args.results / 'TABLES.md'}" + "".join(f", {f}" for f in figs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
