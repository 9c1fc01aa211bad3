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

from tkpbench.encoder import WeightsError, load_state_dict_file


class ASPP(nn.Module):
    """Sum of parallel 3x3 atrous convolutions (DeepLab-v2's ASPP-L). (B, in, h, w) -> (B, C, h, w)."""

    def __init__(self, in_ch: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([b(x) for b in self.branches]).sum(0)


class DeepLabV2(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "resnet101", weights: str | Path | None = None,
                 rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        if not hasattr(torchvision.models, backbone) or not backbone.startswith("resnet"):
            raise ValueError(f"backbone must be a torchvision ResNet (resnet18/34/50/101/152), got {backbone!r}")
        dilate = [False, True, True]
        if backbone in ("resnet18", "resnet34"):
            # BasicBlock ResNets cannot dilate in torchvision; layer3/4 are dilated by hand below
            net = getattr(torchvision.models, backbone)(weights=None)
            _dilate_basic(net.layer3, 2)
            _dilate_basic(net.layer4, 4)
        else:
            net = getattr(torchvision.models, backbone)(weights=None, replace_stride_with_dilation=dilate)
        if weights:
            load_backbone(net, Path(weights), backbone)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self.aspp = ASPP(net.fc.in_features, num_classes, rates)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        logits = self.aspp(self.backbone(x))
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, head_mult: float) -> list[dict]:
        return [{"params": list(self.backbone.parameters()), "lr": lr},
                {"params": list(self.aspp.parameters()), "lr": lr * head_mult}]


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
        raise WeightsError(f"{path}: does not fit torchvision {backbone}: {len(missing)} missing keys "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
