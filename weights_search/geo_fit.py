"""The geo prior's weight ``beta``: its exact NLL, its fit and the scores it gives, from per-row
sparse statistics of the blend's fused log-probabilities.

The place prior of a row (:mod:`weights_search.geo`) is sparse: ``g'(c) >= 0`` on the classes
``S_n`` seen near the row's place, 0 elsewhere. The blend's fused log-probabilities ``log q``
(after its method, temperatures and long-tail prior) become::

    log q'(c) = log q(c) + beta g'(c) - log(1 + sum_{c in S_n} q(c) (exp(beta g'(c)) - 1))

so the NLL of a row at any ``beta`` needs only ``log q`` at the true class and at ``S_n``'s
classes, and its rank (top-1, top-k) only those and the ``k`` best ``log q`` outside ``S_n``
(``beta g'`` raises ``S_n``'s classes alone). :class:`FusedRows` holds those statistics of one
fusion (one set of weights) over the rows of a split, :class:`GeoTerms` the rows' ``g'`` and
labels, shared by every fusion.

Convexity: ``NLL_n(beta) = -log q(y) - beta g'(y) + log sum_c q(c) exp(beta g'(c))``, a
log-sum-exp of functions affine in ``beta`` minus a linear term, so it is convex in ``beta``
(its second derivative is the variance of ``g'`` under ``q'``), and so is a mean of rows. Its
derivative is non-decreasing: :func:`fit_beta` finds its root in :data:`GEO_BOUNDS` with
:func:`scipy.optimize.brentq` (or a bound, where the derivative does not change sign), the
exact minimiser to ``xtol``.

Ranks follow the tie rule of :mod:`weights_search.metrics` (a stable sort by descending score:
an equal score of a lower class index ranks first); the corrected scores are computed in
float32, as the test fusion adds ``beta g'`` to its float32 block, so the CV's ranks are those
the predictions get. Shapes: ``N`` rows, ``C`` classes, ``nnz`` sparse entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.optimize import brentq

from weights_search.functional import top_k as _top_k
from weights_search.geo import csr_rows

#: Range of ``beta``: 0 is the blend without the geo prior, 1 its Bayes combination
#: ``p(y | image) p(y | place) / p(y)``; more than 3 would trust the neighbours' counts beyond
#: any evidence (the same bound as the long-tail prior's tau).
GEO_BOUNDS = (0.0, 3.0)
#: :func:`fit_beta` stops when ``beta`` is known to this.
BETA_XTOL = 1e-6


@dataclass(frozen=True)
class GeoTerms:
    """The rows' place prior and labels: CSR rows (``indptr`` ``(N + 1,)``, ``column`` and
    ``value`` ``(nnz,)``, ``value`` = ``g' >= 0``) and ``labels`` ``(N,)`` (column indices).
    A row without a usable place has no entry."""

    indptr: np.ndarray
    column: np.ndarray
    value: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        if labels.ndim != 1:
            raise ValueError(f"labels of shape {labels.shape} must be (N,)")
        indptr, column, value = csr_rows(self.indptr, self.column, self.value, labels.size)
        if column.size and labels.size and labels.min() < 0:
            raise ValueError("labels must be non-negative class indices")
        rows = np.repeat(np.arange(labels.size), np.diff(indptr))
        if np.unique(rows * (int(column.max(initial=0)) + 1) + column).size != column.size:
            raise ValueError("a row names one class twice")
        for name, array in (("indptr", indptr), ("column", column), ("value", value), ("labels", labels)):
            object.__setattr__(self, name, array)

    @property
    def n_rows(self) -> int:
        return int(self.labels.size)

    @cached_property
    def row_of_entry(self) -> np.ndarray:
        """``(nnz,)`` int64: the row of each entry."""
        return np.repeat(np.arange(self.n_rows), np.diff(self.indptr))

    def entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The entries of ``rows`` (sorted row indices): their positions ``(e,)`` in ``column``
        and ``value``, and the position in ``rows`` of each one's row."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        local = np.repeat(np.arange(rows.size), lengths)
        offsets = np.arange(local.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return starts[local] + offsets, local

    @cached_property
    def true_value(self) -> np.ndarray:
        """``(N,)`` float32: ``g'`` at each row's true class (0 when it is not among the row's)."""
        out = np.zeros(self.n_rows, dtype=np.float32)
        hit = self.column == self.labels[self.row_of_entry]
        out[self.row_of_entry[hit]] = self.value[hit]
        return out


class FusedRows:
    """What the geo prior's NLL and ranks need of one fusion's log-probabilities ``log q`` over
    the ``N`` rows of ``terms``: ``true_lp`` ``(N,)`` at the true class, ``sparse_lp``
    ``(nnz,)`` at each row's sparse classes, and the ``k`` best ``log q`` outside them with
    their classes (``out_lp``, ``out_col`` ``(N, k)``, best first, ties lower class first;
    ``-inf`` and class ``C`` where a row has fewer). Filled block by block (:meth:`add`), in
    any order; float32, 8 k + 4 bytes a row and 4 an entry."""

    def __init__(self, terms: GeoTerms, n_classes: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        n = terms.n_rows
        self.terms, self.n_classes, self.k = terms, int(n_classes), int(k)
        self.true_lp = np.full(n, np.nan, dtype=np.float32)
        self.sparse_lp = np.full(terms.column.size, np.nan, dtype=np.float32)
        self.out_lp = np.full((n, k), -np.inf, dtype=np.float32)
        self.out_col = np.full((n, k), n_classes, dtype=np.int32)

    def add(self, rows: np.ndarray, log_q: np.ndarray) -> None:
        """Take the statistics of ``rows`` (sorted row indices) from their fused log-probabilities
        ``log_q`` ``(rows.size, C)`` (written to during the call and restored: no copy made)."""
        rows = np.asarray(rows, dtype=np.int64)
        if log_q.shape != (rows.size, self.n_classes):
            raise ValueError(f"log_q of shape {log_q.shape} for {rows.size} rows of {self.n_classes} classes")
        terms = self.terms
        self.true_lp[rows] = log_q[np.arange(rows.size), terms.labels[rows]]
        entries, local = terms.entries(rows)
        columns = terms.column[entries]
        kept = log_q[local, columns]
        self.sparse_lp[entries] = kept
        k = min(self.k, self.n_classes)
        log_q[local, columns] = -np.inf  # the classes outside S_n alone, ranked; restored below
        try:
            top, _ = _top_k(log_q, k)
            values = np.take_along_axis(log_q, top, axis=1)
        finally:
            log_q[local, columns] = kept
        # A row with fewer than k classes outside S_n: its rest are S_n's, masked: none.
        masked = np.isneginf(values)
        self.out_lp[rows, :k] = values
        self.out_col[rows, :k] = np.where(masked, self.n_classes, top)

    def check_complete(self) -> None:
        """ValueError unless every row was added."""
        if np.isnan(self.true_lp).any() or np.isnan(self.sparse_lp).any():
            raise ValueError("some rows' fused log-probabilities were never added")


def _row_terms(fused: FusedRows, rows: np.ndarray | None):
    terms = fused.terms
    rows = np.arange(terms.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    entries, local = terms.entries(rows)
    return rows, entries, local


def row_nll(fused: FusedRows, beta: float, rows: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` float64: each row's NLL of ``q'`` at ``beta`` (``rows``: sorted indices; None: all)."""
    rows, entries, local = _row_terms(fused, rows)
    terms = fused.terms
    q = np.exp(fused.sparse_lp[entries].astype(np.float64))
    excess = np.bincount(local, weights=q * np.expm1(beta * terms.value[entries].astype(np.float64)),
                         minlength=rows.size)
    true_geo = terms.true_value[rows].astype(np.float64)
    return -(fused.true_lp[rows].astype(np.float64) + beta * true_geo) + np.log1p(excess)


def nll_derivative(fused: FusedRows, beta: float, rows: np.ndarray | None = None) -> float:
    """The derivative in ``beta`` of the mean of :func:`row_nll` over ``rows``."""
    return _derivative(*_fit_terms(fused, rows))(beta)


def _fit_terms(fused: FusedRows, rows: np.ndarray | None):
    rows, entries, local = _row_terms(fused, rows)
    q = np.exp(fused.sparse_lp[entries].astype(np.float64))
    value = fused.terms.value[entries].astype(np.float64)
    true_geo = fused.terms.true_value[rows].astype(np.float64)
    return q, value, local, true_geo, rows.size


def _derivative(q, value, local, true_geo, n):
    """``beta -> d/dbeta mean NLL``: ``mean(-g'(y) + sum_S q g' e^(beta g') / (1 + sum_S q (e^(beta g') - 1)))``."""
    target = true_geo.sum()

    def derivative(beta: float) -> float:
        if n == 0:
            return 0.0
        grow = np.exp(beta * value)
        norm = 1.0 + np.bincount(local, weights=q * (grow - 1.0), minlength=n)
        slope = np.bincount(local, weights=q * value * grow, minlength=n)
        return float(((slope / norm).sum() - target) / n)

    return derivative


def fit_beta(fused: FusedRows, rows: np.ndarray | None = None, bounds: tuple[float, float] = GEO_BOUNDS) -> float:
    """The ``beta`` in ``bounds`` that minimises the mean NLL of ``q'`` over ``rows`` (sorted
    indices; None: all): the root of its non-decreasing derivative, or the bound it lies
    beyond (the NLL is convex, see the module docstring). 0 when no row has a place."""
    low, high = bounds
    if not 0 <= low <= high:
        raise ValueError(f"bounds must satisfy 0 <= low <= high, got {bounds}")
    derivative = _derivative(*_fit_terms(fused, rows))
    at_low = derivative(low)
    if not np.isfinite(at_low):
        raise ValueError("the geo prior's NLL has no finite derivative (a fused log-probability is +inf or NaN)")
    if at_low >= 0:
        return float(low)
    if derivative(high) <= 0:
        return float(high)
    return float(brentq(derivative, low, high, xtol=BETA_XTOL))


def ranks(fused: FusedRows, beta: float, rows: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` int64: each row's rank of its true class under ``q'`` at ``beta``, exact below
    ``fused.k`` (at least ``k`` otherwise), the tie rule of :mod:`weights_search.metrics`."""
    rows, entries, local = _row_terms(fused, rows)
    terms = fused.terms
    b = np.float32(beta)
    labels = terms.labels[rows]
    true_score = fused.true_lp[rows] + b * terms.true_value[rows]
    sparse_score = fused.sparse_lp[entries] + b * terms.value[entries]
    columns = terms.column[entries]
    t, y = true_score[local], labels[local]
    before = (columns != y) & ((sparse_score > t) | ((sparse_score == t) & (columns < y)))
    rank = np.bincount(local[before], minlength=rows.size)
    out_lp, out_col = fused.out_lp[rows], fused.out_col[rows].astype(np.int64)
    t, y = true_score[:, None], labels[:, None]
    rank += np.count_nonzero((out_col != y) & (out_col < fused.n_classes) & ((out_lp > t) | ((out_lp == t) & (out_col < y))),
                             axis=1)
    return rank


def scores(fused: FusedRows, beta: float, rows: np.ndarray | None = None, k: int | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``rows`` at ``beta``: top-1 hit, top-``k`` hit (``k``: at most ``fused.k``;
    None: ``fused.k``) and NLL of ``q'``."""
    k = fused.k if k is None else k
    if not 1 <= k <= fused.k:
        raise ValueError(f"k must lie in 1..{fused.k}, got {k}")
    rank = ranks(fused, beta, rows)
    return rank < 1, rank < k, row_nll(fused, beta, rows)
