"""Metrics: golden values on hand-made rows, tie ranking, and the binomial bootstrap."""

import numpy as np
import pytest

from weights_search.metrics import bootstrap_ci, correct_at_k, mean_nll, top1, topk_accuracy

PROBS = np.array([
    [0.6, 0.3, 0.1],  # label 0: rank 1
    [0.6, 0.3, 0.1],  # label 1: rank 2
    [0.6, 0.3, 0.1],  # label 2: rank 3
    [0.4, 0.4, 0.2],  # label 1: tied with class 0, which sorts first: rank 2
    [0.4, 0.4, 0.2],  # label 0: tied with class 1, sorts first: rank 1
])
LABELS = np.array([0, 1, 2, 1, 0])


def test_top1_and_topk_rank_ties_by_class_index():
    lp = np.log(PROBS)
    np.testing.assert_array_equal(correct_at_k(lp, LABELS, 1), [True, False, False, False, True])
    assert top1(lp, LABELS) == pytest.approx(2 / 5)
    assert topk_accuracy(lp, LABELS, 2) == pytest.approx(4 / 5)
    assert topk_accuracy(lp, LABELS, 3) == 1.0


def test_mean_nll_is_the_mean_negative_log_of_the_true_class():
    expected = -np.mean(np.log([0.6, 0.3, 0.1, 0.4, 0.4]))
    assert mean_nll(np.log(PROBS), LABELS) == pytest.approx(expected)
    with np.errstate(divide="ignore"):
        zero = np.log(np.array([[1.0, 0.0]]))
    assert mean_nll(zero, np.array([1])) == np.inf


def test_metrics_reject_nan_and_bad_labels():
    with pytest.raises(ValueError, match="NaN"):
        top1(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="0..2"):
        top1(np.log(PROBS), np.array([0, 1, 2, 3, 0]))


def test_bootstrap_ci_is_deterministic_and_matches_resampling_rows():
    correct = np.zeros(400, dtype=bool)
    correct[:300] = True  # top-1 0.75
    low, high = bootstrap_ci(correct, n_boot=2000, seed=3)
    assert (low, high) == bootstrap_ci(correct, n_boot=2000, seed=3)
    assert low < 0.75 < high
    # The same interval, by the textbook bootstrap that resamples row indices.
    rng = np.random.default_rng(0)
    means = correct[rng.integers(0, correct.size, size=(4000, correct.size))].mean(axis=1)
    ref_low, ref_high = np.quantile(means, [0.025, 0.975])
    assert low == pytest.approx(ref_low, abs=0.006)
    assert high == pytest.approx(ref_high, abs=0.006)


def test_bootstrap_ci_rejects_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.ones(3, dtype=bool), level=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.ones(0, dtype=bool))
