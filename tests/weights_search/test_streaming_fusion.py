"""The one-exponential mixture fusions (weights_search.fitted): the values of the stable
``fuse(log_softmax(...))`` to float32 rounding, extreme members included."""

from __future__ import annotations

import numpy as np
import pytest

import weights_search.fitted as fitted
from weights_search import FittedBlend, fuse, log_softmax
from weights_search.fitted import log_softmax_into, mixture_of_log_probs, mixture_of_logits


def _logits(scale, seed=0, m=4, n=50, c=30):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(m, n, c)) * scale).astype(np.float32)


def _close(a, b):
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    finite = np.isfinite(b)
    np.testing.assert_allclose(a[finite], b[finite], rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("scale", [1.0, 8.0, 60.0])
@pytest.mark.parametrize("temperatures", [None, (0.5, 1.0, 2.0, 7.0)])
def test_mixture_of_logits_is_the_stable_fusion(scale, temperatures):
    logits = _logits(scale)
    weights = np.array([0.5, 0.0, 0.2, 0.3])
    expected = fuse(log_softmax(logits, temperatures), weights, "mixture")
    _close(mixture_of_logits(logits, weights, temperatures), expected)
    _close(mixture_of_log_probs(log_softmax(logits, temperatures), weights), expected)
    rows = np.array([3, 4, 17, 40])
    _close(mixture_of_log_probs(log_softmax(logits, temperatures), weights, rows), expected[rows])
    _close(mixture_of_log_probs(log_softmax(logits, temperatures).astype(np.float16), weights, rows),
           fuse(log_softmax(logits, temperatures).astype(np.float16)[:, rows], weights, "mixture"))


def test_classes_every_member_finds_unlikely_keep_their_finite_log_probability(monkeypatch):
    logits = _logits(1.0)
    logits[:, :, 3] = -150.0  # probability e**-150 or so under every member: underflows in float32
    logits[1, :, 4] = -np.inf  # ruled out by one member only
    logits[:, 7, 5] = -np.inf  # ruled out by every member on row 7
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    expected = fuse(log_softmax(logits), weights, "mixture")
    assert np.isfinite(expected[:, 3]).all() and expected[:, 3].max() < -140 and np.isneginf(expected[7, 5])
    _close(mixture_of_logits(logits, weights), expected)
    _close(mixture_of_log_probs(log_softmax(logits), weights), expected)
    rows = np.array([0, 7, 9])
    _close(mixture_of_log_probs(log_softmax(logits), weights, rows), expected[rows])
    # A block where most values are that small takes the stable path throughout.
    monkeypatch.setattr(fitted, "MAX_EXACT_SHARE", 0.0)
    np.testing.assert_array_equal(mixture_of_logits(logits, weights), expected)


def test_a_fitted_mixture_applies_through_the_fast_fusion():
    logits = _logits(3.0)
    blend = FittedBlend("nll", "mixture", (0.1, 0.2, 0.3, 0.4), temperatures=(1.0, 2.0, 0.5, 1.5),
                        log_prior=tuple(np.linspace(-4, -2, 30)), tau=0.7)
    _close(blend.log_proba(logits), blend.fuse_log_probs(log_softmax(logits, blend.temperatures)))


def test_bad_rows_and_weights_are_refused_as_before():
    logits = _logits(1.0)
    with pytest.raises(ValueError, match="all zero"):
        mixture_of_logits(logits, np.zeros(4))
    with pytest.raises(ValueError, match="4 weights for 3 members|3 members"):
        mixture_of_logits(logits[:3], np.ones(4))
    logits[2, 5] = -np.inf
    with pytest.raises(ValueError, match="largest value is not finite"):
        mixture_of_logits(logits, np.ones(4))


@pytest.mark.parametrize("temperatures", [None, (0.5, 1.0, 2.0, 7.0)])
def test_the_log_softmax_in_place_is_the_log_softmax_bit_for_bit(temperatures):
    logits = _logits(5.0)
    logits[1, :, 4] = -np.inf
    expected = log_softmax(logits, temperatures)
    copy = logits.copy()
    assert log_softmax_into(copy, temperatures) is copy
    np.testing.assert_array_equal(copy, expected)
    bad = logits.copy()
    bad[0, 3] = -np.inf
    with pytest.raises(ValueError, match="largest value is not finite"):
        log_softmax_into(bad, temperatures)
