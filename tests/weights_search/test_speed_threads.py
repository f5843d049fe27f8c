"""The passes of `ens blend` on both cores (issue 24: at iNat 2021's shape they were CPU-bound,
and the reading thread also converted every block from float16, so a cold read waited on the
conversion and the conversion on the read): the reading thread reads the stores as stored
(Members.read_raw), worker threads convert the blocks (Members.convert) and work on them; work
that must see the blocks in order (a collector) still does (ordered_map's ``prepare``). The
kernels of the passes work a few rows at a time in cache, with the same values bit for bit.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.members import Members
from ensemble.formats.store import read_store
from tests.ensemble.blend.test_blend_memory import _random_stores, _write_store
from weights_search import fitted as ws_fitted
from weights_search.fitted import Reader, log_softmax_into
from weights_search.functional import _normalise, log_softmax
from weights_search.parallel import ordered_map

ROWS, CLASSES = 600, 1_000


# ------------------------------------------------------------------------ ordered_map(prepare=)

def test_prepare_runs_beside_and_func_runs_in_order_one_at_a_time():
    """Two items are prepared at once (each prepare waits to see the other start), while func
    sees the items in order and never two at once (seen red with func called as soon as its
    item is prepared)."""
    started = [threading.Event() for _ in range(6)]
    inside, calls, overlap = [0], [], []
    lock = threading.Lock()

    def prepare(i):
        started[i].set()
        partner = i + 1 if i % 2 == 0 else i - 1
        overlap.append(started[partner].wait(5))
        if i == 0:
            time.sleep(0.05)  # item 1 is ready first: its func must wait for item 0's
        return i * 10

    def func(x):
        with lock:
            inside[0] += 1
            assert inside[0] == 1
        calls.append(x)
        time.sleep(0.01)
        with lock:
            inside[0] -= 1
        return x + 1

    got = list(ordered_map(func, range(6), 2, prepare=prepare))
    assert got == [1, 11, 21, 31, 41, 51]
    assert calls == [0, 10, 20, 30, 40, 50]
    assert all(overlap)


def test_prepare_on_the_calling_thread_without_workers():
    assert list(ordered_map(lambda x: x + 1, range(4), 0, prepare=lambda i: i * 2)) == [1, 3, 5, 7]


def test_a_failed_prepare_is_raised_in_order_and_no_later_func_runs():
    calls = []

    def prepare(i):
        if i == 2:
            raise ValueError("item 2 broke")
        return i

    with pytest.raises(ValueError, match="item 2 broke"):
        for x in ordered_map(lambda x: calls.append(x) or x, range(8), 2, prepare=prepare):
            pass
    assert calls == [0, 1]


# ------------------------------------------------------------------------ Members.read_raw / convert

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out, logits = _random_stores(tmp_path_factory.mktemp("threads"), ("a", "b", "c"), ROWS, CLASSES, seed=1, scale=4)
    return out, np.stack(logits)


def test_a_block_converted_on_another_thread_is_the_block(stores):
    found, logits = stores
    members = Members(["a", "b", "c"], found, views=False)
    raw = members.read_raw(100, 350)
    assert raw.out is None and all(s.dtype == np.float16 for s in raw.stored)  # only the stored rows, yet
    result = []
    thread = threading.Thread(target=lambda: result.append(members.convert(raw)))
    thread.start()
    thread.join()
    assert result[0].dtype == np.float32 and np.array_equal(result[0], logits[:, 100:350])
    assert np.array_equal(members.block(100, 350), logits[:, 100:350])


def test_the_reading_thread_only_reads(stores, monkeypatch):
    """A Reader pass over Members converts on its workers, and works on the blocks in order
    (seen red with the conversion left on the reading thread)."""
    found, logits = stores
    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", 2)
    members = Members(["a", "b", "c"], found, views=False)
    converting, starts, got = set(), [], []
    real = Members.convert

    def spy(self, raw):
        converting.add(threading.get_ident())
        return real(self, raw)

    monkeypatch.setattr(Members, "convert", spy)
    Reader(members, 70).each_block(lambda start, block: (starts.append(start), got.append(block.copy())))
    assert starts == list(range(0, ROWS, 70))
    assert np.array_equal(np.concatenate(got, axis=1), logits)
    assert converting and threading.get_ident() not in converting


@pytest.mark.parametrize("bad_rows", [[5], [3, 400, 590], [260, 261, 262, 599]])
def test_nan_or_infinity_names_the_first_ids_of_the_member(tmp_path, bad_rows):
    """The pieces converted and checked in cache name the same first ids as a check of the whole
    member (rows in different pieces: 262 rows a piece at 1,000 classes)."""
    rng = np.random.default_rng(2)
    ids = np.arange(10_000, 10_000 + ROWS)
    good = rng.normal(size=(ROWS, CLASSES)).astype(np.float32)
    bad = good.copy()
    for n, row in enumerate(bad_rows):
        bad[row, 7 * n] = np.nan  # (the store writer clips infinities to float16's largest values)
    _write_store(tmp_path / "good", "val", good, ids)
    _write_store(tmp_path / "bad", "val", bad, ids)
    members = Members(["good", "bad"], [read_store(tmp_path / "good"), read_store(tmp_path / "bad")], views=False)
    shown = ", ".join(str(10_000 + r) for r in bad_rows[:3])
    with pytest.raises(EnsError, match=f"bad has NaN or infinite logits, first at image ids? {shown}$"):
        members.block(0, ROWS)


# ------------------------------------------------------------------------ kernels in cache

def _whole_normalise(scores):
    top = scores.max(axis=-1, keepdims=True)
    shifted = scores - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _whole_log_softmax(logits, temperatures):
    out = np.array(logits, dtype=np.float32)
    if temperatures is not None:
        out /= np.asarray(temperatures, dtype=np.float32)[:, None, None]
    for x in out:
        x -= x.max(axis=-1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def test_normalise_in_cache_is_the_whole_array_s_bit_for_bit():
    rng = np.random.default_rng(3)
    scores = (rng.normal(size=(700, 3_000)) * 6).astype(np.float32)
    scores[4, :40] = -np.inf
    expected = _whole_normalise(scores)
    got = _normalise(scores.copy())
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("temperatures", [None, [0.7, 1.9]])
def test_log_softmax_into_in_cache_is_the_whole_member_s_bit_for_bit(temperatures):
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(2, 500, 3_000)) * 5).astype(np.float32)
    logits[1, 9, :100] = -np.inf
    t = None if temperatures is None else np.array(temperatures)
    expected = _whole_log_softmax(logits, t)
    got = log_softmax_into(logits.copy(), t)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(log_softmax(logits, t).view(np.uint32), expected.view(np.uint32))


# ------------------------------------------------------------------------ a stats pass's prepare

def test_the_prior_bins_are_summed_on_the_workers_with_the_same_values(monkeypatch):
    """collect_stats prepares each block's log-softmax and mass per prior bin on the workers,
    blocks in any order, and adds them in row order: the statistics of a plain loop, bit for bit
    (seen red with add ignoring the prepared sums: none were used)."""
    from weights_search import get_method
    from weights_search.prior import LogitAdjustment
    from weights_search.source import ArraySource
    from weights_search.stats import MixtureCollector

    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", 2)
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(3, 900, 400)) * 3).astype(np.float32)
    labels = rng.integers(0, 400, 900)
    counts = rng.integers(1, 60, 400)
    prior = LogitAdjustment(np.log(counts / counts.sum()), None)
    blender = get_method("nll")
    preparing, used = set(), []
    real_prepare, real_add = MixtureCollector.prepare, MixtureCollector.add

    def spy_prepare(self, start, log_probs):
        preparing.add(threading.get_ident())
        return real_prepare(self, start, log_probs)

    def spy_add(self, start, log_probs, prepared=None):
        used.append(prepared is not None)
        return real_add(self, start, log_probs, prepared)

    monkeypatch.setattr(MixtureCollector, "prepare", spy_prepare)
    monkeypatch.setattr(MixtureCollector, "add", spy_add)
    key = blender.collector_key(prior)
    got = ws_fitted.collect_stats(Reader(ArraySource(logits), 100), labels, [(blender, prior)], None)[key]
    assert used and all(used) and threading.get_ident() not in preparing
    plain = blender.collector(labels, 400, prior)
    plain.add(0, log_softmax(logits))
    expected = plain.result()
    assert np.array_equal(got.true_lp, expected.true_lp)
    assert np.array_equal(got.bin_probs, expected.bin_probs)


def test_each_read_asks_the_kernel_for_the_next_block_s_rows(stores, monkeypatch):
    """A cold store is read from the disk ahead of the reading thread (POSIX_FADV_WILLNEED of
    the next block's bytes of every member; seen red without the hint)."""
    import os

    from ensemble.formats import members as members_module

    found, _ = stores
    members = Members(["a", "b", "c"], found, views=False)
    asked = []
    monkeypatch.setattr(members_module.os, "posix_fadvise",
                        lambda fd, offset, length, advice: asked.append((fd, offset, length, advice)))
    members.read_raw(100, 300)
    row = CLASSES * 2
    assert sorted(asked) == sorted((members.fd(m), m.offset + 300 * row, 200 * row, os.POSIX_FADV_WILLNEED)
                                   for m in members.members)
    asked.clear()
    members.read_raw(500, ROWS)  # the last block: nothing after it
    assert asked == []


def test_the_prior_adjusts_a_fused_block_in_its_place_bit_for_bit():
    """FittedBlend.log_proba corrects its own fused block for the prior in place (no (n, C)
    temporary), with adjust's values bit for bit (seen red with the shift in float64)."""
    from weights_search.fitted import FittedBlend, adjust_own, mixture_of_logits
    from weights_search.prior import adjust

    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(3, 300, 2_000)) * 4).astype(np.float32)
    log_prior = np.log(rng.dirichlet(np.ones(2_000)))
    fused = mixture_of_logits(logits, np.array([0.5, 0.3, 0.2]))
    expected = adjust(fused, log_prior, 1.3)
    assert np.array_equal(adjust_own(fused.copy(), log_prior, 1.3).view(np.uint32), expected.view(np.uint32))
    blend = FittedBlend("nll", "mixture", (0.5, 0.3, 0.2), log_prior=tuple(log_prior), tau=1.3)
    assert np.array_equal(blend.log_proba(logits).view(np.uint32), expected.view(np.uint32))
    assert adjust_own(fused.copy(), log_prior, 0.0) is not None


def test_a_thread_fuses_into_its_last_fused_array_once_nothing_holds_it():
    """mixture_of_logits writes block after block into one array per thread (no fresh pages per
    block; seen red with a new array each call), never into one still held."""
    import weakref

    from weights_search.fitted import mixture_of_logits

    rng = np.random.default_rng(7)
    blocks = [(rng.normal(size=(2, 80, 500)) * 3).astype(np.float32) for _ in range(3)]
    w = np.array([0.6, 0.4])
    expected = [mixture_of_logits(b, w).copy() for b in blocks]
    first = mixture_of_logits(blocks[0], w)
    kept = weakref.ref(first)
    del first
    second = mixture_of_logits(blocks[1], w)
    assert second is kept()  # the first one's array, nothing holding it
    third = mixture_of_logits(blocks[2], w)  # the second is held: a new one
    assert third is not second and not np.shares_memory(third, second)
    assert np.array_equal(second, expected[1]) and np.array_equal(third, expected[2])
