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


def _draw_pr(rng, n_images, p=(0.9, 0.5, 0.3, 0.6), lam=(400, 120, 80, 200), q=(0.9, 0.6, 0.5, 0.75), mu=(30, 40, 20, 25)):
    """The model of ``_draw`` with the predicted and ground-truth counts kept: pred = found + false
    positives. True precision = p lam q / (p lam q + mu), true recall = q (percent)."""
    p, lam, q, mu = map(np.asarray, (p, lam, q, mu))
    gt = rng.poisson(lam, (n_images, len(p))) * (rng.random((n_images, len(p))) < p)
    inter = rng.binomial(gt, q)
    pred = inter + rng.poisson(mu, (n_images, len(p)))
    return inter, pred, gt, 100 * p * lam * q / (p * lam * q + mu), 100 * q


def test_class_scores_equal_the_confusion_matrix_precision_recall_and_iou():
    rng = np.random.default_rng(2)
    cm, rows = ConfusionMatrix(4), []
    for _ in range(5):
        gt, pred = rng.integers(0, 4, (7, 9)), rng.integers(0, 3, (7, 9))  # class 3 is never predicted
        gt[0, :2] = 255
        rows.append(ConfusionMatrix.class_counts(cm.update(pred, gt)))
    inter, pred, gt = (np.stack([r[k] for r in rows]) for k in range(3))
    got = S.class_scores(inter, pred, gt)
    np.testing.assert_allclose(got["precision"], 100 * cm.precision())
    np.testing.assert_allclose(got["recall"], 100 * cm.recall())
    np.testing.assert_allclose(got["iou"], 100 * cm.iou())
    assert np.isnan(got["precision"][3]) and got["recall"][3] == 0


def test_per_class_precision_and_recall_intervals_cover_the_true_values():
    rng = np.random.default_rng(11)
    hits, trials = np.zeros((2, 4)), 150
    for t in range(trials):
        inter, pred, gt, precision, recall = _draw_pr(rng, 120)
        ci = S.class_intervals(inter, pred, gt, n_resamples=300, seed=t)
        for row, (k, true) in enumerate((("precision", precision), ("recall", recall))):
            hits[row] += (ci.low[k] <= true) & (true <= ci.high[k])
    assert (hits / trials >= 0.88).all() and (hits / trials <= 0.995).all(), hits / trials


def test_class_intervals_average_seeds_and_leave_out_a_class_that_is_never_there():
    rng = np.random.default_rng(4)
    inter, pred, gt, *_ = _draw_pr(rng, 40)
    gt[:, 3] = inter[:, 3] = 0  # class 3: only false positives
    two = S.class_intervals(np.stack([inter, inter]), np.stack([pred, pred + 5]), np.stack([gt, gt]), n_resamples=200)
    one = S.class_intervals(inter, pred, gt, n_resamples=200)
    assert two.n == 2 and two.images == 40
    assert two.value["recall"] == pytest.approx(one.value["recall"], nan_ok=True)  # recall ignores false positives
    assert (two.value["precision"][:3] < one.value["precision"][:3]).all()
    assert np.isnan(one.value["recall"][3]) and np.isnan(one.low["recall"][3]) and one.value["precision"][3] == 0


def test_per_image_miou_is_the_mean_over_the_classes_an_image_shows_or_predicts():
    inter = np.array([[10, 0, 3, 0], [0, 0, 0, 0]])
    union = np.array([[20, 0, 4, 5], [0, 0, 0, 0]])
    got = S.per_image_miou(inter, union)
    assert got[0] == pytest.approx(100 * (0.5 + 0.75 + 0) / 3) and np.isnan(got[1])


def test_the_share_of_improved_images_has_a_wilson_interval_that_covers_the_true_share():
    """Variant A is perfect on a random 30% of the images and blind on the rest; B finds half of
    every class: the true share improved is 0.3."""
    rng = np.random.default_rng(8)
    hits, trials = 0, 300
    for _ in range(trials):
        union = rng.poisson(50, (60, 3)) + 2
        up = rng.random(60) < 0.3
        ch = S.image_changes(np.where(up[:, None], union, 0), union, union // 2, union, np.arange(60).astype(str))
        assert ch.improved == up.sum() and ch.worse == 60 - up.sum()
        hits += ch.share.contains(30.0)
    assert 0.90 <= hits / trials <= 0.99, hits / trials
    gains, losses = ch.top(2)
    assert all(ch.delta[i] > 0 for i in gains) and all(ch.delta[i] < 0 for i in losses)
    assert ch.delta[gains[0]] == ch.delta.max() and ch.delta[losses[0]] == ch.delta.min()


def test_image_changes_pair_images_and_average_seeds():
    inter_a = np.array([[[4, 1]], [[2, 1]]])  # (2 seeds, 1 image, 2 classes)
    union = np.array([[[4, 2]], [[4, 2]]])
    ch = S.image_changes(inter_a, union, np.array([[[2, 1]], [[2, 1]]]), union, ["x"])
    assert ch.a[0] == pytest.approx((75 + 50) / 2) and ch.delta[0] == pytest.approx(12.5) and ch.improved == 1


def test_an_old_counts_file_gives_iou_but_no_precision_and_a_new_one_derives_the_union(tmp_path):
    inter = np.array([[1, 2], [3, 4]])
    S.save_counts(tmp_path / "old.npz", ["a", "b"], inter=inter, union=inter + 1)
    old = S.measurement(S.load_counts(tmp_path / "old.npz"))
    assert not old.has_pr and old.confusion is None and np.array_equal(old.union, inter + 1)
    S.save_counts(tmp_path / "new.npz", ["a", "b"], inter_crf=inter, pred_crf=inter + 2, gt_crf=inter + 1)
    c = S.load_counts(tmp_path / "new.npz")
    new = S.measurement(c, "_crf")
    assert new.has_pr and np.array_equal(new.union, inter + 3) and S.measurement(c) is None
    both = S.stack_measurements([old, old])
    assert both.inter.shape == (2, 2, 2) and both.pred is None


def test_one_image_gives_its_value_and_no_interval_rather_than_an_error():
    """A split of one image (the paper-shape test's val split; a user's tiny check) has nothing to
    resample: every estimator returns the value with a NaN interval, which the report prints as
    'no interval', instead of scipy's "two or more observations" error."""
    inter, union, _ = _draw(np.random.default_rng(0), 1)
    pred = gt = union
    one = S.image_interval(inter, union)
    assert one.value == pytest.approx(S.miou_from_counts(inter, union)) and np.isnan(one.low) and np.isnan(one.high)
    for seeds in (1, 3):
        i3, u3 = np.repeat(inter[None], seeds, 0), np.repeat(union[None], seeds, 0)
        e = S.seed_and_image_interval(i3, u3)
        assert e.value == pytest.approx(one.value) and np.isnan(e.low) and e.images == 1 and e.n == seeds
        d = S.paired_difference(i3, u3, np.zeros_like(i3), u3)
        assert d.value == pytest.approx(one.value) and np.isnan(d.high) and S.verdict(d) == "within noise"
    c = S.class_intervals(inter, pred, gt)
    assert np.isfinite(c.value["iou"]).any() and all(np.isnan(c.low[k]).all() and np.isnan(c.high[k]).all() for k in c.low)
    # two images are enough to resample again
    i2, u2, _ = _draw(np.random.default_rng(1), 2)
    assert np.isfinite(S.image_interval(i2, u2).low) and np.isfinite(S.seed_and_image_interval(i2[None], u2[None]).low)
