"""Temperatures from one pass of per-row statistics (TemperatureCollector) against the exact fit
on the arrays in hand (fit_temperatures, the reference), at 1,010 and 10,000 classes."""

import numpy as np
import pytest

from weights_search.expansion import largest, pilot_rows
from weights_search.temperature import TOP_LOGITS, TemperatureCollector, TemperatureStats, fit_temperatures


def correlated_members(n_rows, n_classes, seed=0, scales=(0.25, 1.0, 3.0), signals=(3.0, 2.0, 1.0)):
    """``(M, N, C)`` float32 logits and ``(N,)`` labels: a true class per row, noise shared by the
    members plus each member's own, members of varied sharpness (fitted T about 3, 1 and 0.6)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_rows)
    shared = rng.normal(size=(n_rows, n_classes)).astype(np.float32)
    out = np.empty((len(scales), n_rows, n_classes), dtype=np.float32)
    for m, (scale, signal) in enumerate(zip(scales, signals)):
        noise = 0.6 * shared + 0.8 * rng.normal(size=(n_rows, n_classes)).astype(np.float32)
        noise[np.arange(n_rows), labels] += signal * (1 + 0.5 * rng.standard_normal(n_rows)).astype(np.float32)
        out[m] = noise * np.float32(2.0 / scale)
    return out, labels


def collect(logits, labels, block_rows, **kwargs):
    collector = TemperatureCollector(labels, logits.shape[0], **kwargs)
    for start in range(0, labels.size, block_rows):
        collector.add(start, logits[:, start:start + block_rows])
    return collector.result()


@pytest.fixture(scope="module", params=[1010, 10000])
def problem(request):
    logits, labels = correlated_members(1000, request.param)
    return logits, labels, fit_temperatures(logits, labels)


def test_temperatures_match_the_exact_fit(problem):
    logits, labels, exact = problem
    assert exact.min() < 0.8 and exact.max() > 2.5  # members of varied sharpness
    stats = collect(logits, labels, 1000)
    np.testing.assert_allclose(stats.fit(), exact, rtol=1e-3)


def test_a_fold_from_the_one_pass_matches_the_exact_fit_of_its_rows(problem):
    logits, labels, _ = problem
    stats = collect(logits, labels, 1000)
    train = np.flatnonzero(np.arange(labels.size) % 5 != 2)
    np.testing.assert_allclose(stats.subset(train).fit(), fit_temperatures(logits[:, train], labels[train]), rtol=1e-3)


def test_halves_that_differ_stay_within_1e_3():
    # Rows in an order where the second half is much sharper (its own temperatures 40 % higher):
    # its rows are expanded about pilots fitted on the first half, far from the fit of all rows.
    logits, labels = correlated_members(2000, 1010, seed=6)
    logits[:, 1000:] *= np.float32(1.4)
    np.testing.assert_allclose(collect(logits, labels, 200).fit(), fit_temperatures(logits, labels), rtol=1e-3)


def test_log_norm_is_the_log_softmax_denominator(problem):
    logits, labels, exact = problem
    stats = collect(logits, labels, 1000)
    # The expansion's error grows as the fourth power of the distance to the pilot (documented):
    # measured 1e-5 at 10 %, 1e-3 at 30 %.
    for factor, atol in ((1.0, 1e-6), (1.1, 1e-4), (1.3, 2e-3)):
        t = exact * factor
        want = np.log(np.exp(logits.astype(np.float64) / t[:, None, None]).sum(axis=2))
        np.testing.assert_allclose(stats.log_norm(t), want, rtol=0, atol=atol)


def test_small_blocks_give_the_one_block_statistics():
    logits, labels = correlated_members(2100, 300, seed=1)
    assert pilot_rows(3, 300) == 512  # refits at rows 1024 and 2048, inside blocks of the small pass
    one, small = collect(logits, labels, 2100), collect(logits, labels, 37)
    for name in ("row_max", "true", "top", "rest_max", "log_s0", "mean", "var", "skew", "beta0"):
        np.testing.assert_allclose(getattr(small, name), getattr(one, name), rtol=1e-6, err_msg=name)
    assert len(np.unique(one.beta0[0])) == 3  # rows got pilots from several refits


def test_subset_is_what_collecting_those_rows_alone_gives():
    logits, labels = correlated_members(400, 300, seed=2)
    pilot = np.array([3.0, 1.0, 0.6])
    rows = np.flatnonzero(np.arange(400) % 3 == 0)
    whole = collect(logits, labels, 64, pilot=pilot).subset(rows)
    alone = collect(logits[:, rows], labels[rows], 50, pilot=pilot)
    for name in ("row_max", "true", "top", "rest_max", "log_s0", "mean", "var", "skew", "beta0"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(alone, name), err_msg=name)


def test_few_classes_are_kept_exactly():
    logits, labels = correlated_members(300, TOP_LOGITS, seed=3)
    stats = collect(logits, labels, 50)
    assert np.isneginf(stats.log_s0).all()  # no rest
    # The same objective (float64 here, float32 there): equal within the search's xatol (1e-4 in log T).
    np.testing.assert_allclose(stats.fit(), fit_temperatures(logits, labels), rtol=2e-4)


def test_bad_input_is_refused():
    logits, labels = correlated_members(20, 50, seed=4)
    collector = TemperatureCollector(labels, 3)
    with pytest.raises(ValueError, match="row order: expected row 0, got 5"):
        collector.add(5, logits[:, 5:10])
    with pytest.raises(ValueError, match=r"shape \(3, rows, classes\)"):
        collector.add(0, logits[:2])
    collector.add(0, logits[:, :10])
    with pytest.raises(ValueError, match="collected 10 rows of 20"):
        collector.result()
    with pytest.raises(ValueError, match="labels must lie in 0..49"):
        TemperatureCollector(labels + 50, 3).add(0, logits)
    with pytest.raises(ValueError, match="bounds"):
        collect(logits, labels, 20).fit(bounds=(2.0, 1.0))
    assert isinstance(collect(logits, labels, 20), TemperatureStats)


@pytest.mark.parametrize("n_classes", [10000, 1010, 777, 40])
@pytest.mark.parametrize("k", [1, 17, 33])
def test_largest_finds_the_k_largest_values_of_each_row(n_classes, k):
    rng = np.random.default_rng(n_classes + k)
    rows = [rng.normal(size=(50, n_classes)), rng.integers(0, 4, (50, n_classes)),  # many ties
            np.tile(np.arange(n_classes), (50, 1))]  # the largest at the end (the last columns)
    for x in rows:
        x = x.astype(np.float32)
        columns = largest(x, k)
        assert columns.shape == (50, k) and all(np.unique(c).size == k for c in columns)
        np.testing.assert_array_equal(np.sort(np.take_along_axis(x, columns, axis=1), axis=1), np.sort(x, axis=1)[:, -k:])
