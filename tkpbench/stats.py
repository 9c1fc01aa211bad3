"""How sure a measured mIoU is: intervals over images and over training seeds, and paired differences.

Every scored stage keeps, beside its record, the per-image, per-class intersection and union
pixel counts (``save_counts``: integer arrays ``inter`` and ``union`` of shape (N images, C)).
The dataset mIoU is recomputed from them exactly as the metric defines it: sum the counts of the
images, then IoU_c = I_c / U_c and the mean over classes with U_c > 0 (the dataset estimator, not
a mean of per-image IoUs). Everything below resamples images and/or seeds and recomputes that.

Methods (``scipy.stats``):
- one run: ``scipy.stats.bootstrap`` over images, percentile interval. BCa would need a
  jackknife of N full evaluations (40,504 on COCO val); the coverage test shows that the
  percentile interval covers at about the nominal rate for this ratio estimator.
- across seeds: mean, standard deviation and a Student-t interval of the per-seed mIoUs
  (``scipy.stats.t``); with 2-3 seeds it is wide, honestly so.
- seeds and images together (what the report's ± shows): se^2 = sd_seeds^2 / S + se_images^2,
  with se_images the bootstrap standard error over images of the seed-averaged mIoU, and the
  interval mean +- t(S-1) se. The seed term is a t term because a bootstrap over 2-3 seeds is far
  too narrow; the image term is needed because every seed is scored on the same finite images.
  With one seed it is the image bootstrap alone.
- paired differences: two variants run with the same seeds on the same images; the same
  combination applied to the per-seed differences, with the same image draws for both variants,
  so what they share cancels. An interval that contains 0 is "within noise".
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as st

from tkpbench.io import atomic_write_bytes

CONFIDENCE = 0.95


def save_counts(path: Path, ids: list[str], **arrays: np.ndarray) -> int:
    """Write per-image count arrays (each (N, C) integers) and the image ids as a compressed .npz
    (no pickled objects); returns the bytes written."""
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=np.asarray(ids, dtype=str), **{k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def load_counts(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def miou_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Dataset mIoU (%) of counts summed over the image axis. inter, union: (..., N, C) -> (...)."""
    i, u = inter.sum(axis=-2).astype(np.float64), union.sum(axis=-2).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(u > 0, i / np.where(u > 0, u, 1), np.nan)
    return 100 * np.nanmean(iou, axis=-1)


@dataclass
class Estimate:
    """A measured mIoU (%) with its 95% interval; ``n`` seeds (or 1), ``images`` test images."""

    value: float
    low: float
    high: float
    n: int = 1
    images: int = 0
    sd: float | None = None  # between seeds
    method: str = ""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def cell(self) -> str:
        """``73.1 ± 1.2 (n=3)``: the value and the half-width of the 95% interval."""
        return f"{self.value:.1f} ± {self.half_width:.1f} (n={self.n})"


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def canonical_order(*arrays: np.ndarray) -> np.ndarray:
    """An order of the images (axis -2 of every array) that depends only on their counts, so that an
    interval never depends on the order a split lists its images in (resampling is then exactly
    reproducible for the same images in any order)."""
    key = np.concatenate([np.moveaxis(np.asarray(a), -2, 0).reshape(np.shape(a)[-2], -1) for a in arrays], axis=1)
    return np.lexsort(key.T[::-1])


def image_interval(
    inter: np.ndarray, union: np.ndarray, n_resamples: int = 2000, seed: int = 0, batch: int | None = None
) -> Estimate:
    """mIoU of one run with a 95% percentile-bootstrap interval over its images. inter, union: (N, C)."""
    inter, union = np.asarray(inter), np.asarray(union)
    order = canonical_order(inter, union)
    inter, union = inter[order], union[order]

    def stat(idx, axis=-1):
        idx = np.asarray(idx, dtype=np.int64)
        return miou_from_counts(inter[idx], union[idx])

    res = st.bootstrap(
        (np.arange(len(inter)),),
        stat,
        n_resamples=n_resamples,
        vectorized=True,
        batch=_batch(batch, *inter.shape),
        method="percentile",
        confidence_level=CONFIDENCE,
        rng=_rng(seed),
    )
    ci = res.confidence_interval
    return Estimate(
        float(miou_from_counts(inter, union)),
        float(ci.low),
        float(ci.high),
        1,
        len(inter),
        method="bootstrap over images (percentile)",
    )


def seed_interval(values: list[float] | np.ndarray) -> Estimate:
    """Mean, sd and a 95% Student-t interval of per-seed mIoUs (no interval from one seed)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return Estimate(m, float("nan"), float("nan"), len(v), method="one seed: no spread")
    sd = float(v.std(ddof=1))
    lo, hi = st.t.interval(CONFIDENCE, len(v) - 1, loc=m, scale=sd / np.sqrt(len(v))) if sd > 0 else (m, m)
    return Estimate(m, float(lo), float(hi), len(v), sd=sd, method="Student t over seeds")


def _batch(batch: int | None, *shape: int) -> int:
    """Resamples per vectorised call, so that one call holds about 2e7 counts (COCO: 40,504 x 81)."""
    return batch or max(1, int(2e7 // max(1, int(np.prod(shape)))))


def _per_seed_miou(inter: np.ndarray, union: np.ndarray, s_idx: np.ndarray, i_idx: np.ndarray) -> np.ndarray:
    """inter, union: (S, N, C); s_idx: (..., s); i_idx: (..., n) -> mIoU (..., s) of each drawn seed on the drawn images."""
    s_idx, i_idx = np.asarray(s_idx, dtype=np.int64), np.asarray(i_idx, dtype=np.int64)
    sub_i = inter[s_idx[..., :, None], i_idx[..., None, :]]  # (..., s, n, C)
    sub_u = union[s_idx[..., :, None], i_idx[..., None, :]]
    return miou_from_counts(sub_i, sub_u)


def _image_resampled(stat_of, n_images: int, n_resamples: int, seed: int, batch: int):
    """scipy's bootstrap over image indices of ``stat_of(image_idx)`` (percentile interval, standard error)."""
    return st.bootstrap(
        (np.arange(n_images),),
        lambda i, axis=-1: stat_of(i),
        n_resamples=n_resamples,
        vectorized=True,
        batch=batch,
        method="percentile",
        confidence_level=CONFIDENCE,
        rng=_rng(seed),
    )


def _combine(per_seed: np.ndarray, image_res, method: str, images: int) -> Estimate:
    """Seeds (Student t, n-1 df) and images (bootstrap standard error) in one interval."""
    m = float(per_seed.mean())
    if len(per_seed) == 1:
        ci = image_res.confidence_interval
        return Estimate(m, float(ci.low), float(ci.high), 1, images, method=method + ", one seed: images only")
    sd = float(per_seed.std(ddof=1))
    se = float(np.sqrt(sd**2 / len(per_seed) + image_res.standard_error**2))
    q = float(st.t.ppf(0.5 + CONFIDENCE / 2, len(per_seed) - 1))
    return Estimate(m, m - q * se, m + q * se, len(per_seed), images, sd=sd, method=method)


def seed_and_image_interval(
    inter: np.ndarray, union: np.ndarray, n_resamples: int = 1000, seed: int = 0, batch: int | None = None
) -> Estimate:
    """Mean mIoU over seeds with a 95% interval that covers both the variation between training
    seeds and the finite test set. inter, union: (S seeds, N images, C), the same images for
    every seed. se^2 = sd_seeds^2 / S + se_images^2, where se_images is the bootstrap standard
    error over images of the seed-averaged mIoU; the interval is mean +- t(S-1) * se. A bootstrap
    over 2-3 seeds would be far too narrow (3 seeds have 10 distinct resamples), hence the t term."""
    inter, union = np.asarray(inter), np.asarray(union)
    order = canonical_order(inter, union)
    inter, union = inter[:, order], union[:, order]
    per_seed = miou_from_counts(inter, union)
    seeds = np.arange(len(inter))
    res = _image_resampled(
        lambda i: _per_seed_miou(inter, union, np.broadcast_to(seeds, (*np.shape(i)[:-1], len(seeds))), i).mean(axis=-1),
        inter.shape[1],
        n_resamples,
        seed,
        _batch(batch, *inter.shape),
    )
    return _combine(per_seed, res, "seeds (t) and images (bootstrap se)", inter.shape[1])


def paired_difference(
    a_inter: np.ndarray,
    a_union: np.ndarray,
    b_inter: np.ndarray,
    b_union: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    batch: int | None = None,
) -> Estimate:
    """Δ mIoU = A - B (points) for two variants run with the same seeds on the same images, with a
    paired 95% interval: the per-seed differences (t over seeds) and the bootstrap over images with
    the same image draws for both variants, so what they share cancels. Arrays: (S, N, C), seeds aligned."""
    a_i, a_u, b_i, b_u = (np.asarray(x) for x in (a_inter, a_union, b_inter, b_union))
    if a_i.shape[:2] != b_i.shape[:2]:
        raise ValueError(f"paired variants need the same seeds and images: {a_i.shape[:2]} vs {b_i.shape[:2]}")
    order = canonical_order(a_i, a_u, b_i, b_u)
    a_i, a_u, b_i, b_u = (x[:, order] for x in (a_i, a_u, b_i, b_u))
    delta = miou_from_counts(a_i, a_u) - miou_from_counts(b_i, b_u)
    seeds = np.arange(len(a_i))

    def stat(i):
        s = np.broadcast_to(seeds, (*np.shape(i)[:-1], len(seeds)))
        return (_per_seed_miou(a_i, a_u, s, i) - _per_seed_miou(b_i, b_u, s, i)).mean(axis=-1)

    res = _image_resampled(stat, a_i.shape[1], n_resamples, seed, _batch(batch, 2, *a_i.shape))
    return _combine(delta, res, "paired: seeds (t) and images (bootstrap se, same draws)", a_i.shape[1])


def verdict(delta: Estimate) -> str:
    """'A better', 'B better' or 'within noise' (the paired interval contains 0)."""
    if delta.low > 0:
        return "A better"
    if delta.high < 0:
        return "B better"
    return "within noise"
