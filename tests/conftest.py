from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.is_dir():
    SHARED_DATA = Path(os.environ.get("TKPBENCH_SHARED_DATA", "/nonexistent"))


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
