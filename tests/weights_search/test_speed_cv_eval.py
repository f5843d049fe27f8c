"""The CV evaluation pass of `ens blend` (issue 24): blocks scored on both worker threads (each
row's scores land in its own places, so the order does not matter), and each member value of a
fold's rows exponentiated once for all the fold's mixtures (uniform, the method, their
prior-corrected variants), the prior correction made in place after; the same values bit for bit.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from weights_search import cv as ws_cv
from weights_search import fitted as ws_fitted
from weights_search.cv import _predict, _predict_all, cross_validate, cross_validate_and_fit
from weights_search.fitted import mixture_of_log_probs, mixtures_of_log_probs
from weights_search.functional import log_softmax
from weights_search.prior import LogitAdjustment, adjust, class_log_prior
from weights_search.registry import get_method

M, N, C = 3, 240, 50


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % C
    logits = rng.normal(size=(M, N, C)).astype(np.float32) * 3
    logits[:, np.arange(N), labels] += np.array([3.0, 2.0, 1.0], dtype=np.float32)[:, None]
    return logits, labels


class _CountingNumpy:
    """numpy, its ``exp`` counting the values it exponentiates."""

    def __init__(self) -> None:
        self.values = 0

    def __getattr__(self, name):
        return getattr(np, name)

    def exp(self, x, *args, **kwargs):
        self.values += np.size(x)
        return np.exp(x, *args, **kwargs)


@pytest.mark.parametrize("rows", [None, np.array([1, 4, 5, 9, 30, 31, 100])])
def test_mixtures_share_one_exponential_per_member_value_and_match_one_by_one(rows, monkeypatch):
    """The same values as mixture_of_log_probs of each weight vector, bit for bit (members with
    zero weight, values below float32's normal range recomputed), with one exponential of each
    used member's values for all mixtures (seen red with one exponential per mixture)."""
    logits, _ = _data()
    log_probs = log_softmax(logits, None)
    log_probs[1, 5, :10] = -200.0  # below float32's normal range: recomputed exactly
    weights = [np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.0, 0.2]), np.array([0.0, 3.0, 1.0]), np.ones(3)]
    expected = [mixture_of_log_probs(log_probs, w, rows) for w in weights]
    counting = _CountingNumpy()
    monkeypatch.setattr(ws_fitted, "np", counting)
    got = mixtures_of_log_probs(log_probs, weights, rows)
    monkeypatch.undo()
    n = N if rows is None else rows.size
    assert counting.values == M * n * C
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype == np.float32
        assert e.tobytes() == g.tobytes()


def test_predict_all_matches_each_blend_with_its_prior_applied_apart():
    """_predict_all's values are each blend's own (the prior correction in place equals
    prior.adjust of a copy, bit for bit)."""
    logits, labels = _data(1)
    log_probs = log_softmax(logits, None)
    log_prior = class_log_prior(np.arange(1, C + 1))
    blends = []
    for name, prior in (("uniform", None), ("nll", None), ("uniform", 1.3), ("nll", 0.7)):
        b = get_method(name).fit(log_probs, labels)
        if prior is not None:
            b = get_method(name).fit(log_probs, labels, prior=LogitAdjustment(log_prior, prior)) \
                if name == "nll" else b
        blends.append(b)
    rows = np.arange(0, N, 3)
    got = _predict_all(blends, log_probs, rows)
    for b, g in zip(blends, got):
        fused = mixture_of_log_probs(log_probs, b.weights_, rows)
        want = fused if b.tau_ is None else adjust(fused.copy(), b.log_prior_, b.tau_)
        assert want.tobytes() == g.tobytes()
        assert _predict(b, log_probs, rows).tobytes() == g.tobytes()


def _report(monkeypatch, workers: int, prior: bool, temperature: bool = False):
    logits, labels = _data(2)
    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", workers)
    adjustment = LogitAdjustment(class_log_prior(np.arange(1, C + 1)), None) if prior else None
    return cross_validate(logits, labels, "nll", n_folds=3, prior=adjustment, block_rows=37, temperature=temperature,
                          n_boot=50)


@pytest.mark.parametrize("prior,temperature", [(False, False), (True, False), (True, True)])
def test_cv_report_is_the_same_on_any_number_of_threads(monkeypatch, prior, temperature):
    """Blocks scored two at a time, in any order, give the report of one thread, every figure
    equal (seen red with a block's rows taken from the block last started: a race)."""
    one = _report(monkeypatch, 0, prior, temperature)
    two = _report(monkeypatch, 2, prior, temperature)
    assert one == two


@pytest.mark.parametrize("prior", [False, True])
def test_fit_with_temperatures_is_the_same_on_any_number_of_threads(monkeypatch, prior):
    """With temperatures the evaluation pass also feeds the final fit's collectors, in row order:
    the report and the fitted blend of one thread."""
    logits, labels = _data(3)
    adjustment = LogitAdjustment(class_log_prior(np.arange(1, C + 1)), None) if prior else None
    got = []
    for workers in (0, 2):
        monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", workers)
        got.append(cross_validate_and_fit(logits, labels, "nll", n_folds=3, temperature=True, prior=adjustment,
                                          block_rows=37, n_boot=50))
    assert got[0] == got[1]


def test_evaluation_blocks_are_scored_two_at_a_time(monkeypatch):
    """The first block's scoring waits for another block's to start: it does on the pass's
    second worker (seen red with the scoring in the in-order step, one block at a time)."""
    started: list[int] = []
    overlapped: list[bool] = []
    other = threading.Event()
    first_thread: list[int] = []
    original = ws_cv._predict_all

    def spy(blenders, log_probs, local):
        ident = threading.get_ident()
        if not first_thread:
            first_thread.append(ident)
            overlapped.append(other.wait(5))
        elif ident != first_thread[0]:
            other.set()
        started.append(ident)
        return original(blenders, log_probs, local)

    monkeypatch.setattr(ws_cv, "_predict_all", spy)
    _report(monkeypatch, 2, prior=False)
    assert overlapped == [True]
    assert threading.get_ident() not in started
