"""TKP-PCL: encoder -> HV-BiLSTM -> dropout -> bias-free linear -> softmax -> pooling.

Also the step from patch predictions to masks that training's evaluation, the pseudo-mask stage
and ``predict`` share (``patch_masks``: the ViT-PCM tag merge, then upsampling).

Eq. 1: Z = softmax(F_out W); Sec. 3.2: y_c = top-K mean of Z^c; Eq. 2: MCE; Eq. 6:
L = MCE + alpha * sum_c PCE^c (PCE of Eq. 3-5 in ``tkpbench.pce``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tkpbench.config import Config, ModelConfig, config_from_dict
from tkpbench.encoder import PatchEncoder
from tkpbench.errors import ConfigError
from tkpbench.hv_bilstm import HVBiLSTM, keras_init_
from tkpbench.pce import patch_contrastive_error
from tkpbench.pooling import Pooling


@dataclass
class TKPOutput:
    z: Tensor  # (B, S, C) patch scores, softmax over classes (Eq. 1)
    y: Tensor  # (B, C) image scores after pooling
    features: Tensor  # (B, S, E) F_out, the HV-BiLSTM output that PCE works on
    grid: tuple[int, int]  # (h, w) patch grid, S = h * w


class TKPPCL(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kwargs = {"proj_drop_rate": cfg.encoder_dropout, **cfg.encoder_kwargs}
        self.encoder = PatchEncoder(cfg.encoder, cfg.weights or None, cfg.img_size, **kwargs)
        p = self.encoder.patch_size
        if cfg.img_size % p:
            raise ConfigError(
                f"model.img_size = {cfg.img_size} is not a multiple of the patch size {p} of {cfg.encoder}; "
                f"set model.img_size to a multiple of {p}, e.g. {cfg.img_size // p * p or p}"
            )
        self.hv_bilstm = HVBiLSTM(self.encoder.embed_dim, cfg.hidden, cfg.dropout, cfg.lstm_dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(self.hv_bilstm.out_dim, cfg.num_classes, bias=False)
        self.pooling = Pooling(cfg.pooling, cfg.k)
        if cfg.init == "keras":
            keras_init_(self.hv_bilstm.horizontal)
            keras_init_(self.hv_bilstm.vertical)
            nn.init.normal_(self.classifier.weight, 0.0, 0.05)  # ViT-PCM: RandomNormal(0, 0.05), no bias

    def forward(self, x: Tensor) -> TKPOutput:
        """x: (B, 3, H, W) normalised images, H and W multiples of the patch size."""
        tokens, (h, w) = self.encoder(x)  # (B, S, E)
        b = tokens.shape[0]
        f_out = self.hv_bilstm(tokens.reshape(b, h, w, -1)).reshape(b, h * w, -1)  # (B, S, 4*hidden)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # classifier, softmax (Eq. 1) and pooling in fp32 even under bf16 autocast, as ViT-PCM
            logits = self.classifier(self.dropout(f_out.float()))
            z = logits.softmax(dim=-1)
            y = self.pooling(z)
        return TKPOutput(z=z, y=y, features=f_out, grid=(h, w))

    @classmethod
    def from_checkpoint(cls, ck: dict) -> tuple["TKPPCL", "Config"]:
        """The trained model (eval mode) and its config from a loaded ``final.pt`` (``runs.load_final``)."""
        cfg = config_from_dict(ck["config"], "final.pt")
        cfg.model.weights = ""  # the checkpoint's own weights follow
        model = cls(cfg.model)
        model.load_state_dict(ck["model"])
        return model.eval(), cfg

    def trainable_head_parameters(self) -> list[nn.Parameter]:
        return list(self.hv_bilstm.parameters()) + list(self.classifier.parameters())


def image_targets(tags: Tensor) -> Tensor:
    """Image-level targets t: tags (B, C) bool with the background entry forced to 1."""
    t = tags.float().clone()
    t[:, 0] = 1.0
    return t


def tkp_loss(
    out: TKPOutput, tags: Tensor, cfg: ModelConfig, et: Tensor | None = None, classifier_weight: Tensor | None = None
) -> dict[str, Tensor]:
    """Eq. 6 and ViT-PCM's extra terms, in fp32: {"loss", "mce", ["pce"], ["et"], ["reg"]}.

    loss = MCE + alpha * PCE + ET + REG; a switched-off term is absent from the dict, not 0.
    MCE (Eq. 2) is the BCE averaged over classes and images; y is clamped away from 0 and 1.
    The BCE is written out rather than ``F.binary_cross_entropy``, whose kernel rejects a NaN
    score (a device-side assert on CUDA that poisons the context, a RuntimeError on the CPU):
    a diverged model must give a NaN loss, which the engine's NaN guard reports.
    PCE (``cfg.pce``) as Eq. 3-5. ET is the equivariance loss, computed by the caller
    (``tkpbench.equivariance``), passed when ``cfg.et``. REG (``cfg.reg`` > 0) is Keras's
    ``L2(reg)`` on the classifier kernel, ``reg * sum(W^2)``, as ViT-PCM's ``compute_reg_loss``.
    """
    t = image_targets(tags)
    with torch.autocast(device_type=out.y.device.type, enabled=False):
        y = out.y.float().clamp(cfg.clamp, 1.0 - cfg.clamp)
        terms = {"mce": -(t * y.log() + (1.0 - t) * (-y).log1p()).mean()}
        loss = terms["mce"]
        if cfg.pce:
            terms["pce"] = patch_contrastive_error(out.features.float(), out.z, cfg.eps)
            loss = loss + cfg.alpha * terms["pce"]
        if cfg.et:
            if et is None:
                raise ValueError("model.et is on but no equivariance term was passed to tkp_loss")
            terms["et"] = et.float()
            loss = loss + terms["et"]
        if cfg.reg:
            if classifier_weight is None:
                raise ValueError("model.reg > 0 needs the classifier weight")
            terms["reg"] = cfg.reg * classifier_weight.float().pow(2).sum()
            loss = loss + terms["reg"]
        return {"loss": loss, **terms}


def merge_with_tags(z: Tensor, tags: Tensor) -> Tensor:
    """ViT-PCM's merge of patch scores with the image's tags (SPEC Sec. 2).

    z: (B, C, h, w) patch scores; tags: (B, C) bool (background forced on). Absent classes are
    zeroed, each class map is divided by its maximum over the image, and the result is
    renormalised over classes. Returns (B, C, h, w), summing to 1 over C.
    """
    t = image_targets(tags).to(z.dtype)[:, :, None, None]
    m = z * t
    peak = m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    m = m / peak * t
    return m / m.sum(dim=1, keepdim=True).clamp_min(1e-12)


def score_grid(z: Tensor, grid: tuple[int, int]) -> Tensor:
    """z: (B, S, C) patch scores -> the same scores as maps on the patch grid (B, C, h, w)."""
    b, s, c = z.shape
    return z.transpose(1, 2).reshape(b, c, *grid)


def merged_grid(z: Tensor, grid: tuple[int, int], tags: Tensor) -> Tensor:
    """z: (B, S, C) patch scores -> the tag-merged probabilities on the patch grid (B, C, h, w), fp32."""
    return merge_with_tags(score_grid(z.float(), grid), tags)


def upsample_probs(p: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear (``pseudo.align_corners``: ViT-PCM's resize uses True).
    ``runs.load_probs`` makes the same call on stored grids."""
    return F.interpolate(p, size=size, mode="bilinear", align_corners=align_corners)


def patch_masks(
    z: Tensor, grid: tuple[int, int], tags: Tensor, size: tuple[int, int], return_probs: bool = False, align_corners: bool = False
):
    """z: (B, S, C) patch scores -> merged (B, C, h, w) -> bilinear to ``size`` -> argmax (B, H, W).
    With ``return_probs`` also the upsampled merged probabilities (B, C, H, W)."""
    up = upsample_probs(merged_grid(z, grid, tags), size, align_corners)
    return (up.argmax(1), up) if return_probs else up.argmax(1)
