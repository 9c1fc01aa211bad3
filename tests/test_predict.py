"""``tkpbench predict --device``: where the model and the CRF of your own images run."""

import pytest
import torch
from PIL import Image

import tkpbench.predict
from tkpbench.predict import main as predict


@pytest.fixture
def image(synth_root, tmp_path):
    path = tmp_path / "photo.png"
    Image.open(sorted((synth_root / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]).save(path)
    return path


def test_predict_crf_runs_where_device_says_else_where_the_run_says(tiny_run, image, tmp_path, monkeypatch):
    used = []
    real = tkpbench.predict.crf_labels
    monkeypatch.setattr(tkpbench.predict, "crf_labels", lambda im, p, cfg: used.append(cfg.device) or real(im, p, cfg))
    assert predict(["--run", str(tiny_run), str(image), "--out", str(tmp_path / "a"), "--crf", "--device", "cpu"]) == 0
    assert predict(["--run", str(tiny_run), str(image), "--out", str(tmp_path / "b"), "--crf"]) == 0
    assert used == ["cpu", ""]  # the run's crf.device is ""
    assert (tmp_path / "a" / "photo.png").is_file() and (tmp_path / "b" / "photo_overlay.jpg").is_file()


def test_predict_refuses_a_device_it_cannot_use_in_one_line(tiny_run, image, tmp_path, capsys):
    assert predict(["--run", str(tiny_run), str(image), "--out", str(tmp_path / "o"), "--device", "gpu"]) == 2
    assert "'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert predict(["--run", str(tiny_run), str(image), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "no usable GPU" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
