"""The statistics behind every ± in the report: coverage, invariances, paired differences."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as stx
from hypothesis.extra import numpy as hnp

from tkpbench import stats as S
from tkpbench.metrics import ConfusionMatrix


def _draw(rng, n_images, p=(0.9, 0.5, 0.3, 0.6), lam=(400, 120, 80, 200), q=(0.9, 0.6, 0.5, 0.75), mu=(30, 40, 20, 25)):
    """Per-image counts from a known model: a class is present with prob p, covers Poisson(lam)
    pixels of which Binomial(q) are found, plus Poisson(mu) false-positive pixels."""
    p, lam, q, mu = map(np.asarray, (p, lam, q, mu))
    present = rng.random((n_images, len(p))) < p
    gt = rng.poisson(lam, (n_images, len(p))) * present
    inter = rng.binomial(gt, q)
    union = gt + rng.poisson(mu, (n_images, len(p)))
    true = 100 * np.mean(p * lam * q / (p * lam + mu))
    return inter, union, true


def test_miou_from_counts_equals_the_confusion_matrix_miou():
    rng = np.random.default_rng(1)
    cm = ConfusionMatrix(4)
    inter, union = [], []
    for _ in range(6):
        gt, pred = rng.integers(0, 4, (9, 11)), rng.integers(0, 4, (9, 11))
        gt[0, :3] = 255
        c = ConfusionMatrix(4)
        c.update(pred, gt)
        cm.update(pred, gt)
        m = c.mat.numpy()
        inter.append(np.diag(m))
        union.append(m.sum(0) + m.sum(1) - np.diag(m))
    assert S.miou_from_counts(np.array(inter), np.array(union)) == pytest.approx(100 * cm.miou())


def test_the_image_interval_covers_the_true_miou_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    trials = 300
    for t in range(trials):
        inter, union, true = _draw(rng, 120)
        hits += S.image_interval(inter, union, n_resamples=400, seed=t).contains(true)
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def test_the_seed_and_image_interval_covers_the_true_mean_of_noisy_seeds():
    """Three training seeds whose quality differs (the seed noise) on one shared test set."""
    rng = np.random.default_rng(3)
    hits, trials = 0, 200
    for t in range(trials):
        qs = [np.clip(np.array([0.9, 0.6, 0.5, 0.75]) + rng.normal(0, 0.04), 0, 1) for _ in range(3)]
        present = rng.random((80, 4)) < np.array([0.9, 0.5, 0.3, 0.6])
        gt = rng.poisson([400, 120, 80, 200], (80, 4)) * present
        fp = rng.poisson([30, 40, 20, 25], (80, 4))
        inter = np.stack([rng.binomial(gt, q) for q in qs])
        union = np.stack([gt + fp] * 3)
        p, lam, mu = np.array([0.9, 0.5, 0.3, 0.6]), np.array([400, 120, 80, 200]), np.array([30, 40, 20, 25])
        true = 100 * np.mean(p * lam * np.array([0.9, 0.6, 0.5, 0.75]) / (p * lam + mu))
        hits += S.seed_and_image_interval(inter, union, n_resamples=300, seed=t).contains(true)
    assert hits / trials >= 0.88, hits / trials


counts = stx.integers(5, 30).flatmap(
    lambda n: stx.tuples(
        hnp.arrays(np.int64, (n, 3), elements=stx.integers(0, 50)), hnp.arrays(np.int64, (n, 3), elements=stx.integers(0, 50))
    )
)


def _pair(raw):
    a, b = raw
    inter = np.minimum(a, b) + 1  # every class is present and found in part in every image
    union = np.maximum(a, b) + 2
    return inter, union


@settings(max_examples=25, deadline=None)
@given(counts, stx.randoms(use_true_random=False))
def test_permuting_images_changes_nothing(raw, rnd):
    inter, union = _pair(raw)
    perm = np.array(rnd.sample(range(len(inter)), len(inter)))
    a, b = S.image_interval(inter, union, n_resamples=300), S.image_interval(inter[perm], union[perm], n_resamples=300)
    assert a.value == pytest.approx(b.value, abs=1e-9)
    assert (a.low, a.high) == (b.low, b.high)  # the images are resampled in an order of their own
    three = np.stack([inter, inter, inter]), np.stack([union, union + 1, union + 2])
    c = S.seed_and_image_interval(*three, n_resamples=100)
    d = S.seed_and_image_interval(three[0][:, perm], three[1][:, perm], n_resamples=100)
    assert (c.low, c.high) == (d.low, d.high)


@settings(max_examples=25, deadline=None)
@given(counts)
def test_duplicating_every_image_keeps_the_miou_and_narrows_the_interval(raw):
    inter, union = _pair(raw)
    one = S.image_interval(inter, union, n_resamples=400)
    two = S.image_interval(np.concatenate([inter, inter]), np.concatenate([union, union]), n_resamples=400)
    assert two.value == pytest.approx(one.value, abs=1e-9)
    if one.half_width > 1e-6:
        assert two.half_width < one.half_width


@settings(max_examples=20, deadline=None)
@given(counts)
def test_a_variant_worse_on_every_image_gives_a_paired_interval_that_excludes_zero(raw):
    inter, union = _pair(raw)
    worse_union = union + np.ceil(0.3 * union).astype(np.int64)  # every IoU drops by the same factor
    d = S.paired_difference(inter[None], union[None], inter[None], worse_union[None], n_resamples=300)
    assert d.low > 0 and S.verdict(d) == "A better"


def test_the_paired_interval_over_three_seeds_excludes_zero_for_a_constant_shift():
    rng = np.random.default_rng(5)
    inter, union = np.stack([_draw(rng, 60)[0] for _ in range(3)]), None
    union = inter + rng.poisson(50, inter.shape) + 1
    d = S.paired_difference(inter, union, inter, union + 20, n_resamples=300)
    assert d.n == 3 and d.low > 0


def test_two_exchangeable_variants_mostly_give_an_interval_that_contains_zero():
    rng = np.random.default_rng(7)
    contains = 0
    for t in range(60):
        a = [_draw(rng, 80) for _ in range(3)]
        b = [_draw(rng, 80) for _ in range(3)]
        d = S.paired_difference(
            np.stack([x[0] for x in a]),
            np.stack([x[1] for x in a]),
            np.stack([x[0] for x in b]),
            np.stack([x[1] for x in b]),
            n_resamples=200,
            seed=t,
        )
        contains += d.contains(0.0)
    assert contains / 60 >= 0.85


def test_seed_interval_is_the_student_t_interval():
    e = S.seed_interval([70.3, 62.5, 48.2])
    assert e.value == pytest.approx(60.333, abs=1e-3) and e.sd == pytest.approx(11.208, abs=1e-3)
    assert e.low == pytest.approx(60.3333 - 4.3027 * 11.2082 / 3**0.5, abs=1e-2)
    assert np.isnan(S.seed_interval([70.0]).low)


def test_counts_round_trip_without_pickle(tmp_path):
    inter = np.arange(12).reshape(4, 3)
    S.save_counts(tmp_path / "c.npz", ["a", "b", "c", "d"], inter=inter, union=inter + 1)
    got = S.load_counts(tmp_path / "c.npz")
    assert got["ids"].tolist() == ["a", "b", "c", "d"] and np.array_equal(got["union"], inter + 1)
