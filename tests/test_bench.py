"""bench/: the stage benchmarks read the targets' recipes from the pipeline, and the GPU check's
machinery (no-GPU exit, skips, budgets, record) works on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not installed: it is imported from the repository

from bench import gpu_check as gc  # noqa: E402


def _ctx(tmp_path, gpus=0, dry=False) -> gc.Context:
    return gc.Context(torch.device("cpu"), gpus, dry, tmp_path, None)


def test_without_a_gpu_it_says_why_and_exits_0(tmp_path):
    out = tmp_path / "record.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine that has one
    p = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("no usable GPU: ") and p.stdout.rstrip().endswith("; nothing to check")
    assert len(p.stdout.strip().splitlines()) == 1
    assert not out.exists()


def test_a_missing_package_a_gpu_count_and_the_dry_run_skip_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf now raises ImportError
    ran = []
    checks = [
        gc.Check("crf", 10, lambda ctx, b: ran.append("crf"), needs=("pydensecrf",)),
        gc.Check("ddp", 10, lambda ctx, b: ran.append("ddp"), gpus=2),
        gc.Check("peak", 10, lambda ctx, b: ran.append("peak")),
    ]
    rows = gc.run_checks(checks, _ctx(tmp_path, gpus=1), {"crf", "ddp"})
    assert ran == []
    assert [(r["check"], r["status"], r["note"]) for r in rows] == [
        ("crf", "skip", "pydensecrf not installed"),
        ("ddp", "skip", "needs 2 GPUs, this machine has 1"),
        ("peak", "skip", "not selected (--only / --skip)"),
    ]
    rows = gc.run_checks(checks[2:], _ctx(tmp_path, dry=True), {"peak"})
    assert rows[0]["note"] == "needs a GPU (--cpu-dry-run)" and ran == []


def test_an_error_or_an_overrun_fails_the_check_and_not_the_others(tmp_path):
    def broken(ctx, budget):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def slow(ctx, budget):
        time.sleep(0.05)
        return gc.verdict(True, "fast enough?")

    checks = [
        gc.Check("broken", 10, broken, on_cpu=True),
        gc.Check("slow", 0, slow, on_cpu=True),
        gc.Check("good", 10, lambda ctx, b: gc.verdict(True, "1.0 agree"), on_cpu=True),
    ]
    rows = gc.run_checks(checks, _ctx(tmp_path, gpus=1), {"broken", "slow", "good"})
    assert [r["status"] for r in rows] == ["fail", "fail", "pass"]
    assert rows[0]["note"] == "CUDA error: an illegal memory access was encountered"
    assert "over its budget of 0 s" in rows[1]["note"]


def test_without_pydensecrf_the_crf_check_compares_the_torch_crf_with_its_cpu_path(tmp_path, monkeypatch):
    from tkpbench.data import synth

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    small = synth.render
    monkeypatch.setattr(synth, "render", lambda rng, h, w, c: small(rng, 48, 64, c))  # 10 images at 48 x 64
    r = gc.check_crf(_ctx(tmp_path), 60)
    assert r.status == "pass" and r.data["reference"] == "torch on the CPU", r
    assert r.data["agreement_min"] == 1.0 and "against torch on the CPU" in r.note
    assert dict((c.name, c.needs) for c in gc.CHECKS)["crf"] == ("rich",)


def test_the_budgets_fit_eight_minutes_on_one_gpu_and_ten_on_two():
    one = sum(c.budget_s for c in gc.CHECKS if c.gpus <= 1)
    assert one <= 8 * 60
    assert sum(c.budget_s for c in gc.CHECKS) <= 10 * 60


def test_pixel_agreement():
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[0, 1], [2, 0]])
    assert gc.pixel_agreement(a, b) == 0.75
    assert gc.pixel_agreement(a, b, a < 3) == 1.0
    assert gc.pixel_agreement(a, b, torch.zeros_like(a, dtype=torch.bool)) == 1.0


def test_the_record_names_the_machine_tf32_and_every_check(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert gc.main(["--cpu-dry-run", "--only", "cuda,peak", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["machine"]["cores"] == len(os.sched_getaffinity(0))
    assert rec["machine"]["torch"] == torch.__version__ and "cpu" in rec["machine"]
    assert set(rec["precision"]) >= {"tf32_matmul", "tf32_cudnn", "float32_matmul_precision"}
    assert rec["commit"] and rec["cpu_dry_run"] is True
    assert [r["check"] for r in rec["checks"]] == [c.name for c in gc.CHECKS]
    assert rec["counts"] == {"pass": 0, "fail": 0, "skip": len(gc.CHECKS)}
    shown = capsys.readouterr().out
    assert "needs a GPU (--cpu-dry-run)" in shown and "TF32: matmul" in shown


def test_an_unknown_check_is_one_error_line(capsys):
    assert gc.main(["--only", "cuda,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown check(s) bogus;") and len(err.strip().splitlines()) == 1


def test_the_gpu_check_imports_no_optional_package_and_the_benchmarks_not_the_training_stage():
    code = (
        "import sys; import bench.gpu_check; "
        "bad = {'pydensecrf', 'pycocotools', 'rich'} & set(sys.modules); assert not bad, bad; "
        "import bench.stages; assert 'tkpbench.train' not in sys.modules"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_the_projection_reads_each_targets_chains_from_the_pipeline():
    from bench import stages

    out = {
        "model": {"img_size": 384, "batch": 16, "s_per_step": 1.0},
        "deeplab_resnet101_crop321": {"bf16_channels_last": {"images_per_s": 10.0, "msc_scales": [0.5, 0.75]}},
    }
    proj = stages.projection(out)
    # voc: topk_pce 50 epochs + vit_pcm 80 epochs of 10582 // 16 steps; DeepLab 20k iterations x 10 images per chain
    assert proj["voc"]["chains"] == ["topk_pce", "vit_pcm"]
    assert proj["voc"]["train"] == round((50 + 80) * (10582 // 16) / 3600, 2)
    assert proj["voc"]["deeplab"] == round(2 * 20000 * 10 / 10.0 / 3600, 2)
    # coco: the pipeline's seg.iters=100000 and the COCO training split
    assert proj["coco"]["deeplab"] == round(2 * 100000 * 10 / 10.0 / 3600, 2)
    assert proj["coco"]["train"] == round((50 + 80) * (82081 // 16) / 3600, 2)
    # a figure measured at other settings projects nothing
    out["deeplab_resnet101_crop321"]["bf16_channels_last"]["msc_scales"] = []
    assert "deeplab" not in stages.projection(out)["voc"]


@pytest.mark.slow
def test_the_training_checks_pass_on_the_cpu(tmp_path):
    """ddp (2 gloo processes across the unfreeze with ET), sigterm (143, then the resume) and nan,
    through the real training stage on generated data."""
    out = tmp_path / "r.json"
    assert gc.main(["--cpu-dry-run", "--only", "ddp,sigterm,nan", "--out", str(out)]) == 0
    rows = {r["check"]: r for r in json.loads(out.read_text())["checks"]}
    assert [rows[c]["status"] for c in ("ddp", "sigterm", "nan")] == ["pass"] * 3, rows
