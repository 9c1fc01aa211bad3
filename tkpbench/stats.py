"""How sure a measured mIoU is: intervals over images and over training seeds, and paired differences.

Every scored stage keeps, beside its record, the per-image, per-class pixel counts
(``save_counts``): ``inter`` (predicted c where the truth is c), ``pred`` (predicted c), ``gt``
(truth c) and ``union`` = pred + gt - inter, integer arrays of shape (N images, C), and the
dataset's (C, C) ``confusion`` matrix (rows truth, columns prediction). Files written before
``pred``/``gt``/``confusion`` existed hold ``inter`` and ``union`` only: they still give IoU and
its intervals, never precision or recall (``measurement`` says which). A measurement other than
the plain one is a key suffix: ``inter_crf`` (after the CRF), ``inter_msf`` (a rung of the
DeepLab evaluation ladder, ``tkpbench.segment.evaluate``).
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
- per-class IoU, precision and recall (``class_intervals``): the dataset estimator of each,
  averaged over seeds, with a percentile bootstrap over images (the same draws for every seed
  and every class); the seed term is left out, and the report says so.
- which images change (``image_changes``): per-image mIoU of two variants, paired by image, and
  the share of images that improve with a Wilson interval (``scipy.stats.binomtest``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tkpbench.io import atomic_write_bytes


def _scipy_stats():
    """``scipy.stats``, imported on first use (0.5 s): every stage that scores imports this module,
    and only its rank 0 computes an interval."""
    from scipy import stats

    return stats


CONFIDENCE = 0.95


def save_counts(path: Path, ids: list[str], **arrays: np.ndarray) -> int:
    """Write count arrays (per image (N, C), or a (C, C) confusion matrix; integers, stored int64)
    and the image ids as a compressed .npz (no pickled objects); returns the bytes written."""
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=np.asarray(ids, dtype=str), **{k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def load_counts(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@dataclass
class Measurement:
    """One measurement's per-image counts, (N, C) or (S seeds, N, C): ``pred``, ``gt`` and
    ``confusion`` are None in a file written before they were stored."""

    inter: np.ndarray
    union: np.ndarray
    pred: np.ndarray | None = None
    gt: np.ndarray | None = None
    confusion: np.ndarray | None = None
    ids: np.ndarray | None = None  # the images, in the order of axis -2

    @property
    def has_pr(self) -> bool:
        """Whether precision and recall can be computed (pred and gt stored)."""
        return self.pred is not None and self.gt is not None


def measurement(counts: dict[str, np.ndarray], suffix: str = "") -> Measurement | None:
    """The arrays of one measurement (``suffix``: "", "_crf", "_msf", ...) of a loaded counts file;
    None when the file has no ``inter{suffix}``. ``union`` comes from the file, or pred + gt - inter."""
    if f"inter{suffix}" not in counts:
        return None
    inter = counts[f"inter{suffix}"]
    pred, gt, conf = (counts.get(f"{k}{suffix}") for k in ("pred", "gt", "confusion"))
    union = counts.get(f"union{suffix}")
    if union is None:
        union = pred + gt - inter
    return Measurement(inter, union, pred, gt, conf, counts.get("ids"))


def stack_measurements(ms: list[Measurement]) -> Measurement:
    """Seeds stacked on a new first axis; pred/gt only when every seed has them; confusion summed."""
    pr = all(m.has_pr for m in ms)
    conf = [m.confusion for m in ms]
    return Measurement(
        np.stack([m.inter for m in ms]),
        np.stack([m.union for m in ms]),
        np.stack([m.pred for m in ms]) if pr else None,
        np.stack([m.gt for m in ms]) if pr else None,
        np.sum(conf, axis=0) if all(c is not None for c in conf) else None,
        ms[0].ids,
    )


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


NAN = float("nan")
ONE_IMAGE = "one image: no interval"


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
    res = _image_resampled(
        lambda i: miou_from_counts(inter[i], union[i]), len(inter), n_resamples, seed, _batch(batch, *inter.shape)
    )
    if res is None:  # nothing to resample: the value, and no interval
        return Estimate(float(miou_from_counts(inter, union)), NAN, NAN, 1, len(inter), method=ONE_IMAGE)
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
    lo, hi = _scipy_stats().t.interval(CONFIDENCE, len(v) - 1, loc=m, scale=sd / np.sqrt(len(v))) if sd > 0 else (m, m)
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
    """scipy's bootstrap over image indices of ``stat_of(image_idx)`` (percentile interval, standard
    error); None for fewer than two images, where there is nothing to resample."""
    if n_images < 2:
        return None
    return _scipy_stats().bootstrap(
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
    if image_res is None:  # one image: its variation cannot be estimated, so no interval
        sd = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else None
        return Estimate(m, NAN, NAN, len(per_seed), images, sd=sd, method=f"{method}: {ONE_IMAGE}")
    if len(per_seed) == 1:
        ci = image_res.confidence_interval
        return Estimate(m, float(ci.low), float(ci.high), 1, images, method=method + ", one seed: images only")
    sd = float(per_seed.std(ddof=1))
    se = float(np.sqrt(sd**2 / len(per_seed) + image_res.standard_error**2))
    q = float(_scipy_stats().t.ppf(0.5 + CONFIDENCE / 2, len(per_seed) - 1))
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


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 num / den, NaN where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 100 * num / np.where(den > 0, den, 1), np.nan)


def _finite_mean(v: np.ndarray) -> np.ndarray:
    """Mean over the first (seed) axis of the finite values; NaN where there are none."""
    ok = np.isfinite(v)
    k = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, np.where(ok, v, 0).sum(axis=0) / np.maximum(k, 1), np.nan)


def class_scores(inter: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Dataset per-class IoU, precision and recall (%) of counts summed over the image axis:
    IoU = I / (P + G - I), precision = I / P (NaN when never predicted), recall = I / G (NaN when
    absent). inter, pred, gt: (..., N, C) -> each (..., C)."""
    i, p, g = (np.asarray(x).sum(axis=-2) for x in (inter, pred, gt))
    return {"iou": _ratio(i, p + g - i), "precision": _ratio(i, p), "recall": _ratio(i, g)}


@dataclass
class ClassIntervals:
    """Per-class IoU, precision and recall (%), each (C,): the mean over seeds of the dataset
    estimator and a 95% percentile-bootstrap interval over images."""

    value: dict[str, np.ndarray]
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    n: int
    images: int


def class_intervals(
    inter: np.ndarray, pred: np.ndarray, gt: np.ndarray, n_resamples: int = 1000, seed: int = 0, chunk: int = 100
) -> ClassIntervals:
    """Per-class IoU, precision and recall with 95% intervals over images. Arrays (N, C) or
    (S, N, C) with the same images for every seed. A resample is a multinomial weight per image
    (the same for every seed and class), so a resampled sum is one matrix product; draws in which
    a class has no pixels (its ratio undefined) are left out of that class's percentiles. Seed
    variation is not in these intervals (with 2-3 seeds it is the mIoU interval's job)."""
    arrs = [np.asarray(x, dtype=np.float64) for x in (inter, pred, gt)]
    arrs = [a if a.ndim == 3 else a[None] for a in arrs]
    order = canonical_order(*arrs)
    arrs = [a[:, order] for a in arrs]
    s, n, _ = arrs[0].shape
    value = {k: _finite_mean(v) for k, v in class_scores(*arrs).items()}
    if n < 2:  # one image: every resample is that image, so no interval
        nan = {k: np.full_like(v, np.nan) for k, v in value.items()}
        return ClassIntervals(value, nan, dict(nan), s, n)
    rng = _rng(seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in value}
    for start in range(0, n_resamples, chunk):
        w = rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, n_resamples - start)).astype(np.float64)  # (B, N)
        i, p, g = (w @ a for a in arrs)  # (S, B, C) resampled sums: one BLAS product per array
        for k, v in {"iou": _ratio(i, p + g - i), "precision": _ratio(i, p), "recall": _ratio(i, g)}.items():
            draws[k].append(_finite_mean(v))
    low, high = {}, {}
    for k, parts in draws.items():
        d = np.concatenate(parts)  # (B, C)
        ok = np.isfinite(d).any(axis=0)
        q = np.full((2, d.shape[1]), np.nan)
        if ok.any():
            q[:, ok] = np.nanpercentile(d[:, ok], [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)], axis=0)
        low[k], high[k] = q
    return ClassIntervals(value, low, high, s, n)


def per_image_miou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Each image's own mIoU (%): the mean over the classes with union > 0 in that image of
    inter / union (the classes it shows or that are predicted in it); NaN for an image with
    none. inter, union: (..., N, C) -> (..., N)."""
    u = np.asarray(union, dtype=np.float64)
    iou = np.where(u > 0, np.asarray(inter, dtype=np.float64) / np.where(u > 0, u, 1), 0.0)
    k = (u > 0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, 100 * iou.sum(axis=-1) / np.maximum(k, 1), np.nan)


@dataclass
class ImageChanges:
    """Per-image mIoU of two variants on the same images (averaged over their shared seeds), the
    paired difference ``delta`` = A - B (points) and the share of images A improves, with its 95%
    Wilson interval. Images where either value is undefined are left out."""

    ids: np.ndarray
    a: np.ndarray
    b: np.ndarray
    delta: np.ndarray
    improved: int
    worse: int
    share: Estimate

    def top(self, k: int) -> tuple[list[int], list[int]]:
        """Indices (into ``ids``) of the k largest gains and the k largest losses, largest first;
        a gain is only an image with delta > 0, a loss only one with delta < 0."""
        order = np.argsort(self.delta, kind="stable")
        gains = [int(i) for i in order[::-1][:k] if self.delta[i] > 0]
        losses = [int(i) for i in order[:k] if self.delta[i] < 0]
        return gains, losses


def image_changes(a_inter: np.ndarray, a_union: np.ndarray, b_inter: np.ndarray, b_union: np.ndarray, ids) -> ImageChanges:
    """Which images change between variants A and B (arrays (N, C) or (S, N, C), seeds and images
    aligned): per-image mIoU (``per_image_miou``) averaged over seeds, paired by image; an image
    improves when A's value is strictly higher. The share improved counts every image scored by
    both; its interval is Wilson's score interval of a binomial proportion over those images."""
    a, b = (per_image_miou(i, u) for i, u in ((a_inter, a_union), (b_inter, b_union)))
    if a.ndim == 2:
        a, b = a.mean(axis=0), b.mean(axis=0)
    ok = np.isfinite(a) & np.isfinite(b)
    ids, a, b = np.asarray(ids)[ok], a[ok], b[ok]
    delta = a - b
    up, down, n = int((delta > 0).sum()), int((delta < 0).sum()), len(delta)
    if n:
        ci = _scipy_stats().binomtest(up, n).proportion_ci(CONFIDENCE, method="wilson")
        share = Estimate(
            100 * up / n, float(100 * ci.low), float(100 * ci.high), 1, n, method="Wilson score interval over images"
        )
    else:
        share = Estimate(float("nan"), float("nan"), float("nan"), 1, 0, method="no images")
    return ImageChanges(ids, a, b, delta, up, down, share)
