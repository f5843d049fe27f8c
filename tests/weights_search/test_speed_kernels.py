"""The fusion pass's kernels made faster for issue 24 (iNat 2021: 500,000 rows x 10,000 classes),
with the same results: top_k through group maxima (the old row-wide partition kept as the
reference), mixture_of_logits a few rows at a time (no second (n, C) scratch array), and
ordered_map, which fuses blocks on several threads and gives them back in order."""

from __future__ import annotations

import threading
import time
import types
import tracemalloc

import numpy as np
import pytest

from weights_search.fitted import _log_total, mixture_of_log_probs, mixture_of_logits
from weights_search.functional import _top_k_rows, fuse, log_softmax, top_k
from weights_search.parallel import default_workers, ordered_map


def _reference_top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: a stable sort of each row by descending value (ties: lower index first)."""
    idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return idx, np.exp(np.take_along_axis(x, idx, axis=1)).astype(np.float32)


def _rows(rng, n, classes, kind):
    x = rng.standard_normal((n, classes)).astype(np.float32)
    if kind == "ties":  # few distinct values: many groups share the k-th largest
        x = np.round(x * 2) / 2
    elif kind == "top ties":  # several classes tie for the top in scattered groups
        x[:, rng.integers(0, classes, 40)] = 9.0
    elif kind == "minus inf":  # rows of mostly -inf, one with fewer finite values than k
        x[::3, : classes - 7] = -np.inf
        x[1::3, :] = -np.inf
        x[1::3, 5] = 0.0
    elif kind == "float16":
        x = (x * 4).astype(np.float16).astype(np.float32)
    return x


@pytest.mark.parametrize("classes", [10_000, 1_010, 1_000, 333, 40])
@pytest.mark.parametrize("kind", ["plain", "ties", "top ties", "minus inf", "float16"])
def test_top_k_is_the_stable_sort(classes, kind):
    rng = np.random.default_rng(classes)
    x = _rows(rng, 60, classes, kind)
    for k in (1, 2, 5):
        idx, prob = top_k(x, k)
        want_idx, want_prob = _reference_top_k(x, k)
        assert idx.dtype == np.int64 and prob.dtype == np.float32
        assert np.array_equal(idx, want_idx), (kind, k)
        assert np.array_equal(prob.view(np.uint32), want_prob.view(np.uint32))


def test_top_k_ties_across_groups_take_the_lowest_indices():
    """Every value equal: the k-th largest ties in every group; the first k columns win."""
    x = np.zeros((3, 10_000), dtype=np.float32)
    x[1, 9_999] = 1.0  # one above, then ties
    assert top_k(x, 5)[0].tolist() == [[0, 1, 2, 3, 4], [9_999, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_top_k_never_partitions_or_sorts_whole_rows(monkeypatch):
    """At 10,000 classes top_k must not partition or sort whole rows (about 25 ns a value): it
    partitions the maxima of groups of classes and sorts only the candidates. Its speed is
    benchmarks/blend.py's to measure; this checks the shape of the work instead."""
    import weights_search.functional as functional

    widths = []

    def spy(name):
        real = getattr(np, name)

        def call(a, *args, **kwargs):
            widths.append((name, np.shape(a)[-1]))
            return real(a, *args, **kwargs)
        return call

    spied = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    for name in ("argpartition", "partition", "argsort", "sort"):
        setattr(spied, name, spy(name))
    monkeypatch.setattr(functional, "np", spied)
    x = (np.random.default_rng(0).standard_normal((20, 10_000)) * 3).astype(np.float32)
    found = top_k(x, 5)[0]
    assert found.tolist() == np.argsort(-x, axis=1, kind="stable")[:, :5].tolist()
    assert widths and all(width <= 10_000 // 8 for _, width in widths), widths


def _mixture_whole_block(logits, weights, temperatures=None):
    """mixture_of_logits as it was (whole-block passes), for the byte-for-byte comparison."""
    w = np.asarray(weights, dtype=np.float64)
    used = np.flatnonzero(w > 0)
    w = w[used] / w[used].sum()
    t = None if temperatures is None else np.asarray(temperatures, dtype=np.float32)
    n_rows, n_classes = logits.shape[1:]
    total = np.zeros((n_rows, n_classes), dtype=np.float32)
    scratch = np.empty_like(total)
    log_norm = np.empty((used.size, n_rows, 1), dtype=np.float32)
    for i, m in enumerate(used):
        if t is None:
            scratch[...] = logits[m]
        else:
            np.divide(logits[m], t[m], out=scratch, dtype=np.float32)
        top = scratch.max(axis=1, keepdims=True)
        scratch -= top
        np.exp(scratch, out=scratch)
        sums = scratch.sum(axis=1, keepdims=True)
        scratch *= (w[i] / sums).astype(np.float32)
        total += scratch
        log_norm[i] = top + np.log(sums)

    def member_log_probs(i, rows, cols):
        z = logits[used[i]][rows, cols].astype(np.float32)
        return (z if t is None else z / t[used[i]]) - log_norm[i, rows, 0]

    out = _log_total(total, w, member_log_probs)
    return fuse(log_softmax(logits, temperatures), np.asarray(weights), "mixture") if out is None else out


@pytest.mark.parametrize("classes", [10_000, 1_010, 3])
@pytest.mark.parametrize("case", ["plain", "zero weight", "minus inf", "far", "float16"])
def test_mixture_of_logits_by_rows_is_the_whole_block_result(classes, case):
    rng = np.random.default_rng(classes + len(case))
    x = (rng.standard_normal((3, 70, classes)) * (60 if case == "far" else 3)).astype(np.float32)
    weights = rng.random(3) + 0.1
    if case == "zero weight":
        weights[1] = 0.0
    if case == "minus inf":
        x[:, ::4, : classes // 2] = -np.inf
    if case == "float16":
        x = x.astype(np.float16)
    for temperatures in (None, rng.random(3) + 0.5):
        got = mixture_of_logits(x, weights, temperatures)
        want = _mixture_whole_block(x, weights, temperatures)
        assert got.dtype == want.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (case, temperatures)


def test_mixture_of_logits_holds_one_block_sized_array():
    """The old passes held a total and a scratch array of the block's size (2 x n x C float32);
    a few rows at a time the scratch is small: the peak stays under 1.5 of them."""
    x = (np.random.default_rng(1).standard_normal((4, 300, 10_000)) * 3).astype(np.float32)
    block = 300 * 10_000 * 4
    tracemalloc.start()
    try:
        mixture_of_logits(x, np.ones(4))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * block, peak / block


def test_ordered_map_keeps_the_order_and_uses_the_threads():
    barrier = threading.Barrier(2, timeout=20)
    threads = set()

    def work(item):
        threads.add(threading.get_ident())
        if item < 2:
            barrier.wait()  # the first two items run at once, or this times out
        time.sleep(0.002 * ((7 * item) % 5))  # finish out of order
        return item * item

    assert list(ordered_map(work, range(20), 2)) == [i * i for i in range(20)]
    assert threading.get_ident() not in threads and len(threads) == 2


def test_ordered_map_draws_items_no_further_than_its_bound():
    drawn, done = [], []

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    for result in ordered_map(lambda i: i, items(), 3):
        done.append(result)
        # the items being worked on (3 at most) and the one drawn after this result's turn
        assert len(drawn) - len(done) <= 3
    assert done == list(range(10))


def test_ordered_map_raises_the_first_failure_in_order():
    def work(item):
        if item in (3, 5):
            raise ValueError(f"bad {item}")
        return item

    got = []
    with pytest.raises(ValueError, match="bad 3"):
        for result in ordered_map(work, range(10), 2):
            got.append(result)
    assert got == [0, 1, 2]
    with pytest.raises(ValueError, match="workers must be at least 0"):
        list(ordered_map(work, range(3), -1))
    assert list(ordered_map(lambda i: -i, range(4), 0)) == [0, -1, -2, -3]
    assert default_workers() in (0, 1)


def test_one_worker_fuses_while_the_caller_draws_the_next_item():
    """The pass ``ens blend`` runs: the caller reads block i + 1 while a worker fuses block i
    (each item's work waits to see the next item drawn; it would time out if the caller
    waited for the work before drawing)."""
    caller = threading.get_ident()
    drawn = [threading.Event() for _ in range(5)]
    seen = []

    def items():
        for i in range(4):
            drawn[i].set()
            yield i

    def work(item):
        assert threading.get_ident() != caller
        seen.append(drawn[item + 1].wait(5) if item < 3 else True)
        return item

    assert list(ordered_map(work, items(), 1)) == [0, 1, 2, 3]
    assert seen == [True] * 4


def _mixture_of_log_probs_whole_block(log_probs, weights, rows=None):
    """mixture_of_log_probs as it was (whole-block passes), for the byte-for-byte comparison."""
    w = np.asarray(weights, dtype=np.float64)
    used = np.flatnonzero(w > 0)
    w = w[used] / w[used].sum()
    n_rows = log_probs.shape[1] if rows is None else rows.size
    total = np.zeros((n_rows, log_probs.shape[2]), dtype=np.float32)
    scratch = np.empty_like(total)
    for i, m in enumerate(used):
        if rows is None:
            np.exp(log_probs[m], out=scratch)  # (float16 input: its own exp, then cast)
        else:
            scratch[...] = log_probs[m][rows]
            np.exp(scratch, out=scratch)
        scratch *= np.float32(w[i])
        total += scratch
    picked = (lambda r: r) if rows is None else (lambda r: rows[r])
    out = _log_total(total, w, lambda i, r, c: log_probs[used[i]][picked(r), c])
    if out is None:
        return fuse(log_probs if rows is None else log_probs[:, rows], weights, "mixture")
    return out


@pytest.mark.parametrize("classes", [10_000, 1_010, 3])
@pytest.mark.parametrize("case", ["plain", "zero weight", "minus inf", "far", "float16"])
def test_mixture_of_log_probs_by_rows_is_the_whole_block_result(classes, case):
    rng = np.random.default_rng(classes + 7 * len(case))
    lp = log_softmax((rng.standard_normal((3, 70, classes)) * (60 if case == "far" else 3)).astype(np.float32))
    weights = rng.random(3) + 0.1
    if case == "zero weight":
        weights[1] = 0.0
    if case == "minus inf":
        lp[:, ::4, : classes // 2] = -np.inf
    if case == "float16":
        lp = lp.astype(np.float16)
    for rows in (None, np.sort(rng.choice(70, 41, replace=False))):
        got = mixture_of_log_probs(lp, weights, rows)
        want = _mixture_of_log_probs_whole_block(lp, weights, rows)
        assert got.dtype == want.dtype
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (case, rows is None)


def test_mixture_of_log_probs_holds_one_block_sized_array():
    lp = log_softmax((np.random.default_rng(2).standard_normal((4, 300, 10_000)) * 3).astype(np.float32))
    rows = np.arange(0, 300, 2)
    tracemalloc.start()
    try:
        mixture_of_log_probs(lp, np.ones(4), rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * rows.size * 10_000 * 4, peak / (rows.size * 10_000 * 4)
