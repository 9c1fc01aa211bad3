import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_until_killed, tiny_config

from tkpbench import distributed as D
from tkpbench.data import VOCSegmentation
from tkpbench.deeplab import ASPP, CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, DeepLabV2, init_name
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
    import torchvision

    with pytest.raises(WeightsError, match=r"nope\.pth do not exist.*resnet18"):
        DeepLabV2(3, "resnet18", tmp_path / "nope.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad\.pth: neither a torchvision resnet18 state dict .* nor deeplab-pytorch's"):
        DeepLabV2(3, "resnet18", tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad\.pth: neither"):
        init_name(tmp_path / "bad.pth")
    sd = torchvision.models.resnet18().state_dict()
    torch.save({**sd, "conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape\.pth: does not fit torchvision resnet18: .* 1 of another shape .*conv1"):
        DeepLabV2(3, "resnet18", tmp_path / "shape.pth")
    torch.save(sd, tmp_path / "ok.pth")
    m = DeepLabV2(3, "resnet18", tmp_path / "ok.pth")
    torch.testing.assert_close(m.backbone[0].weight, sd["conv1.weight"], rtol=0, atol=0)
    assert m.init == init_name(tmp_path / "ok.pth") == "imagenet-torchvision" and m.caffe_input is None
    assert DeepLabV2(3, "resnet18").init == init_name("") == "random"


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


def test_input_loss_sums_the_four_outputs_against_labels_at_their_size(synth_root):
    """seg.loss_at = "input" with seg.msc_scales (DeepLab-v2's MSC training): the loss is the sum of the
    cross-entropies of scale 1, each scale (at its input's size, labels resized with F.interpolate's
    nearest) and the max fusion."""
    import torch.nn.functional as F

    from tkpbench.deeplab import resize_labels

    cfg = tiny_config(synth_root / "VOC2012", seg__msc_scales="[0.5, 0.75]", seg__loss_at="input")
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


def _deeplab_pytorch_loss(base, images, labels, scales):
    """deeplab-pytorch's training loss, restated from its ``libs/models/msc.py`` (MSC.forward in
    training) and ``main.py`` (``resize_labels``, the loop over the logits): logits of the image and
    of each bilinearly rescaled image at their output stride, their max fused at the first one's
    size; each of the four against the labels resized to its own size by PIL's NEAREST, one label
    map at a time as float; cross-entropies (ignore 255) summed."""
    from PIL import Image

    logits = base(images)
    h, w = logits.shape[-2:]
    pyramid = [base(F.interpolate(images, scale_factor=p, mode="bilinear", align_corners=False)) for p in scales]
    fused = torch.max(
        torch.stack([logits] + [F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False) for p in pyramid]), dim=0
    )[0]
    loss = 0.0
    for logit in [logits, *pyramid, fused]:
        oh, ow = logit.shape[-2:]
        resized = [np.asarray(Image.fromarray(lb.float().numpy()).resize((ow, oh), resample=Image.NEAREST)) for lb in labels]
        loss = loss + F.cross_entropy(logit, torch.from_numpy(np.stack(resized)).long(), ignore_index=255)
    return loss


def test_default_loss_is_deeplab_pytorchs_and_input_is_not(synth_root):
    """seg.loss_at = "output_stride" (the default) equals deeplab-pytorch's loss on the same model and
    batch (four outputs at 9, 4, 6 and 9 px for a 65 crop); "input" (logits upsampled, labels resized
    with F.interpolate) is another number."""
    cfg = tiny_config(synth_root / "VOC2012", seg__msc_scales="[0.5, 0.75]", seg__crop="65")
    assert cfg.seg.loss_at == "output_stride"
    t = SegTask(cfg, synth_root)
    torch.manual_seed(0)
    m = t.build_model().train()
    with torch.no_grad():  # logits that vary over the image, so that which label a cell meets matters
        for conv in m.aspp.branches:
            conv.weight.mul_(30)
    img = torch.randn(2, 3, 65, 65)
    mask = torch.randint(0, 21, (2, 65, 65))
    mask[0, :20, :30] = 255
    mask[1, 40:] = 255
    outs = m(img, msc_scales=[0.5, 0.75], upsample=False)
    assert [tuple(o.shape[-2:]) for o in outs] == [(9, 9), (4, 4), (6, 6), (9, 9)]
    loss = t.loss(m, (img, mask), torch.device("cpu"))["loss"]
    ref = _deeplab_pytorch_loss(lambda x: m.aspp(m.backbone(x)), img, mask, [0.5, 0.75])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    t.cfg.seg.loss_at = "input"
    other = t.loss(m, (img, mask), torch.device("cpu"))["loss"]
    assert abs(other.item() - ref.item()) > 1e-2 * ref.item()


def test_pil_label_resize_is_pils_nearest_for_the_whole_batch():
    """resize_labels_pil equals PIL's NEAREST resize of each label map (deeplab-pytorch's
    resize_labels), non-square sizes and the ignore label included; F.interpolate's nearest does not."""
    from PIL import Image

    from tkpbench.deeplab import resize_labels, resize_labels_pil

    g = torch.Generator().manual_seed(0)
    for (h, w), size in [((321, 321), (41, 41)), ((160, 160), (21, 21)), ((240, 240), (30, 30)), ((50, 70), (7, 9))]:
        mask = torch.randint(0, 21, (3, h, w), generator=g)
        mask[:, : h // 4] = 255
        ref = np.stack(
            [np.asarray(Image.fromarray(lb.float().numpy()).resize(size[::-1], resample=Image.NEAREST)) for lb in mask]
        )
        got = resize_labels_pil(mask, size)
        assert got.dtype == mask.dtype and np.array_equal(got.numpy(), ref)
    assert not torch.equal(resize_labels(mask, (7, 9)), got)


def _deeplab_pytorch_resnet_keys(n_blocks, head_classes=91, prefix=""):
    """A state dict in deeplab-pytorch's layout (``libs/models/resnet.py`` and ``deeplabv1.py``, saved
    by its ``convert.py``) with random values: ``layer1.conv1`` the stem, ``layer2``-``layer5`` of
    ``block{i}`` each with ``reduce``, ``conv3x3``, ``increase`` (and ``shortcut`` in block1), each a
    ``conv`` and a ``bn`` (with running statistics); ``fc`` DeepLab-v1's 1x1 COCO classifier."""
    g = torch.Generator().manual_seed(1)
    sd = {}

    def conv_bn(name, cin, cout, k):
        sd[f"{name}.conv.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5
        sd[f"{name}.bn.weight"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.running_var"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)

    conv_bn("layer1.conv1", 3, 64, 7)
    cin = 64
    for layer, (n, cout) in enumerate(zip(n_blocks, (256, 512, 1024, 2048)), start=2):
        for b in range(1, n + 1):
            name = f"layer{layer}.block{b}"
            conv_bn(f"{name}.reduce", cin if b == 1 else cout, cout // 4, 1)
            conv_bn(f"{name}.conv3x3", cout // 4, cout // 4, 3)
            conv_bn(f"{name}.increase", cout // 4, cout, 1)
            if b == 1:
                conv_bn(f"{name}.shortcut", cin, cout, 1)
        cin = cout
    sd["fc.weight"] = torch.randn(head_classes, 2048, 1, 1, generator=g)
    sd["fc.bias"] = torch.randn(head_classes, generator=g)
    return {prefix + k: v for k, v in sd.items()}


def test_deeplab_pytorch_coco_init_is_mapped_onto_a_caffe_layout_resnet(tmp_path):
    """seg.weights in deeplab-pytorch's layout (its COCO init, here resnet50-sized with random values):
    every backbone tensor lands once, where its name says; the network takes Caffe's layout (stride in
    the 1x1 reduce, first dilated block dilated, ceil-mode pooling: 41, 21, 31 px for 321, 160, 240) and
    input (BGR 0-255 minus the mean); the classifier is not loaded; the layout survives a checkpoint."""
    sd = _deeplab_pytorch_resnet_keys((3, 4, 6, 3))
    torch.save(sd, tmp_path / "deeplabv1_resnet50-coco.pth")
    m = DeepLabV2(21, "resnet50", tmp_path / "deeplabv1_resnet50-coco.pth").eval()
    assert m.init == init_name(tmp_path / "deeplabv1_resnet50-coco.pth") == "coco-deeplab-pytorch"
    assert "ASPP starts at N(0, 0.01)" in m.init_note
    # a bijection between the file's backbone tensors and the model's, and the names it follows
    ours = {k: v for k, v in m.backbone.state_dict().items()}
    theirs = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert len(ours) == len(theirs)
    where = {v.numpy().tobytes() + bytes(str(v.shape), "ascii"): k for k, v in ours.items() if v.dim() > 0}
    assert len(where) == sum(v.dim() > 0 for v in ours.values())
    landed = {k: where[v.numpy().tobytes() + bytes(str(v.shape), "ascii")] for k, v in theirs.items() if v.dim() > 0}
    assert len(set(landed.values())) == len(landed)
    assert landed["layer1.conv1.conv.weight"] == "0.weight" and landed["layer1.conv1.bn.running_var"] == "1.running_var"
    assert landed["layer3.block1.reduce.conv.weight"] == "5.0.conv1.weight"
    assert landed["layer3.block1.shortcut.bn.running_mean"] == "5.0.downsample.1.running_mean"
    assert landed["layer5.block3.increase.bn.weight"] == "7.2.bn3.weight"
    assert landed["layer4.block6.conv3x3.conv.weight"] == "6.5.conv2.weight"
    assert m.aspp.branches[0].weight.std() < 0.02  # N(0, 0.01), not the file's fc
    # Caffe's ResNet layout and its sizes
    layer2, layer3 = m.backbone[5], m.backbone[6]
    assert layer2[0].conv1.stride == (2, 2) and layer2[0].conv2.stride == (1, 1)
    assert layer3[0].conv2.dilation == layer3[1].conv2.dilation == (2, 2) and m.backbone[3].ceil_mode
    with torch.no_grad():  # the strides are all in the stem, layer1 and layer2 (layer3 and layer4 dilate)
        sizes = [m.backbone[:6](torch.zeros(1, 3, s, s)).shape[-1] for s in (321, 160, 240)]
    assert sizes == [41, 21, 31]
    # the input it sees: BGR, 0-255, minus deeplab-pytorch's mean
    rgb = torch.rand(1, 3, 4, 4)
    normed = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = 255 * rgb.flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    torch.testing.assert_close(m.caffe_input(normed), expected, rtol=0, atol=1e-3)
    # a trained model (final.pt) comes back in the same layout without the weights file
    again = DeepLabV2.from_state_dict(21, "resnet50", 8, m.state_dict()).eval()
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x), rtol=0, atol=0)


def test_deeplab_pytorch_layout_variants_and_refusals(tmp_path, synth_root):
    """The MSC-wrapped layout (``base.``, an ASPP head of COCO-Stuff's 182 classes) loads without its
    head; a 1000-class head names an ImageNet init; a 21-class head (trained on VOC's masks), no head
    (nothing tells the training data), a deeplab-pytorch file for another ResNet, and the COCO init on
    COCO are refused with the file named."""
    sd = _deeplab_pytorch_resnet_keys((3, 4, 6, 3), prefix="base.")
    del sd["base.fc.weight"], sd["base.fc.bias"]
    for i in range(4):
        sd[f"base.aspp.c{i}.weight"], sd[f"base.aspp.c{i}.bias"] = torch.randn(182, 2048, 3, 3), torch.randn(182)
    torch.save(sd, tmp_path / "cocostuff.pth")
    m = DeepLabV2(21, "resnet50", tmp_path / "cocostuff.pth")
    assert m.init == "coco-deeplab-pytorch" and m.aspp.branches[0].weight.shape[0] == 21
    torch.testing.assert_close(m.backbone[0].weight, sd["base.layer1.conv1.conv.weight"], rtol=0, atol=0)
    torch.save(_deeplab_pytorch_resnet_keys((3, 4, 6, 3), head_classes=21), tmp_path / "voc.pth")
    with pytest.raises(WeightsError, match=r"voc\.pth: its classifier fc has 21 classes"):
        DeepLabV2(21, "resnet50", tmp_path / "voc.pth")
    torch.save(_deeplab_pytorch_resnet_keys((3, 4, 6, 3), head_classes=1000), tmp_path / "imagenet.pth")
    assert init_name(tmp_path / "imagenet.pth") == "imagenet-caffe-deeplab-pytorch"
    headless = {k: v for k, v in sd.items() if ".aspp." not in k}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(WeightsError, match=r"headless\.pth: deeplab-pytorch's layout, but its classifier \(None classes\)"):
        init_name(tmp_path / "headless.pth")
    with pytest.raises(WeightsError, match=r"cocostuff\.pth: does not fit torchvision resnet101: \d+ missing"):
        DeepLabV2(21, "resnet101", tmp_path / "cocostuff.pth")
    with pytest.raises(WeightsError, match="Bottleneck ResNet"):
        DeepLabV2(21, "resnet18", tmp_path / "cocostuff.pth")
    from types import SimpleNamespace

    cfg = tiny_config(synth_root / "VOC2012", seg__backbone="resnet50", seg__weights=str(tmp_path / "cocostuff.pth"))
    cfg.data.dataset = "coco"
    t = SegTask(cfg, synth_root)
    t.__dict__["base"] = SimpleNamespace(num_classes=81)  # the COCO split itself is not needed
    with pytest.raises(WeightsError, match=r"cocostuff\.pth: deeplab-pytorch's COCO init was trained on COCO's masks"):
        t.build_model()
