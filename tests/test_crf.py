import numpy as np
import pytest

from tkpbench.crf import dense_crf
from tkpbench.data import VOCSegmentation
from tkpbench.data.synth import blurred_probs
from tkpbench.metrics import ConfusionMatrix


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
    with pytest.raises(ValueError, match=msg):
        dense_crf(np.zeros((4, 4, 3), np.uint8), probs)
