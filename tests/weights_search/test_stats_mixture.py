"""The mixture methods' streamed statistics (weights_search/stats.py) against direct computations
on the (M, N, C) stack: streaming in small blocks, fold subsets, the prior bins (exact, and the
fine scheme within its bound), the rival pairs' exact top-1 at any tau, memory at 10,000 classes
and the bound on pairs."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from weights_search import LogitAdjustment, class_log_prior, get_method, log_softmax
from weights_search.margins import MixtureMargins
from weights_search.prior import TAU_BOUNDS, MixturePrior, fit_tau
from weights_search.stats import MAX_BINS, MixtureCollector, MixtureStats

METHODS = [("uniform", {}), ("nll", {}), ("greedy", {}), ("greedy", {"score": "accuracy"}), ("accuracy", {})]


def _members(n_members=3, n_rows=300, n_classes=40, seed=0, counts="int"):
    """Correlated members (shared noise + own noise + a signal on the true class), labels, and a
    long-tailed log-prior (integer counts: few distinct values; "real": all distinct)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_rows)
    shared = rng.normal(size=(n_rows, n_classes))
    logits = np.stack([0.8 * shared + (0.6 + 0.3 * m) * rng.normal(size=(n_rows, n_classes))
                       for m in range(n_members)])
    logits[:, np.arange(n_rows), labels] += (1.5 + 0.5 * np.arange(n_members))[:, None]
    ranks = 1 + np.arange(n_classes)
    raw = 400 / ranks ** 0.9
    prior = class_log_prior(np.round(raw) + 1 if counts == "int" else raw)
    # Members learned the training prior: rare classes score lower.
    logits += 0.7 * prior
    return log_softmax(logits.astype(np.float32)), labels, prior


def _collect(lp, labels, prior=None, block=None, **options):
    collector = MixtureCollector(labels, lp.shape[2], prior, **options)
    block = block or lp.shape[1]
    for start in range(0, lp.shape[1], block):
        collector.add(start, lp[:, start:start + block])
    return collector.result()


def _assert_same_stats(a: MixtureStats, b: MixtureStats):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.true_lp, b.true_lp)
    for name in ("bin_probs", "bin_shift"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert (a.pairs is None) == (b.pairs is None)
    if a.pairs is not None:
        for name in ("row", "rival", "lp", "dominated"):
            np.testing.assert_array_equal(getattr(a.pairs, name), getattr(b.pairs, name))


# --- streaming and subsets -------------------------------------------------------------------------

@pytest.mark.parametrize("with_prior", [False, True])
def test_blocks_of_seven_rows_give_the_one_block_stats_and_fits(with_prior):
    lp, labels, log_prior = _members()
    prior = LogitAdjustment(log_prior) if with_prior else None
    one = _collect(lp, labels, log_prior if with_prior else None, pairs=True)
    seven = _collect(lp, labels, log_prior if with_prior else None, block=7, pairs=True)
    _assert_same_stats(one, seven)
    assert one.pairs.n_pairs > 0 and (one.bins is not None) == with_prior
    for name, params in METHODS:
        whole = get_method(name, **params).fit(lp, labels, prior)
        streamed = get_method(name, **params).fit_stats(seven, prior)
        np.testing.assert_array_equal(streamed.weights_, whole.weights_)
        assert streamed.tau_ == whole.tau_ and streamed.train_score_ == whole.train_score_


def test_a_fold_subset_is_the_stats_of_those_rows_alone():
    lp, labels, log_prior = _members(n_rows=240)
    stats = _collect(lp, labels, log_prior, block=13, pairs=True)
    rows = np.sort(np.random.default_rng(1).choice(labels.size, 150, replace=False))
    alone = _collect(lp[:, rows], labels[rows], log_prior, block=11, pairs=True)
    _assert_same_stats(stats.subset(rows), alone)
    for name, params in METHODS:
        a = get_method(name, **params).fit_stats(stats.subset(rows), LogitAdjustment(log_prior))
        b = get_method(name, **params).fit(lp[:, rows], labels[rows], LogitAdjustment(log_prior))
        np.testing.assert_array_equal(a.weights_, b.weights_)
        assert a.tau_ == b.tau_
    with pytest.raises(ValueError, match="sorted distinct"):
        stats.subset(rows[::-1])


def test_blocks_out_of_order_or_missing_rows_are_refused():
    lp, labels, _ = _members(n_rows=30)
    collector = MixtureCollector(labels, lp.shape[2])
    collector.add(0, lp[:, :10])
    with pytest.raises(ValueError, match="row order"):
        collector.add(20, lp[:, 20:])
    with pytest.raises(ValueError, match="after 10 were added"):
        collector.result()


# --- the prior bins ----------------------------------------------------------------------------------

def _direct_moments(lp, log_prior, tau):
    shift = log_prior - log_prior.min()
    tilted = np.exp(lp.astype(np.float64) - tau * shift)
    total = tilted.sum(axis=2)
    mean = (tilted * shift).sum(axis=2) / total
    var = (tilted * shift ** 2).sum(axis=2) / total - mean ** 2
    return np.log(total), mean, var


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0, 2.3, 3.0])
def test_exact_bins_give_the_log_normaliser_and_its_moments(tau):
    lp, labels, log_prior = _members(n_classes=300)
    stats = _collect(lp, labels, log_prior, block=50)
    assert stats.bins.exact and stats.bins.n_bins < 300
    scores = MixturePrior(stats, labels, log_prior).at(tau, moments=True)
    log_norm, mean, var = _direct_moments(lp, log_prior, tau)
    np.testing.assert_allclose(scores.log_norm, log_norm, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores.tilt_mean, mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores.tilt_var, var, rtol=0, atol=1e-6)
    np.testing.assert_allclose(MixturePrior(stats, labels, log_prior).at(tau).log_norm, log_norm, atol=1e-6)


def test_fine_bins_stay_within_their_bound_and_fit_as_the_exact_ones():
    lp, labels, log_prior = _members(n_rows=600, n_classes=1010, counts="real")
    fine = _collect(lp, labels, log_prior, block=100, pairs=True)
    exact = _collect(lp, labels, log_prior, block=100, pairs=True, max_bins=10_000)
    assert not fine.bins.exact and exact.bins.exact and fine.bins.n_bins <= MAX_BINS // 2
    for tau in (0.5, 1.0, 3.0):
        approx = MixturePrior(fine, labels, log_prior).at(tau, moments=True).log_norm
        true = _direct_moments(lp, log_prior, tau)[0]
        error = true - approx
        assert error.min() >= -1e-6 and error.max() <= fine.bins.error_bound(tau) + 1e-6
        assert error.max() > 1e-9  # the scheme is an approximation here: the test sees it
    for name, params in METHODS:
        a = get_method(name, **params).fit_stats(fine, LogitAdjustment(log_prior))
        b = get_method(name, **params).fit_stats(exact, LogitAdjustment(log_prior))
        np.testing.assert_allclose(a.weights_, b.weights_, atol=1e-3)
        assert a.tau_ == pytest.approx(b.tau_, abs=1e-3)
    probs = np.exp(lp[0].astype(np.float64))
    assert fit_tau(probs, labels, log_prior) == pytest.approx(_brute_tau(probs, labels, log_prior), abs=1e-3)


def _brute_tau(probs, labels, log_prior):
    shift = log_prior - log_prior.min()
    grid = np.linspace(*TAU_BOUNDS, 3001)
    nll = [np.mean(np.log((probs * np.exp(-t * shift)).sum(1)) - np.log(probs[np.arange(labels.size), labels])
                   + t * shift[labels]) for t in grid]
    return grid[int(np.argmin(nll))]


# --- rival pairs ---------------------------------------------------------------------------------------

def _strict_right(lp, labels, weights, log_prior=None, tau=0.0):
    """Rows whose true class scores strictly above every other under the corrected mixture,
    in float64 from the (M, N, C) stack (ties are errors, as margins.py documents)."""
    mixed = np.einsum("m,mnc->nc", np.asarray(weights, np.float64), np.exp(lp.astype(np.float64)))
    if log_prior is not None and tau:
        mixed *= np.exp(-tau * (log_prior - log_prior.min()))
    true = mixed[np.arange(labels.size), labels].copy()
    mixed[np.arange(labels.size), labels] = -np.inf
    return int((true > mixed.max(axis=1)).sum())


def test_rival_pairs_count_what_the_explicit_argmax_counts_at_any_tau():
    lp, labels, log_prior = _members(n_rows=400, n_classes=60)
    stats = _collect(lp, labels, log_prior, block=9, pairs=True)
    assert stats.pairs.dominated.any() and stats.pairs.n_pairs < labels.size * 59
    rng = np.random.default_rng(5)
    for tau in [0.0, 3.0, *rng.uniform(0, 3, 6)]:
        margins = MixtureMargins.from_stats(stats, tau)
        for weights in [np.ones(3), np.eye(3)[1], *rng.dirichlet(np.ones(3), 6)]:
            assert margins.count(weights) == _strict_right(lp, labels, weights, log_prior, tau), (tau, weights)


def test_a_tie_counts_as_an_error_from_the_pairs_too():
    # Row 0: member 0 ties the true class 0 with class 1; member 1 prefers class 0.
    lp = np.log(np.array([[[0.5, 0.5, 0.0]], [[0.8, 0.1, 0.1]]], np.float32) + 1e-30).astype(np.float32)
    stats = _collect(lp, np.array([0]), pairs=True)
    margins = MixtureMargins.from_stats(stats)
    assert margins.count(np.array([1.0, 0.0])) == 0 and margins.count(np.array([1.0, 1.0])) == 1


def test_a_given_tau_finds_rivals_at_it_alone_and_counts_rows_there():
    lp, labels, log_prior = _members(n_rows=300, n_classes=60)
    both = _collect(lp, labels, log_prior, pairs=True)
    given = _collect(lp, labels, log_prior, pairs=True, tau=0.7)
    assert given.pairs.n_pairs < both.pairs.n_pairs
    weights = np.array([0.2, 0.3, 0.5])
    assert MixtureMargins.from_stats(given, 0.7).count(weights) == _strict_right(lp, labels, weights, log_prior, 0.7)
    with pytest.raises(ValueError, match="cannot count rows at tau=1.5"):
        MixtureMargins.from_stats(given, 1.5)


def test_the_pairs_bound_is_a_clear_error():
    lp, labels, log_prior = _members(n_rows=200)
    with pytest.raises(ValueError, match=r"rival pairs .* more than max_pairs=50 .*nll, greedy with score=nll"):
        _collect(lp, labels, log_prior, block=20, pairs=True, max_pairs=50)
    with pytest.raises(ValueError, match="max_pairs=50"):
        method = get_method("accuracy")
        collector = method.collector(labels, lp.shape[2], None, max_pairs=50)
        collector.add(0, lp)
    # The methods that do not count rows right collect no pairs, whatever the bound.
    assert get_method("nll").collector(labels, lp.shape[2], None, max_pairs=0).add(0, lp) is None


def test_a_method_that_counts_rows_refuses_stats_without_pairs():
    lp, labels, _ = _members(n_rows=50)
    stats = get_method("nll").collector(labels, lp.shape[2], None)
    stats.add(0, lp)
    with pytest.raises(ValueError, match="need rival pairs"):
        get_method("accuracy").fit_stats(stats.result())
    assert get_method("accuracy").collector_key(None) != get_method("nll").collector_key(None)
    assert get_method("uniform").collector_key(None) == get_method("nll").collector_key(None)


# --- 10,000 classes ----------------------------------------------------------------------------------

def test_ten_thousand_classes_fit_from_one_block_of_memory_and_match_the_full_mixture_nll():
    n_members, n_rows, n_classes, block = 3, 800, 10_000, 40
    lp, labels, log_prior = _members(n_members, n_rows, n_classes, seed=3)
    blocks = [lp[:, s:s + block] for s in range(0, n_rows, block)]
    block_bytes = n_members * block * n_classes * 4
    stack_bytes = lp.nbytes
    prior = LogitAdjustment(log_prior)
    for method, with_prior in [("nll", False), ("nll", True), ("accuracy", False)]:
        p = prior if with_prior else None
        fitter = get_method(method)
        tracemalloc.start()
        try:
            collector = fitter.collector(labels, n_classes, p)
            for i, part in enumerate(blocks):
                collector.add(i * block, part)
            stats = collector.result()
            _, collect_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            fitter.fit_stats(stats, p)
            _, fit_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        kept = (stats.pairs.n_pairs * (12 + 4 * n_members) if stats.pairs is not None else 0)
        assert collect_peak < 3 * block_bytes + kept + 2 * 2**20, (method, with_prior, collect_peak)
        assert fit_peak < stack_bytes / 20, (method, with_prior, fit_peak)
    # nll without a prior against a brute-force minimisation of the full mixture's NLL.
    fitted = get_method("nll").fit_stats(_collect(lp, labels, block=100), None)
    probs = np.exp(lp.astype(np.float64))
    # The full mixture's class probabilities are linear in w: its true-class column and its
    # row sums over all classes are w-combinations of the members', taken once from the stack.
    true_column = probs[:, np.arange(n_rows), labels]
    row_sums = probs.sum(axis=2)

    def full_nll(theta):
        w = np.exp(theta - logsumexp(theta))
        return -np.mean(np.log((w @ true_column) / (w @ row_sums)))
    best = minimize(full_nll, np.zeros(n_members), method="Nelder-Mead",
                    options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000})
    np.testing.assert_allclose(fitted.weights_, np.exp(best.x - logsumexp(best.x)), atol=1e-4)


def test_bin_masses_of_large_bins_match_float64_sums():
    """Bins of thousands of classes (runs summed in float32, then in float64) and bins of one."""
    rng = np.random.default_rng(2)
    n_classes = 6000
    counts = np.where(np.arange(n_classes) < 5000, 300, 1 + np.arange(n_classes) % 7)
    lp = log_softmax(rng.normal(0, 2, (2, 25, n_classes)).astype(np.float32))
    stats = _collect(lp, np.zeros(25, dtype=np.int64), class_log_prior(counts), block=10)
    shift = stats.bins.shift
    expected = np.stack([np.exp(lp.astype(np.float64))[..., shift == value].sum(axis=2) for value in stats.bins.low],
                        axis=2)
    assert stats.bins.exact and stats.bins.n_bins == 8
    np.testing.assert_allclose(stats.bin_probs, expected, rtol=2e-6)
