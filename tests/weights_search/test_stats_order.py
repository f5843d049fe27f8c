"""Streamed temperatures and logit weights whatever the row order (issue 24 review).

The collectors expand each row's rest about a pilot fitted on earlier rows; rows sorted by class,
with the members' sharpness rising across class ids, make those pilots far from the fit of all
rows. The re-pass (one more read, with the fit as every row's pilot) must bring the fits within
1e-3 of the exact ones, and only in that case: rows in random order are read as before.
"""

import numpy as np
import pytest

import weights_search.pooling as pooling
from weights_search import cv
from weights_search.expansion import largest
from weights_search.fitted import Reader, fit_blend
from weights_search.functional import log_softmax
from weights_search.pooling import LogitBlend, LogitCollector
from weights_search.source import ArraySource
from weights_search.temperature import TemperatureCollector, fit_temperatures


class CountingSource(ArraySource):
    """An array source that counts its passes (reads of row 0)."""

    def __init__(self, arrays):
        super().__init__(arrays)
        self.reads = 0

    def block(self, start, stop):
        self.reads += start == 0
        return super().block(start, stop)


def sorted_by_class(n_rows, n_classes, n_members=3, low=0.5, high=2.0, order="sorted", seed=0):
    """Rows sorted by class id, each member sharper on later classes (``low`` to ``high``), or
    the same rows in random order."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, n_classes, n_rows))
    shared = rng.normal(size=(n_rows, n_classes)).astype(np.float32)
    sharp = (low + (high - low) * labels / n_classes).astype(np.float32)
    logits = np.empty((n_members, n_rows, n_classes), np.float32)
    for m in range(n_members):
        x = 0.6 * shared + 0.8 * rng.normal(size=(n_rows, n_classes)).astype(np.float32)
        x[np.arange(n_rows), labels] += 2.5 * (1 + 0.5 * rng.standard_normal(n_rows)).astype(np.float32)
        logits[m] = x * sharp[:, None] * np.float32(1 + 0.3 * m)
    if order == "random":
        p = rng.permutation(n_rows)
        logits, labels = logits[:, p], labels[p]
    return logits, labels


SHAPES = [pytest.param((3000, 1010), id="1010-classes"), pytest.param((1500, 10000), id="10000-classes")]


@pytest.mark.slow  # over 5 s on the 2-core machine
@pytest.mark.parametrize("shape", SHAPES)
def test_temperatures_of_rows_sorted_by_class_match_the_exact_fit(shape):
    logits, labels = sorted_by_class(*shape)
    source = CountingSource(logits)
    blend = fit_blend(source, labels, "uniform", temperature=True, block_rows=128)
    exact = fit_temperatures(logits, labels)
    assert np.abs(blend.temperatures / exact - 1).max() < 1e-3
    # The temperatures' pass, its re-pass, the stats pass.
    assert source.reads == 3
    # A fold's (through the same orchestration as CV).
    from weights_search.fitted import fitted_temperatures
    train = np.flatnonzero(np.arange(labels.size) % 5 != 2)
    _, _, (fold,) = fitted_temperatures(Reader(ArraySource(logits), 128), labels, [train])
    assert np.abs(fold / fit_temperatures(logits[:, train], labels[train]) - 1).max() < 1e-3


@pytest.mark.slow  # over 5 s on the 2-core machine
@pytest.mark.parametrize("shape", SHAPES)
def test_logit_weights_of_rows_sorted_by_class_match_the_exact_fit(shape):
    logits, labels = sorted_by_class(*shape)
    log_probs = log_softmax(logits)
    source = CountingSource(log_probs)
    blend = fit_blend(source, labels, "logit", block_rows=128)
    exact = LogitBlend().fit_exact(log_probs, labels)
    assert np.abs(np.asarray(blend.weights) - exact.weights_).max() < 1e-3
    assert source.reads == 2  # the stats pass and its re-pass


def test_the_check_on_spread_rows_still_asks_for_the_re_pass(monkeypatch):
    monkeypatch.setattr(pooling, "CHECK_ROWS", 500)  # 3,000 rows: the check sees 500 of them
    logits, labels = sorted_by_class(3000, 1010)
    log_probs = log_softmax(logits)
    source = CountingSource(log_probs)
    blend = fit_blend(source, labels, "logit", block_rows=128)
    assert source.reads == 2
    assert np.abs(np.asarray(blend.weights) - LogitBlend().fit_exact(log_probs, labels).weights_).max() < 1e-3


def test_cv_folds_and_final_logit_fit_of_rows_sorted_by_class_match_the_exact_fits():
    logits, labels = sorted_by_class(3000, 1010)
    log_probs = log_softmax(logits)
    source = CountingSource(log_probs)
    report, blend = cv.cross_validate_and_fit(source, labels, "logit", n_folds=5, n_boot=10, block_rows=256)
    assert np.abs(np.asarray(blend.weights) - LogitBlend().fit_exact(log_probs, labels).weights_).max() < 1e-3
    assert source.reads == 3  # stats pass, its re-pass, evaluation pass
    # The folds' fits, through the same orchestration.
    fold_of = cv._fold_of(cv.stratified_folds(labels, 5, 0), labels.size)
    specs = [cv._Spec("logit", "method", "logit", LogitBlend, None)]
    fold_blends, _, _ = cv._fit_and_evaluate(ArraySource(log_probs), labels, fold_of, specs, temperature=False,
                                             block_rows=256, score=lambda *args: None)
    for f in (0, 3):
        train = np.flatnonzero(fold_of != f)
        exact = LogitBlend().fit_exact(log_probs[:, train], labels[train])
        assert np.abs(fold_blends[f][0].weights_ - exact.weights_).max() < 1e-3


def test_rows_in_random_order_are_read_once_per_pass():
    logits, labels = sorted_by_class(3000, 1010, order="random")
    log_probs = log_softmax(logits)
    source = CountingSource(log_probs)
    blend = fit_blend(source, labels, "logit", block_rows=128)
    assert source.reads == 1
    assert np.abs(np.asarray(blend.weights) - LogitBlend().fit_exact(log_probs, labels).weights_).max() < 1e-3
    source = CountingSource(logits)
    fit_blend(source, labels, "uniform", temperature=True, block_rows=128)
    assert source.reads == 2
    source = CountingSource(log_probs)
    cv.cross_validate_and_fit(source, labels, "logit", n_folds=5, n_boot=10, block_rows=256)
    assert source.reads == 2


@pytest.mark.parametrize("order", ["sorted", "random"])
def test_second_order_statistics_keep_the_error_claim(monkeypatch, order):
    # Without room for the third cumulants (at 100,000 rows and 8 members and a prior, say) the
    # expansion stops at the second order; the fits still hold 1e-3.
    monkeypatch.setattr(pooling, "THIRD_ORDER_BYTES", 0)
    logits, labels = sorted_by_class(3000, 1010, order=order)
    log_probs = log_softmax(logits)
    collector = LogitCollector(labels, 1010)
    collector.add(0, log_probs[:, :64])
    assert collector._stats_.skew is None  # the fallback is what is tested
    blend = fit_blend(log_probs, labels, "logit", block_rows=128)
    exact = LogitBlend().fit_exact(log_probs, labels)
    assert np.abs(np.asarray(blend.weights) - exact.weights_).max() < 1e-3


def test_minus_infinite_logits_give_finite_statistics_and_the_exact_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 300, 200)).astype(np.float32) * 3
    labels = rng.integers(0, 20, 300)
    logits[0, :, 20:] = -np.inf  # the member rules out most classes: the rest's largest is -inf
    collector = TemperatureCollector(labels, 1)
    collector.add(0, logits)
    stats = collector.result()
    for name in ("log_s0", "mean", "var", "skew"):
        assert not np.isnan(getattr(stats, name)).any(), name
    assert abs(stats.fit()[0] / fit_temperatures(logits, labels)[0] - 1) < 1e-3


def test_rows_whose_every_class_is_kept_have_an_empty_rest():
    # More members than UNION_CLASSES: each keeps its largest class; with each member's largest a
    # different class, every class is kept and the rest is empty.
    n_classes = n_members = pooling.EXACT_CLASSES + 1
    rng = np.random.default_rng(1)
    labels = rng.integers(0, n_classes, 40)
    logits = rng.normal(size=(n_members, 40, n_classes)).astype(np.float32)
    logits[np.arange(n_members), :, np.arange(n_members)] += 8
    logits[:, np.arange(40), labels] += 2
    log_probs = log_softmax(logits)
    collector = LogitCollector(labels, n_classes, pilot=np.full(n_members, 0.01))
    collector.add(0, log_probs)
    stats = collector.result()
    assert np.isneginf(stats.log_s0).all()
    assert not np.isnan(stats.mean).any() and not np.isnan(stats.cov).any()
    x = np.full(n_members, 0.02)
    nll, grad = stats.nll_and_grad(x)
    exact = pooling.pooled_nll_and_grad(x, pooling.relative_log_probs(log_probs, labels))
    assert abs(nll - exact[0]) < 1e-5 and np.abs(grad - exact[1]).max() < 1e-5


def test_largest_finds_the_k_largest_with_grouped_columns():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 1013)).astype(np.float32)
    # Make the largest values share a stride-n_groups group: columns j, j + 63, j + 126, ...
    x[:, [5, 5 + 63, 5 + 126, 5 + 189]] += 10
    got = np.sort(x[np.arange(50)[:, None], largest(x, 8)], axis=1)
    assert np.array_equal(got, np.sort(x, axis=1)[:, -8:])


@pytest.mark.slow  # over 5 s on the 2-core machine
def test_cv_with_temperatures_of_rows_sorted_by_class_matches_the_exact_fits():
    logits, labels = sorted_by_class(3000, 1010)
    source = CountingSource(logits)
    _, blend = cv.cross_validate_and_fit(source, labels, "logit", temperature=True, n_folds=5, n_boot=10,
                                         block_rows=256)
    temperatures = fit_temperatures(logits, labels)
    assert np.abs(np.asarray(blend.temperatures) / temperatures - 1).max() < 1e-3
    exact = LogitBlend().fit_exact(log_softmax(logits, temperatures), labels)
    assert np.abs(np.asarray(blend.weights) - exact.weights_).max() < 1e-3
    # Temperatures and their re-pass, the first fold's stats pass and its re-pass (the later
    # folds' and the final fit's start from its pilot), four more folds, the scoring pass.
    assert source.reads == 9
    fold_of = cv._fold_of(cv.stratified_folds(labels, 5, 0), labels.size)
    specs = [cv._Spec("logit", "method", "logit", LogitBlend, None)]
    fold_blends, _, _ = cv._fit_and_evaluate(ArraySource(logits), labels, fold_of, specs, temperature=True,
                                             block_rows=256, score=lambda *args: None)
    for f in (0, 4):
        train = np.flatnonzero(fold_of != f)
        fold_temperatures = fit_temperatures(logits[:, train], labels[train])
        exact = LogitBlend().fit_exact(log_softmax(logits[:, train], fold_temperatures), labels[train])
        assert np.abs(fold_blends[f][0].weights_ - exact.weights_).max() < 1e-3


def test_a_final_fit_far_from_its_pilots_is_collected_again(monkeypatch):
    # Should the folds' fits pass the check and the final fit not, the final fit alone re-reads.
    real = cv.far_from_pilots
    monkeypatch.setattr(cv, "far_from_pilots", lambda stats, blender, prior, rows=None:
                        None if rows is not None else real(stats, blender, prior))
    logits, labels = sorted_by_class(3000, 1010)
    log_probs = log_softmax(logits)
    source = CountingSource(log_probs)
    _, blend = cv.cross_validate_and_fit(source, labels, "logit", n_folds=5, n_boot=10, block_rows=256)
    assert source.reads == 3  # stats pass, evaluation pass, the final fit's re-pass
    assert np.abs(np.asarray(blend.weights) - LogitBlend().fit_exact(log_probs, labels).weights_).max() < 1e-3
