"""Geometric pooling (`logit`) fitted from one pass of per-row statistics (LogitCollector ->
LogitStats) against the exact fit on the stack in hand (fit_pooling / LogitBlend.fit_exact, the
reference), at 1,010 and 10,000 classes, with and without a long-tailed prior."""

import numpy as np
import pytest

from test_stats_temperature import correlated_members
from weights_search.expansion import pilot_rows
from weights_search.functional import GEOMETRIC, fuse, log_softmax
from weights_search.metrics import top1
from weights_search.pooling import EXACT_CLASSES, LogitBlend, LogitCollector, LogitStats
from weights_search.prior import LogitAdjustment, adjust, class_log_prior

FIELDS = ("union", "pad", "true", "log_s0", "mean", "cov", "skew", "pilot")


def long_tailed_prior(n_classes, seed=1):
    rng = np.random.default_rng(seed)
    counts = np.floor(500 * np.arange(1, n_classes + 1) ** -1.0 * rng.uniform(0.5, 1.5, n_classes)) + 1
    return LogitAdjustment(class_log_prior(rng.permutation(counts)))


def members_with_prior(n_rows, n_classes, seed=5, scales=(1.0, 1.5, 2.0), signals=(3.0, 2.0, 0.5)):
    """Log-probs of correlated members (by default three, one weak) that carry a long-tailed
    training prior."""
    logits, labels = correlated_members(n_rows, n_classes, seed=seed, scales=scales, signals=signals)
    prior = long_tailed_prior(n_classes)
    return log_softmax(logits + np.float32(0.7) * prior.log_prior.astype(np.float32)), labels, prior


def collect(log_probs, labels, prior, block_rows, **kwargs):
    collector = LogitCollector(labels, log_probs.shape[2], prior, **kwargs)
    for start in range(0, labels.size, block_rows):
        collector.add(start, log_probs[:, start:start + block_rows])
    return collector.result()


@pytest.fixture(scope="module", params=[1010, 10000])
def problem(request):
    log_probs, labels, prior = members_with_prior(1200, request.param)
    return log_probs, labels, prior, collect(log_probs, labels, prior, 100), collect(log_probs, labels, None, 100)


def test_weights_match_the_exact_fit(problem):
    log_probs, labels, _, _, plain = problem
    exact = LogitBlend().fit_exact(log_probs, labels)
    streamed = LogitBlend().fit_stats(plain)
    assert exact.weights_[0] > 0.5 and exact.weights_[1] > 0.2  # both useful members weigh
    np.testing.assert_allclose(streamed.weights_, exact.weights_, rtol=0, atol=1e-3)
    assert streamed.train_score_ == pytest.approx(exact.train_score_, abs=1e-4)


def test_a_fold_with_the_prior_matches_the_exact_fit_and_its_held_out_top1(problem):
    log_probs, labels, prior, stats, _ = problem
    held = np.arange(labels.size) % 5 == 3
    train, test = np.flatnonzero(~held), np.flatnonzero(held)
    exact = LogitBlend().fit_exact(log_probs[:, train], labels[train], prior)
    streamed = LogitBlend().fit_stats(stats.subset(train), prior)
    assert 0.3 < exact.tau_ < 3.0  # the prior is worth correcting for
    np.testing.assert_allclose(streamed.weights_, exact.weights_, rtol=0, atol=1e-3)
    assert streamed.tau_ == pytest.approx(exact.tau_, abs=1e-3)
    assert top1(streamed.predict_log_proba(log_probs[:, test]), labels[test]) == \
        top1(exact.predict_log_proba(log_probs[:, test]), labels[test])


def test_four_members_match_the_exact_fit():
    log_probs, labels, prior = members_with_prior(1500, 1010, seed=15, scales=(1.0, 1.5, 2.0, 0.7),
                                                  signals=(3.0, 2.0, 0.5, 2.5))
    exact = LogitBlend().fit_exact(log_probs, labels, prior)
    streamed = LogitBlend().fit_stats(collect(log_probs, labels, prior, 128), prior)
    assert (exact.weights_ > 0.1).sum() >= 3
    np.testing.assert_allclose(np.append(streamed.weights_, streamed.tau_), np.append(exact.weights_, exact.tau_),
                               rtol=0, atol=1e-3)


def test_halves_that_differ_stay_within_1e_3():
    # Rows in an order where the second half is much sharper: its rows are expanded about pilots
    # fitted on the first half, far from the fit of all rows.
    log_probs, labels, prior = members_with_prior(2000, 1010, seed=12)
    log_probs[:, 1000:] = log_softmax(log_probs[:, 1000:] * np.float32(1.4))
    exact = LogitBlend().fit_exact(log_probs, labels, prior)
    streamed = LogitBlend().fit_stats(collect(log_probs, labels, prior, 200), prior)
    np.testing.assert_allclose(np.append(streamed.weights_, streamed.tau_), np.append(exact.weights_, exact.tau_),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("x", [[0.8, 0.4, 0.05, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 2.5]])
def test_the_statistics_gradient_is_the_nll_slope(x):
    # Near the pilots, at the solver's start (0) and far off (the third-order term scaled down).
    log_probs, labels, prior = members_with_prior(300, 400, seed=13)
    stats = collect(log_probs, labels, prior, 100)
    assert stats.skew is not None
    stats.union = stats.union.astype(np.float64)  # float32 scores would drown the differences
    x = np.array(x)
    nll, grad = stats.nll_and_grad(x)
    step = 1e-3
    for i in range(x.size):
        dx = np.eye(x.size)[i] * step
        slope = (stats.nll_and_grad(x + dx)[0] - stats.nll_and_grad(x - dx)[0]) / (2 * step)
        assert grad[i] == pytest.approx(slope, rel=1e-3, abs=1e-6), i


def test_blender_fit_runs_through_the_statistics():
    # fit(log_probs, labels) on arrays: one block through the collector, then fit_stats.
    log_probs, labels, prior = members_with_prior(300, 400, seed=6)
    fitted = LogitBlend().fit(log_probs, labels, prior)
    exact = LogitBlend().fit_exact(log_probs, labels, prior)
    np.testing.assert_allclose(np.append(fitted.weights_, fitted.tau_), np.append(exact.weights_, exact.tau_), atol=1e-3)


def test_few_classes_are_kept_exactly():
    log_probs, labels, prior = members_with_prior(200, EXACT_CLASSES, seed=7)
    stats = collect(log_probs, labels, prior, 64)
    assert np.isneginf(stats.log_s0).all() and stats.union.shape[2] == EXACT_CLASSES
    fitted = LogitBlend().fit_stats(stats, prior)
    exact = LogitBlend().fit_exact(log_probs, labels, prior)
    np.testing.assert_allclose(np.append(fitted.weights_, fitted.tau_), np.append(exact.weights_, exact.tau_), atol=1e-5)


def test_small_blocks_give_the_one_block_statistics():
    log_probs, labels, prior = members_with_prior(2100, 300, seed=8)
    assert pilot_rows(3, 300) == 512  # refits at rows 1024 and 2048, inside blocks of the small pass
    one, small = collect(log_probs, labels, prior, 2100), collect(log_probs, labels, prior, 37)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(small, name), getattr(one, name), rtol=1e-6, atol=1e-9, err_msg=name)
    assert len(np.unique(one.pilot[:, 0])) == 3  # rows got pilots from several refits


def test_subset_is_what_collecting_those_rows_alone_gives():
    log_probs, labels, prior = members_with_prior(400, 300, seed=9)
    pilot = np.array([1.0, 0.5, 0.1, 1.0])
    rows = np.flatnonzero(np.arange(400) % 3 == 0)
    whole = collect(log_probs, labels, prior, 64, pilot=pilot).subset(rows)
    alone = collect(log_probs[:, rows], labels[rows], prior, 50, pilot=pilot)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(whole, name), getattr(alone, name), rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_array_equal(whole.labels, alone.labels)


def test_predictions_fuse_as_the_geometric_pool():
    log_probs, labels, prior = members_with_prior(200, 300, seed=10)
    fitted = LogitBlend().fit(log_probs, labels, prior)
    want = adjust(fuse(log_probs, fitted.weights_, GEOMETRIC), prior.log_prior, fitted.tau_)
    np.testing.assert_allclose(fitted.predict_log_proba(log_probs), want, atol=1e-6)


def test_bad_statistics_are_refused():
    log_probs, labels, prior = members_with_prior(60, 200, seed=11)
    stats = collect(log_probs, labels, None, 60)
    with pytest.raises(ValueError, match="collected with the prior it fits with"):
        LogitBlend().fit_stats(stats, prior)
    with pytest.raises(ValueError, match="collected with another log-prior"):
        LogitBlend().fit_stats(collect(log_probs, labels, prior, 60), long_tailed_prior(200, seed=3))
    with pytest.raises(ValueError, match="fits on LogitStats, got"):
        LogitBlend().fit_stats(object())
    with pytest.raises(ValueError, match="a prior of 200 classes for members of 100 classes"):
        LogitCollector(labels, 100, prior)
    with pytest.raises(ValueError, match="pilot must be 4 values"):
        collect(log_probs, labels, prior, 60, pilot=np.ones(3))
    assert isinstance(stats, LogitStats) and LogitBlend().collector_key(prior) != LogitBlend().collector_key(None)


def test_the_rest_summary_is_the_tilted_cumulants_of_the_classes_not_kept():
    log_probs, labels, prior = members_with_prior(40, 300, seed=14)
    pilot = np.array([0.9, 0.3, 0.2, 1.2])
    stats = collect(log_probs, labels, prior, 40, pilot=pilot)
    shift = prior.log_prior - prior.log_prior.min()
    for n in (0, 17, 39):
        v = np.vstack([np.maximum(log_probs[:, n].astype(np.float64), np.log(np.finfo(np.float32).tiny)), -shift])
        kept = np.zeros(300, dtype=bool)
        for m in range(3):
            kept[np.argsort(-log_probs[m, n])[:22]] = True  # ceil(64 / 3) per member
        kept[labels[n]] = True
        rest = v[:, ~kept]
        score = pilot @ rest
        w = np.exp(score - score.max())
        mean = rest @ w / w.sum()
        c = rest - mean[:, None]
        np.testing.assert_allclose(stats.log_s0[n], score.max() + np.log(w.sum()), rtol=1e-6)
        np.testing.assert_allclose(stats.mean[n], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.cov[n], (c * w) @ c.T / w.sum(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats.skew[n], np.einsum("ic,jc,kc,c->ijk", c, c, c, w) / w.sum(), rtol=1e-3, atol=1e-4)
        union = stats.union[:, n][:, stats.pad[n] == 0]
        assert union.shape[1] == kept.sum()
        np.testing.assert_allclose(np.sort(union[0]), np.sort(v[0, kept] - v[0, labels[n]]), rtol=1e-6, atol=1e-5)
