"""Patch contrastive error, PCE (paper Sec. 3.3, Eq. 3-5).

Choices fixed by SPEC.md where the paper is silent:

* the sets are per image: P_high^c = {i : Z_i^c > eps}, P_low^c = {i : Z_i^c < 1 - eps};
* the loss is summed over all classes (background included) and averaged over the batch;
* the positive term averages 1 - S-bar over ordered pairs i != j of P_high
  (N+ = |P_high| (|P_high| - 1)), the negative term averages S-bar over P_high x P_low
  (N- = |P_high| |P_low|); a term with no pairs is 0;
* Z only selects patches (no gradient into the scores).

Everything is batched matrix products: with H, L the (B, C, S) 0/1 masks and S-bar the
(B, S, S) similarity, the per-class sums are rows of (H @ S-bar) * H and (H @ S-bar) * L.
Memory is O(B S^2 + B C S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalized_similarity(features: Tensor) -> Tensor:
    """S-bar of Eq. 4: (1 + cos(F^i, F^j)) / 2 for all pairs. features: (B, S, E) -> (B, S, S)."""
    f = F.normalize(_at_least_fp32(features), dim=-1)
    return (1.0 + f @ f.transpose(1, 2)) * 0.5


def pce_per_class(features: Tensor, scores: Tensor, eps: float = 0.85) -> Tensor:
    """L_PCE^c of Eq. 5 for every image and class.

    features: (B, S, E) refined patch embeddings F_out; scores: (B, S, C) patch scores Z.
    Returns (B, C), each entry in [0, 2].
    """
    if features.dim() != 3 or scores.dim() != 3 or features.shape[:2] != scores.shape[:2]:
        raise ValueError(
            "PCE needs features (B, S, E) and scores (B, S, C) with the same B and S, got "
            f"{tuple(features.shape)} and {tuple(scores.shape)}"
        )
    sbar = normalized_similarity(features)  # (B, S, S)
    z = scores.detach()
    high = (z > eps).to(sbar.dtype).transpose(1, 2)  # (B, C, S)
    low = (z < 1.0 - eps).to(sbar.dtype).transpose(1, 2)  # (B, C, S)
    hs = high @ sbar  # (B, C, S): sum of S-bar from each patch to the class's high set
    n_high = high.sum(-1)
    n_low = low.sum(-1)
    diag = sbar.diagonal(dim1=1, dim2=2).unsqueeze(1)  # (B, 1, S)
    # Sum over ordered pairs i != j in P_high of S-bar; the diagonal is taken out exactly.
    pos_sim = (hs * high).sum(-1) - (high * diag).sum(-1)
    n_pos = n_high * (n_high - 1.0)
    pos = torch.where(n_pos > 0, (n_pos - pos_sim) / n_pos.clamp_min(1.0), torch.zeros_like(n_pos))
    n_neg = n_high * n_low
    neg_sim = (hs * low).sum(-1)
    neg = torch.where(n_neg > 0, neg_sim / n_neg.clamp_min(1.0), torch.zeros_like(n_neg))
    return pos + neg


def patch_contrastive_error(features: Tensor, scores: Tensor, eps: float = 0.85) -> Tensor:
    """Mean over images of the sum over classes of L_PCE^c (Eq. 5). Returns a scalar tensor."""
    return pce_per_class(features, scores, eps).sum(dim=1).mean()
