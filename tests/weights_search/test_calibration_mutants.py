"""Golden values that kill the mutants `make mutate` found surviving in
weights_search/calibration.py (the numbers `ens report` shows): one-row bins, one bin, empty
buckets at the end, NaN confidences, and no RuntimeWarning from an empty bin or bucket."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from weights_search.calibration import (
    accuracy_by_bucket, bin_index, disagreement, error_correlation, frequency_buckets, reliability,
)


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def test_one_bin_holds_every_confidence():
    assert bin_index([0.0, 0.3, 1.0], n_bins=1).tolist() == [0, 0, 0]
    with _raises("n_bins must be at least 1, got 0"):
        bin_index([0.5], n_bins=0)


@pytest.mark.parametrize("confidence", [[0.5, np.nan], [-0.1], [1.1]])
def test_a_confidence_out_of_range_is_refused(confidence):
    with _raises("confidences must lie in [0, 1]"):
        bin_index(confidence)


def test_reliability_of_one_row_bins_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty bin divides 0 by 0 quietly
        diagram = reliability([0.1, 0.9, 0.95], [0, 1, 0], n_bins=2)
    assert diagram.count.tolist() == [1, 2]
    np.testing.assert_allclose(diagram.confidence, [0.1, 0.925])
    np.testing.assert_allclose(diagram.accuracy, [0.0, 0.5])
    assert diagram.ece == pytest.approx((0.1 + abs(1 - 1.85)) / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty_first = reliability([0.9], [1], n_bins=2)
    assert np.isnan(empty_first.confidence[0]) and np.isnan(empty_first.accuracy[0])
    assert empty_first.accuracy[1] == 1.0
    for confidence, correct in (([[0.5]], [[1]]), ([0.5, 0.6], [1]), ([], [])):
        with pytest.raises(ValueError, match=r"^expected two non-empty \(n_samples,\) arrays, got "):
            reliability(confidence, correct)


def test_error_correlation_of_one_row_and_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a member always right has no variance: NaN, quietly
        corr = error_correlation([[1, 1, 1], [1, 0, 0], [0, 1, 1]])
    assert np.isnan(corr[0, 1]) and corr[0, 0] == 1.0
    assert corr[1, 2] == pytest.approx(-1.0)
    assert error_correlation([[1], [0]]).shape == (2, 2)
    with _raises("expected (n_members, n_samples) hits, got shape (2, 0)"):
        error_correlation(np.zeros((2, 0)))
    with _raises("expected (n_members, n_samples) hits, got shape (3,)"):
        error_correlation([1, 0, 1])


def test_disagreement_of_one_row():
    assert disagreement([[1], [2]]).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    with _raises("expected (n_members, n_samples) predictions, got shape (2, 0)"):
        disagreement(np.zeros((2, 0), int))
    with _raises("expected (n_members, n_samples) predictions, got shape (2,)"):
        disagreement([1, 2])


def test_frequency_buckets_at_their_bounds():
    buckets = frequency_buckets(np.array([1.0, 5.0, 3.0]))  # as many classes as buckets
    assert buckets.dtype == np.int64 and buckets.tolist() == [2, 0, 1]
    assert frequency_buckets(np.array([4, 1]), n_buckets=1).tolist() == [0, 0]
    with _raises("expected (n_classes,) counts with at least 3 classes, got shape (2,)"):
        frequency_buckets(np.array([4, 1]))
    with _raises("expected (n_classes,) counts with at least 0 classes, got shape (2,)"):
        frequency_buckets(np.array([4, 1]), n_buckets=0)


def test_accuracy_by_bucket_with_the_tail_empty():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accuracy, rows = accuracy_by_bucket([[1, 0, 1], [0, 0, 1]], np.array([0, 0, 1]), np.array([0, 1, 2]))
    assert rows.tolist() == [2, 1, 0]
    np.testing.assert_allclose(accuracy[:, :2], [[0.5, 1.0], [0.0, 1.0]])
    assert np.isnan(accuracy[:, 2]).all()
    with _raises("expected (n_members, n_samples) hits and (n_samples,) labels, got (3,) and (3,)"):
        accuracy_by_bucket([1, 0, 1], np.array([0, 0, 1]), np.array([0, 1, 2]))


def test_accuracy_by_bucket_refuses_three_dimensional_hits():
    with _raises("expected (n_members, n_samples) hits and (n_samples,) labels, got (2, 3, 1) and (3, 1)"):
        accuracy_by_bucket(np.ones((2, 3, 1)), np.zeros((3, 1), int), np.array([0, 1, 2]))
