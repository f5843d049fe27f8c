"""log_softmax, fuse and top_k: golden values on hand-made arrays, and chunking invariance."""

import numpy as np
import pytest
from scipy.special import log_softmax as scipy_log_softmax

from weights_search.functional import FUSIONS, GEOMETRIC, LOG_FLOOR, MIXTURE, fuse, log_softmax, top_k


def _stack(seed=0, shape=(3, 50, 7)):
    rng = np.random.default_rng(seed)
    return log_softmax(rng.normal(scale=3.0, size=shape).astype(np.float32))


def test_log_softmax_matches_scipy_in_float32_for_float16_input():
    logits = np.random.default_rng(1).normal(scale=5.0, size=(2, 30, 11)).astype(np.float16)
    out = log_softmax(logits)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, scipy_log_softmax(logits.astype(np.float64), axis=-1), atol=2e-6)


def test_log_softmax_divides_each_member_by_its_temperature():
    logits = np.random.default_rng(2).normal(size=(2, 5, 4)).astype(np.float32)
    out = log_softmax(logits, np.array([2.0, 0.5]))
    np.testing.assert_allclose(out[0], scipy_log_softmax(logits[0] / 2.0, axis=-1), atol=1e-6)
    np.testing.assert_allclose(out[1], scipy_log_softmax(logits[1] / 0.5, axis=-1), atol=1e-6)


def test_log_softmax_keeps_minus_inf_without_nan():
    logits = np.array([[[0.0, -np.inf, 1.0]]], dtype=np.float32)
    out = log_softmax(logits)
    assert out[0, 0, 1] == -np.inf
    np.testing.assert_allclose(out[0, 0, [0, 2]], np.log([1 / (1 + np.e), np.e / (1 + np.e)]), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_log_softmax_rejects_rows_without_a_finite_maximum(bad):
    with pytest.raises(ValueError, match="not finite"):
        log_softmax(np.array([[0.0, bad]], dtype=np.float32))
    with pytest.raises(ValueError, match="not finite"):
        log_softmax(np.full((1, 2, 3), -np.inf, dtype=np.float32))


@pytest.mark.parametrize("temperatures", [np.ones(3), np.array([1.0, 0.0]), np.array([[1.0, 1.0]])])
def test_log_softmax_rejects_bad_temperatures(temperatures):
    with pytest.raises(ValueError, match="temperatures"):
        log_softmax(np.zeros((2, 4, 5), dtype=np.float32), temperatures)


def test_mixture_is_the_log_of_the_weighted_mean_of_probabilities():
    lp = _stack()
    w = np.array([0.2, 0.0, 0.6])  # normalised by fuse: 0.25 / 0 / 0.75
    expected = np.log(np.tensordot(w / w.sum(), np.exp(lp.astype(np.float64)), axes=1))
    np.testing.assert_allclose(fuse(lp, w, MIXTURE), expected, atol=1e-5)


def test_geometric_pooling_renormalises_the_weighted_sum_of_log_probabilities():
    lp = _stack()
    w = np.array([0.5, 1.5, 0.0])
    expected = scipy_log_softmax(np.tensordot(w, lp.astype(np.float64), axes=1), axis=-1)
    np.testing.assert_allclose(fuse(lp, w, GEOMETRIC), expected, atol=1e-5)


def test_geometric_pooling_with_all_zero_weights_is_uniform():
    out = fuse(_stack(), np.zeros(3), GEOMETRIC)
    np.testing.assert_allclose(out, np.log(1 / 7), rtol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusing_chunks_of_rows_equals_fusing_all_rows(fusion):
    lp = _stack(3, (4, 101, 13))
    w = np.array([0.1, 0.4, 0.0, 2.0])
    whole = fuse(lp, w, fusion)
    chunks = np.concatenate([fuse(lp[:, s:s + 17], w, fusion) for s in range(0, 101, 17)])
    np.testing.assert_array_equal(chunks, whole)


def test_fuse_never_makes_nan_from_minus_inf():
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[[0.5, 0.5, 0.0]], [[0.0, 0.5, 0.5]], [[0.0, 0.0, 1.0]]], dtype=np.float32))
    mixture = fuse(lp, np.array([0.5, 0.0, 0.5]), MIXTURE)
    np.testing.assert_allclose(mixture[0], np.log([0.25, 0.25, 0.5]), rtol=1e-6)
    only_first = fuse(lp, np.array([1.0, 0.0, 0.0]), MIXTURE)
    assert only_first[0, 2] == -np.inf and not np.isnan(only_first).any()
    # Members 1 and 3 each rule out classes the other needs: every class keeps a finite score.
    geometric = fuse(lp, np.array([1.0, 1.0, 1.0]), GEOMETRIC)
    half = np.log(0.5)
    expected = scipy_log_softmax([half + 2 * LOG_FLOOR, 2 * half + LOG_FLOOR, half + LOG_FLOOR])
    np.testing.assert_allclose(geometric[0], expected, atol=1e-4)


def test_fuse_rejects_bad_arguments_and_names_the_fusions():
    lp = _stack()
    with pytest.raises(ValueError, match="mixture, geometric"):
        fuse(lp, np.ones(3), "mean")
    with pytest.raises(ValueError, match="2 weights for 3 members"):
        fuse(lp, np.ones(2), MIXTURE)
    with pytest.raises(ValueError, match="non-negative"):
        fuse(lp, np.array([1.0, -1.0, 1.0]), MIXTURE)
    with pytest.raises(ValueError, match="all zero"):
        fuse(lp, np.zeros(3), MIXTURE)


def test_top_k_is_best_first_with_ties_to_the_lower_index():
    lp = np.log(np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=np.float32))
    idx, prob = top_k(lp, 3)
    np.testing.assert_array_equal(idx, [[1, 3, 0], [0, 1, 2]])
    np.testing.assert_allclose(prob, [[0.4, 0.4, 0.1], [0.7, 0.1, 0.1]], rtol=1e-6)
    with pytest.raises(ValueError, match="1..4"):
        top_k(lp, 5)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_equals_the_head_of_a_stable_descending_sort(k):
    # Values on a coarse grid, so that many rows have ties at the k-th place.
    lp = np.round(np.random.default_rng(k).normal(size=(300, 8)), 1).astype(np.float32) - 5
    idx, prob = top_k(lp, k)
    expected = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(prob, np.exp(np.take_along_axis(lp, expected, axis=1)), rtol=1e-6)
