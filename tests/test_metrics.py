import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tkpbench.metrics import ConfusionMatrix


def test_hand_computed_example_with_ignore():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    # class 0: tp 1, fp 1 (the 2 predicted as 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0 -> 0
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_classes_with_empty_union_are_left_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    iou = cm.iou()
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert cm.miou() == pytest.approx((0.5 + 0.5) / 2)


def test_all_background_baseline():
    cm = ConfusionMatrix(3)
    cm.update(np.array([2, 2, 2, 2]), np.array([0, 0, 0, 1]))
    assert cm.all_background_miou() == pytest.approx((3 / 4) / 2)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_numpy_and_tensor_inputs_and_split_updates_agree(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 5, size=(7, 9))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=(7, 9))
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, gt)
    b.update(torch.from_numpy(pred[:3]), torch.from_numpy(gt[:3]))
    b.update(pred[3:], gt[3:])
    assert torch.equal(a.mat, b.mat)
    assert int(a.mat.sum()) == int((gt != 255).sum())


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([3]), np.array([0]))


def test_precision_recall_and_class_counts_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(4)
    counts = cm.update(pred, gt)
    inter, p, g = ConfusionMatrix.class_counts(counts)
    assert inter.tolist() == [1, 2, 0, 0] and p.tolist() == [2, 3, 0, 0] and g.tolist() == [2, 2, 1, 0]
    np.testing.assert_allclose(cm.precision(), [1 / 2, 2 / 3, np.nan, np.nan])
    np.testing.assert_allclose(cm.recall(), [1 / 2, 1.0, 0.0, np.nan])
    assert cm.matrix().dtype == np.int64 and cm.matrix().sum() == 5 and cm.matrix()[2, 0] == 1
