"""Bad input to training ends with one ``error:`` line that names the key and the fix, exit 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

from tkpbench import distributed as D
from tkpbench.config import save_config
from tkpbench.data.__main__ import main as data_main
from tkpbench.errors import TrainingError
from tkpbench.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def test_a_training_split_smaller_than_one_global_batch_is_one_error_line(synth_root, tmp_path):
    """The synthetic train_aug split has 20 images; a global batch of 32 cannot make one step."""
    save_config(tiny_config(synth_root / "VOC2012", train__batch_size="32"), tmp_path / "cfg.toml")
    r = subprocess.run(
        [sys.executable, "-m", "tkpbench.train", "--config", "cfg.toml", "--no-progress", "--device", "cpu"],
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "has 20 images, fewer than one global batch of 32" in lines[0]
    assert "train.batch_size" in lines[0] and "at most 20" in lines[0]


def test_the_sampler_names_the_training_set_it_was_given():
    with pytest.raises(TrainingError, match=r"^VOC train_aug has 8 images, fewer than one global batch of 16: .*at most 8"):
        D.ResumableSampler(8, 16, 0, 1, 0, what="VOC train_aug")
    assert D.ResumableSampler(16, 16, 0, 1, 0).batches_per_epoch == 1  # exactly one batch is enough


def _train_error(cfg, tmp_path, capsys) -> str:
    save_config(cfg, tmp_path / "cfg.toml")
    args = ["--config", str(tmp_path / "cfg.toml"), "--runs", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_an_img_size_that_is_not_a_multiple_of_the_patch_is_one_error_line(synth_root, tmp_path, capsys):
    line = _train_error(tiny_config(synth_root / "VOC2012", model__img_size="40"), tmp_path, capsys)
    assert "model.img_size = 40 is not a multiple of the patch size 16" in line and "e.g. 32" in line


def test_a_k_larger_than_the_patch_grid_is_one_error_line(synth_root, tmp_path, capsys):
    """model.img_size 32 with 16 px patches: 4 patches, so top-4 is the most there is."""
    line = _train_error(tiny_config(synth_root / "VOC2012", model__k="5"), tmp_path, capsys)
    assert "model.k = 5" in line and "these images have 4; set model.k to at most 4" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "21"], "argument --classes: '21' is not a number of VOC foreground classes (1 to 20)"),
        (["--size", "8", "64"], "argument --size: '8' is not an image side of at least 16 px"),
        (["--seed", "-1"], "argument --seed: '-1' is not a seed >= 0"),
    ],
)
def test_bad_synth_arguments_are_one_error_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        data_main(["synth", "--root", str(tmp_path / "s"), "--n", "2", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
