"""A VOC 2012 folder cut from the real sample in ``../shared/data`` and weight files of the
expected names holding random weights: what ``reproduce.sh voc`` needs to run with the paper's
model shapes on real images, without the datasets or the pretrained weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from tkpbench.data.common import read_image, read_mask
from tkpbench.data.voc import read_id_list
from tkpbench.deeplab import IMAGENET_MEAN, IMAGENET_STD

VIT_FILE = "jx_vit_base_p16_384-83fb41ba.pth"  # tkpbench.data.download RESOURCES["weights"]
RESNET_FILE = "resnet101-63fe2227.pth"


def voc_subset(sample: Path, dst: Path, n_train_aug: int, n_train: int, n_val: int) -> Path:
    """``dst/VOC2012`` with the first ``n_train_aug`` ids of the sample's train list as train_aug,
    the first ``n_train`` of those as train (VOC train is part of train_aug) and the first
    ``n_val`` val ids as val. ``SegmentationClassAug/`` holds the train_aug masks as greyscale
    class-index PNGs, the format of the common SegmentationClassAug download."""
    src = sample / "voc2012-sample" / "VOC2012"
    lists = src / "ImageSets" / "Segmentation"
    train_aug = read_id_list(lists / "train.txt")[:n_train_aug]
    splits = {"train_aug": train_aug, "train": train_aug[:n_train], "val": read_id_list(lists / "val.txt")[:n_val]}
    voc = dst / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for i in sorted(set().union(*splits.values())):
        shutil.copyfile(src / "JPEGImages" / f"{i}.jpg", voc / "JPEGImages" / f"{i}.jpg")
        shutil.copyfile(src / "SegmentationClass" / f"{i}.png", voc / "SegmentationClass" / f"{i}.png")
    for i in train_aug:
        labels = read_mask(src / "SegmentationClass" / f"{i}.png", 21)
        Image.fromarray(labels, mode="L").save(voc / "SegmentationClassAug" / f"{i}.png")
    for name, ids in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return voc


def random_weights(dst: Path, images: list[Path], seed: int = 1234) -> tuple[Path, Path]:
    """The two weight files the configs name, as plain tensor state dicts in the layouts their
    loaders read: timm's ViT-B/16 384 (the ``jx_`` release's keys, ``head.`` included) and
    torchvision's ResNet-101 (``fc.`` included). Random, from ``seed`` (not the training seed, so
    a model that ignored the file would not start from the same values).

    DeepLab keeps the backbone's BatchNorm frozen, so the file must condition the network as a
    trained one does: running statistics measured on ``images`` (real photographs, at output
    stride 8 as DeepLab runs) and small scales at the end of each residual branch. With a fresh
    ResNet's 0 and 1, or statistics of white noise, real images give a loss of ~1e4 and the first
    SGD step a non-finite one; with measured statistics but unit scales, the second step does."""
    dst.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vit = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=1000).state_dict()
        net = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        batch = torch.stack([TF.resize(torch.from_numpy(read_image(p)).permute(2, 0, 1), [193, 193]) for p in images])
        batch = TF.normalize(batch.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            for name, bn in ((n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)):
                # small scales at the end of each residual branch, as a trained ResNet has
                bn.weight.uniform_(*((0.05, 0.25) if name.endswith("bn3") else (0.5, 1.5)))
                bn.bias.normal_(0, 0.1)
                bn.momentum = None  # the running statistics become this batch's
            net.train()(batch)
        resnet = net.state_dict()
    torch.save(vit, dst / VIT_FILE)
    torch.save(resnet, dst / RESNET_FILE)
    return dst / VIT_FILE, dst / RESNET_FILE


def grid_of(npz: Path) -> tuple[int, int]:
    """The patch grid (h, w) of a pseudo-mask probabilities file (``runs.save_probs``)."""
    with np.load(npz) as f:
        return tuple(f["grid"].shape[-2:])
