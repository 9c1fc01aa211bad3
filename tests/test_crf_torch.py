"""The PyTorch permutohedral backend against pydensecrf (the reference)."""

import numpy as np
import pytest
from PIL import Image

from tkpbench.crf import dense_crf, dense_crf_batch
from tkpbench.data import VOCSegmentation
from tkpbench.data.synth import blurred_probs
from tkpbench.metrics import ConfusionMatrix


def _pydensecrf(img, p, gauss=True, bilateral=True, iters=10):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = p.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary_from_softmax(p))
    if gauss:
        d.addPairwiseGaussian(sxy=1, compat=3)
    if bilateral:
        d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(img), compat=4)
    return np.array(d.inference(iters)).reshape(c, h, w)


def _real(shared_data, n=2, size=(200, 150)):
    ds = VOCSegmentation(shared_data / "voc2012-sample" / "VOC2012", "val")
    out = []
    for i in range(n):
        img = np.array(Image.fromarray(ds.image(i)).resize(size, Image.BILINEAR))
        mask = np.array(Image.fromarray(ds.mask(i)).resize(size, Image.NEAREST))
        keep = np.flatnonzero(ds.tags(i))
        p = blurred_probs(mask, 21, sigma=4, offset=3, seed=i)[keep]
        out.append((img, mask, keep, p / p.sum(0, keepdims=True)))
    return out


def test_torch_backend_agrees_with_pydensecrf_on_real_images(shared_data):
    ref_cm, ours_cm = ConfusionMatrix(21), ConfusionMatrix(21)
    for img, mask, keep, p in _real(shared_data):
        ref = _pydensecrf(img, p)
        ours = dense_crf(img, p, backend="torch")
        assert (ref.argmax(0) == ours.argmax(0)).mean() >= 0.995
        assert np.abs(ref - ours).max() < 0.02 and np.abs(ref - ours).mean() < 1e-3
        ref_cm.update(keep[ref.argmax(0)], mask)
        ours_cm.update(keep[ours.argmax(0)], mask)
    assert abs(ref_cm.miou() - ours_cm.miou()) < 0.001


@pytest.mark.parametrize("gauss, bilateral", [(True, False), (False, True)])
def test_gaussian_only_and_bilateral_only(gauss, bilateral, shared_data):
    img, _, _, p = _real(shared_data, n=1, size=(120, 90))[0]
    ref = _pydensecrf(img, p, gauss, bilateral)
    ours = dense_crf(img, p, backend="torch", gauss_compat=3.0 if gauss else 0.0, bi_compat=4.0 if bilateral else 0.0)
    assert (ref.argmax(0) == ours.argmax(0)).mean() >= 0.995
    assert np.abs(ref - ours).max() < 0.02


def test_one_label_present_and_a_constant_image():
    img = np.full((30, 40, 3), 77, np.uint8)
    p = np.zeros((3, 30, 40), np.float32)
    p[1] = 0.98
    p[0] = p[2] = 0.01
    ref, ours = _pydensecrf(img, p), dense_crf(img, p, backend="torch")
    assert np.all(ours.argmax(0) == 1)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_a_batch_equals_one_by_one():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 24, 32, 3), dtype=np.uint8)
    p = rng.random((3, 4, 24, 32)).astype(np.float32) ** 3
    p /= p.sum(1, keepdims=True)
    batch = dense_crf_batch(imgs, p)
    for i in range(3):
        np.testing.assert_allclose(batch[i], dense_crf(imgs[i], p[i], backend="torch"), atol=1e-5)


def test_torch_backend_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.2, np.float32), backend="torch")


def test_filtering_ignores_what_its_reused_buffers_held():
    """The filter writes into preallocated buffers (addmm with beta=0): stale contents, NaN
    included, must never reach the result, and a later call with another channel count is exact."""
    import torch

    from tkpbench.permutohedral import Lattice

    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 300, 5, generator=g) * 4
    lat = Lattice(feats)
    values = torch.rand(600, 4, generator=g)
    first = lat.filter(values)
    lat._grids = tuple(torch.full_like(t, float("nan")) for t in lat._grids)
    again = lat.filter(values)
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    narrow = lat.filter(values[:, :1])
    torch.testing.assert_close(narrow, first[:, :1], rtol=1e-6, atol=1e-6)


@pytest.fixture
def eight_gpus(monkeypatch):
    """This process sees 8 (pretend) GPUs, and the current CUDA device is 5."""
    import torch

    import tkpbench.crf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(tkpbench.crf, "cuda_usable", lambda: (True, ""))


@pytest.mark.parametrize(
    "setting, local_rank, want",
    [("", 3, "cuda:3"), ("cuda", 3, "cuda:3"), ("cuda:1", 3, "cuda:1"), ("cpu", 3, "cpu"), ("", None, "cuda:5")],
)
def test_the_crf_device_is_this_ranks_gpu(eight_gpus, setting, local_rank, want):
    import torch

    from tkpbench.crf import crf_device

    assert crf_device(setting, local_rank) == torch.device(want)


def test_a_crf_device_this_machine_lacks_is_a_user_error(eight_gpus, monkeypatch):
    import torch

    import tkpbench.crf
    from tkpbench.crf import CRFDeviceError, crf_device
    from tkpbench.errors import UserError

    with pytest.raises(CRFDeviceError, match="sees 8 GPU.*one rank per GPU"):
        crf_device("cuda", 8)  # a ninth rank on an 8-GPU node
    with pytest.raises(CRFDeviceError, match="'gpu'.*cpu, cuda or cuda:N"):
        crf_device("gpu", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tkpbench.crf, "cuda_usable", lambda: (False, "no NVIDIA driver is loaded"))
    assert crf_device("", 3) == torch.device("cpu")
    with pytest.raises(CRFDeviceError, match="no NVIDIA driver.*--device cpu") as e:
        crf_device("cuda", 3)
    assert isinstance(e.value, UserError)


def test_the_crf_stage_runs_each_rank_on_its_own_gpu_and_says_so(eight_gpus, monkeypatch, synth_root, tmp_path, capsys):
    """Rank 3 of a node (LOCAL_RANK 3) with crf.device "" refines on cuda:3, not on cuda (= cuda:0)."""
    from tkpbench import refine
    from tkpbench.config import Config
    from tkpbench.distributed import DistInfo

    used = []

    def on_device(ds, pseudo_dir, todo, cfg, loaders):
        used.append(cfg.device)
        yield from ["done"] * len(todo)

    monkeypatch.setattr(refine, "_refine_on_device", on_device)
    cfg = Config()
    cfg.data.root = str(synth_root / "VOC2012")
    cfg.crf.backend = "torch"
    refine.refine_folder(tmp_path, "val", cfg.crf, cfg.data, DistInfo(rank=0, local_rank=3, world=1), progress=False)
    assert used == ["cuda:3"]
    assert "torch backend on cuda:3 (Pretend GPU" in capsys.readouterr().out


@pytest.mark.parametrize("srgb", [0.01, 1e-6])  # the packed keys' int64 product wraps around; float32 loses the simplex
def test_kernel_widths_too_small_for_the_lattice_are_a_config_error_naming_the_keys(srgb):
    from tkpbench.errors import ConfigError

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    p = np.full((2, 20, 30), 0.5, np.float32)
    with pytest.raises(ConfigError, match=r"raise crf.gauss_sxy, crf.bi_sxy or crf.bi_srgb"):
        dense_crf(img, p, backend="torch", device="cpu", bi_srgb=srgb)
