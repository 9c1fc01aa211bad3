import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tkpbench.config import Config, apply_overrides
from tkpbench.errors import UserError
from tkpbench.records import StageRecord, write_stage
from tkpbench.report import build_tables, fig4_sweep, fig5_grid, load_results, main, published, variant


def _cfg(pooling, pce, k=6, eps=0.85, synthetic=False, et=False, keep="last"):
    """A run's config; train.keep = "last" unless asked (with "best" its cells are flagged §)."""
    c = Config()
    c.synthetic = synthetic
    flags = ["model.et=true", "model.reg=0.01"] if et else []
    apply_overrides(
        c,
        [
            f"model.pooling={pooling}",
            f"model.pce={'true' if pce else 'false'}",
            f"model.k={k}",
            f"model.eps={eps}",
            f"train.keep={keep}",
            *flags,
        ],
    )
    return c.to_dict()


def _write(results, run, stage, dataset, split, miou, crf=None, cfg=None, synthetic=False):
    rec = StageRecord(
        stage=stage,
        dataset=dataset,
        split=split,
        miou=miou,
        per_class={},
        num_images=10,
        miou_crf=crf,
        synthetic=synthetic,
        commit="abc123",
        device="CPU",
        date="2026-11-24T00:00:00",
        miou_all_background=3.5 if synthetic else None,
    )
    write_stage(results, run, rec, cfg)


def _fixture(results):
    _write(results, "topk_pce", "mask", "voc", "train", 70.0, 73.5, _cfg("topk", True))
    _write(results, "topk_pce", "seg", "voc", "val", 71.0, None, _cfg("topk", True))
    _write(results, "vit_pcm_max", "mask", "voc", "train", 68.0, 69.0, _cfg("max", False))
    _write(results, "demo", "mask", "voc", "train", 40.0, 47.0, _cfg("topk", True, synthetic=True), synthetic=True)
    for k, v in [(1, 60.0), (6, 66.0)]:
        _write(results, f"sweep_k{k}", "mask", "voc", "train", v - 2, v, _cfg("topk", True, k=k))
    _write(results, "sweep_eps0.9", "mask", "voc", "train", 61.0, 63.0, _cfg("topk", True, eps=0.9))


def _row(table, first):
    return next(r for r in table[2] if r[0].startswith(first))


def test_variant_names():
    assert variant(_cfg("topk", True)) == "topk+pce" and variant(_cfg("topk", False, k=1)) == "max"
    assert variant(_cfg("avg", False)) == "avg"
    assert variant(_cfg("max", False, et=True)) == "vit_pcm" and variant(_cfg("topk", True, et=True)) == "topk+pce+et"


def test_the_vit_pcm_rows_come_only_from_vit_pcm_runs_and_say_what_they_measure(tmp_path):
    """Tables 1-3's ViT-PCM row is measured from baselines/vit_pcm.toml (max pooling + ET + REG) only,
    never from Table 4's max-pooling row; its DeepLab cells carry the BPM footnote."""
    _fixture(tmp_path)
    t1, t2, *_ = build_tables(load_results(tmp_path))
    assert _row(t1, "ViT-PCM")[4] == "not run"  # vit_pcm_max alone does not stand in for ViT-PCM
    assert _row(t2, "ViT-PCM")[3] == "69.3 †" and any("BPM" in n and n.startswith("†") for n in t2[3])
    _write(tmp_path, "vit_pcm", "mask", "voc", "train", 66.0, 68.5, _cfg("max", False, et=True, keep="best"))
    _write(tmp_path, "vit_pcm", "seg", "voc", "val", 65.0, None, _cfg("max", False, et=True, keep="best"))
    t1, t2, _, t4, _ = build_tables(load_results(tmp_path))
    # train.keep = "best" (the default, ViT-PCM's save_best_only): chosen with val pixel labels, flagged §
    assert _row(t1, "ViT-PCM")[4:6] == ["66.0 (n=1, no interval)§", "68.5 (n=1, no interval)§"]
    assert _row(t2, "ViT-PCM")[4:] == ["65.0 (n=1, no interval)§", "not comparable"]
    assert any(n.startswith("§ chosen with val pixel labels") for n in t2[3])
    assert any(r[0].startswith("Max-Pooling (ViT-PCM's pooling, TKP-PCL's training) [vit_pcm_max]") for r in t4[2])
    assert all("[vit_pcm]" not in r[0] for r in t4[2])


def test_coco_figures_name_their_protocol(tmp_path):
    cfg = _cfg("topk", True)
    cfg["data"]["coco_protocol"] = "vit_pcm"
    _write(tmp_path, "coco_topk_pce", "seg", "coco", "val2014", 40.0, None, cfg)
    t3 = build_tables(load_results(tmp_path))[2]
    assert _row(t3, "TKP-PCL")[4] == "40.0 (n=1, no interval)"
    assert any(n.startswith("TKP-PCL: COCO protocol vit_pcm (ViT-PCM's parse_coco.py") for n in t3[3])


def test_tables_put_published_and_measured_side_by_side(tmp_path):
    _fixture(tmp_path)
    tables = build_tables(load_results(tmp_path))
    t1, t2, t3, t4, demo = tables
    assert _row(t1, "MCTformer")[3:5] == ["61.7", "published"]
    # records without per-image counts: the value, and plainly no interval
    assert _row(t1, "TKP-PCL")[3:6] == ["74.6", "70.0 (n=1, no interval)", "73.5 (n=1, no interval)"]
    assert _row(t1, "ViT-PCM")[3:5] == ["71.4", "not run"]
    assert _row(t2, "TKP-PCL")[3:5] == ["72.2", "71.0 (n=1, no interval)"]
    assert _row(t3, "TKP-PCL")[4] == "not run"
    assert any("topk_pce @ abc123" in n for n in t1[3])
    # the demo run is never in the paper's tables, only under its own heading
    assert all("demo" not in r[0] for r in t4[2])
    assert "NOT a reproduction" in demo[0] and _row(demo, "demo")[2:5] == [
        "40.0 (n=1, no interval)",
        "47.0 (n=1, no interval)",
        "3.5",
    ]
    # sweep runs feed Fig. 4 only
    assert all("sweep" not in r[0] for r in t4[2])


def test_report_command_writes_tables_md_and_figures(tmp_path, capsys):
    _fixture(tmp_path)
    assert main([str(tmp_path), "--runs", str(tmp_path / "noruns")]) == 0
    md = (tmp_path / "TABLES.md").read_text()
    assert "Table 1" in md and "| TKP-PCL |  | ViT-B/16 | 74.6 | 70.0 (n=1, no interval) | 73.5 (n=1, no interval) |" in md
    assert "Demo runs on generated data (NOT a reproduction" in md
    fig = Image.open(tmp_path / "fig4_sweep.png")
    assert fig.size == (800, 320) and np.asarray(fig).std() > 0
    assert "Table 4" in capsys.readouterr().out


def test_per_class_tables_put_runs_side_by_side(tmp_path):
    from tkpbench.report import per_class_tables

    rec = StageRecord(
        stage="mask",
        dataset="voc",
        split="train",
        miou=50.0,
        per_class={"background": 80.0, "cat": 20.0},
        per_class_crf={"background": 90.0, "cat": 30.0},
        num_images=3,
    )
    write_stage(tmp_path, "a", rec, _cfg("topk", True))
    rec.per_class_crf = {"background": 85.0, "cat": None}
    write_stage(tmp_path, "b", rec, _cfg("max", False))
    ((title, header, rows, _),) = per_class_tables(load_results(tmp_path))
    assert "after CRF" in title and header == ["class", "a", "b"]
    assert rows == [["background", "90.0", "85.0"], ["cat", "30.0", "-"]]


def test_fig4_is_absent_without_sweeps(tmp_path):
    assert fig4_sweep([], tmp_path / "f.png") is None


def test_fig5_grid_has_titles_one_row_per_image_four_columns_and_a_legend(tmp_path):
    img = np.full((80, 120, 3), 100, np.uint8)
    m = np.zeros((80, 120), np.uint8)
    m[20:60, 30:90] = 15
    out = fig5_grid(
        [img, img], [m, m], [m, m], [m, m], tmp_path / "g.png", ids=["a", "b"], class_names=[f"c{i}" for i in range(21)]
    )
    arr = np.asarray(Image.open(out))
    header, legend = 22, 24  # the column titles, then one legend row for the 2 classes present
    assert arr.shape == (header + 2 * 160 + legend, 4 * 240, 3)
    # VOC colour of class 15 (person) in the GT column of the first image row
    assert arr[header + 80, 240 + 120].tolist() == [192, 128, 128]
    assert (arr[:header] < 128).any()  # the titles are drawn
    assert (arr[-legend:] == [192, 128, 128]).all(-1).any()  # the legend shows the class colour
    # DeepLab's segmentation of val images as a second block below the pseudo masks (the paper's Fig. 5)
    seg = np.zeros_like(m)
    seg[:40] = 7  # car
    block = ([img], [m], [seg], [seg], ("val image", "ground truth", "DeepLab a", "DeepLab b"), ["v"])
    out = fig5_grid(
        [img, img], [m, m], [m, m], [m, m], tmp_path / "h.png", class_names=[f"c{i}" for i in range(21)], extra_blocks=(block,)
    )
    arr = np.asarray(Image.open(out))
    assert arr.shape == (2 * header + 3 * 160 + legend, 4 * 240, 3)
    row = header + 2 * 160 + header  # the DeepLab block's image row
    assert arr[row + 40, 2 * 240 + 120].tolist() == [128, 128, 128]  # car (7) in the "DeepLab a" column


def test_training_curves_and_per_class_bars_are_drawn_from_what_runs_write(tmp_path):
    from tkpbench.report import fig_curves, fig_per_class

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    lines = [{"step": s, "epoch": 1 + s // 5, "loss": 1 / s, "mce": 0.9 / s, "pce": 0.1, "lr": 1e-3} for s in range(1, 11)]
    lines += [{"step": 5, "epoch": 1, "val_miou": 0.3, "val_f1": 0.2}, {"step": 10, "epoch": 2, "val_miou": 0.5}]
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curves = np.asarray(Image.open(fig_curves(run, tmp_path / "curves.png")).convert("L"))
    assert curves.std() > 10
    rec = StageRecord(
        stage="mask",
        dataset="voc",
        split="train",
        miou=50.0,
        per_class={},
        num_images=3,
        per_class_crf={"background": 90.0, "cat": 30.0},
    )
    write_stage(tmp_path / "results", "r", rec, _cfg("topk", True))
    bars = np.asarray(Image.open(fig_per_class(load_results(tmp_path / "results"), tmp_path / "bars.png")).convert("L"))
    assert bars.std() > 10
    assert fig_curves(tmp_path / "nothing", tmp_path / "none.png") is None


def test_the_tables_print_the_papers_published_figures():
    """Every published cell of Tables 1-4 is the paper's (SPEC Sec. 5), with its venue and backbone."""
    t1, t2, t3, t4 = build_tables([])
    cited = [("MCTformer", "CVPR22", "DeiT-S"), ("PPC", "CVPR22", "ResNet38"), ("SIPE", "CVPR22", "ResNet50")]
    cited += [("AFA", "CVPR22", "MiT-B1"), ("ViT-PCM", "ECCV22", "ViT-B/16"), ("ToCo", "CVPR23", "ViT-B/16")]
    ours = [("TKP-PCL", "", "ViT-B/16")]
    sapc = [("SAPC-CS", "ICME23", "MiT-B1")]
    # ‡: the figure's own source reports it as another kind (or value) than the column; † a note
    assert [r[:4] for r in t1[2]] == [
        [*m, v] for m, v in zip(cited + ours, ["61.7", "61.5 ‡", "58.6 ‡", "66.0 ‡", "71.4", "72.2 ‡", "74.6"])
    ]
    assert [r[:4] for r in t2[2]] == [
        [*m, v] for m, v in zip(cited + sapc + ours, ["61.7", "61.5 ‡", "58.6 ‡", "63.8", "69.3 †", "70.5 ‡", "67.5 ‡", "72.2"])
    ]
    coco = [("MCTformer", "CVPR22", "Resnet38"), ("SIPE", "CVPR22", "Resnet38"), *cited[3:], *sapc, *ours]
    assert [r[:4] for r in t3[2]] == [
        [*m, v] for m, v in zip(coco, ["42.0", "43.6", "38.9 ‡", "45.0 †", "42.3 ‡", "39.9 ‡", "45.6"])
    ]
    assert [(r[1], r[4]) for r in t4[2]] == [("60.5", "59.6"), ("70.1", "68.6"), ("72.9", "69.8"), ("74.6", "72.2")]
    assert any(n.startswith("† ViT-PCM's README lists 45.03") for n in t3[3])
    assert any(n.startswith("‡ ToCo 72.2: ToCo's README gives 72.2 as its VOC test segmentation") for n in t1[3])
    assert t4[3][-1].endswith("Avg-Pooling -9.6 / -9.0, top-K +2.8 / +1.2, top-K + PCE +4.5 / +3.6")
    # TKP-PCL's rows are its own; every other figure is either checked against a named source or says it is not
    figures = published.load()
    assert {f.source for f in figures if f.method == "TKP-PCL" or f.table == 4} == {published.OWN}
    assert all(bool(f.source_url) == (f.source == published.CHECKED) for f in figures)
    assert {f.source for f in figures if f.method != "TKP-PCL" and f.table < 4} == {published.CITED, published.CHECKED}


@pytest.mark.parametrize(
    "old, new, problem",
    [
        ("value = 58.6\n", "", "missing keys ['value']"),
        ("value = 58.6", 'value = "58.6"', "value = '58.6' is not a float"),
        ("value = 58.6", "valeu = 58.6", "unknown keys ['valeu']"),
        ("value = 58.6", "value = 586", "value = 586.0 is not an mIoU in %"),
        ('column = "voc train pseudo-mask mIoU (CRF)"', 'column = "voc val DeepLab-v2 mIoU"', "is not a column of Table 1"),
        (f'source = "{published.CHECKED}"', 'source = ""', "source = ''; it is one of"),
        (f'source = "{published.CHECKED}"', f'source = "{published.CITED}"', "source_url goes with source = "),
        ("source_url = ", "# source_url = ", "['mismatch', 'source_note', 'source_split', 'source_stage', 'source_value'] "),
        ('source_stage = "CAM seed"', 'source_stage = "seed"', "source_stage = 'seed'; it is one of"),
        ('source_split = "train"', 'source_split = "trainaug"', "source_split = 'trainaug'; it is one of"),
        ("source_value = 58.65", 'source_value = "58.65"', "source_value = '58.65' is not a float"),
        ("source_value = 58.65", "source_value = 586.5", "source_value = 586.5 is not an mIoU in %"),
    ],
)
def test_a_malformed_published_figure_is_refused_naming_the_file_and_the_entry(tmp_path, old, new, problem):
    text = published.PUBLISHED_FILE.read_text()
    sipe = text.index('method = "SIPE"')  # the third figure
    path = tmp_path / "published.toml"
    path.write_text(text[:sipe] + text[sipe:].replace(old, new, 1))
    with pytest.raises(published.PublishedFiguresError) as e:
        published.load(path)
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith(f"{path}: [[figure]] 3 (SIPE): ") and problem in str(e.value)


def test_the_report_ends_with_one_error_line_on_a_malformed_published_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "published.toml"
    bad.write_text("[[figure]]\ntable = 1\n")
    monkeypatch.setattr(published, "PUBLISHED_FILE", bad)
    assert main([str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {bad}: [[figure]] 1 (?): missing keys")


def _fig5_runs(tmp_path, voc_root):
    """A max-pooling and a TKP-PCL demo run whose records were written in another, gone folder and
    name a relative data root; their CRF masks are the ground truth of the first two train images."""
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:2]
    for run, cfg in (("demo-s0", _cfg("topk", True, synthetic=True)), ("demo_max-s0", _cfg("max", False, synthetic=True))):
        cfg["data"]["root"] = "data/demo/VOC2012"
        _write(tmp_path / "results", run, "mask", "voc", "train", 40.0, 45.0, cfg, synthetic=True)
        summary = tmp_path / "results" / run / "summary.json"
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "cwd": str(tmp_path / "gone")}))
        crf = tmp_path / "runs" / run / "pseudo" / "crf"
        crf.mkdir(parents=True)
        for i in ids:
            shutil.copy(voc_root / "SegmentationClass" / f"{i}.png", crf / f"{i}.png")


def test_fig5_reads_a_relative_data_root_from_the_current_folder_not_the_recorded_one(tmp_path, synth_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fig5_runs(tmp_path, synth_root / "VOC2012")
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "VOC2012").symlink_to(synth_root / "VOC2012")
    assert main(["results", "--runs", "runs"]) == 0
    fig = np.asarray(Image.open(tmp_path / "results" / "fig5_demo-s0_vs_demo_max-s0.png"))
    assert fig.shape[1] == 4 * 240 and fig.shape[0] > 22 + 2 * 160  # titles, two image rows, a legend
    assert "fig5_demo-s0_vs_demo_max-s0" in (tmp_path / "results" / "TABLES.md").read_text()


def test_fig5_is_skipped_with_one_line_when_its_data_is_not_here(tmp_path, synth_root, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fig5_runs(tmp_path, synth_root / "VOC2012")
    assert main(["results", "--runs", "runs"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "Fig. 5" in line]
    assert len(skipped) == 1 and skipped[0].startswith(
        "warning: Fig. 5 (demo-s0 vs demo_max-s0) skipped: VOC root data/demo/VOC2012"
    )
    assert str(tmp_path) in skipped[0] and not (tmp_path / "results" / "fig5_demo-s0_vs_demo_max-s0.png").exists()
