"""weights_search.calibration: golden values on hand-made arrays, computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from weights_search.calibration import (accuracy_by_bucket, bin_index, confidence_and_correct, disagreement,
                                        error_correlation, expected_calibration_error, frequency_buckets,
                                        reliability)


def test_confidence_is_the_largest_probability_and_ties_go_to_the_lower_column():
    log_probs = np.log(np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]]))
    confidence, correct = confidence_and_correct(log_probs, np.array([1, 1, 0]))
    np.testing.assert_allclose(confidence, [0.5, 0.4, 0.8])
    assert correct.tolist() == [True, False, False]  # row 1: the tie predicts column 0
    # A log-probability rounded just above 0 (as a float32 blend can give) is a confidence of 1.
    confidence, _ = confidence_and_correct(np.array([[1.2e-7, -30.0]], np.float32), np.array([0]))
    assert confidence.tolist() == [1.0] and reliability(confidence, np.ones(1)).count[-1] == 1


@pytest.mark.parametrize("log_probs, labels, message", [
    (np.zeros((2, 3)), np.array([0]), r"expected log_probs \(n_samples, n_classes\) and labels \(n_samples,\), "
                                      r"got \(2, 3\) and \(1,\)"),
    (np.zeros(3), np.array([0]), "expected log_probs"),
    (np.zeros((1, 3)), np.array([3]), r"labels must be integer column indices in 0..2"),
    (np.zeros((1, 3)), np.array([-1]), r"labels must be integer column indices in 0..2"),
    (np.zeros((1, 3)), np.array([0.0]), r"labels must be integer column indices in 0..2"),
    (np.array([[0.0, np.nan]]), np.array([0]), "log_probs contain NaN"),
])
def test_confidence_checks_its_inputs_as_the_metrics_do(log_probs, labels, message):
    """One check of ``(log_probs, labels)``: out-of-range labels and NaN were taken silently here."""
    from weights_search.metrics import mean_nll

    for function in (confidence_and_correct, mean_nll):
        with pytest.raises(ValueError, match=message):
            function(log_probs, labels)


def test_bins_are_closed_on_the_right_and_zero_joins_the_first():
    # Two bins, (0, 0.5] and (0.5, 1]: 0.5 falls in the first, 0.5001 in the second.
    assert bin_index(np.array([0.0, 0.25, 0.5, 0.5001, 1.0]), 2).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bin_index(np.array([1.2]))


def test_reliability_and_ece_by_hand():
    # Bin (0, .5]: confidences .1 .3 .35, one hit in three -> mean .25, accuracy 1/3.
    # Bin (.5, 1]: .9 and 1.0, both hits -> mean .95, accuracy 1.
    # ECE = 3/5 |1/3 - .25| + 2/5 |1 - .95| = .05 + .02 = .07
    diagram = reliability(np.array([0.1, 0.3, 0.35, 0.9, 1.0]), np.array([0, 1, 0, 1, 1]), n_bins=2)
    np.testing.assert_allclose(diagram.confidence, [0.25, 0.95])
    np.testing.assert_allclose(diagram.accuracy, [1 / 3, 1.0])
    assert diagram.count.tolist() == [3, 2]
    assert diagram.ece == pytest.approx(0.07)
    np.testing.assert_allclose(diagram.edges, [0, 0.5, 1])


def test_empty_bins_are_nan_and_a_perfectly_calibrated_set_has_zero_ece():
    # Four bins; confidences .75 (in (.5, .75]) right 3 times in 4: calibrated exactly.
    confidence = np.full(4, 0.75)
    diagram = reliability(confidence, np.array([1, 1, 1, 0]), n_bins=4)
    assert np.isnan(diagram.accuracy[[0, 1, 3]]).all() and diagram.accuracy[2] == 0.75
    assert diagram.ece == 0.0
    assert expected_calibration_error(confidence, np.ones(4), n_bins=4) == pytest.approx(0.25)


def test_error_correlation_by_hand():
    correct = np.array([[1, 1, 0, 0],   # errors on rows 2, 3
                        [1, 1, 0, 0],   # the same errors: correlation 1
                        [1, 0, 1, 0],   # errors on rows 1, 3: centred dot product 0
                        [0, 0, 1, 1],   # errors exactly where the first is right: -1
                        [1, 1, 1, 1]])  # never wrong: no variance
    corr = error_correlation(correct)
    np.testing.assert_allclose(corr[0, :4], [1, 1, 0, -1], atol=1e-12)
    np.testing.assert_allclose(corr[:4, 0], [1, 1, 0, -1], atol=1e-12)
    assert np.isnan(corr[4, :4]).all() and np.isnan(corr[:4, 4]).all() and corr[4, 4] == 1


def test_disagreement_by_hand():
    predictions = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(disagreement(predictions), [[0, 0.25, 0.75], [0.25, 0, 0.75], [0.75, 0.75, 0]])


def test_frequency_buckets_cut_the_ranking_into_equal_runs():
    # Ranked: 50 (col 1), 20 (col 3), 20 (col 4) | 7 (col 6), 5 (col 0) | 3 (col 5), 1 (col 2):
    # seven classes in three runs of 3, 2, 2.
    buckets = frequency_buckets(np.array([5, 50, 1, 20, 20, 3, 7]))
    assert buckets.tolist() == [1, 0, 2, 0, 0, 2, 1]
    # Equal counts keep column order: the first two of four equal classes are the head.
    assert frequency_buckets(np.array([4, 4, 4, 4]), 2).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        frequency_buckets(np.array([1, 2]))


def test_accuracy_by_bucket_by_hand():
    class_bucket = np.array([0, 1, 2])
    labels = np.array([0, 0, 1, 2, 2])
    correct = np.array([[1, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    accuracy, rows = accuracy_by_bucket(correct, labels, class_bucket)
    np.testing.assert_allclose(accuracy, [[0.5, 1, 1], [0, 0, 0.5]])
    assert rows.tolist() == [2, 1, 2]
    accuracy, rows = accuracy_by_bucket(np.array([[1, 0]]), np.array([0, 1]), np.array([0, 0, 2]))
    assert rows.tolist() == [2, 0, 0] and accuracy[0, 0] == 0.5 and np.isnan(accuracy[0, 1:]).all()
