"""Checkpoint selection: every training keeps last.pt, best.pt (best val mIoU) and best_f1.pt (best
val tag F1) beside final.pt, of the right epochs, exactly across a resume."""

import json
import shutil

import pytest
import torch
from helpers import run_until_killed, tiny_config

from tkpbench import distributed as D
from tkpbench.engine import fit
from tkpbench.errors import CheckpointError
from tkpbench.io import atomic_write_json
from tkpbench.runs import ResultsDir, RunDir, load_checkpoint, load_final
from tkpbench.train import TKPTask

CPU = D.DistInfo()


def _epoch_weights(run_dir, epoch: int, per_epoch: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{epoch * per_epoch:08d}.pt", weights_only=True)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scripted_metrics_keep_the_best_f1_best_miou_and_last_epochs(synth_root, tmp_path):
    """mIoU peaks at epoch 2, F1 ties at epochs 1 and 3 (the earlier wins): best.pt is epoch 2,
    best_f1.pt epoch 1, last.pt and final.pt (train.keep = last) epoch 3."""
    scripted = {1: (0.2, 0.7), 2: (0.9, 0.3), 3: (0.5, 0.7)}

    class Scripted(TKPTask):
        def evaluate(self, model, dist):
            self.seen = getattr(self, "seen", 0) + 1
            miou, f1 = scripted[self.seen]
            return {"miou": miou, "f1": f1}

    cfg = tiny_config(synth_root / "VOC2012", train__eval_every="1", train__keep_checkpoints="10")
    fit(Scripted(cfg), cfg.to_dict(), tmp_path / "s", CPU, progress=False)
    run = RunDir(tmp_path / "s")
    files = {sel: load_checkpoint(run.weights(sel)) for sel in ("final", "last", "best_miou", "best_f1")}
    per_epoch = files["last"]["weights_step"] // 3
    assert [files[s]["epoch"] for s in ("last", "best_miou", "best_f1")] == [3, 2, 1]
    assert files["final"]["selection"] == "last" and files["best_f1"]["f1"] == 0.7 and files["best_miou"]["miou"] == 0.9
    for sel, epoch in (("best_miou", 2), ("best_f1", 1), ("last", 3), ("final", 3)):
        assert _same(files[sel]["model"], _epoch_weights(run.root, epoch, per_epoch)), sel
    assert not _same(files["best_f1"]["model"], files["best_miou"]["model"])
    # every file loads as final.pt does (weights_only, with its config)
    assert load_final(RunDir(run.root, "best_f1"))["config"] == cfg.to_dict()


def test_keep_best_final_is_the_best_miou_selection(synth_root, tmp_path):
    scripted = iter([0.2, 0.9, 0.5])

    class Scripted(TKPTask):
        def evaluate(self, model, dist):
            return {"miou": next(scripted), "f1": 0.5}

    cfg = tiny_config(synth_root / "VOC2012", train__keep="best", train__eval_every="1")
    fit(Scripted(cfg), cfg.to_dict(), tmp_path / "b", CPU, progress=False)
    run = RunDir(tmp_path / "b")
    final, best = load_checkpoint(run.final), load_checkpoint(run.weights("best_miou"))
    assert final["selection"] == "best_miou" and final["epoch"] == 2 == best["epoch"]
    assert final["weights_step"] == best["weights_step"] < load_checkpoint(run.weights("last"))["weights_step"]
    assert load_checkpoint(run.weights("best_f1"))["epoch"] == 1  # F1 constant: the earliest epoch


@pytest.mark.slow
def test_real_evaluation_and_resume_keep_the_selected_files_exact(synth_root, tmp_path):
    """Real val F1 and mIoU each epoch; a run killed after epoch 2's evaluation and resumed keeps
    files identical to an uninterrupted run's, and each holds the epoch the log names."""
    cfg = tiny_config(synth_root / "VOC2012", train__eval_every="1", train__keep_checkpoints="10")
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "a", CPU, progress=False)
    run_until_killed(TKPTask(cfg), cfg, tmp_path / "b", kill_after_eval=2)
    assert not (tmp_path / "b" / "last.pt").exists()
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "b", CPU, progress=False)
    evals = [json.loads(ln) for ln in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_f1" in e]
    assert [e["epoch"] for e in evals] == [1, 2, 3]

    def best_epoch(key):  # ties: the earlier epoch
        return max(evals, key=lambda e: (e[key], -e["epoch"]))["epoch"]

    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    per_epoch = load_checkpoint(a.weights("last"))["weights_step"] // 3
    for sel, epoch in (("best_f1", best_epoch("val_f1")), ("best_miou", best_epoch("val_miou")), ("last", 3)):
        wa, wb = load_checkpoint(a.weights(sel)), load_checkpoint(b.weights(sel))
        assert wa["epoch"] == wb["epoch"] == epoch, sel
        assert _same(wa["model"], _epoch_weights(a.root, epoch, per_epoch)), sel
        for k in wa["model"]:
            torch.testing.assert_close(wa["model"][k], wb["model"][k], atol=1e-6, rtol=0)


def test_without_evaluations_only_last_is_kept(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "VOC2012")  # eval_every = 0
    fit(TKPTask(cfg), cfg.to_dict(), tmp_path / "n", CPU, progress=False)
    run = RunDir(tmp_path / "n")
    assert run.weights("last").is_file() and not run.weights("best_miou").exists() and not run.weights("best_f1").exists()
    with pytest.raises(CheckpointError, match="kept no 'best_f1' weights.*--selection final"):
        load_final(RunDir(run.root, "best_f1"))


def test_selection_paths_keep_final_as_it_was(tmp_path):
    final, f1 = RunDir(tmp_path), RunDir(tmp_path, "best_f1")
    assert (
        final.crf == tmp_path / "pseudo" / "crf" and final.marker("crf", "train") == tmp_path / "pseudo" / "DONE_crf_train.json"
    )
    assert f1.crf == tmp_path / "pseudo" / "best_f1" / "crf" and f1.weights() == tmp_path / "best_f1.pt"
    assert f1.marker("pseudo", "train") == tmp_path / "pseudo" / "best_f1" / "DONE_pseudo_train.json"
    assert RunDir(tmp_path, "best_miou").weights() == tmp_path / "best.pt"
    with pytest.raises(CheckpointError, match="unknown checkpoint selection 'best'"):
        RunDir(tmp_path, "best")


@pytest.mark.slow
def test_the_chain_scores_each_distinct_selection_once_and_a_rerun_skips_them(synth_root, tmp_path, monkeypatch):
    """Scripted val metrics make best_f1 epoch 1, best_miou epoch 2 and last epoch 3 (train.keep =
    best: final.pt is best_miou). The chain scores final.pt as "mask" (selection best_miou) and
    last and best_f1 as their own records; best.pt is final.pt's weights and is not scored again."""
    from tkpbench.config import dumps, save_config
    from tkpbench.pipeline import run_chain
    from tkpbench.records import load_summary
    from tkpbench.runs import model_digest

    scripted = {1: (0.2, 0.9), 2: (0.9, 0.3), 3: (0.5, 0.7)}

    class Scripted(TKPTask):
        def evaluate(self, model, dist):
            self.seen = getattr(self, "seen", 0) + 1
            miou, f1 = scripted[self.seen]
            return {"miou": miou, "f1": f1}

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(synth_root / "VOC2012", train__eval_every="1", train__keep="best", data__mask_split="train")
    save_config(cfg, tmp_path / "tiny.toml")
    fit(Scripted(cfg), cfg.to_dict(), tmp_path / "runs" / "tiny", CPU, progress=False, config_text=dumps(cfg))
    logs: list[str] = []
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, seg=False, log=logs.append)
    stages = load_summary(tmp_path / "results" / "tiny" / "summary.json")["stages"]
    assert set(stages) == {"mask", "mask@last", "mask@best_f1"}, logs
    run = RunDir(tmp_path / "runs" / "tiny")
    assert stages["mask"]["protocol"]["selection"] == "best_miou" and stages["mask"]["protocol"]["selections"] == ["best_miou"]
    assert stages["mask"]["protocol"]["epoch"] == 2
    for sel, epoch in (("last", 3), ("best_f1", 1)):
        rec = stages[f"mask@{sel}"]
        assert rec["protocol"]["selection"] == sel and rec["protocol"]["epoch"] == epoch
        assert rec["model_sha256"] == model_digest(run.weights(sel)) != stages["mask"]["model_sha256"]
        assert (tmp_path / "results" / "tiny" / rec["counts_file"]).is_file()
        assert len(list(RunDir(run.root, sel).crf.glob("*.png"))) == stages["mask"]["num_images"]
    assert not (run.pseudo / "best_miou").exists()
    logs.clear()
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, seg=False, log=logs.append)
    assert not any(line.startswith("$ ") for line in logs), logs
    # a selection's own pseudo masks made from other weights are made again, with its CRF, and only they
    # (its record names the weights and settings it measured, which did not change: it is kept)
    marker = RunDir(run.root, "best_f1").marker("pseudo", "train")
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "model_sha256": "0" * 16}))
    logs.clear()
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, seg=False, log=logs.append)
    ran = [line for line in logs if line.startswith("$ ")]
    assert len(ran) == 2 and all("--selection best_f1" in c for c in ran), ran
    assert "tkpbench.pseudo" in ran[0] and "tkpbench.refine" in ran[1]
    # a record of a selection that holds no weights of its own now (best_miou's best.pt is final.pt's
    # weights; as results committed from a machine where the best epoch was another) is dropped with its counts
    results = ResultsDir(tmp_path / "results")
    summary = load_summary(results.summary("tiny"))
    summary["stages"]["mask@best_miou"] = {**summary["stages"]["mask@last"], "model_sha256": "0" * 16}
    atomic_write_json(results.summary("tiny"), summary)
    shutil.copy(results.counts("tiny", "mask@last"), results.counts("tiny", "mask@best_miou"))
    logs.clear()
    run_chain(tmp_path / "tiny.toml", [], tmp_path / "runs", tmp_path / "results", 1, seg=False, log=logs.append)
    assert not any(line.startswith("$ ") for line in logs), logs
    assert any(line.startswith("[drop] mask@best_miou of tiny") for line in logs), logs
    assert set(load_summary(results.summary("tiny"))["stages"]) == {"mask", "mask@last", "mask@best_f1"}
    assert not results.counts("tiny", "mask@best_miou").exists() and results.counts("tiny", "mask@last").is_file()
