"""Kills the mutants `make mutate` found surviving in weights_search/margins.py and in the
count-based methods' use of it: the exact top-1 of mixtures is compared with a brute-force
count (strict argmax, ties are errors), with and without the prior's class shift, and the
accuracy and greedy-accuracy methods' ``train_score_`` with a prior with the corrected blend's
error computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from weights_search import AccuracyBlend, GreedyBlend, LogitAdjustment, adjust, fuse, log_softmax
from weights_search.margins import MixtureMargins


def _strict_right(log_probs, labels, weights, class_shift=None) -> int:
    """Rows whose true class scores strictly above every other under the (corrected) mixture."""
    mixed = np.einsum("m,mnc->nc", np.asarray(weights, np.float64), np.exp(log_probs.astype(np.float64)))
    if class_shift is not None:
        mixed = mixed * np.exp(-class_shift.astype(np.float64))
    true = mixed[np.arange(labels.size), labels]
    others = mixed.copy()
    others[np.arange(labels.size), labels] = -np.inf
    return int((true > others.max(axis=1)).sum())


def _problem(seed=3, m=3, n=60, c=4):
    rng = np.random.default_rng(seed)
    log_probs = log_softmax(rng.normal(0, 1.5, (m, n, c)).astype(np.float32))
    labels = rng.integers(0, c, n)
    return log_probs, labels


@pytest.mark.parametrize("shifted", [False, True])
def test_counts_match_a_brute_force_count(shifted):
    log_probs, labels = _problem()
    shift = np.array([0.9, -0.4, 0.0, 1.3], np.float32) if shifted else None
    margins = MixtureMargins(log_probs, labels, shift)
    rng = np.random.default_rng(0)
    for weights in [np.ones(3), np.array([1.0, 0, 0]), np.array([0, 2.0, 1.0]), *rng.random((5, 3))]:
        assert margins.count(weights) == _strict_right(log_probs, labels, weights, shift)
        expected_each = [_strict_right(log_probs, labels, weights + np.eye(3)[k], shift) for k in range(3)]
        assert margins.count_each_added(weights).tolist() == expected_each
    # best_on_line: the count it reports is the count at the point it returns, and no point of
    # a fine grid of the segment does better.
    base, direction = np.array([0.2, 0.5, 0.3]), np.array([0.5, -0.3, -0.2])
    best, t = margins.best_on_line(base, direction, 0.0, 1.0)
    assert 0.0 <= t <= 1.0
    assert best == _strict_right(log_probs, labels, base + t * direction, shift)
    grid = [_strict_right(log_probs, labels, base + s * direction, shift) for s in np.linspace(0, 1, 401)]
    assert best >= max(grid)


def test_a_tie_is_an_error_and_a_second_member_can_break_it():
    # One row, true class 0: member 0 ties it with class 1, member 1 prefers class 0.
    log_probs = np.log(np.array([[[0.5, 0.5]], [[0.8, 0.2]]], np.float32))
    margins = MixtureMargins(log_probs, np.array([0]))
    assert margins.count(np.array([1.0, 0.0])) == 0
    assert margins.count(np.array([1.0, 1.0])) == 1
    assert margins.count_each_added(np.array([1.0, 0.0])).tolist() == [0, 1]


def test_rows_right_or_wrong_for_every_weight():
    # Row 0: class 0 wins for both members (always right); row 1: class 1 wins for both (never).
    log_probs = np.log(np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.7, 0.3], [0.6, 0.4]]], np.float32))
    margins = MixtureMargins(log_probs, np.array([0, 1]))
    assert margins.n_always == 1 and margins.margins.shape == (0, 2) and margins.starts.size == 0
    assert margins.count(np.array([0.3, 0.7])) == 1
    assert margins.count_each_added(np.array([0.3, 0.7])).tolist() == [1, 1]
    assert margins.best_on_line(np.array([0.3, 0.7]), np.array([1.0, -1.0]), 0.0, 0.5) == (1, 0.0)


def test_the_kept_product_is_not_reused_for_other_weights():
    log_probs, labels = _problem(seed=5)
    margins = MixtureMargins(log_probs, labels)
    for weights in (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]),
                    np.array([1, 0, 0])):
        assert margins.count(weights) == _strict_right(log_probs, labels, weights)


@pytest.mark.parametrize("method", [AccuracyBlend(n_random=2), GreedyBlend(n_rounds=6, score="accuracy")])
def test_count_based_methods_score_the_corrected_blend(method):
    log_probs, labels = _problem(seed=11, n=80)
    log_prior = np.log(np.array([0.55, 0.25, 0.15, 0.05]))
    method.fit(log_probs, labels, LogitAdjustment(log_prior, tau=1.0))
    corrected = adjust(fuse(log_probs, method.weights_, method.fusion), log_prior, 1.0)
    others = corrected.copy()
    others[np.arange(labels.size), labels] = -np.inf
    right = (corrected[np.arange(labels.size), labels] > others.max(axis=1)).sum()
    assert method.train_score_ == pytest.approx(1.0 - right / labels.size)
    uncorrected = MixtureMargins(log_probs, labels).count(method.weights_)
    assert uncorrected != right  # the prior changes which rows are right: the test can tell


@pytest.mark.parametrize("seed, t_low, t_high", [(3, 0.0, 1.0), (7, -0.4, 0.6), (9, -1.0, -0.2), (13, 0.3, 2.0)])
def test_best_on_line_is_the_middle_of_the_best_piece_nearest_zero(seed, t_low, t_high):
    """The count along the segment, on a fine grid, is piecewise constant: the best pieces are
    the runs of grid points with the highest count; the answer is the middle of the one whose
    middle is nearest ``t = 0``."""
    log_probs, labels = _problem(seed=seed, n=40)
    margins = MixtureMargins(log_probs, labels)
    base, direction = np.array([0.3, 0.4, 0.3]), np.array([0.4, -0.5, 0.1])
    grid = np.linspace(t_low, t_high, 4001)
    counts = np.array([_strict_right(log_probs, labels, base + s * direction) for s in grid])
    best = counts.max()
    runs, start = [], None
    for i, c in enumerate(counts):
        if c == best and start is None:
            start = i
        if c != best and start is not None:
            runs.append((grid[start], grid[i - 1]))
            start = None
    if start is not None:
        runs.append((grid[start], grid[-1]))
    middles = [(a + b) / 2 for a, b in runs]
    expected = middles[int(np.argmin(np.abs(middles)))]
    count, t = margins.best_on_line(base, direction, t_low, t_high)
    assert count == best
    assert t == pytest.approx(expected, abs=2 * (t_high - t_low) / 4000)


def test_an_empty_segment_scores_the_start():
    log_probs, labels = _problem()
    margins = MixtureMargins(log_probs, labels)
    weights = np.array([0.2, 0.5, 0.3])
    assert margins.best_on_line(weights, np.array([1.0, 0.0, -1.0]), 0.5, 0.5) == (margins.count(weights), 0.0)
