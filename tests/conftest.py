from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.is_dir():
    SHARED_DATA = Path(os.environ.get("TKPBENCH_SHARED_DATA", "/nonexistent"))


@pytest.fixture(scope="session", autouse=True)
def _caches_in_a_temporary_folder(tmp_path_factory):
    """Tag and mask caches go to a temporary folder: no test writes into the data it reads."""
    os.environ["TKPBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a digest of its bytes (folders: their names)."""
    return {
        str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="session", autouse=True)
def _shared_data_is_left_unchanged():
    """The real samples are read-only material: a test run leaves them exactly as it found them."""
    before = _snapshot(SHARED_DATA) if SHARED_DATA.is_dir() else None
    yield
    if before is not None:
        after = _snapshot(SHARED_DATA)
        assert after == before, f"tests changed {SHARED_DATA}: {sorted(set(after) ^ set(before))[:5]}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (real VOC/COCO samples) is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small generated VOC + COCO dataset shared by the tests (deterministic)."""
    from tkpbench.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, n=24, seed=0, size=(96, 128))
    return root


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory) -> Path:
    """A tiny TKP-PCL model trained for one epoch on the generated data (one per test module)."""
    from helpers import tiny_config

    from tkpbench import distributed as D
    from tkpbench.engine import fit
    from tkpbench.train import TKPTask

    cfg = tiny_config(synth_root / "VOC2012", train__epochs="1")
    run = tmp_path_factory.mktemp("runs") / "tiny"
    fit(TKPTask(cfg), cfg.to_dict(), run, D.DistInfo(), progress=False)
    return run


@pytest.fixture()
def run_with_masks(synth_root, tmp_path):
    """A run folder whose 'pseudo masks' are the generated ground truth (for DeepLab's mechanics only)."""
    from helpers import tiny_config

    from tkpbench.data import VOCSegmentation, save_mask

    run = tmp_path / "tiny"
    cfg = tiny_config(synth_root / "VOC2012", data__seg_train_split="train_aug")
    ds = VOCSegmentation(cfg.data.root, "train_aug")
    (run / "pseudo" / "crf").mkdir(parents=True)
    for i in range(len(ds)):
        save_mask(run / "pseudo" / "crf" / f"{ds.ids[i]}.png", ds.mask(i))
    return run, cfg
