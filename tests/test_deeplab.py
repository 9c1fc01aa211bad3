import json
import shutil

import numpy as np
import pytest
import torch
from helpers import run_until_killed, tiny_config

from tkpbench import distributed as D
from tkpbench.data import VOCSegmentation, save_mask
from tkpbench.deeplab import ASPP, DeepLabV2
from tkpbench.encoder import WeightsError
from tkpbench.engine import fit
from tkpbench.records import load_summary
from tkpbench.segment import SegTask, evaluate


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_output_shape_and_output_stride_8(backbone):
    m = DeepLabV2(5, backbone).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert m.backbone(x).shape[-2:] == (8, 12)
        assert m(x).shape == (1, 5, 64, 96)


def test_aspp_has_the_configured_rates_and_sums_its_branches():
    a = ASPP(8, 3, (6, 12, 18, 24))
    assert [b.dilation for b in a.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(1, 8, 10, 10)
    torch.testing.assert_close(a(x), sum(b(x) for b in a.branches))
    assert ASPP(8, 3, (2, 4)).rates == (2, 4)


def test_missing_or_foreign_backbone_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.pth do not exist.*resnet18"):
        DeepLabV2(3, "resnet18", tmp_path / "nope.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="does not fit torchvision resnet18"):
        DeepLabV2(3, "resnet18", tmp_path / "bad.pth")
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "ok.pth")
    DeepLabV2(3, "resnet18", tmp_path / "ok.pth")


@pytest.fixture()
def run_with_masks(synth_root, tmp_path):
    """A run folder whose 'pseudo masks' are the generated ground truth (for the mechanics only)."""
    run = tmp_path / "tiny"
    cfg = tiny_config(synth_root / "VOC2012", data__seg_train_split="train_aug")
    ds = VOCSegmentation(cfg.data.root, "train_aug")
    (run / "pseudo" / "crf").mkdir(parents=True)
    for i in range(len(ds)):
        save_mask(run / "pseudo" / "crf" / f"{ds.ids[i]}.png", ds.mask(i))
    return run, cfg


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (run / "seg" / "log.jsonl").read_text().splitlines() if "loss" in ln]


def test_loss_falls_within_a_few_dozen_steps_and_eval_writes_the_record(run_with_masks, tmp_path):
    run, cfg = run_with_masks
    cfg.seg.iters = 40
    cfg.seg.lr = 0.02
    cfg.seg.head_lr_mult = 1.0
    fit(SegTask(cfg, run), cfg.to_dict(), run / "seg", D.DistInfo(), progress=False)
    losses = _losses(run)
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:5])
    evaluate(run, "val", D.DistInfo(), cfg, progress=False, results=tmp_path / "results")
    rec = load_summary(tmp_path / "results" / "tiny" / "summary.json")["stages"]["seg"]
    assert rec["split"] == "val" and rec["num_images"] == len(VOCSegmentation(cfg.data.root, "val"))
    assert 0 <= rec["miou"] <= 100 and rec["protocol"]["train_masks"].endswith("pseudo/crf")


def test_segmentation_resume_equals_an_uninterrupted_run(run_with_masks):
    run, cfg = run_with_masks
    other = run.parent / "copy"
    shutil.copytree(run, other)
    fit(SegTask(cfg, run), cfg.to_dict(), run / "seg", D.DistInfo(), progress=False)
    run_until_killed(SegTask(cfg, other), cfg, other / "seg", stop_after=3)
    fit(SegTask(cfg, other), cfg.to_dict(), other / "seg", D.DistInfo(), progress=False)
    a = torch.load(run / "seg" / "final.pt", weights_only=True)["model"]
    b = torch.load(other / "seg" / "final.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_poly_schedule_and_head_multiplier(synth_root):
    cfg = tiny_config(synth_root / "VOC2012")
    cfg.seg.iters, cfg.seg.lr, cfg.seg.head_lr_mult = 100, 1e-3, 10.0
    t = SegTask(cfg, synth_root)
    opt = t.optimizer(t.build_model())
    # backbone weights, backbone BatchNorm affines (BN learns in the tiny config), ASPP weights, ASPP biases
    assert t.lr_factors(0, 0) == pytest.approx([1e-3, 1e-3, 1e-2, 2e-2])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 5e-4, 0.0]
    assert t.lr_factors(50, 0)[0] == pytest.approx(1e-3 * 0.5**0.9)


def test_padding_is_the_mean_pixel_with_ignored_labels():
    """A crop larger than the image pads it: about 0 after normalisation (not black, -2.1), label 255."""
    from torchvision import tv_tensors

    from tkpbench.data.transforms import seg_train_transform
    from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD

    tf = seg_train_transform(64, (1.0, 1.0), IMAGENET_MEAN, IMAGENET_STD)
    img = tv_tensors.Image(torch.full((3, 16, 16), 255, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.uint8))
    out, m = tf(img, mask)
    pad = m == 255
    assert pad.float().mean() > 0.9
    assert out[:, pad].abs().max() < 0.02


def test_deeplab_param_groups_and_msc_outputs():
    """deeplab-pytorch's recipe: ASPP weights 10x, ASPP biases 20x without weight decay; MSC returns
    scale 1, each scale and the max fusion, as one forward."""
    from tkpbench.deeplab import DeepLabV2

    m = DeepLabV2(5, "resnet18", None, output_stride=16)
    groups = m.param_groups(10.0, 20.0, 5e-4, bias_decay=False)
    by_mult = {g["lr_mult"]: g for g in groups if g["params"][0].dim() <= 1 or g["lr_mult"] != 1.0}
    assert by_mult[20.0]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in by_mult[20.0]["params"])
    assert by_mult[10.0]["weight_decay"] == 5e-4 and all(p.dim() == 4 for p in by_mult[10.0]["params"])
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())  # every parameter in exactly one group
    x = torch.randn(1, 3, 64, 64)
    outs = m.train()(x, msc_scales=[0.5, 0.75])
    assert [tuple(o.shape[-2:]) for o in outs] == [(64, 64), (32, 32), (48, 48), (64, 64)]
    assert torch.all(outs[-1] >= outs[0])


def test_msc_loss_sums_the_four_outputs_against_labels_at_their_size(synth_root):
    """seg.msc_scales (DeepLab-v2's MSC training): the loss is the sum of the cross-entropies of scale
    1, each scale (labels resized nearest to its size) and the max fusion."""
    import torch.nn.functional as F

    from tkpbench.deeplab import resize_labels

    cfg = tiny_config(synth_root / "VOC2012", seg__msc_scales="[0.5, 0.75]")
    t = SegTask(cfg, synth_root)
    torch.manual_seed(0)
    m = t.build_model().train()
    img = torch.randn(2, 3, 48, 48)
    mask = torch.randint(0, 21, (2, 48, 48))
    mask[:, :4] = 255
    loss = t.loss(m, (img, mask), torch.device("cpu"))["loss"]
    outs = m(img, msc_scales=[0.5, 0.75])
    expected = sum(F.cross_entropy(o, resize_labels(mask, o.shape[-2:]), ignore_index=255) for o in outs)
    assert len(outs) == 4 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    t.cfg.seg.msc_scales = []
    single = t.loss(m, (img, mask), torch.device("cpu"))["loss"]
    assert single.item() == pytest.approx(F.cross_entropy(m(img), mask, ignore_index=255).item(), rel=1e-5)
