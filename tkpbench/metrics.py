"""Confusion matrix, IoU and mIoU (one torch.bincount per update; all-reduced across ranks)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


class ConfusionMatrix:
    """``mat[t, p]`` counts pixels of true class t predicted as p; ``ignore_index`` pixels are skipped.

    ``update`` takes numpy arrays or tensors (CPU or GPU) of equal shape and returns that update's
    own (C, C) counts; a value outside [0, num_classes) that is not ``ignore_index`` is a ValueError.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat: Tensor | None = None

    def update(self, pred, target) -> Tensor:
        p, t = _as_tensor(pred), _as_tensor(target)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
        n = self.num_classes
        t = t.reshape(-1)
        p = p.to(t.device).reshape(-1)
        signed = t.is_signed() or p.is_signed()
        t = t.int()
        p = p.int()
        # ignored pixels go to an extra row that is dropped: no boolean gather on the hot path
        t = torch.where(t == self.ignore_index, n, t)
        if p.numel():
            bad = int(p.max()) >= n or int(t.max()) > n
            if signed:
                bad = bad or int(p.min()) < 0 or int(t.min()) < 0
            if bad:
                raise ValueError(f"class index outside [0, {n}) that is not the ignore index {self.ignore_index}")
        counts = torch.bincount(t * n + p, minlength=(n + 1) * n)[: n * n].reshape(n, n).long()
        self.mat = counts if self.mat is None else self.mat.to(counts.device) + counts
        return counts

    @staticmethod
    def class_counts(counts: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class intersection, predicted and ground-truth pixel counts (int64 (C,) each) of one
        confusion matrix (what ``update`` returns for one image): the per-image record that
        ``tkpbench.stats`` resamples; union = pred + gt - inter."""
        m = counts.cpu().long()
        return m.diag().numpy(), m.sum(0).numpy(), m.sum(1).numpy()

    def matrix(self) -> np.ndarray:
        """The (C, C) int64 matrix, rows truth, columns prediction (zeros before any update)."""
        return self._m().cpu().numpy()

    def _m(self) -> Tensor:
        return self.mat if self.mat is not None else torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (no-op without an initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            m = self._m().clone()
            if dist.get_backend() == "nccl" and not m.is_cuda:
                m = m.cuda()
            dist.all_reduce(m)
            self.mat = m

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes with an empty union (absent and never predicted)."""
        m = self._m().double().cpu()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
        return iou.numpy()

    def precision(self) -> np.ndarray:
        """Per-class precision, TP / predicted; NaN for a class never predicted."""
        m = self._m().double().cpu()
        p = m.sum(0)
        return torch.where(p > 0, m.diag() / p.clamp_min(1), torch.full_like(p, float("nan"))).numpy()

    def recall(self) -> np.ndarray:
        """Per-class recall, TP / ground truth; NaN for a class absent from the ground truth."""
        m = self._m().double().cpu()
        g = m.sum(1)
        return torch.where(g > 0, m.diag() / g.clamp_min(1), torch.full_like(g, float("nan"))).numpy()

    def miou(self) -> float:
        """Mean IoU over classes with a non-empty union."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def all_background_miou(self) -> float:
        """The mIoU that predicting background (class 0) everywhere would score on the same pixels."""
        gt = self._m().double().sum(1).cpu()
        total = float(gt.sum())
        present = int((gt > 0).sum()) if gt[0] > 0 else int((gt > 0).sum()) + 1
        return float(gt[0]) / total / present if total else float("nan")

    def pixel_accuracy(self) -> float:
        m = self._m().double()
        total = float(m.sum())
        return float(m.diag().sum()) / total if total else float("nan")
