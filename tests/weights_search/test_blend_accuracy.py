"""Exact top-1 of mixtures (MixtureMargins) against brute force, and the accuracy search."""

import numpy as np
import pytest

from weights_search.accuracy import AccuracyBlend
from weights_search.functional import MIXTURE, fuse, log_softmax
from weights_search.margins import MixtureMargins
from weights_search.metrics import top1


def _problem(seed, n_members=3, n_rows=120, n_classes=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_rows)
    logits = rng.normal(scale=1.5, size=(n_members, n_rows, n_classes))
    logits[:, np.arange(n_rows), labels] += rng.uniform(0.0, 2.0, size=(n_members, 1))
    return log_softmax(logits), labels


def _brute_force_right(lp, labels, weights):
    return int(round(top1(fuse(lp, weights, MIXTURE), labels) * labels.size))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_matches_the_argmax_of_the_fused_mixture(seed):
    lp, labels = _problem(seed)
    margins = MixtureMargins(lp, labels)
    for w in np.random.default_rng(seed).dirichlet(np.ones(3), size=20):
        assert margins.count(w) == _brute_force_right(lp, labels, w)


def test_count_each_added_matches_brute_force():
    lp, labels = _problem(3, n_members=4)
    margins = MixtureMargins(lp, labels)
    base = np.array([2.0, 0.0, 1.0, 0.0])
    expected = [_brute_force_right(lp, labels, base + np.eye(4)[m]) for m in range(4)]
    np.testing.assert_array_equal(margins.count_each_added(base), expected)


def test_best_on_line_beats_a_fine_grid_and_returns_a_point_that_achieves_it():
    lp, labels = _problem(4)
    margins = MixtureMargins(lp, labels)
    w = np.array([0.5, 0.3, 0.2])
    direction = np.array([0.0, 0.0, 1.0]) - w
    best, t = margins.best_on_line(w, direction, -0.25, 1.0)
    grid = [margins.count(w + s * direction) for s in np.linspace(-0.25, 1.0, 2001)]
    assert best >= max(grid)
    assert margins.count(w + t * direction) == best
    assert -0.25 <= t <= 1.0


def test_rows_always_right_or_never_right_are_set_aside():
    # Row 0: both members rank the true class first. Row 1: both rank class 2 above it.
    probs = np.array([[[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]],
                      [[0.6, 0.3, 0.1], [0.1, 0.4, 0.5]]])
    margins = MixtureMargins(np.log(probs), np.array([0, 1]))
    assert margins.n_always == 1
    assert margins.margins.shape == (0, 2)
    assert margins.count(np.array([0.5, 0.5])) == 1


def test_accuracy_search_finds_the_best_two_member_mixture():
    lp, labels = _problem(5, n_members=2, n_rows=300)
    margins = MixtureMargins(lp, labels)
    best_on_grid = max(margins.count(np.array([a, 1 - a])) for a in np.linspace(0, 1, 20001))
    method = AccuracyBlend().fit(lp, labels)
    assert margins.count(method.weights_) >= best_on_grid
    assert method.train_score_ == pytest.approx(1 - margins.count(method.weights_) / labels.size)


def test_accuracy_search_is_at_least_as_good_as_uniform_and_every_member():
    lp, labels = _problem(6, n_members=5, n_rows=400)
    margins = MixtureMargins(lp, labels)
    method = AccuracyBlend().fit(lp, labels)
    right = margins.count(method.weights_)
    assert right >= margins.count(np.full(5, 0.2))
    assert all(right >= margins.count(np.eye(5)[m]) for m in range(5))
    assert method.weights_.sum() == pytest.approx(1.0)
