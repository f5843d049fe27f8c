"""Kills the mutants `make mutate` found surviving in weights_search/cv.py, fitted.py and the
estimators' repr: fold bounds, the defaults a report is made with, the bootstrap interval of a
row recomputed by hand, and the fold taus (the method's, not uniform's)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from weights_search import (
    FittedBlend, LogitAdjustment, NllBlend, blend_chunks, bootstrap_ci, correct_at_k, cross_val_log_probs,
    cross_validate, get_method, log_softmax, stratified_folds,
)


def _problem(seed=2, m=2, n=30, c=3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    logits = rng.normal(0, 1, (m, n, c)).astype(np.float32)
    logits[:, np.arange(n), labels] += rng.normal(1.0, 1.0, (m, n)).astype(np.float32)
    return logits, labels


def test_fold_counts_at_their_bounds():
    labels = np.array([0, 1, 0, 1, 2])
    assert sorted(np.concatenate(stratified_folds(labels, 5)).tolist()) == [0, 1, 2, 3, 4]
    assert all(f.size == 1 for f in stratified_folds(labels, 5))  # k == N: one row a fold
    two = stratified_folds(labels, 2)
    assert sorted(f.size for f in two) == [2, 3]
    assert stratified_folds(labels, 2)[0].dtype == np.int64
    for k in (1, 6):
        with pytest.raises(ValueError, match=re.escape(f"the number of folds must lie in 2..5 (the number of rows), got {k}")):
            stratified_folds(labels, k)
    with pytest.raises(ValueError, match=re.escape("labels must be a (n_samples,) array, got shape (1, 5)")):
        stratified_folds(labels[None], 2)


def test_default_seed_is_zero():
    labels = np.arange(40) % 4
    assert [f.tolist() for f in stratified_folds(labels, 4)] == [f.tolist() for f in stratified_folds(labels, 4, seed=0)]
    assert any(a.tolist() != b.tolist() for a, b in zip(stratified_folds(labels, 4), stratified_folds(labels, 4, seed=1)))


def test_cross_val_log_probs_with_small_folds():
    logits, labels = _problem()
    folds = [np.array([0]), np.arange(1, 30)]  # a fold of one row is a fold
    out = cross_val_log_probs(logits, labels, lambda: get_method("uniform"), folds)
    assert out.dtype == np.float32 and out.shape == (30, 3)
    np.testing.assert_allclose(out[0], np.log(np.exp(log_softmax(logits[:, 0])).mean(axis=0)), rtol=1e-5)
    with pytest.raises(ValueError, match=re.escape("folds must be at least 2 non-empty arrays of row indices "
                                                   "that partition 0..29")):
        cross_val_log_probs(logits, labels, lambda: get_method("uniform"), [np.arange(30)])
    with pytest.raises(ValueError, match=re.escape("partition 0..29")):
        cross_val_log_probs(logits, labels, lambda: get_method("uniform"), [np.arange(15), np.arange(15, 29)])


def test_report_defaults_and_a_member_row_by_hand():
    logits, labels = _problem()
    report = cross_validate(logits, labels, "nll")
    assert report.top_k == 5 and report.n_folds == 5
    hits = correct_at_k(log_softmax(logits[0]), labels, 1)
    row = next(r for r in report.rows if r.name == "member 0")
    assert (row.top1_low, row.top1_high) == bootstrap_ci(hits, 1000, seed=0)
    assert report.row("method") is report.method_row and report.row("method").prior is False
    assert report.row("method", True) is None


def test_the_fold_taus_are_the_methods():
    logits, labels = _problem(n=45)
    log_prior = np.log(np.array([0.6, 0.3, 0.1]))
    report = cross_validate(logits, labels, "nll", n_folds=3, prior=LogitAdjustment(log_prior))
    lp = log_softmax(logits)
    expected = []
    for test in stratified_folds(labels, 3):
        train = np.setdiff1d(np.arange(labels.size), test)
        expected.append(NllBlend().fit(lp[:, train], labels[train], LogitAdjustment(log_prior)).tau_)
    assert report.fold_taus == pytest.approx(tuple(expected))
    assert report.row("method", True).name == "nll+prior"


def test_chunks_of_one_row():
    logits, _ = _problem(n=5)
    blend = FittedBlend("uniform", "mixture", (0.5, 0.5))
    chunks = list(blend_chunks(list(logits), blend, chunk_rows=1))
    assert [start for start, _ in chunks] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=re.escape("chunk_rows must be at least 1, got 0")):
        list(blend_chunks(list(logits), blend, chunk_rows=0))
    with pytest.raises(ValueError, match="^" + re.escape("a prior correction needs both log_prior and tau") + "$"):
        FittedBlend("uniform", "mixture", (0.5, 0.5), tau=1.0)


def test_repr_names_every_parameter():
    assert repr(get_method("accuracy", seed=3)) == "AccuracyBlend(max_passes=20, n_random=8, seed=3)"


def test_report_intervals_use_the_given_resamples_and_seed():
    logits, labels = _problem()
    report = cross_validate(logits, labels, "uniform", n_boot=50, seed=3)
    row = next(r for r in report.rows if r.name == "member 1")
    hits = np.zeros(labels.size, bool)
    hits[:] = correct_at_k(log_softmax(logits[1]), labels, 1)
    assert (row.top1_low, row.top1_high) == bootstrap_ci(hits, 50, seed=3)
