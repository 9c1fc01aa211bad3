import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

from tkpbench.config import save_config
from tkpbench.data import VOCSegmentation
from tkpbench.data.common import read_mask
from tkpbench.io import atomic_write_json
from tkpbench.pipeline import PipelineError, check_data, main, run_chain
from tkpbench.records import SCHEMA_VERSION, command_line, load_summary
from tkpbench.runs import ResultsDir, model_digest

REPO = Path(__file__).resolve().parents[1]


def test_missing_data_stops_before_any_training(tmp_path, capsys):
    rc = main(
        [
            "voc",
            "--set",
            f"data.root={tmp_path / 'nothing'}",
            "--runs",
            str(tmp_path / "runs"),
            "--results",
            str(tmp_path / "results"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "nothing was started" in err and "python -m tkpbench.data download voc" in err
    assert not (tmp_path / "runs").exists()


def test_missing_weights_file_is_reported_by_the_check(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012", model__weights=str(tmp_path / "vit.pth"))
    with pytest.raises(PipelineError, match=r"vit\.pth: MISSING.*download weights"):
        check_data(cfg)


def test_reproduce_sh_prints_usage_for_an_unknown_target():
    r = subprocess.run([str(REPO / "reproduce.sh"), "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "Usage" in r.stdout


def test_a_real_data_run_without_pretrained_weights_is_refused(synth_root):
    cfg = tiny_config(synth_root / "VOC2012")
    cfg.synthetic = False
    with pytest.raises(PipelineError, match=r"model\.weights is empty.*random init"):
        check_data(cfg)


def _moved_elsewhere_it_reports_from_there(made: Path, monkeypatch) -> None:
    """Runs, results and data copied to a folder of another name (the made one gone) report from
    there, Fig. 5 included, which reads the data: nothing in a record names where it was made."""
    moved = made.parent / (made.name + "-moved")
    for name in ("runs", "results", "data"):
        shutil.copytree(made / name, moved / name)
    # a max-pooling twin of the run, so that the report has the pair Fig. 5 shows
    shutil.copytree(moved / "runs" / "tiny", moved / "runs" / "tiny_max")
    summary = load_summary(moved / "results" / "tiny" / "summary.json")
    summary["run"], summary["config"]["name"] = "tiny_max", "tiny_max"
    summary["config"]["model"].update(pooling="max", pce=False)
    (moved / "results" / "tiny_max").mkdir()
    for f in (moved / "results" / "tiny").glob("counts_*.npz"):
        shutil.copy(f, moved / "results" / "tiny_max" / f.name)
    atomic_write_json(moved / "results" / "tiny_max" / "summary.json", summary)
    (made / "data").rename(made / "data-gone")
    monkeypatch.chdir(moved)
    r = subprocess.run(
        [sys.executable, "-m", "tkpbench.report", "results", "--runs", "runs"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and "skipped" not in r.stderr, r.stderr[-2000:]
    assert (moved / "results" / "fig5_tiny_vs_tiny_max.png").is_file()
    (made / "data-gone").rename(made / "data")
    monkeypatch.chdir(made)


@pytest.mark.slow
def test_whole_chain_runs_then_a_rerun_skips_every_stage(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    shutil.copytree(synth_root / "VOC2012", tmp_path / "data" / "VOC2012")  # a relative data.root, as the demo's
    cfg = tiny_config(Path("data/VOC2012"), data__mask_split="train", data__seg_train_split="train_aug")
    save_config(cfg, tmp_path / "tiny.toml")
    logs: list[str] = []
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, log=logs.append)
    text = (tmp_path / "results" / "tiny" / "summary.json").read_text()
    assert str(tmp_path) not in text and str(REPO) not in text  # no path of this machine, commands included
    commands = [s["command"] for s in json.loads(text)["stages"].values()]
    assert commands and all(c.startswith(("python -m tkpbench.evaluate --", "python -m tkpbench.segment eval")) for c in commands)
    _moved_elsewhere_it_reports_from_there(tmp_path, monkeypatch)
    summary = load_summary(tmp_path / "results" / "tiny" / "summary.json")
    assert set(summary["stages"]) == {"mask", "seg"} and summary["synthetic"]
    assert any(line.startswith("$ ") and "tkpbench.train" in line for line in logs)
    # DeepLab's evaluation keeps its first predictions for Fig. 5, as class-index PNGs of val images
    examples = sorted((tmp_path / "runs" / "tiny" / "seg" / "examples").glob("*.png"))
    n_val = len(VOCSegmentation(synth_root / "VOC2012", "val"))
    assert len(examples) == min(8, n_val) > 0 and read_mask(examples[0], 21).max() < 21
    logs.clear()
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, log=logs.append)
    assert not any(line.startswith("$ ") for line in logs), [x for x in logs if x.startswith(("$ ", "[redo]"))]
    # 8 stages of final.pt; 3 per other selection (eval_every = 0: last.pt is final.pt, no best files)
    assert sum(line.startswith("[skip]") for line in logs) == 8 + 3 * 3, logs
    # records of another model (results committed from elsewhere, or a retrained run) are measured again
    run = tmp_path / "runs" / "tiny"
    assert summary["stages"]["mask"]["model_sha256"] == model_digest(run / "final.pt")
    assert summary["stages"]["seg"]["model_sha256"] == model_digest(run / "seg" / "final.pt")
    for stage in summary["stages"].values():
        stage["model_sha256"] = "0" * 16
    atomic_write_json(tmp_path / "results" / "tiny" / "summary.json", summary)
    logs.clear()
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, log=logs.append)
    assert not any(line.startswith("[skip] mask mIoU (Table 1)") for line in logs), logs
    assert any(line.startswith("$ ") and "tkpbench.segment eval" in line for line in logs), logs
    redone = load_summary(tmp_path / "results" / "tiny" / "summary.json")["stages"]
    assert redone["mask"]["model_sha256"] == model_digest(run / "final.pt")
    assert redone["seg"]["model_sha256"] == model_digest(run / "seg" / "final.pt")
    # a finished run is not reused for another config: the differing keys and the fix are shown
    with pytest.raises(PipelineError, match=r"(?s)another config.*model\.k: 2 -> 3.*--set name="):
        run_chain(tmp_path / "tiny.toml", ["model.k=3"], tmp_path / "runs", tmp_path / "results", 1, log=logs.append)
    # pseudo masks made from another final.pt are made again (never mixed), and so is everything after them
    marker = run / "pseudo" / "DONE_pseudo_train_aug.json"
    atomic_write_json(marker, {**json.loads(marker.read_text()), "model_sha256": "0" * 16})
    logs.clear()
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, log=logs.append)
    assert any(line.startswith("[redo] DONE_pseudo_train_aug.json") for line in logs), logs
    assert any(line.startswith("$ ") and "tkpbench.pseudo" in line and "train_aug" in line for line in logs)
    # a changed CRF setting redoes the CRF and every stage after it, and nothing before it
    logs.clear()
    run_chain(tmp_path / "tiny.toml", ["crf.iters=3"], tmp_path / "runs", tmp_path / "results", 1, log=logs.append)
    ran = [line for line in logs if line.startswith("$ ")]
    assert not any("tkpbench.train" in c or "tkpbench.pseudo" in c for c in ran), ran
    for stage in ("tkpbench.refine", "tkpbench.evaluate", "tkpbench.segment train", "tkpbench.segment eval"):
        assert any(stage in c for c in ran), (stage, ran)
    assert any("crf.iters: 10 -> 3" in line for line in logs), logs
    stages = load_summary(tmp_path / "results" / "tiny" / "summary.json")["stages"]
    assert stages["mask"]["settings"]["crf.iters"] == 3 and stages["seg"]["settings"]["crf.iters"] == 3


@pytest.mark.slow
def test_coco_layout_chain_on_the_generated_twin(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    cfg = tiny_config(
        synth_root / "coco",
        "tiny_coco",
        data__dataset="coco",
        data__train_split="train2014",
        data__val_split="val2014",
        data__mask_split="train2014",
        data__seg_train_split="train2014",
    )
    save_config(cfg, tmp_path / "coco.toml")
    run_chain(tmp_path / "coco.toml", [], tmp_path / "runs", tmp_path / "results", 1, log=lambda *_: None)
    stages = load_summary(tmp_path / "results" / "tiny_coco" / "summary.json")["stages"]
    # 21 generated, the unannotated one left out
    assert stages["mask"]["dataset"] == "coco" and stages["mask"]["num_images"] == 20
    assert stages["seg"]["split"] == "val2014" and stages["seg"]["num_images"] == 4


def test_num_classes_that_does_not_fit_the_dataset_is_refused(synth_root, tmp_path):
    from tkpbench import distributed as D
    from tkpbench.engine import TrainingError, fit
    from tkpbench.train import TKPTask

    cfg = tiny_config(synth_root / "VOC2012", model__num_classes="81")
    with pytest.raises(TrainingError, match="model.num_classes=21"):
        fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "r", D.DistInfo(), progress=False)


def test_a_command_is_recorded_as_typed_again_without_this_machines_paths():
    pkg = REPO / "tkpbench"
    assert command_line([str(pkg / "pipeline.py"), "demo"]) == "python -m tkpbench.pipeline demo"
    assert command_line([str(pkg / "report" / "__main__.py"), "results"]) == "python -m tkpbench.report results"
    assert command_line([str(pkg / "report" / "__init__.py"), "results"]) == "python -m tkpbench.report results"
    assert command_line(["tkpbench segment", "eval", "--run-dir", "runs/x"]) == "tkpbench segment eval --run-dir runs/x"
    assert command_line(["/home/me/bench/stages.py", "--quick"]) == "python stages.py --quick"
    assert command_line([]) == ""


@pytest.mark.slow
def test_the_demo_really_learns(tmp_path, monkeypatch):
    """The demo's TKP-PCL pseudo masks (seed 0) lie far above the all-background baseline, and its
    self-check, which `make demo` applies to every seed and variant, passes on that record."""
    from tkpbench.data.synth import make_synthetic
    from tkpbench.pipeline import demo_learned

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    make_synthetic(tmp_path / "demo", n=200, seed=0)
    root = f"data.root={tmp_path / 'demo' / 'VOC2012'}"
    ov = [root, "train.seed=0", "name=demo-s0"]
    run_chain(REPO / "configs" / "demo.toml", ov, tmp_path / "runs", tmp_path / "results", 1, seg=False, log=lambda *_: None)
    rec = load_summary(tmp_path / "results" / "demo-s0" / "summary.json")["stages"]["mask"]
    assert rec["miou_all_background"] < 10
    assert rec["miou_crf"] > rec["miou_all_background"] + 25, rec["miou_crf"]
    demo_learned(ResultsDir(tmp_path / "results"), ["demo-s0"])


def test_the_demo_fails_naming_a_run_that_did_not_learn(tmp_path):
    from tkpbench.pipeline import demo_learned

    results = ResultsDir(tmp_path / "results")
    for name, crf in (("demo-s0", 60.0), ("demo-s1", 20.0), ("demo_max-s0", 29.1)):
        mask = {"miou_crf": crf, "miou_all_background": 4.0}
        atomic_write_json(results.summary(name), {"schema": SCHEMA_VERSION, "stages": {"mask": mask}})
    demo_learned(results, ["demo-s0", "demo_max-s0"])
    named = r"did not learn: .*within 25 points.* demo-s1 \(20\.0 after the CRF, all-background 4\.0\)"
    with pytest.raises(PipelineError, match=named):
        demo_learned(results, ["demo-s0", "demo-s1", "demo_max-s0"])
