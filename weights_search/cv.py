"""Honest estimates: stratified folds, out-of-fold blended predictions and the CV report.

Every fitted quantity (temperatures when asked for, then the weights, and ``tau`` of a prior
correction) is fitted on K-1 folds and only used to predict the held-out fold, so no fold's rows
reach its own predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from weights_search.base import Blender
from weights_search.functional import check_members, log_softmax
from weights_search.metrics import bootstrap_ci, correct_at_k
from weights_search.prior import LogitAdjustment
from weights_search.registry import DEFAULT_METHOD, get_method
from weights_search.temperature import fit_temperatures


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Split rows ``0..N-1`` into ``k`` folds; returns ``k`` sorted arrays of held-out row indices.

    Rows are shuffled, grouped by class (classes in random order) and dealt to folds in turn.
    A class with at least ``k`` rows is spread over every fold as evenly as it allows; a class
    with fewer rows lands in as many different folds as it has rows. Fold sizes differ by at
    most one. Deterministic for a given ``seed``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a (n_samples,) array, got shape {labels.shape}")
    if not 2 <= k <= labels.size:
        raise ValueError(f"the number of folds must lie in 2..{labels.size} (the number of rows), got {k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.size)
    classes, class_index = np.unique(labels, return_inverse=True)
    class_rank = rng.permutation(classes.size)
    grouped = order[np.argsort(class_rank[class_index[order]], kind="stable")]
    fold_of = np.empty(labels.size, dtype=np.int64)
    fold_of[grouped] = np.arange(labels.size) % k
    return tuple(np.flatnonzero(fold_of == f) for f in range(k))


def cross_val_log_probs(logits: np.ndarray, labels: np.ndarray, make_method: Callable[[], Blender],
                        folds: Sequence[np.ndarray], *, temperature: bool = False,
                        prior: LogitAdjustment | None = None) -> np.ndarray:
    """Out-of-fold blended log-probabilities ``(N, C)`` float32.

    ``logits``: ``(M, N, C)`` member logits; ``labels``: ``(N,)``; ``make_method``: returns a new
    unfitted method (e.g. ``lambda: get_method("nll")``); ``folds``: held-out row indices that
    partition ``0..N-1`` (e.g. from :func:`stratified_folds`). For each fold, temperatures (when
    ``temperature``), weights (and ``tau`` of ``prior``, when it leaves it to fit) are fitted on
    the other folds and the fold is predicted.
    """
    logits, labels = check_members(logits, labels)
    out = np.empty(logits.shape[1:], dtype=np.float32)
    for train, test, log_probs in _fold_log_probs(logits, labels, folds, temperature):
        method = make_method().fit(log_probs[:, train], labels[train], prior)
        out[test] = method.predict_log_proba(log_probs[:, test])
    return out


@dataclass(frozen=True)
class CvRow:
    """Cross-validated scores of one blend: a single member, uniform weights or the fitted method,
    the last two also with the prior correction."""

    name: str  #: the member's name, "uniform", or the method's name; "+prior" appended with the prior
    kind: str  #: "member", "uniform" or "method"
    top1: float
    top1_low: float  #: bootstrap interval for top1
    top1_high: float
    topk: float  #: top-k accuracy, k being the report's top_k
    nll: float
    prior: bool = False  #: corrected for the prior, ``tau`` fitted (or given) in each fold


#: What a row's name gains when the blend is corrected for the prior.
PRIOR_SUFFIX = "+prior"


@dataclass(frozen=True)
class CvReport:
    """The honest-estimate table: one :class:`CvRow` per member, then uniform, then the method;
    with a prior (``prior``), uniform and the method each twice, without and with the correction.

    ``fold_taus``: with a prior, the ``tau`` the method's corrected blend used in each fold.
    """

    method: str
    top_k: int
    n_folds: int
    temperature: bool
    rows: tuple[CvRow, ...]
    prior: bool = False
    fold_taus: tuple[float, ...] = ()

    def row(self, kind: str, prior: bool = False) -> CvRow | None:
        """The row of ``kind`` ("uniform" or "method"), with or without the prior; None if absent."""
        return next((r for r in self.rows if r.kind == kind and r.prior == prior), None)

    @property
    def uniform_row(self) -> CvRow:
        """Uniform weights, corrected for the prior when the report has one."""
        return self.row("uniform", self.prior)

    @property
    def method_row(self) -> CvRow:
        """The fitted method's row (the uniform row when the method is uniform), corrected for the
        prior when the report has one."""
        return self.row("method", self.prior) or self.uniform_row

    @property
    def beats_uniform(self) -> bool:
        """Whether the method's CV top-1 is higher than uniform's (on equal top-1: lower NLL);
        with a prior, both corrected."""
        method, uniform = self.method_row, self.uniform_row
        return (method.top1, -method.nll) > (uniform.top1, -uniform.nll)


def cross_validate(logits: np.ndarray, labels: np.ndarray, method: str = DEFAULT_METHOD,
                   params: Mapping[str, Any] | None = None, *, n_folds: int = 5, temperature: bool = False,
                   member_names: Sequence[str] | None = None, top_k: int = 5, n_boot: int = 1000,
                   seed: int = 0, prior: LogitAdjustment | None = None) -> CvReport:
    """Score every single member, uniform weights and ``method`` by ``n_folds``-fold CV.

    ``logits``: ``(M, N, C)``; ``labels``: ``(N,)``. Folds come from :func:`stratified_folds`
    with ``seed``; with ``temperature``, each fold fits its own temperatures (single members
    too). With ``prior``, uniform and ``method`` are also scored corrected for it (rows named
    ``uniform+prior``, ``<method>+prior``), ``tau`` fitted in each fold like the weights (unless
    ``prior`` gives it). Each row reports out-of-fold top-1 with a ``n_boot``-resample 95%
    bootstrap interval, top-``top_k`` accuracy and mean NLL. ``member_names`` default to
    ``"member 0"``, ...
    """
    logits, labels = check_members(logits, labels)
    n_members = logits.shape[0]
    names = list(member_names) if member_names is not None else [f"member {m}" for m in range(n_members)]
    if len(names) != n_members:
        raise ValueError(f"{len(names)} member names for {n_members} members")
    params = dict(params or {})
    get_method(method, **params)  # a bad name or parameter fails before any fitting
    if prior is not None:
        prior.check(logits.shape[2])
    fold_taus: list[float] = []
    blends: list[tuple[str, str, bool, _Predict]] = [
        (name, "member", False, _single(m)) for m, name in enumerate(names)]
    fitted = [("uniform", "uniform", lambda: get_method("uniform"))]
    if method != "uniform":
        fitted.append((method, "method", lambda: get_method(method, **params)))
    for name, kind, make in fitted:
        blends.append((name, kind, False, _fitted(make)))
        if prior is not None:
            taus = fold_taus if kind == "method" or method == "uniform" else None
            blends.append((name + PRIOR_SUFFIX, kind, True, _fitted(make, prior, taus)))
    hits = np.zeros((len(blends), 2, labels.size), dtype=bool)
    nll = np.zeros((len(blends), labels.size))
    folds = stratified_folds(labels, n_folds, seed)
    for train, test, log_probs in _fold_log_probs(logits, labels, folds, temperature):
        train_lp, test_lp = log_probs[:, train], log_probs[:, test]
        for b, (_, _, _, predict) in enumerate(blends):
            held_out = predict(train_lp, labels[train], test_lp)
            hits[b, 0, test] = correct_at_k(held_out, labels[test], 1)
            hits[b, 1, test] = correct_at_k(held_out, labels[test], top_k)
            nll[b, test] = -held_out[np.arange(test.size), labels[test]]
    rows = tuple(CvRow(name, kind, float(hits[b, 0].mean()), *bootstrap_ci(hits[b, 0], n_boot, seed=seed),
                       float(hits[b, 1].mean()), float(nll[b].mean()), corrected)
                 for b, (name, kind, corrected, _) in enumerate(blends))
    return CvReport(method, top_k, n_folds, temperature, rows, prior is not None, tuple(fold_taus))


#: ``predict(train log-probs, train labels, held-out log-probs) -> held-out blended log-probs``.
_Predict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _single(member: int) -> _Predict:
    def predict(train_lp: np.ndarray, train_labels: np.ndarray, test_lp: np.ndarray) -> np.ndarray:
        return test_lp[member]
    return predict


def _fitted(make_method: Callable[[], Blender], prior: LogitAdjustment | None = None,
            taus: list[float] | None = None) -> _Predict:
    """Fit a new method on the training rows (with ``prior``: its weights and ``tau``) and predict
    the held-out rows; each fold's ``tau`` is appended to ``taus`` when given."""
    def predict(train_lp: np.ndarray, train_labels: np.ndarray, test_lp: np.ndarray) -> np.ndarray:
        method = make_method().fit(train_lp, train_labels, prior)
        if taus is not None:
            taus.append(float(method.tau_))
        return method.predict_log_proba(test_lp)
    return predict


def _fold_log_probs(logits: np.ndarray, labels: np.ndarray, folds: Sequence[np.ndarray],
                    temperature: bool) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(train rows, held-out rows, (M, N, C) log-probs)`` per fold.

    Without temperatures the log-softmax does not depend on the fold and is computed once; with
    them, each fold's temperatures are fitted on its training rows only.
    """
    n_rows = labels.size
    folds = [np.asarray(f, dtype=np.int64) for f in folds]
    if len(folds) < 2 or any(f.size == 0 for f in folds) or not np.array_equal(np.sort(np.concatenate(folds)), np.arange(n_rows)):
        raise ValueError(f"folds must be at least 2 non-empty arrays of row indices that partition 0..{n_rows - 1}")
    shared = None if temperature else log_softmax(logits)
    for test in folds:
        train = np.setdiff1d(np.arange(n_rows), test, assume_unique=True)
        if shared is not None:
            yield train, test, shared
        else:
            yield train, test, log_softmax(logits, fit_temperatures(logits[:, train], labels[train]))
