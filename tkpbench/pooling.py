"""Patch-to-image pooling (paper Sec. 3.2).

The paper maps the patch scores Z (Eq. 1) to an image score per class by averaging the k largest
patch scores of that class (top-K pooling). ViT-PCM's global max pooling is k = 1 and global
average pooling is k = S; both are kept as the Table 4 baselines.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from tkpbench.errors import ConfigError

PoolKind = Literal["avg", "max", "topk"]


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, S, C), got shape {tuple(scores.shape)}")


def topk_pool(scores: Tensor, k: int) -> Tensor:
    """y_c = mean of the k largest Z_i^c over patches i.

    scores: (B, S, C) -> (B, C). ``k`` must lie in [1, S].
    """
    _check_scores(scores)
    s = scores.shape[1]
    if not 1 <= k <= s:
        raise ConfigError(
            f"model.k = {k} but top-K pooling needs 1 <= k <= the number of patches, and these images have {s}; "
            f"set model.k to at most {s} or use larger images"
        )
    return scores.topk(k, dim=1, sorted=False).values.mean(dim=1)


def max_pool(scores: Tensor) -> Tensor:
    """Global max pooling over patches (ViT-PCM's GMP). scores: (B, S, C) -> (B, C)."""
    _check_scores(scores)
    return scores.amax(dim=1)


def avg_pool(scores: Tensor) -> Tensor:
    """Global average pooling over patches. scores: (B, S, C) -> (B, C)."""
    _check_scores(scores)
    return scores.mean(dim=1)


def pool(scores: Tensor, kind: PoolKind, k: int = 6) -> Tensor:
    """Dispatch on ``kind``: "avg", "max" or "topk" (with ``k``). scores: (B, S, C) -> (B, C)."""
    if kind == "topk":
        return topk_pool(scores, k)
    if kind == "max":
        return max_pool(scores)
    if kind == "avg":
        return avg_pool(scores)
    raise ConfigError(f"model.pooling = {kind!r} is unknown; expected one of 'avg', 'max', 'topk'")


class Pooling(nn.Module):
    """Patch-to-image pooling chosen at construction, so ``print(model)`` shows the paper's choice
    (as timm's ``SelectAdaptivePool2d``). scores: (B, S, C) -> (B, C)."""

    def __init__(self, kind: PoolKind = "topk", k: int = 6) -> None:
        super().__init__()
        if kind not in ("avg", "max", "topk"):
            raise ConfigError(f"model.pooling = {kind!r} is unknown; expected one of 'avg', 'max', 'topk'")
        if kind == "topk" and k < 1:
            raise ConfigError(f"model.k = {k} is not allowed; top-K pooling needs k >= 1")
        self.kind, self.k = kind, k

    def forward(self, scores: Tensor) -> Tensor:
        return pool(scores, self.kind, self.k)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", k={self.k}" if self.kind == "topk" else "")
