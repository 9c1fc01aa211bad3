"""The report's checkpoint selection: the § flag on cells chosen with val pixel labels, the
selection table with best_miou - last paired over seeds and images, and the json ``selection``."""

import json

import numpy as np

from tkpbench.config import Config, apply_overrides
from tkpbench.records import StageRecord, write_stage
from tkpbench.report import build_tables, load_results
from tkpbench.report.formats import measured_cells, to_json, to_latex, to_markdown
from tkpbench.stats import save_counts

IDS = [f"img{i}" for i in range(12)]


def _cfg(keep: str, synthetic: bool = True) -> dict:
    c = Config()
    c.synthetic = synthetic
    apply_overrides(c, ["model.pooling=topk", "model.pce=true", f"train.keep={keep}", "train.eval_every=1"])
    return c.to_dict()


def _record(results, run, stage, cfg, inter, protocol=None, synthetic=True):
    """A mask record with per-image counts: union 100 px of class 1 per image, ``inter`` of them right."""
    inter = np.stack([np.zeros(len(IDS)), np.asarray(inter, dtype=float)], 1).astype(np.int64)
    union = np.full_like(inter, 100)
    union[:, 0] = 0
    name = f"counts_{stage}.npz"
    (results / run).mkdir(parents=True, exist_ok=True)
    save_counts(results / run / name, IDS, inter=inter, union=union, inter_crf=inter, union_crf=union)
    rec = StageRecord(
        stage=stage,
        dataset="voc",
        split="train",
        miou=50.0,
        per_class={},
        num_images=len(IDS),
        miou_crf=50.0,
        synthetic=synthetic,
        date="2026-12-01T00:00:00",
        counts_file=name,
        protocol=protocol or {},
    )
    write_stage(results, run, rec, cfg)


def _runs(results, keep="best"):
    """Two seeds: final.pt is best_miou (keep = best) at 60 %, last 50 %, best_f1 55 %."""
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        cfg = _cfg(keep)
        cfg["train"]["seed"] = seed
        run = f"demo-s{seed}"
        noise = rng.permutation([-3, -2, -1, 1, 2, 3] * 2)  # mean 0: the means are exact
        final = "best_miou" if keep == "best" else "last"
        _record(results, run, "mask", cfg, 60 + noise, {"selection": final, "selections": [final], "epoch": 2})
        _record(results, run, "mask@last", cfg, 50 + noise, {"selection": "last", "selections": ["last"], "epoch": 3})
        _record(results, run, "mask@best_f1", cfg, 55 + noise, {"selection": "best_f1", "selections": ["best_f1"], "epoch": 1})


def test_cells_chosen_with_val_pixel_labels_are_flagged_and_the_selection_table_pairs_best_with_last(tmp_path):
    _runs(tmp_path)
    tables = build_tables(load_results(tmp_path))
    demo = next(t for t in tables if t[0].startswith("Demo runs"))
    row = demo[2][0]
    assert row[3].endswith("§") and row[2].endswith("§") and row[5] == "-"  # no DeepLab record: nothing to flag
    assert any(n.startswith("§ chosen with val pixel labels") for n in demo[3])
    sel = next(t for t in tables if t[0].startswith("Checkpoint selection"))
    rows = {r[0]: r for r in sel[2]}
    assert rows["last"][3].startswith("50.0") and rows["best_f1"][3].startswith("55.0")
    assert rows["best_miou"][3].startswith("60.0") and rows["best_miou"][3].endswith("§")
    assert not rows["last"][3].endswith("§") and not rows["best_f1"][3].endswith("§")
    assert rows["best_miou"][4].startswith("+10.0 [") and "excludes 0" in rows["best_miou"][4]
    assert rows["best_f1"][2] == "1" and rows["last"][2] == "3"
    # the footnote is printed under the table in every format
    assert "- § chosen with val pixel labels" in to_markdown([sel]) and r"\S{} chosen" in to_latex([sel])


def test_json_gives_every_measured_cell_its_selection(tmp_path):
    _runs(tmp_path)
    out = json.loads(to_json(build_tables(load_results(tmp_path))))
    demo = next(t for t in out if t["title"].startswith("Demo runs"))
    assert {(c["column"], c["selection"]) for c in demo["cells"]} == {
        ("mask (pre-CRF)", "best_miou"),
        ("mask (CRF)", "best_miou"),
        ("seg", "best_miou"),
    }
    sel = next(t for t in out if t["title"].startswith("Checkpoint selection"))
    assert [(c["value"][:4], c["selection"]) for c in sel["cells"]] == [
        ("50.0", "last"),
        ("60.0", "best_miou"),
        ("55.0", "best_f1"),
    ]


def test_keep_last_is_not_flagged_and_old_records_without_selection_still_load(tmp_path):
    _runs(tmp_path, keep="last")
    demo = next(t for t in build_tables(load_results(tmp_path)) if t[0].startswith("Demo runs"))
    assert not any(c.endswith("§") for c in demo[2][0]) and not any(n.startswith("§") for n in demo[3])
    # a record of an earlier version (no protocol.selection): final.pt was train.keep's choice
    old = tmp_path / "old"
    _record(old, "demo", "mask", _cfg("best"), [60] * len(IDS))
    tables = build_tables(load_results(old))
    demo = next(t for t in tables if t[0].startswith("Demo runs"))
    assert demo[2][0][3].endswith("§")
    assert [c["selection"] for c in measured_cells(demo)] == ["best_miou"] * 3
    assert not any(t[0].startswith("Checkpoint selection") for t in tables)  # one selection: nothing to compare


def test_table_1_and_4_flag_real_runs_kept_by_best_val_miou(tmp_path):
    _record(tmp_path, "topk_pce", "mask", _cfg("best", synthetic=False), [70] * len(IDS), {"selection": "best_miou"}, False)
    out = json.loads(to_json(build_tables(load_results(tmp_path))))
    t1 = next(t for t in out if t["title"].startswith("Table 1"))
    t4 = next(t for t in out if t["title"].startswith("Table 4"))
    assert [c["column"] for c in t1["cells"]] == ["measured", "measured +CRF"]
    assert all(c["value"].endswith("§") and c["selection"] == "best_miou" for c in t1["cells"])
    assert any(f.startswith("§ chosen with val pixel labels") for f in t1["footnotes"])
    assert {c["column"] for c in t4["cells"]} == {"measured mask (CRF)", "measured seg"}
    assert next(c for c in t4["cells"] if c["column"] == "measured mask (CRF)")["value"].endswith("§")
