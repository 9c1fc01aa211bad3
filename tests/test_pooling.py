import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tkpbench.errors import ConfigError
from tkpbench.pooling import Pooling, avg_pool, max_pool, pool, topk_pool

shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 6))


def _scores(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


@given(shapes, st.integers(0, 10_000))
def test_topk_with_k_equal_1_is_max_pooling(shape, seed):
    z = _scores(shape, seed)
    torch.testing.assert_close(topk_pool(z, 1), max_pool(z))
    torch.testing.assert_close(pool(z, "max"), z.amax(1))


@given(shapes, st.integers(0, 10_000))
def test_topk_with_k_equal_s_is_average_pooling(shape, seed):
    z = _scores(shape, seed)
    torch.testing.assert_close(topk_pool(z, shape[1]), avg_pool(z))
    torch.testing.assert_close(pool(z, "avg"), z.mean(1))


@given(shapes, st.integers(0, 10_000), st.data())
def test_topk_is_invariant_to_permuting_patches(shape, seed, data):
    z = _scores(shape, seed)
    k = data.draw(st.integers(1, shape[1]))
    perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(topk_pool(z[:, perm], k), topk_pool(z, k))


@given(shapes, st.integers(0, 10_000))
def test_topk_is_non_increasing_in_k_and_between_min_and_max(shape, seed):
    z = _scores(shape, seed)
    prev = None
    for k in range(1, shape[1] + 1):
        y = topk_pool(z, k)
        assert torch.all(y <= z.amax(1) + 1e-12) and torch.all(y >= z.amin(1) - 1e-12)
        if prev is not None:
            assert torch.all(y <= prev + 1e-12)
        prev = y


@settings(max_examples=30)
@given(st.integers(0, 10_000), st.integers(1, 8))
def test_topk_gradient_reaches_exactly_the_selected_entries(seed, k):
    z = _scores((2, 12, 3), seed).requires_grad_(True)
    topk_pool(z, k).sum().backward()
    top_idx = z.detach().topk(k, dim=1).indices
    expected = torch.zeros_like(z).scatter_(1, top_idx, 1.0 / k)
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.parametrize("k", [0, -1, 13])
def test_k_outside_range_is_a_config_error_naming_the_key_and_the_numbers(k):
    with pytest.raises(ConfigError, match=rf"model\.k = {k} .* these images have 12; set model\.k to at most 12"):
        topk_pool(torch.rand(1, 12, 3), k)


def test_unknown_kind_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.pooling = 'median' is unknown"):
        pool(torch.rand(1, 4, 2), "median")
    with pytest.raises(ConfigError, match=r"model\.pooling = 'median' is unknown"):
        Pooling("median")
