"""The DeepLab evaluation ladder: single scale, multi-scale + flip and + CRF in one pass over val."""

import numpy as np
import pytest
import torch

from tkpbench import distributed as D
from tkpbench.config import Config, apply_overrides
from tkpbench.deeplab import DeepLabV2, predict_probs
from tkpbench.engine import fit
from tkpbench.records import load_summary
from tkpbench.segment import MSF_SCALES, SegTask, evaluate, ladder, ladder_probs
from tkpbench.stats import load_counts, measurement, miou_from_counts


def _cfg(*overrides):
    c = Config()
    apply_overrides(c, list(overrides))
    return c


def _rungs(cfg, with_crf=False):
    return [(r.name, r.scales, r.flip, r.crf, r.suffix) for r in ladder(cfg, with_crf)]


def test_the_default_protocol_is_the_single_scale_rung_and_keeps_the_plain_keys():
    assert _rungs(_cfg()) == [("ss", (1.0,), False, False, ""), ("msf", MSF_SCALES, True, False, "_msf")]
    # --ladder adds the CRF on the ms+flip probabilities; seg.eval_crf adds it and the configured CRF
    assert _rungs(_cfg(), with_crf=True)[-1] == ("msf_crf", MSF_SCALES, True, True, "_msf_crf")
    assert [r[0] for r in _rungs(_cfg("seg.eval_crf=true"))] == ["ss", "msf", "msf_crf", "configured_crf"]
    assert _rungs(_cfg("seg.eval_crf=true"))[-1] == ("configured_crf", (1.0,), False, True, "_crf")


def test_a_multi_scale_protocol_is_the_ms_flip_rung():
    cfg = _cfg("seg.eval_scales=[0.75,1.0,1.25]", "seg.eval_flip=true", "seg.eval_crf=true")
    assert _rungs(cfg) == [
        ("ss", (1.0,), False, False, "_ss"),
        ("msf", (0.75, 1.0, 1.25), True, False, ""),
        ("msf_crf", (0.75, 1.0, 1.25), True, True, "_crf"),
    ]
    # a protocol that is neither rung is a rung of its own, stored under the plain keys
    odd = _rungs(_cfg("seg.eval_scales=[0.75]"))
    assert odd[0] == ("configured", (0.75,), False, False, "") and [r[4] for r in odd[1:]] == ["_ss", "_msf"]


def test_ladder_probabilities_equal_predict_probs_for_every_rung():
    torch.manual_seed(0)
    model = DeepLabV2(4, "resnet18", output_stride=16).eval()
    img = torch.randn(1, 3, 37, 53)
    cfg = _cfg("seg.eval_scales=[1.0,0.75]", "seg.eval_flip=true")
    rungs = ladder(cfg, with_crf=True)
    with torch.no_grad():
        got = ladder_probs(model, img, rungs, amp=False)
        for r in rungs:
            want = predict_probs(model, img, list(r.scales), r.flip, amp=False)
            # the configured protocol (first) adds in predict_probs's order: equal to the bit
            assert torch.equal(got[(r.scales, r.flip)], want) if r.suffix == "" else torch.allclose(got[(r.scales, r.flip)], want)
    assert set(got) == {((1.0, 0.75), True), ((1.0,), False)}


@pytest.fixture()
def trained(run_with_masks):
    run, cfg = run_with_masks
    cfg.seg.iters = 4
    fit(SegTask(cfg, run), cfg.to_dict(), run / "seg", D.DistInfo(), progress=False)
    return run, cfg


@pytest.mark.slow
def test_one_evaluation_stores_every_rung_and_the_record_lists_them(trained, tmp_path):
    run, cfg = trained
    cfg.crf.device = "cpu"
    cfg.seg.eval_scales = [0.5, 1.0]  # neither rung: a rung of its own; four views in all
    out = evaluate(run, "val", D.DistInfo(), cfg, progress=False, results=tmp_path / "results", with_crf=True)
    rec = load_summary(tmp_path / "results" / "tiny" / "summary.json")["stages"]["seg"]
    ladder_rec = rec["protocol"]["ladder"]
    assert [r["rung"] for r in ladder_rec] == ["configured", "ss", "msf", "msf_crf"]
    assert [r["table2"] for r in ladder_rec] == [True, False, False, False]
    c = load_counts(tmp_path / "results" / "tiny" / rec["counts_file"])
    n, k = rec["num_images"], len(rec["per_class"])
    for r in ladder_rec:
        m = measurement(c, r["counts_suffix"])
        assert m.inter.shape == m.pred.shape == m.gt.shape == (n, k) and m.confusion.shape == (k, k)
        # every rung's per-image counts add up to its dataset confusion matrix and give its recorded mIoU
        assert np.array_equal(m.inter.sum(0), np.diag(m.confusion)) and np.array_equal(m.pred.sum(0), m.confusion.sum(0))
        assert np.array_equal(m.union, m.pred + m.gt - m.inter)
        assert miou_from_counts(m.inter, m.union) == pytest.approx(r["miou"], abs=1e-3)
        assert out["ladder"][r["rung"]] * 100 == pytest.approx(r["miou"], abs=1e-3)
    # the ground truth is the same whatever the rung; the predictions differ
    assert (
        np.array_equal(c["gt"], c["gt_ss"]) and np.array_equal(c["gt"], c["gt_msf"]) and np.array_equal(c["gt"], c["gt_msf_crf"])
    )
    assert rec["miou"] == ladder_rec[0]["miou"] and "inter_crf" not in c
