import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tkpbench.pce import patch_contrastive_error, pce_per_class


def loop_pce(features, scores, eps):
    """Eq. 3-5 written as plainly as the paper states them."""
    total = 0.0
    b, s, c = scores.shape
    for n in range(b):
        per_image = 0.0
        for cls in range(c):
            high = [i for i in range(s) if scores[n, i, cls] > eps]
            low = [i for i in range(s) if scores[n, i, cls] < 1 - eps]

            def sbar(i, j):
                a, bb = features[n, i], features[n, j]
                cos = float(a @ bb / (a.norm() * bb.norm()))
                return (1 + cos) / 2

            pairs = [(i, j) for i, j in itertools.product(high, high) if i != j]
            pos = sum(1 - sbar(i, j) for i, j in pairs) / len(pairs) if pairs else 0.0
            negs = list(itertools.product(high, low))
            neg = sum(sbar(m, q) for m, q in negs) / len(negs) if negs else 0.0
            per_image += pos + neg
        total += per_image
    return total / b


def make(seed, b=2, s=10, c=4, e=5):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, s, e, generator=g, dtype=torch.float64)
    # peaked softmax so that some scores pass eps and many fall under 1 - eps
    z = (torch.randn(b, s, c, generator=g, dtype=torch.float64) * 4).softmax(-1)
    return f, z


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([0.6, 0.75, 0.85, 0.95]))
def test_pce_equals_a_plain_loop_over_eq_3_to_5(seed, eps):
    f, z = make(seed)
    got = patch_contrastive_error(f, z, eps)
    assert abs(float(got) - loop_pce(f, z, eps)) < 1e-5


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 100_000), st.floats(0.01, 100.0))
def test_pce_is_invariant_to_positive_scaling_of_features(seed, scale):
    f, z = make(seed)
    torch.testing.assert_close(patch_contrastive_error(f * scale, z), patch_contrastive_error(f, z), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 100_000))
def test_pce_is_invariant_to_permuting_patches(seed):
    f, z = make(seed)
    perm = torch.randperm(f.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        patch_contrastive_error(f[:, perm], z[:, perm]), patch_contrastive_error(f, z), atol=1e-5, rtol=1e-5
    )


def test_pce_is_zero_when_no_score_exceeds_eps():
    f = torch.randn(2, 9, 4)
    z = torch.full((2, 9, 3), 1 / 3)
    assert float(patch_contrastive_error(f, z, 0.85)) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 100_000))
def test_each_class_term_lies_in_0_2(seed):
    f, z = make(seed, s=16, c=5)
    per = pce_per_class(f, z, 0.7)
    assert torch.all(per >= -1e-6) and torch.all(per <= 2 + 1e-6)


def test_no_gradient_into_scores_and_finite_gradient_into_features():
    f, z = make(3)
    f.requires_grad_(True)
    logits = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    z = (logits * 4).softmax(-1)
    patch_contrastive_error(f, z, 0.6).backward()
    assert logits.grad is None
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_positive_term_is_zero_when_high_confidence_features_share_one_direction():
    s, e = 8, 6
    f = torch.randn(1, s, e, dtype=torch.float64)
    direction = torch.randn(e, dtype=torch.float64)
    high = [0, 3, 5]
    for i, scale in zip(high, [1.0, 2.5, 0.3]):
        f[0, i] = direction * scale
    z = torch.full((1, s, 2), 0.5, dtype=torch.float64)
    z[0, high, 1] = 0.95
    z[0, high, 0] = 0.05
    # no low set for class 1 (all others at 0.5) -> class 1's term is the positive term alone
    per = pce_per_class(f, z, 0.85)
    assert abs(float(per[0, 1])) < 1e-12


def test_negative_term_is_mean_similarity_between_high_and_low():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    z = torch.tensor([[[0.05, 0.95], [0.5, 0.5], [0.95, 0.05]]], dtype=torch.float64)
    per = pce_per_class(f, z, 0.85)
    # class 1: high={0}, low={2}: no positive pairs; S-bar(0,2) = (1 - 1) / 2 = 0
    # class 0: high={2}, low={0}: same pair -> 0
    torch.testing.assert_close(per, torch.zeros(1, 2, dtype=torch.float64))
    f[0, 2] = torch.tensor([0.0, 1.0])  # orthogonal now: S-bar = 0.5
    torch.testing.assert_close(pce_per_class(f, z, 0.85), torch.full((1, 2), 0.5, dtype=torch.float64))
