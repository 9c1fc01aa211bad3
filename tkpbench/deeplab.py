"""DeepLab-v2 (Chen et al., TPAMI 2017) as SPEC Sec. 2 fixes it.

ResNet (101 by default) with output stride 8 (``replace_stride_with_dilation=[False, True,
True]``: dilation 2 in layer3, 4 in layer4) -> ASPP: four 3x3 convolutions at rates 6, 12, 18,
24 straight to class logits, summed -> bilinear upsampling to the input size (or, for
deeplab-pytorch's training loss, the logits kept at the output stride).

Two key layouts of ``seg.weights``, told apart by the file's keys (``read_weights``, ``init_name``):

* a torchvision ResNet state dict ("imagenet-torchvision", the default): torchvision's network;
* deeplab-pytorch's, above all its COCO init ("coco-deeplab-pytorch": ``deeplabv1_resnet101-coco.pth``,
  made by its ``convert.py --dataset coco`` from the DeepLab authors' MS-COCO ``init.caffemodel``, the
  ``INIT_MODEL`` of its ``configs/voc12.yaml``; also its released COCO-Stuff DeepLabs, keys under
  ``base.``). The keys are mapped onto torchvision's (``_from_deeplab_pytorch``) and the network takes
  the layout those weights were trained in: Caffe's MSRA ResNet (stride 2 in the first 1x1
  convolution of a block rather than its 3x3, the first block of a dilated layer dilated like the
  others, max pooling with ``ceil_mode``) fed BGR pixels in 0-255 minus deeplab-pytorch's mean
  (``CaffeInput``). The file's classifier (DeepLab-v1's ``fc``, 91 COCO classes, or a COCO-Stuff
  ASPP) is never loaded: the ASPP starts at N(0, 0.01), as in deeplab-pytorch's ``main.py``
  (``model.base.load_state_dict(state_dict, strict=False)`` skips it).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn

from tkpbench import distributed as D
from tkpbench.encoder import WeightsError, load_state_dict_file

# the normalisation of torchvision's ImageNet ResNets, which DeepLab's input always gets
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the BGR mean (0-255) that deeplab-pytorch subtracts (its configs/voc12.yaml IMAGE.MEAN)
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)

LAYOUTS = ("torchvision", "deeplab-pytorch")
# deeplab-pytorch's layout: the classes of the file's classifier -> the name a record gives the init
# (91: DeepLab's MS-COCO init.caffemodel; 182: a COCO-Stuff DeepLab of deeplab-pytorch's releases;
# 1000: an ImageNet Caffe ResNet in this layout)
DLP_INITS = {91: "coco-deeplab-pytorch", 182: "coco-deeplab-pytorch", 1000: "imagenet-caffe-deeplab-pytorch"}

# deeplab-pytorch's Bottleneck branches -> torchvision's (convolution, BatchNorm) names
_DLP_BRANCH = {
    "reduce": ("conv1", "bn1"),
    "conv3x3": ("conv2", "bn2"),
    "increase": ("conv3", "bn3"),
    "shortcut": ("downsample.0", "downsample.1"),
}
_DLP_BLOCK = re.compile(r"layer(\d)\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(\w+)")
_DLP_STEM = re.compile(r"layer1\.conv1\.(conv|bn)\.(\w+)")
_DLP_HEAD = re.compile(r"(fc|aspp\.c\d+)\.(weight|bias)")


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


class CaffeInput(nn.Module):
    """tkpbench's input (RGB, ImageNet mean/std) -> the input of deeplab-pytorch's Caffe weights
    (BGR, 0-255, minus ``CAFFE_MEAN_BGR``), exactly: a fixed per-channel affine map in front of the
    first convolution, whose zero padding is then Caffe's. Its buffers mark a checkpoint of this layout."""

    def __init__(self) -> None:
        super().__init__()
        bgr_std = torch.tensor(IMAGENET_STD).flip(0) * 255
        bgr_mean = torch.tensor(IMAGENET_MEAN).flip(0) * 255 - torch.tensor(CAFFE_MEAN_BGR)
        self.register_buffer("scale", bgr_std.view(1, 3, 1, 1))
        self.register_buffer("shift", bgr_mean.view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x.flip(1) * self.scale + self.shift


class DeepLabV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        weights: str | Path | None = None,
        rates: tuple[int, ...] = (6, 12, 18, 24),
        output_stride: int = 8,
        layout: str = "torchvision",
    ) -> None:
        """``output_stride`` 8 is DeepLab-v2's (layer3 and layer4 dilated); 16 dilates layer4 only, about
        3x cheaper (the CPU demo uses it; never the paper's tables). ``weights``: the backbone's
        initialisation, whose keys decide ``layout`` ("torchvision" or "deeplab-pytorch", see the module
        docstring); without a file ``layout`` is taken as given (``from_state_dict``). ``init_note`` says
        what was loaded and what was not, for the log."""
        super().__init__()
        if not hasattr(torchvision.models, backbone) or not backbone.startswith("resnet"):
            raise ValueError(f"backbone must be a torchvision ResNet (resnet18/34/50/101/152), got {backbone!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 (DeepLab-v2) or 16, got {output_stride}")
        sd, self.init = None, "random"
        if weights:
            self.init, sd = read_weights(Path(weights), backbone)
            layout = "torchvision" if self.init == "imagenet-torchvision" else "deeplab-pytorch"
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        dilate = [False, output_stride == 8, True]
        if backbone in ("resnet18", "resnet34"):
            # BasicBlock ResNets cannot dilate in torchvision; layer3/4 are dilated by hand below
            net = getattr(torchvision.models, backbone)(weights=None)
            if output_stride == 8:
                _dilate_basic(net.layer3, 2)
            _dilate_basic(net.layer4, 4 if output_stride == 8 else 2)
        else:
            net = getattr(torchvision.models, backbone)(weights=None, replace_stride_with_dilation=dilate)
        self.caffe_input = None
        if layout == "deeplab-pytorch":
            _caffe_resnet(net, backbone)
            self.caffe_input = CaffeInput()
        self.init_note = f"DeepLab init: {self.init}"
        if sd is not None:
            self.init_note = f"DeepLab init: {self.init} from {weights}; " + _load_backbone(net, sd, Path(weights), backbone)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self.aspp = ASPP(net.fc.in_features, num_classes, rates)

    @classmethod
    def from_state_dict(cls, num_classes: int, backbone: str, output_stride: int, state_dict: dict[str, Tensor]) -> DeepLabV2:
        """A trained DeepLab (``seg/final.pt``'s ``model``) with its weights; its layout read from its
        keys (``CaffeInput``'s buffers), so evaluation needs no ``seg.weights`` file."""
        layout = "deeplab-pytorch" if "caffe_input.scale" in state_dict else "torchvision"
        m = cls(num_classes, backbone, None, output_stride=output_stride, layout=layout)
        m.load_state_dict(state_dict)
        return m

    def forward(self, x: Tensor, msc_scales: list[float] | None = None, upsample: bool = True) -> Tensor | list[Tensor]:
        """Logits at the input size (``upsample``) or at the output stride; with ``msc_scales`` the
        list of ``msc`` (training)."""
        return self.msc(x, msc_scales, upsample) if msc_scales else self._logits(x, upsample)

    def _logits(self, x: Tensor, upsample: bool = True) -> Tensor:
        h, w = x.shape[-2:]
        logits = self.aspp(self.backbone(x if self.caffe_input is None else self.caffe_input(x)))
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False) if upsample else logits

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

    def msc(self, x: Tensor, scales: list[float], upsample: bool = True) -> list[Tensor]:
        """DeepLab-v2's multi-scale training outputs: the logits at scale 1, at each of ``scales`` and
        their max fusion at scale 1's size. With ``upsample`` each output is at its input's size
        (scale 1's for the fusion); without, at its output stride (deeplab-pytorch's ``MSC``: the fusion
        at the scale-1 logits' size). One call, so that DDP sees one forward per backward."""
        full = self._logits(x, upsample)
        size = full.shape[-2:]
        pyramid = [self._logits(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False), upsample) for s in scales]
        up = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
        return [full, *pyramid, torch.stack([full, *up]).amax(0)]


def resize_labels(mask: Tensor, size) -> Tensor:
    """(B, H, W) class indices -> (B, *size) with ``F.interpolate(mode="nearest")`` (``seg.loss_at =
    "input"``; it samples the top-left of each cell, which deeplab-pytorch's docstring calls misaligned)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


@lru_cache(maxsize=64)
def _pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """The source index of each of ``n_out`` pixels when PIL resizes ``n_in`` pixels with NEAREST."""
    row = Image.fromarray(np.arange(n_in, dtype=np.float32)[None]).resize((n_out, 1), resample=Image.NEAREST)
    return np.asarray(row)[0].astype(np.int64)


def resize_labels_pil(mask: Tensor, size) -> Tensor:
    """(B, H, W) class indices -> (B, *size) exactly as deeplab-pytorch's ``resize_labels``
    (``PIL.Image.resize(..., NEAREST)`` of each label map; 255 stays 255), for the whole batch at once
    and on the mask's device: PIL's nearest with no rotation picks rows and columns independently,
    so its row and column indices are taken from PIL once per size and gathered."""
    (h, w), (oh, ow) = mask.shape[-2:], tuple(size)
    if (h, w) == (oh, ow):
        return mask
    rows = torch.from_numpy(_pil_nearest_index(h, oh)).to(mask.device)
    cols = torch.from_numpy(_pil_nearest_index(w, ow)).to(mask.device)
    return mask[:, rows[:, None], cols[None, :]]


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


def _caffe_resnet(net: nn.Module, backbone: str) -> None:
    """torchvision's Bottleneck ResNet -> the MSRA/Caffe one of deeplab-pytorch (``libs/models/resnet.py``):
    a block's stride in its 1x1 ``reduce`` rather than its 3x3, the first block of a dilated layer
    dilated like the rest (torchvision gives it the previous layer's dilation), max pooling with
    ``ceil_mode`` (a 321 crop gives 41 x 41 logits, its 160 and 240 MSC inputs 21 and 31)."""
    if not isinstance(net.layer1[0], torchvision.models.resnet.Bottleneck):
        raise WeightsError(f"deeplab-pytorch's weights are a Bottleneck ResNet (resnet101); seg.backbone is {backbone}")
    net.maxpool.ceil_mode = True
    for layer in (net.layer2, net.layer3, net.layer4):
        first = layer[0]
        if first.conv2.stride != (1, 1):
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
        first.conv2.dilation, first.conv2.padding = layer[-1].conv2.dilation, layer[-1].conv2.padding


def weights_layout(sd: dict[str, Tensor]) -> str | None:
    """The key layout of a state dict: "torchvision", "deeplab-pytorch" or None (neither)."""
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "torchvision"
    if "layer1.conv1.conv.weight" in sd or "base.layer1.conv1.conv.weight" in sd:
        return "deeplab-pytorch"
    return None


def _layout_error(path: Path, backbone: str) -> WeightsError:
    return WeightsError(
        f"{path}: neither a torchvision {backbone} state dict (keys conv1.weight, layer1.0.conv1.weight, ...; e.g. "
        "resnet101-63fe2227.pth: python -m tkpbench.data download weights --root weights) nor deeplab-pytorch's "
        "(layer1.conv1.conv.weight, layer2.block1.reduce.conv.weight, ...; deeplabv1_resnet101-coco.pth from its "
        "convert.py --dataset coco). Set seg.weights to one of these."
    )


def read_weights(path: Path, backbone: str) -> tuple[str, dict[str, Tensor]]:
    """seg.weights -> (its init name, its state dict in torchvision's names without the classifier)."""
    if not path.is_file():
        raise WeightsError(
            f"DeepLab backbone weights {path} do not exist. Expected a torchvision {backbone} ImageNet state dict "
            "(e.g. resnet101-63fe2227.pth: python -m tkpbench.data download weights --root weights) or deeplab-pytorch's "
            "COCO init (deeplabv1_resnet101-coco.pth). Set seg.weights."
        )
    sd = load_state_dict_file(path)
    layout = weights_layout(sd)
    if layout is None:
        raise _layout_error(path, backbone)
    if layout == "torchvision":
        return "imagenet-torchvision", {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return _from_deeplab_pytorch(sd, path)


def _from_deeplab_pytorch(sd: dict[str, Tensor], path: Path) -> tuple[str, dict[str, Tensor]]:
    """deeplab-pytorch's keys -> torchvision's:
    ``[base.]layer1.conv1.{conv,bn}.X`` -> ``conv1.X`` / ``bn1.X``;
    ``[base.]layer{L}.block{B}.{reduce,conv3x3,increase,shortcut}.{conv,bn}.X`` ->
    ``layer{L-1}.{B-1}.{conv1,conv2,conv3,downsample.0 | bn1,bn2,bn3,downsample.1}.X``;
    the classifier (``fc.*``, ``aspp.c{i}.*``) is dropped; its classes name the init (``DLP_INITS``).
    A classifier of 21 classes is a DeepLab trained on VOC's ground truth
    (``deeplabv2_resnet101_msc-vocaug.pth``): refused, a weakly supervised figure cannot start from it;
    so is a file whose classifier tells no known training data."""
    out, unknown, classes = {}, [], None
    for key, v in sd.items():
        k = key.removeprefix("base.")
        if m := _DLP_STEM.fullmatch(k):
            out[f"{'conv1' if m[1] == 'conv' else 'bn1'}.{m[2]}"] = v
        elif m := _DLP_BLOCK.fullmatch(k):
            conv, bn = _DLP_BRANCH[m[3]]
            out[f"layer{int(m[1]) - 1}.{int(m[2]) - 1}.{conv if m[4] == 'conv' else bn}.{m[5]}"] = v
        elif m := _DLP_HEAD.fullmatch(k):
            classes = v.shape[0] if m[2] == "weight" else classes
            if classes == 21:
                raise WeightsError(
                    f"{path}: its classifier {m[1]} has 21 classes: a DeepLab trained on VOC's ground-truth masks, which "
                    "a weakly supervised result may not start from. Use deeplab-pytorch's COCO init "
                    "(deeplabv1_resnet101-coco.pth) or torchvision's ImageNet ResNet in seg.weights."
                )
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{path}: keys outside deeplab-pytorch's ResNet layout: {unknown[:3]} ({len(unknown)} in all)")
    if classes not in DLP_INITS:
        raise WeightsError(
            f"{path}: deeplab-pytorch's layout, but its classifier ({classes} classes) does not tell what it was trained on; "
            f"expected {', '.join(f'{n} ({name})' for n, name in DLP_INITS.items())}"
        )
    return DLP_INITS[classes], out


def _load_backbone(net: nn.Module, sd: dict[str, Tensor], path: Path, backbone: str) -> str:
    """Every torchvision backbone tensor (not ``fc``) from ``sd``, shapes checked; returns the log note."""
    want = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{path}: does not fit torchvision {backbone}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:2]}). "
            "Set seg.backbone to the file's ResNet or seg.weights to a file of this one."
        )
    net.load_state_dict(sd, strict=False)
    return f"{len(want)} backbone tensors loaded; the ASPP starts at N(0, 0.01) (the file's classifier, if any, is not loaded)"


def init_name(path: str | Path | None) -> str:
    """The initialisation a DeepLab trained from ``seg.weights`` = ``path`` starts from, for records:
    "random" (no file), "imagenet-torchvision", "coco-deeplab-pytorch" or "imagenet-caffe-deeplab-pytorch"
    (from the file's key layout and classifier)."""
    if not path:
        return "random"
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"DeepLab weights {path} (seg.weights) do not exist; the record cannot name the init it used")
    return read_weights(path, "ResNet")[0]
