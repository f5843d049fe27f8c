"""Kills the mutants `make mutate` found surviving in weights_search/mixture.py and pooling.py:
the training score of a blend fitted with a prior is the corrected blend's NLL, recomputed by
hand, and the iteration counts are recorded."""

from __future__ import annotations

import numpy as np
import pytest

from weights_search import LogitAdjustment, LogitBlend, NllBlend, UniformBlend, adjust, fuse, log_softmax, mean_nll


def _problem(seed=4, m=3, n=50, c=4):
    rng = np.random.default_rng(seed)
    labels = rng.choice(c, n, p=[0.1, 0.2, 0.3, 0.4])  # the reverse of the training prior below
    logits = rng.normal(0, 1, (m, n, c)).astype(np.float32)
    logits[:, np.arange(n), labels] += rng.normal(1.0, 1.0, (m, n)).astype(np.float32)
    return log_softmax(logits), labels


LOG_PRIOR = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


@pytest.mark.parametrize("method", [UniformBlend(), NllBlend(), LogitBlend()], ids=repr)
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
