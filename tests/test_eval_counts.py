"""What a scored folder stores per image: intersection, predicted and ground-truth pixels."""

import numpy as np

from tkpbench.data import VOCSegmentation, save_mask
from tkpbench.evaluate import evaluate_folder


def test_the_per_image_counts_add_up_to_the_confusion_matrix(synth_root, tmp_path):
    ds = VOCSegmentation(synth_root / "VOC2012", "val")
    for i in range(len(ds)):
        m = np.where(ds.mask(i) == 255, 0, ds.mask(i))
        m[: m.shape[0] // 3] = 0  # a band of background: false positives of 0, false negatives of the rest
        save_mask(tmp_path / f"{ds.ids[i]}.png", m)
    s = evaluate_folder(tmp_path, ds)
    a = s.arrays("_crf")
    conf = a["confusion_crf"]
    assert conf.shape == (ds.num_classes, ds.num_classes) and a["inter_crf"].shape == (len(ds), ds.num_classes)
    assert np.array_equal(a["inter_crf"].sum(0), np.diag(conf))
    assert np.array_equal(a["pred_crf"].sum(0), conf.sum(0)) and np.array_equal(a["gt_crf"].sum(0), conf.sum(1))
    assert np.array_equal(a["union_crf"], a["pred_crf"] + a["gt_crf"] - a["inter_crf"])
    assert (
        (a["pred_crf"][:, 0] >= a["gt_crf"][:, 0]).all()
        and a["pred_crf"][:, 0].sum() > a["gt_crf"][:, 0].sum()
        and (a["inter_crf"][:, 1:] <= a["gt_crf"][:, 1:]).all()
    )
