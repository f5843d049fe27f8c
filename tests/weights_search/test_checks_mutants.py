"""Golden values that kill the mutants `make mutate` found surviving in weights_search: the
argument checks' boundaries and messages, float32 outputs, defaults, and the mixture's shift
that keeps far-out log-probabilities finite."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from weights_search import (
    LogitAdjustment, NllBlend, adjust, bootstrap_ci, class_log_prior, correct_at_k, fit_temperatures, fuse,
    get_method, log_softmax, mean_nll, top_k,
)
from weights_search.base import check_solver_options
from weights_search.functional import MIXTURE, check_members


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


# ------------------------------------------------------------------------------------------
# Argument checks: the exact boundary and the exact message


def test_solver_options_boundaries():
    check_solver_options(1, 1e-12)
    with _raises("max_iter must be at least 1, got 0"):
        check_solver_options(0, 1e-6)
    with _raises("tol must be positive, got 0"):
        check_solver_options(5, 0)


def test_member_checks_messages():
    lp = np.zeros((2, 3, 4), np.float32)
    assert check_members(lp, np.array([0, 1, 3]))[1].tolist() == [0, 1, 3]
    with _raises("expected member outputs of shape (n_members, n_samples, n_classes), got (2, 0, 4)"):
        check_members(np.zeros((2, 0, 4)), np.zeros(0, int))
    with _raises("expected member outputs of shape (n_members, n_samples, n_classes), got (3, 4)"):
        check_members(np.zeros((3, 4)), np.zeros(3, int))
    with _raises("labels of shape (2,) do not match 3 samples"):
        check_members(lp, np.array([0, 1]))
    with _raises("labels must be integer class indices, got dtype float64"):
        check_members(lp, np.array([0.0, 1.0, 2.0]))
    with _raises("labels must lie in 0..3, got 0..4"):
        check_members(lp, np.array([0, 1, 4]))


def test_weights_checks_messages():
    lp = np.zeros((2, 1, 3), np.float32)
    with _raises("expected member outputs of shape (n_members, n_rows, n_classes), got (1, 3)"):
        fuse(np.zeros((1, 3)), [1.0], MIXTURE)
    with _raises("3 weights for 2 members"):
        fuse(lp, [1, 1, 1], MIXTURE)
    # Integer weights are taken as floats: 1 and 3 mix as 0.25 and 0.75.
    two = np.log(np.array([[[0.5, 0.5]], [[1.0, 1e-30]]], np.float32))
    np.testing.assert_allclose(np.exp(fuse(two, np.array([1, 3]), MIXTURE)), [[0.875, 0.125]], rtol=1e-6)


def test_unknown_parameter_names_each_one():
    with _raises("blend method 'nll' has no parameter a, b; its parameters: max_iter, tol"):
        get_method("nll", b=1, a=2)


def test_logit_adjustment_checks():
    prior = LogitAdjustment([0, -1])
    assert prior.log_prior.dtype == np.float64 and prior.log_prior.tolist() == [0.0, -1.0]
    assert LogitAdjustment(np.array([-0.5], np.float32)).log_prior.dtype == np.float64  # one class is a prior
    for bad in ([], [[0.0, 1.0]], [0.0, np.inf]):
        with pytest.raises(ValueError, match=r"^log_prior must be a finite \(n_classes,\) array"):
            LogitAdjustment(bad)


def test_class_log_prior_checks():
    np.testing.assert_allclose(class_log_prior([3, 1, 0], zero_count=1), np.log([0.6, 0.2, 0.2]))
    assert class_log_prior(np.array([1, 3], np.int64)).dtype == np.float64
    with _raises("class counts must be finite and non-negative"):
        class_log_prior([1, -1])
    with _raises("zero_count must be positive, got 0"):
        class_log_prior([1, 0], zero_count=0)


def test_correct_at_k_refuses_k_zero():
    with _raises("k must be at least 1, got 0"):
        correct_at_k(np.zeros((1, 2)), np.array([0]), 0)


def test_bootstrap_interval_golden_values():
    hits = np.arange(200) < 144  # 72 % of 200
    assert bootstrap_ci(hits) == (pytest.approx(0.659875), pytest.approx(0.785))  # n_boot=1000, seed=0
    assert bootstrap_ci(hits, level=0.5) == (pytest.approx(0.7), pytest.approx(0.745))
    assert bootstrap_ci(hits, n_boot=1) == (0.715, 0.715)
    assert bootstrap_ci([2, 0, 1]) == bootstrap_ci([True, False, True])  # any non-zero is a hit
    with _raises("level must lie strictly between 0 and 1, got 0"):
        bootstrap_ci(hits, level=0)
    with _raises("n_boot must be at least 1, got 0"):
        bootstrap_ci(hits, n_boot=0)


def test_fit_temperatures_keeps_to_its_bounds():
    logits = np.array([[[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]])
    labels = np.array([0, 1, 1])
    assert fit_temperatures(logits, labels)[0] == pytest.approx(5.767, abs=1e-3)
    assert fit_temperatures(logits, labels, (0.5, 2.0))[0] == pytest.approx(2.0, abs=1e-3)
    with _raises("expected member logits of shape (n_members, n_samples, n_classes), got (3, 2)"):
        fit_temperatures(logits[0], labels)


# ------------------------------------------------------------------------------------------
# log_softmax, fuse, adjust, top_k: shapes, dtypes and far-out values


def test_log_softmax_of_one_row_and_of_one_class():
    np.testing.assert_allclose(log_softmax(np.array([1.0, 2.0, 3.0])),
                               [-2.4076061, -1.407606, -0.407606], rtol=1e-6)
    assert log_softmax(np.array([[5.0], [1.0]])).tolist() == [[0.0], [0.0]]
    with _raises("logits need a non-empty class axis, got shape (2, 0)"):
        log_softmax(np.zeros((2, 0)))
    with _raises("logits need a non-empty class axis, got shape ()"):
        log_softmax(np.float32(1.0))


def test_log_softmax_temperatures_per_row_of_a_matrix():
    out = log_softmax(np.array([[0.0, 2.0], [0.0, 2.0]]), [1.0, 2.0])
    np.testing.assert_allclose(out, [[-2.126928, -0.126928], [-1.3132616, -0.3132617]], rtol=1e-6)
    np.testing.assert_allclose(log_softmax(np.zeros((3, 1, 2)), np.float64(2.0)), np.log(0.5) * np.ones((3, 1, 2)))
    with _raises("temperatures of shape (2,) do not match logits of shape (3,): "
                 "give one float or one per leading index"):
        log_softmax(np.zeros(3), [1.0, 2.0])
    with _raises("logits have a row whose largest value is not finite (all -inf, +inf or NaN)"):
        log_softmax(np.array([[[0.0, 1.0]], [[-np.inf, -np.inf]]]))


def test_log_softmax_of_a_four_dimensional_array_is_over_its_last_axis():
    logits = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(log_softmax(logits), np.broadcast_to(np.log([1 / (1 + np.e), np.e / (1 + np.e)]),
                                                                    (2, 3, 2, 2)), rtol=1e-5)


def test_mixture_of_far_out_log_probabilities_stays_finite():
    """exp(-200) is 0 in float32: the mixture must shift by the largest member before exp."""
    lp = np.array([[[0.0, -200.0]], [[0.0, -300.0]]], np.float32)
    out = fuse(lp, [1, 1], MIXTURE)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, -200 - np.log(2)]], rtol=1e-6)
    lp = np.array([[[-300.0, 0.0]], [[-200.0, 0.0]]], np.float32)
    np.testing.assert_allclose(fuse(lp, [3, 1], MIXTURE), [[np.log(0.25) - 200, 0.0]], rtol=1e-6, atol=1e-6)
    with _raises("mixture weights are all zero"):
        fuse(lp, [0, 0], MIXTURE)


def test_geometric_fusion_is_float32():
    lp = np.log(np.full((2, 3, 4), 0.25))  # float64 in
    assert fuse(lp, [0.5, 0.5], "geometric").dtype == np.float32


def test_adjust_and_top_k_return_float32():
    lp = np.log(np.array([[0.5, 0.25, 0.25]]))  # float64 in
    out = adjust(lp, np.log(np.array([0.5, 0.25, 0.25])), 1.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.log([[1 / 3, 1 / 3, 1 / 3]]), rtol=1e-6)
    idx, p = top_k(lp, 2)
    assert idx.tolist() == [[0, 1]] and p.dtype == np.float32
    np.testing.assert_allclose(p, [[0.5, 0.25]], rtol=1e-6)


def test_a_row_of_minus_infinity_is_refused_beside_finite_rows():
    with _raises("logits have a row whose largest value is not finite (all -inf, +inf or NaN)"):
        log_softmax(np.array([[0.0, 1.0], [-np.inf, -np.inf]]))
    with _raises("logits have a row whose largest value is not finite (all -inf, +inf or NaN)"):
        log_softmax(np.array([[[0.0, 1.0], [np.nan, 0.0]]]))


def test_a_class_every_member_rules_out_is_minus_infinity_quietly():
    lp = np.array([[[0.0, -np.inf]], [[0.0, -np.inf]]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fuse(lp, [1, 1], MIXTURE)
    assert out.tolist() == [[0.0, -np.inf]]


def test_messages_of_unfitted_and_nan_scores():
    with _raises("NllBlend is not fitted yet: call fit first"):
        NllBlend().predict_log_proba(np.zeros((1, 1, 2)))
    with _raises("log_probs contain NaN"):
        mean_nll(np.array([[np.nan, 0.0]]), np.array([0]))
