"""Memory of the rival pairs that ``accuracy`` and ``greedy`` (score=accuracy) fit on (issue 24):
held once (no parts concatenated), fold subsets that copy no pair, margins built a chunk at a
time, and the bound on pairs passed through :func:`cross_validate_and_fit`. Peaks are measured
with tracemalloc (numpy reports its buffers to it), per pair, above what was held before."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.special import log_softmax

from weights_search import cross_validate_and_fit, get_method
from weights_search.margins import MixtureMargins
from weights_search.prior import class_log_prior
from weights_search.stats import MixtureCollector, TooManyPairs, max_pairs_within, pair_bytes

METHODS = [("accuracy", {"max_passes": 2, "n_random": 2}), ("greedy", {"score": "accuracy", "n_rounds": 5})]


def _members(n_members: int, n_rows: int, n_classes: int, seed: int = 0):
    """Weak, correlated members: many classes score at least as high as the true one."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_rows)
    shared = rng.normal(size=(n_rows, n_classes))
    logits = np.stack([0.8 * shared + (0.6 + 0.3 * m) * rng.normal(size=(n_rows, n_classes))
                       for m in range(n_members)])
    logits[:, np.arange(n_rows), labels] += 0.7
    return log_softmax(logits.astype(np.float32), axis=2).astype(np.float32), labels


@pytest.fixture(scope="module")
def sixteen():
    """16 members, 800 rows of 600 classes: about 450,000 pairs."""
    return _members(16, 800, 600)


def _stats(method, lp, labels, block=100, prior=None):
    collector = method.collector(labels, lp.shape[2], prior)
    for start in range(0, lp.shape[1], block):
        collector.add(start, lp[:, start:start + block])
    return collector


@pytest.mark.parametrize("name, params", METHODS)
def test_the_pairs_are_held_once_and_a_fold_subset_copies_none(sixteen, name, params):
    lp, labels = sixteen
    n_members = lp.shape[0]
    held_per_pair = 4 + 4 + 4 * n_members  # row (int32), class (int32), M float32
    tracemalloc.start()
    try:
        collector = _stats(get_method(name, **params), lp, labels)
        tracemalloc.reset_peak()
        stats = collector.result()
        del collector
        held, result_peak = tracemalloc.get_traced_memory()
        pairs = stats.pairs.n_pairs
        rows = np.sort(np.random.default_rng(1).choice(labels.size, int(0.8 * labels.size), replace=False))
        tracemalloc.reset_peak()
        subset = stats.subset(rows)
        _, subset_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pairs > 300_000
    # Before: the parts and their concatenation (2x, 160 B a pair); now the grown arrays
    # (at most a quarter unused before they are trimmed).
    assert result_peak < 1.3 * held_per_pair * pairs, result_peak / pairs
    assert held < 1.1 * held_per_pair * pairs + labels.size * (8 * n_members + 16)
    # Before: 80% of the pairs copied (76 B a pair); now rows and an index of them.
    assert subset_peak - held < 2 * pairs, (subset_peak - held) / pairs
    assert subset.pairs.n_pairs == int(np.isin(stats.pairs.row, rows).sum())


@pytest.mark.parametrize("name, params", METHODS)
def test_a_fit_on_the_pairs_adds_its_margins_and_little_else(sixteen, name, params):
    lp, labels = sixteen
    n_members = lp.shape[0]
    stats = _stats(get_method(name, **params), lp, labels).result()
    pairs = stats.pairs.n_pairs
    rows = np.flatnonzero(np.arange(labels.size) % 5 != 0)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fold = get_method(name, **params).fit_stats(stats.subset(rows), None)
        whole = get_method(name, **params).fit_stats(stats, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # float64 margins (8 M a pair) and the search's few (K,) arrays; before: 254-271 B a pair
    # at 16 members (the fold's copy of its pairs, (M, K) float32 and (K, M) float64
    # temporaries while building and in greedy's rounds).
    assert peak - before < (8 * n_members + 64) * pairs, (peak - before) / pairs
    assert (peak - before) < pair_bytes(n_members) * pairs
    # The fits are the same as from pairs copied the old way (the in-memory margins).
    fresh = MixtureMargins(lp, labels)
    assert MixtureMargins.from_stats(stats).count(whole.weights_) == fresh.count(whole.weights_)
    assert 0 <= fold.train_score_ <= 1


def test_counts_from_subsets_of_subsets_match_the_brute_force_argmax_at_any_tau():
    lp, labels = _members(3, 400, 50, seed=4)
    n_classes = lp.shape[2]
    log_prior = class_log_prior(np.round(400 / (1 + np.arange(n_classes)) ** 0.9) + 1)
    collector = MixtureCollector(labels, n_classes, log_prior, pairs=True)
    for start in range(0, labels.size, 37):
        collector.add(start, lp[:, start:start + 37])
    stats = collector.result()
    rng = np.random.default_rng(2)
    first = np.sort(rng.choice(labels.size, 300, replace=False))
    second = np.sort(rng.choice(first.size, 200, replace=False))
    part = stats.subset(first).subset(second)
    chosen = first[second]
    sub_lp, sub_labels = lp[:, chosen], labels[chosen]
    shift = log_prior - log_prior.min()
    for tau in (0.0, 0.8, 3.0):
        margins = MixtureMargins.from_stats(part, tau)
        for weights in (np.ones(3), np.eye(3)[2], *rng.dirichlet(np.ones(3), 4)):
            mixed = np.einsum("m,mnc->nc", weights, np.exp(sub_lp.astype(np.float64))) * np.exp(-tau * shift)
            true = mixed[np.arange(sub_labels.size), sub_labels].copy()
            mixed[np.arange(sub_labels.size), sub_labels] = -np.inf
            assert margins.count(weights) == int((true > mixed.max(axis=1)).sum()), (tau, weights)
    np.testing.assert_array_equal(part.pairs.row, np.searchsorted(chosen, stats.pairs.row[np.isin(stats.pairs.row, chosen)]))


def test_cross_validate_and_fit_passes_the_bound_on_pairs():
    lp, labels = _members(4, 300, 80, seed=1)
    report, blend = cross_validate_and_fit(lp, labels, "accuracy", {"max_passes": 2}, n_folds=3, n_boot=10,
                                           block_rows=64)
    total = _stats(get_method("accuracy"), lp, labels).result().pairs.n_pairs
    with pytest.raises(TooManyPairs, match=f"more than max_pairs={total - 1} ") as caught:
        cross_validate_and_fit(lp, labels, "accuracy", {"max_passes": 2}, n_folds=3, n_boot=10, block_rows=64,
                               max_pairs=total - 1)
    assert caught.value.rows == labels.size and caught.value.n_pairs == total and caught.value.ends == (0.0,)
    again, _ = cross_validate_and_fit(lp, labels, "accuracy", {"max_passes": 2}, n_folds=3, n_boot=10,
                                      block_rows=64, max_pairs=total)
    assert again == report
    # nll holds no pairs: no bound applies to it.
    cross_validate_and_fit(lp, labels, "nll", n_folds=3, n_boot=10, block_rows=64, max_pairs=0)
