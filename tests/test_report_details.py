"""The report's detail outputs on counts drawn from a known model: the evaluation ladder, per-class
precision and recall, which images change, the confusion matrix and the LaTeX tables."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tkpbench.config import Config, apply_overrides
from tkpbench.records import StageRecord, write_stage
from tkpbench.report import (
    change_pairs,
    detail_tables,
    fig_confusion,
    fig_image_changes,
    latex_escape,
    load_results,
    main,
    make_groups,
    row_normalised,
    to_latex,
)
from tkpbench.report.tables import build_tables
from tkpbench.stats import save_counts

CLASSES = ["background", "cat", "dog", "car"]


def _cfg(pooling, pce, synthetic=True):
    c = Config()
    c.synthetic = synthetic
    apply_overrides(c, [f"model.pooling={pooling}", f"model.pce={'true' if pce else 'false'}"])
    return c.to_dict()


def _draw(rng, n, q):
    """Counts of a known model (see test_stats._draw): presence p, Poisson(lam) pixels, a share q
    of them found, Poisson(mu) false positives; the confusion puts each miss on class 0 (and
    background's misses on class 1)."""
    p, lam, mu = np.array([1.0, 0.5, 0.4, 0.3]), np.array([900, 200, 150, 120]), np.array([20, 30, 25, 15])
    gt = rng.poisson(lam, (n, 4)) * (rng.random((n, 4)) < p)
    inter = rng.binomial(gt, q)
    pred = inter + rng.poisson(mu, (n, 4))
    conf = np.diag(inter.sum(0))
    conf[1:, 0] = (gt - inter).sum(0)[1:]
    conf[0, 1] = (gt - inter).sum(0)[0]
    return inter, pred, gt, conf


def _write_run(results, run, cfg, stage, arrays, ids, ladder=None, miou=50.0):
    save_counts(results / run / f"counts_{stage}.npz", ids, **arrays)
    rec = StageRecord(
        stage=stage,
        dataset="voc",
        split="train" if stage == "mask" else "val",
        miou=miou,
        miou_crf=miou if stage == "mask" else None,
        per_class={c: 1.0 for c in CLASSES},
        num_images=len(ids),
        synthetic=cfg["synthetic"],
        counts_file=f"counts_{stage}.npz",
        protocol={"eval_scales": [1.0], "eval_flip": False, **({"ladder": ladder} if ladder else {})},
    )
    write_stage(results, run, rec, cfg)


def _arrays(inter, pred, gt, conf, suffix="", old=False):
    if old:  # a file written before pred, gt and the confusion matrix were stored
        return {f"inter{suffix}": inter, f"union{suffix}": pred + gt - inter}
    return {
        f"inter{suffix}": inter,
        f"pred{suffix}": pred,
        f"gt{suffix}": gt,
        f"union{suffix}": pred + gt - inter,
        f"confusion{suffix}": conf,
    }


LADDER = [
    {"rung": "ss", "scales": [1.0], "flip": False, "crf": False, "counts_suffix": "", "miou": 0.0, "table2": True},
    {"rung": "msf", "scales": [0.5, 1.0, 1.5], "flip": True, "crf": False, "counts_suffix": "_msf", "miou": 0.0, "table2": False},
    {
        "rung": "msf_crf",
        "scales": [0.5, 1.0, 1.5],
        "flip": True,
        "crf": True,
        "counts_suffix": "_msf_crf",
        "miou": 0.0,
        "table2": False,
    },
]


def _results(tmp_path, old=False, n=60, seeds=(0, 1)):
    """Two demo variants (top-K + PCE better on every class than max pooling), two seeds each,
    pseudo masks (after CRF) and DeepLab with its ladder (ms+flip and CRF each a little better)."""
    rng = np.random.default_rng(0)
    ids = [f"im{i:03d}" for i in range(n)]
    results = tmp_path / "results"
    for name, cfg, q in (("demo", _cfg("topk", True), 0.85), ("demo_max", _cfg("max", False), 0.6)):
        for s in seeds:
            c = _cfg("topk", True) if name == "demo" else _cfg("max", False)
            c["train"]["seed"] = s
            _write_run(results, f"{name}-s{s}", c, "mask", _arrays(*_draw(rng, n, q), suffix="_crf", old=old), ids)
            seg = {**_arrays(*_draw(rng, n, q - 0.1), old=old)}
            if not old:
                seg.update(_arrays(*_draw(rng, n, q - 0.05), suffix="_msf"))
                seg.update(_arrays(*_draw(rng, n, q), suffix="_msf_crf"))
            _write_run(results, f"{name}-s{s}", c, "seg", seg, ids, ladder=None if old else LADDER)
    return results


def _table(tables, start):
    return [t for t in tables if t[0].startswith(start)]


def test_the_ladder_table_gives_each_rung_its_interval_and_marks_table_2s(tmp_path):
    tables = detail_tables(load_results(_results(tmp_path)))
    (lad,) = [t for t in _table(tables, "Evaluation ladder") if " demo (" in t[0]]
    assert [r[0] for r in lad[2]] == ["single scale", "multi-scale + flip", "multi-scale + flip + CRF"]
    assert [r[5] for r in lad[2]] == ["yes", "", ""] and [r[3] for r in lad[2]] == ["no", "no", "yes"]
    vals = [float(r[4].split()[0]) for r in lad[2]]
    assert vals[0] < vals[1] < vals[2] and all("± " in r[4] and "(n=2)" in r[4] for r in lad[2])


def test_an_old_record_has_one_rung_and_says_how_to_get_the_others(tmp_path):
    tables = detail_tables(load_results(_results(tmp_path, old=True)))
    lad = _table(tables, "Evaluation ladder")[0]
    assert len(lad[2]) == 1 and lad[2][0][0] == "single scale" and lad[2][0][5] == "yes"
    assert any("predates the ladder" in n and "--ladder" in n for n in lad[3])


def test_per_class_precision_and_recall_come_with_intervals_that_hold_the_model(tmp_path):
    tables = detail_tables(load_results(_results(tmp_path, n=200)))
    (t,) = [t for t in _table(tables, "Per-class IoU, precision and recall %, pseudo masks") if ", demo (" in t[0]]
    assert t[1] == ["class", "IoU", "precision", "recall"] and [r[0] for r in t[2]] == CLASSES
    cat = {h: re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", v).groups() for h, v in zip(t[1][1:], t[2][1][1:])}
    lo, hi = float(cat["recall"][1]), float(cat["recall"][2])
    assert lo <= 85.0 <= hi and hi - lo < 10  # recall of the known model is q = 0.85
    # precision = p lam q / (p lam q + mu) = 0.5 * 200 * 0.85 / (85 + 30)
    assert float(cat["precision"][1]) <= 100 * 85 / 115 <= float(cat["precision"][2])


def test_old_counts_files_give_iou_intervals_and_say_precision_and_recall_are_unavailable(tmp_path):
    tables = detail_tables(load_results(_results(tmp_path, old=True)))
    t = _table(tables, "Per-class IoU, precision and recall %, pseudo masks")[0]
    assert all(r[2:] == ["n/a", "n/a"] and "[" in r[1] for r in t[2])
    assert any("precision and recall unavailable, and no confusion-matrix figure" in n for n in t[3])


def test_which_images_change_pairs_each_variant_with_max_pooling(tmp_path):
    runs = load_results(_results(tmp_path))
    (t,) = _table(detail_tables(runs), "Which images change")
    assert [r[:2] for r in t[2]] == [["demo vs demo_max", "pseudo masks after CRF"], ["demo vs demo_max", "DeepLab-v2"]]
    share, lo, hi = map(float, re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", t[2][0][2]).groups())
    up, down, tied = map(int, t[2][0][3].split(" / "))
    assert up + down + tied == 60 and share == pytest.approx(100 * up / 60, abs=0.05) and lo < share < hi and share > 80
    (first,) = [p for p in change_pairs(make_groups(runs), seeds="first") if p[2] == "mask"]
    assert first[0].name == "demo" and len(first[4].delta) == 60


def test_the_confusion_figure_is_row_normalised_and_drawn_for_runs_that_store_it(tmp_path):
    rng = np.random.default_rng(1)
    *_, conf = _draw(rng, 50, 0.7)
    norm = row_normalised(np.vstack([conf, np.zeros((1, 4), np.int64)])[:, :4])
    assert np.allclose(norm[:4].sum(1), 100) and np.isnan(norm[4]).all()
    assert norm[1, 1] == pytest.approx(100 * conf[1, 1] / conf[1].sum())
    out = np.asarray(Image.open(fig_confusion(conf, CLASSES, tmp_path / "c.png", "t")).convert("L"))
    assert out.std() > 10
    results = _results(tmp_path)
    assert main([str(results), "--runs", str(tmp_path / "none")]) == 0
    assert (results / "fig_confusion_demo_mask.png").is_file() and (results / "fig_confusion_demo_max_seg.png").is_file()
    assert "fig_confusion_demo_mask" in (results / "TABLES.md").read_text()
    old = _results(tmp_path / "old", old=True)
    assert main([str(old), "--runs", str(tmp_path / "none")]) == 0 and not list(old.glob("fig_confusion_*"))


def test_the_image_change_figure_shows_the_largest_gains_and_losses(tmp_path, synth_root, monkeypatch):
    """Run a's masks are the ground truth, run b's are background everywhere except on one image
    where b is right and a is wrong: that image is the one loss."""
    from tkpbench.data import VOCSegmentation, save_mask
    from tkpbench.stats import image_changes

    monkeypatch.chdir(tmp_path)
    ds = VOCSegmentation(synth_root / "VOC2012", "train")
    ids = ds.ids[:5]
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "VOC2012").symlink_to(synth_root / "VOC2012")
    cfg = _cfg("topk", True)
    cfg["data"]["root"] = "data/demo/VOC2012"
    _write_run(tmp_path / "results", "a", cfg, "mask", {"inter": np.ones((5, 4))}, ids)
    inter_a, inter_b = [], []
    for n, i in enumerate(ids):
        gt = np.where(ds.mask(n) == 255, 0, ds.mask(n))
        a, b = (gt, np.zeros_like(gt)) if n else (np.zeros_like(gt), gt)
        for run, m in (("a", a), ("b", b)):
            (tmp_path / "runs" / run / "pseudo" / "crf").mkdir(parents=True, exist_ok=True)
            save_mask(tmp_path / "runs" / run / "pseudo" / "crf" / f"{i}.png", m)
        inter_a.append([[100, 100], [50, 100]][n == 0])
        inter_b.append([[50, 100], [100, 100]][n == 0])
    union = np.full((5, 2), 100)
    ch = image_changes(np.array(inter_a), union, np.array(inter_b), union, np.array(ids))
    out = fig_image_changes(tmp_path / "results", tmp_path / "runs", "a", "b", ch, k=2)
    arr = np.asarray(Image.open(out))
    header = 22
    assert arr.shape[1] == 4 * 240 and arr.shape[0] >= 2 * header + 3 * 160  # 2 gains, 1 loss, a legend
    loss_row = 2 * header + 2 * 160 + 80  # the loss block: a's mask (column 3) is all background (black)
    assert (arr[loss_row, 2 * 240 + 60 : 2 * 240 + 180] == 0).all() and (arr[loss_row, 3 * 240 : 4 * 240] != 255).any()
    # the data not here: one warning line from the report, no figure
    (tmp_path / "data" / "demo" / "VOC2012").unlink()
    with pytest.raises(Exception, match="VOC root"):
        fig_image_changes(tmp_path / "results", tmp_path / "runs", "a", "b", ch, k=2)


def _tabulars(tex):
    return re.findall(r"\\begin\{tabular\}\{([lr]+)\}\n(.*?)\\end\{tabular\}", tex, re.S)


def test_latex_tables_are_booktabs_tabulars_with_one_cell_per_column_and_footnotes(tmp_path):
    runs = load_results(_results(tmp_path))
    tables = build_tables(runs) + detail_tables(runs)
    tex = to_latex(tables)
    blocks = _tabulars(tex)
    assert len(blocks) == len(tables) == tex.count("\\begin{tabular}") == tex.count("\\end{tabular}")
    for (spec, body), (_, header, rows, _) in zip(blocks, tables):
        lines = body.strip().splitlines()
        assert lines[0] == "\\toprule" and lines[2] == "\\midrule" and len(spec) == len(header)
        bottom = lines.index("\\bottomrule")
        assert bottom == 3 + len(rows)
        for line in lines[1:2] + lines[3:bottom]:
            assert line.endswith(" \\\\") and len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1
        for line in lines[bottom + 1 :]:  # footnotes span every column
            assert line.startswith(f"\\multicolumn{{{len(spec)}}}")
            assert "\\dag{}" in line or "\\ddag{}" in line or "\\S{}" in line
    assert "\\dag{} ViT-PCM's 69.3" in tex and "69.3 \\dag{}" in tex
    body = "\n".join(x for x in tex.splitlines() if not x.startswith("%"))  # comment lines may keep any character
    assert "$\\pm$" in body and not {"±", "Δ", "†", "‡"} & set(body)
    # every % outside a comment line is escaped
    assert all(re.search(r"(?<!\\)%", x) is None for x in tex.splitlines() if not x.startswith("%"))


def test_latex_escapes_its_specials():
    assert latex_escape("a_b & 5% #1 {x} ~ ^ \\ † ± Δ") == (
        r"a\_b \& 5\% \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{} \dag{} $\pm$ $\Delta$"
    )


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex on this machine")
def test_latex_tables_compile(tmp_path):
    runs = load_results(_results(tmp_path))
    tex = to_latex(build_tables(runs) + detail_tables(runs))
    doc = tmp_path / "t.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + tex + "\n\\end{document}\n")
    r = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path, capture_output=True, timeout=120
    )
    assert r.returncode == 0, r.stdout[-2000:]


def test_the_report_command_prints_latex(tmp_path, capsys):
    results = _results(tmp_path)
    assert main([str(results), "--runs", str(tmp_path / "none"), "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("% Generated by") and "\\toprule" in out and "Evaluation ladder" in out
