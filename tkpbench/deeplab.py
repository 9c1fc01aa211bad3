"""DeepLab-v2 (Chen et al., TPAMI 2017) as SPEC Sec. 2 fixes it.

ResNet (101 by default) with output stride 8 (``replace_stride_with_dilation=[False, True,
True]``: dilation 2 in layer3, 4 in layer4) -> ASPP: four 3x3 convolutions at rates 6, 12, 18,
24 straight to class logits, summed -> bilinear upsampling to the input size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from tkpbench import distributed as D
from tkpbench.encoder import WeightsError, load_state_dict_file

# the normalisation of torchvision's ImageNet ResNets, which DeepLab's input always gets
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ASPP(nn.Module):
    """Sum of parallel 3x3 atrous convolutions (DeepLab-v2's ASPP-L). (B, in, h, w) -> (B, C, h, w)."""

    def __init__(self, in_ch: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([b(x) for b in self.branches]).sum(0)


class DeepLabV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        weights: str | Path | None = None,
        rates: tuple[int, ...] = (6, 12, 18, 24),
        output_stride: int = 8,
    ) -> None:
        """``output_stride`` 8 is DeepLab-v2's (layer3 and layer4 dilated); 16 dilates layer4 only, about
        3x cheaper (the CPU demo uses it; never the paper's tables)."""
        super().__init__()
        if not hasattr(torchvision.models, backbone) or not backbone.startswith("resnet"):
            raise ValueError(f"backbone must be a torchvision ResNet (resnet18/34/50/101/152), got {backbone!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 (DeepLab-v2) or 16, got {output_stride}")
        dilate = [False, output_stride == 8, True]
        if backbone in ("resnet18", "resnet34"):
            # BasicBlock ResNets cannot dilate in torchvision; layer3/4 are dilated by hand below
            net = getattr(torchvision.models, backbone)(weights=None)
            if output_stride == 8:
                _dilate_basic(net.layer3, 2)
            _dilate_basic(net.layer4, 4 if output_stride == 8 else 2)
        else:
            net = getattr(torchvision.models, backbone)(weights=None, replace_stride_with_dilation=dilate)
        if weights:
            load_backbone(net, Path(weights), backbone)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self.aspp = ASPP(net.fc.in_features, num_classes, rates)

    def forward(self, x: Tensor, msc_scales: list[float] | None = None) -> Tensor | list[Tensor]:
        """Logits at the input size; with ``msc_scales`` the list of ``msc`` (training)."""
        return self.msc(x, msc_scales) if msc_scales else self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        logits = self.aspp(self.backbone(x))
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def param_groups(self, head_mult: float, head_bias_mult: float, weight_decay: float, bias_decay: bool) -> list[dict]:
        """deeplab-pytorch's groups: backbone weights 1x, ASPP weights ``head_mult``x, ASPP biases
        ``head_bias_mult``x; biases and BatchNorm affines (1-d parameters) without weight decay unless
        ``bias_decay``. Each group's ``lr_mult`` scales the base learning rate; empty groups are dropped."""
        wd_1d = weight_decay if bias_decay else 0.0
        back = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.aspp.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in back if p.dim() > 1], "lr_mult": 1.0, "weight_decay": weight_decay},
            {"params": [p for p in back if p.dim() <= 1], "lr_mult": 1.0, "weight_decay": wd_1d},
            {"params": [p for p in head if p.dim() > 1], "lr_mult": head_mult, "weight_decay": weight_decay},
            {"params": [p for p in head if p.dim() <= 1], "lr_mult": head_bias_mult, "weight_decay": wd_1d},
        ]
        return [g for g in groups if g["params"]]

    def msc(self, x: Tensor, scales: list[float]) -> list[Tensor]:
        """DeepLab-v2's multi-scale training outputs: the logits at scale 1, at each of ``scales`` (at
        that scale's size) and their max fusion at scale 1's size. One call, so that DDP sees one
        forward per backward (``forward(x, msc_scales=...)``)."""
        full = self._logits(x)
        h, w = x.shape[-2:]
        pyramid = [self._logits(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
        up = [F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False) for p in pyramid]
        return [full, *pyramid, torch.stack([full, *up]).amax(0)]


def resize_labels(mask: Tensor, size) -> Tensor:
    """(B, H, W) class indices -> (B, *size), nearest (deeplab-pytorch's labels for each MSC output)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


@torch.no_grad()
def predict_probs(model: nn.Module, img: torch.Tensor, scales: list[float], flip: bool, amp: bool) -> torch.Tensor:
    """Softmax averaged over scales (and flips) at the image's own size. img: (1, 3, H, W) -> (C, H, W)."""
    h, w = img.shape[-2:]
    acc = None
    for s in scales:
        x = img if s == 1.0 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=False)
        xs = [x, x.flip(-1)] if flip else [x]
        for n, xi in enumerate(xs):
            with D.autocast(img.device, amp):
                logits = model(xi)
            if n == 1:
                logits = logits.flip(-1)
            p = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]
            acc = p if acc is None else acc + p
    return acc / (len(scales) * (2 if flip else 1))


def _dilate_basic(layer: nn.Sequential, d: int) -> None:
    for n, block in enumerate(layer):
        if n == 0:
            block.conv1.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (d, d), (d, d)


def load_backbone(net: nn.Module, path: Path, backbone: str) -> None:
    if not path.is_file():
        raise WeightsError(
            f"DeepLab backbone weights {path} do not exist. Expected a torchvision {backbone} ImageNet state dict "
            "(e.g. resnet101-63fe2227.pth: python -m tkpbench.data download weights --root weights). Set seg.weights."
        )
    sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: does not fit torchvision {backbone}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
