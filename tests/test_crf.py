import ast
import dataclasses
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tkpbench.config import Config
from tkpbench.crf import CRFInputError, dense_crf
from tkpbench.data import VOCSegmentation
from tkpbench.data.common import save_mask
from tkpbench.data.synth import blurred_probs
from tkpbench.errors import UserError
from tkpbench.metrics import ConfusionMatrix
from tkpbench.refine import CRFError, refine_folder
from tkpbench.runs import claim_outputs, save_probs

REPO = Path(__file__).resolve().parents[1]


def test_dense_crf_equals_a_direct_pydensecrf_call():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    p = rng.random((3, 30, 40)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    d = dcrf.DenseCRF2D(40, 30, 3)
    d.setUnaryEnergy(unary_from_softmax(p))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=img, compat=4)
    ref = np.array(d.inference(10)).reshape(3, 30, 40)
    np.testing.assert_allclose(dense_crf(img, p), ref, rtol=1e-6, atol=1e-7)


def test_the_crf_really_helps_on_blurred_shifted_boundaries():
    h, w = 80, 100
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    mask[(yy - 40) ** 2 + (xx - 35) ** 2 < 20**2] = 1
    mask[(yy > 20) & (yy < 60) & (xx > 65) & (xx < 90)] = 2
    palette = np.array([[40, 40, 40], [220, 30, 30], [30, 30, 220]], np.uint8)
    img = np.clip(palette[mask] + np.random.default_rng(1).normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)
    probs = blurred_probs(mask, 3, sigma=4, offset=4)
    before, after = ConfusionMatrix(3), ConfusionMatrix(3)
    before.update(probs.argmax(0), mask)
    after.update(dense_crf(img, probs).argmax(0), mask)
    assert after.miou() > before.miou() + 0.03


def test_the_crf_helps_on_real_voc_samples(shared_data):
    ds = VOCSegmentation(shared_data / "voc2012-sample" / "VOC2012", "val")
    before, after = ConfusionMatrix(21), ConfusionMatrix(21)
    for i in range(3):
        img, mask = ds.image(i), ds.mask(i)
        probs = blurred_probs(mask, 21, sigma=6, offset=5, seed=i)
        keep = np.flatnonzero(ds.tags(i))
        sub = probs[keep] / probs[keep].sum(0, keepdims=True)
        before.update(keep[sub.argmax(0)], mask)
        after.update(keep[dense_crf(img, sub).argmax(0)], mask)
    assert after.miou() > before.miou()


@pytest.mark.parametrize(
    "probs, msg",
    [
        (np.full((2, 4, 4), 0.3, np.float32), "sum to 1"),
        (np.full((2, 4, 4), np.nan, np.float32), "NaN"),
        (np.full((2, 5, 4), 0.5, np.float32), "H, W"),
        (np.ones((1, 4, 4), np.float32), "at least 2 labels"),
    ],
)
def test_bad_inputs_are_clear_errors(probs, msg):
    """A user error (one ``error:`` line from a command), and still a ValueError for callers."""
    with pytest.raises(CRFInputError, match=msg) as e:
        dense_crf(np.zeros((4, 4, 3), np.uint8), probs)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


@pytest.mark.slow
def test_under_torchrun_no_rank_looks_or_writes_before_rank_0_cleared_stale_masks(synth_root, tmp_path):
    """tests/crf_ddp_worker.py: 2 ranks over a folder of another model's masks (all 255), rank 0's
    clearing slowed down. Every mask must be a new one; and each rank runs this node's CPUs / 2 workers."""
    ds = VOCSegmentation(synth_root / "VOC2012", "val")
    pseudo = tmp_path / "run" / "pseudo"
    for i in range(len(ds)):
        present = np.flatnonzero(ds.tags(i))
        probs = blurred_probs(ds.mask(i), 21, sigma=3, offset=2, seed=i)[present]
        save_probs(pseudo / "probs" / f"{ds.ids[i]}.npz", probs / probs.sum(0), present, ds.mask(i).shape)
    claim_outputs(pseudo, "old model", {}, ("crf",))  # the stamp says: the masks below are the old model's
    for i in range(len(ds)):
        save_mask(pseudo / "crf" / f"{ds.ids[i]}.png", np.full(ds.mask(i).shape, 255, np.uint8))
    worker = [str(REPO / "tests" / "crf_ddp_worker.py"), str(synth_root / "VOC2012"), str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *worker]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    masks = {i: pseudo / "crf" / f"{i}.png" for i in ds.ids}
    assert all(p.is_file() for p in masks.values()), [i for i, p in masks.items() if not p.is_file()]
    for i, p in masks.items():
        assert np.array(Image.open(p)).max() < 21, f"{i}: a stale mask survived"
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert r.stdout.count(f"pydensecrf in {share} one-thread processes") == 2, r.stdout


def test_a_probabilities_file_of_another_size_than_its_image_is_named_with_the_fix(synth_root, tmp_path):
    cfg = Config()
    cfg.data.root = str(synth_root / "VOC2012")
    ds = VOCSegmentation(cfg.data.root, "val")
    sizes = [ds.mask(i).shape for i in range(len(ds))]
    sizes[1] = (sizes[1][0], sizes[1][1] + 3)  # image 1 changed after its probabilities were made
    for i, size in enumerate(sizes):
        probs = np.full((2, *size), 0.5, np.float32)
        save_probs(tmp_path / "pseudo" / "probs" / f"{ds.ids[i]}.npz", probs, np.array([0, 1]), size)
    fix = "delete it and run python -m tkpbench.pseudo again"
    with pytest.raises(CRFError, match=rf"1 images failed.*{ds.ids[1]}\.npz.*{sizes[1][0]}x{sizes[1][1]}.*{fix}") as e:
        refine_folder(tmp_path, "val", dataclasses.replace(cfg.crf, workers=1), cfg.data, progress=False)
    assert isinstance(e.value, UserError)
    assert len(list((tmp_path / "pseudo" / "crf").glob("*.png"))) == len(ds) - 1


def test_the_component_never_imports_the_stage_and_points_old_command_lines_to_it(capsys):
    tree = ast.parse((REPO / "tkpbench" / "crf.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "tkpbench.refine" not in imported and imported  # the stage imports the component, never back
    with pytest.raises(SystemExit) as e, pytest.warns(RuntimeWarning, match="found in sys.modules"):
        runpy.run_module("tkpbench.crf", run_name="__main__")  # = python -m tkpbench.crf
    assert e.value.code == 2 and "python -m tkpbench.refine" in capsys.readouterr().err
