"""Kills the mutants `make mutate` found surviving in weights_search/mixture.py and pooling.py:
the training score of a blend fitted with a prior is the corrected blend's NLL, recomputed by
hand, and the iteration counts are recorded."""

from __future__ import annotations

import numpy as np
import pytest

import re

from weights_search import (
    AccuracyBlend, GreedyBlend, LogitAdjustment, LogitBlend, NllBlend, UniformBlend, adjust, fuse, log_softmax, mean_nll,
)


def _problem(seed=4, m=3, n=50, c=4):
    rng = np.random.default_rng(seed)
    labels = rng.choice(c, n, p=[0.1, 0.2, 0.3, 0.4])  # the reverse of the training prior below
    logits = rng.normal(0, 1, (m, n, c)).astype(np.float32)
    logits[:, np.arange(n), labels] += rng.normal(1.0, 1.0, (m, n)).astype(np.float32)
    return log_softmax(logits), labels


LOG_PRIOR = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


@pytest.mark.parametrize("method", [UniformBlend(), NllBlend(), LogitBlend(), GreedyBlend(n_rounds=8)], ids=repr)
@pytest.mark.parametrize("tau", [0.7, None])
def test_train_score_with_a_prior_is_the_corrected_blends_nll(method, tau):
    log_probs, labels = _problem()
    method.fit(log_probs, labels, LogitAdjustment(LOG_PRIOR, tau))
    if tau is not None:
        assert method.tau_ == tau
    corrected = adjust(fuse(log_probs, method.weights_, method.fusion), LOG_PRIOR, method.tau_)
    assert method.train_score_ == pytest.approx(mean_nll(corrected, labels), rel=1e-5)
    plain = mean_nll(fuse(log_probs, method.weights_, method.fusion), labels)
    assert abs(plain - method.train_score_) > 1e-3  # the correction shows in the score


def test_iterations_are_counted():
    log_probs, labels = _problem()
    for method in (NllBlend(), LogitBlend()):
        assert method.fit(log_probs, labels).n_iter_ >= 1
        fitted = method.fit(log_probs, labels, LogitAdjustment(LOG_PRIOR))
        assert isinstance(fitted.n_iter_, int) and fitted.n_iter_ >= 1
    one = NllBlend().fit(log_probs[:1], labels)
    assert one.n_iter_ == 0 and one.weights_.tolist() == [1.0]
    two = NllBlend().fit(log_probs[:2], labels)
    assert two.weights_.shape == (2,) and two.n_iter_ >= 1


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def test_search_parameters_at_their_bounds():
    AccuracyBlend(max_passes=1, n_random=0)
    GreedyBlend(n_rounds=0, n_init=1)
    GreedyBlend(n_rounds=1, n_init=0, bag_fraction=1.0)
    with _raises("max_passes must be at least 1, got 0"):
        AccuracyBlend(max_passes=0)
    with _raises("n_random must be non-negative, got -1"):
        AccuracyBlend(n_random=-1)
    with _raises("n_rounds and n_init must be non-negative and add up to at least 1, got 0 and 0"):
        GreedyBlend(n_rounds=0, n_init=0)
    with _raises("n_rounds and n_init must be non-negative and add up to at least 1, got -1 and 3"):
        GreedyBlend(n_rounds=-1, n_init=3)
    with _raises("n_bags must be at least 1, got 0"):
        GreedyBlend(n_bags=0)
    with _raises("bag_fraction must lie in (0, 1], got 1.5"):
        GreedyBlend(bag_fraction=1.5)


def test_one_pass_of_the_accuracy_search():
    log_probs, labels = _problem()
    one = AccuracyBlend(max_passes=1).fit(log_probs, labels)
    assert one.n_passes_ == 1
    many = AccuracyBlend().fit(log_probs, labels)
    assert 1 <= many.n_passes_ <= 20 and many.train_score_ <= one.train_score_
    assert many.weights_.sum() == pytest.approx(1.0) and (many.weights_ >= 0).all()
