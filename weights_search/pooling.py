"""Geometric pooling: non-negative weights on member log-probabilities, fitted by validation NLL.

The pooled prediction is ``log q[n] = s[n] - logsumexp_c s[n]`` with
``s[n] = sum_m w_m log p_m[n]`` (a weighted geometric mean of the members' probabilities,
renormalised). The weights are not normalised: their sum also sharpens (> 1) or flattens (< 1)
the pooled distribution, so they act as a shared temperature as well. The NLL is convex in ``w``.

The prior correction (:mod:`weights_search.prior`) subtracts ``tau * log pi`` from the pooled
logits ``s``: one more term of the same weighted sum, as if ``-log pi`` were a member with
weight ``tau``. The NLL stays convex in ``(w, tau)``, and both are fitted together.

Streaming (issue 24): the NLL needs every row's normaliser ``logsumexp_c s[n, c]``, a sum over all
classes, at every optimiser step. :class:`LogitCollector` reads the members once and keeps, per
row, the values of a few classes exactly (the union of each member's largest log-probabilities
and the true class) and a third-order cumulant summary of the other classes (the *rest*) about a
pilot ``(w, tau)`` fitted from the rows as they come (:mod:`weights_search.expansion`; once
more about the fit, in a second pass, when rows in an unfavourable order leave it far from
their pilots); the fit runs on those :class:`LogitStats` alone (see there for the error and
the memory). With at most
:data:`EXACT_CLASSES` classes every class is kept and the statistics are exact.
:func:`fit_pooling` on the arrays in hand is the exact reference (:meth:`LogitBlend.fit_exact`).
"""

from __future__ import annotations

from typing import Hashable

import numpy as np
from scipy.optimize import minimize

from weights_search.base import Blender, Stats, check_solver_options
from weights_search.expansion import PilotedCollector, check_rows, largest
from weights_search.functional import GEOMETRIC, LOG_FLOOR, check_members
from weights_search.prior import TAU_BOUNDS, LogitAdjustment

#: Classes kept exactly per row by :class:`LogitCollector`: each member's largest
#: ``ceil(UNION_CLASSES / M)`` log-probabilities, and the true class.
UNION_CLASSES = 64
#: With at most this many classes, every class of every row is kept (exact statistics, no pilot).
EXACT_CLASSES = 128
#: The rest's third cumulants (``N * D**3`` float32) are kept while they take at most this many
#: bytes (up to 100,000 rows of 5 parameters, 3,000 rows of 17); beyond, the expansion stops at
#: the second order, and :meth:`LogitStats.fit_error` estimates the fit's error from the
#: third-order term instead: the re-pass about the fit keeps the 1e-3 claim (tested with this
#: set to 0).
THIRD_ORDER_BYTES = 256 * 2**20
#: A fit whose estimated error (:meth:`LogitStats.fit_error`) exceeds this asks for a second
#: pass with the fit as every row's pilot. Measured, the actual error was 1 to 3 times the
#: estimate (1,010 and 10,000 classes, rows sorted by class or in halves of different
#: sharpness, with and without third cumulants), so fits that pass stay within 1e-3; rows in
#: random order estimate 1e-6..5e-6 (1.4e-4 without third cumulants: a second pass).
REPASS_ERROR = 1e-4
#: :meth:`LogitStats.fit_error` estimates on at most this many rows (evenly spread).
CHECK_ROWS = 16384
#: The expansion's third-order term is followed up to this many tilted standard deviations of
#: the rest's score change ``d . v``; beyond, ``d`` is scaled down to it in that term (the convex
#: second-order part carries the rest).
TRUST = 1.0


def pooled_nll_and_grad(weights: np.ndarray, relative: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of geometric pooling and its gradient with respect to the ``(M,)`` weights.

    ``relative``: ``(M, N, C)`` float32 (or float64, which the tests use), C-contiguous: each
    member's clipped log-probabilities minus that of the true class,
    ``max(log p_m[n, c], LOG_FLOOR) - max(log p_m[n, y_n], LOG_FLOOR)`` (see
    :func:`relative_log_probs`). The softmax does not change when a row is shifted, so with
    ``s = sum_m w_m relative_m`` the NLL of row ``n`` is just ``logsumexp_c s[n]`` and the
    gradient is ``mean_n E_q[relative_m[n]]``; no large numbers cancel, and a member whose
    log-probabilities are the same for every class is exactly 0 and gets a gradient of exactly 0.
    """
    n_members, n_rows, n_classes = relative.shape
    flat = relative.reshape(n_members, -1)
    scores = (weights.astype(flat.dtype) @ flat).reshape(n_rows, n_classes)
    top = scores.max(axis=1, keepdims=True)
    e = np.exp(scores - top)
    total = e.sum(axis=1, keepdims=True)
    nll = (top[:, 0] + np.log(total[:, 0])).mean(dtype=np.float64)
    e /= total
    grad = (flat @ e.reshape(-1)).astype(np.float64) / n_rows
    return float(nll), grad


def relative_log_probs(log_probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray | None = None) -> np.ndarray:
    """``(M, N, C)`` float32: log-probabilities clipped at ``LOG_FLOOR``, minus the true class's.

    With a ``(C,)`` ``log_prior``, ``(M + 1, N, C)``: the last entry is the prior correction's,
    ``-log_prior`` minus its true-class value (its weight is ``tau``).
    """
    n_members, n_rows, n_classes = log_probs.shape
    relative = np.empty((n_members + (log_prior is not None), n_rows, n_classes), dtype=np.float32)
    np.maximum(log_probs, np.float32(LOG_FLOOR), out=relative[:n_members], dtype=np.float32)
    if log_prior is not None:
        relative[n_members] = -np.asarray(log_prior, dtype=np.float32)
    relative -= relative[:, np.arange(labels.size), labels][:, :, None]
    return relative


def fit_pooling(log_probs: np.ndarray, labels: np.ndarray, prior: LogitAdjustment | None = None,
                max_iter: int = 200, tol: float = 1e-7, start: np.ndarray | None = None):
    """The exact fit of geometric pooling on ``(M, N, C)`` member log-probabilities in hand: the
    reference the streamed fit (:class:`LogitStats`) is tested against, and the fit of a
    :class:`LogitCollector`'s first rows (its pilot).

    Returns scipy's ``OptimizeResult``: ``x`` holds the ``M`` weights, then ``tau`` with a prior.
    Holds an ``(M (+1), N, C)`` float32 copy: for data that fits in memory only.
    """
    log_probs, labels = check_members(log_probs, labels)
    n_members = log_probs.shape[0]
    bounds, x0 = _bounds_and_start(n_members, prior)
    if prior is not None:
        prior.check(log_probs.shape[2])
    if start is not None:
        x0 = np.clip(start, [b[0] for b in bounds], [np.inf if b[1] is None else b[1] for b in bounds])
    relative = relative_log_probs(log_probs, labels, None if prior is None else prior.log_prior)
    return minimize(pooled_nll_and_grad, x0, args=(relative,), jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": max_iter, "ftol": tol, "gtol": tol})


def _bounds_and_start(n_members: int, prior: LogitAdjustment | None) -> tuple[list, np.ndarray]:
    """L-BFGS-B's bounds and start: ``w >= 0`` from 0; ``tau`` in its bounds from 0 (or fixed)."""
    bounds = [(0.0, None)] * n_members
    start = np.zeros(n_members)
    if prior is not None:
        bounds.append(TAU_BOUNDS if prior.tau is None else (prior.tau, prior.tau))
        start = np.append(start, 0.0 if prior.tau is None else prior.tau)
    return bounds, start


class LogitStats:
    """What :class:`LogitCollector` keeps of each row to fit geometric pooling on any subset.

    ``D`` = ``M`` (+1 with a prior) parameters ``x = (w, tau)`` and per class the values
    ``v_c = (max(log p_m[c], LOG_FLOOR) for m, -shift_c)`` (``shift = log_prior - min``), so the
    pooled score is ``x . v_c``. Per row ``n``:

    - ``union`` ``(D, N, W)`` float32: ``v - v_true`` of the row's kept classes (each member's largest
      log-probabilities and the true class; ``W = M * ceil(UNION_CLASSES / M) + 1``, or ``C``
      when every class is kept), ``pad`` ``(N, W)`` float32: 0, or -inf on a repeated class;
    - ``true`` ``(D, N)`` float64: ``v`` of the true class;
    - the rest (the other classes), tilted by ``exp(x0 . v)`` at the row's pilot ``x0``
      (``pilot`` ``(N, D)``): ``log_s0`` ``(N,)`` = ``log sum_rest exp(x0 . v)``, ``mean``
      ``(N, D)`` and ``cov`` ``(N, D, D)`` of ``v`` under that tilt. Then, with ``d = x - x0``,

          log sum_rest exp(x . v) ~= log_s0 + mean . d + d' cov d / 2 + skew[d, d, d] / 6

      with ``skew`` ``(N, D, D, D)`` float32 the tilted third cumulants (kept while they take at
      most :data:`THIRD_ORDER_BYTES`, else None and the expansion stops at the second order):
      the cumulant expansion, exact at ``x0`` to the third derivative; the error is about the
      fourth tilted cumulant of ``d . v`` over 24, and it enters the row's normaliser times the
      rest's share of it. The third-order term follows ``d`` only within :data:`TRUST` tilted
      standard deviations of ``d . v``; beyond, the convex second-order part carries it, so far
      from the pilot (the solver's start, ``w = 0``) the objective stays sane.

    The pilots come from :mod:`weights_search.expansion`: the first rows' exact fit, then fits on
    the first half of the rows for the second half, so in random order ``d`` is the sampling
    difference of the weights between folds and halves. In an unfavourable order (rows sorted
    by class, the members' sharpness rising across classes: off by 2e-3..3e-2 from one pass)
    :meth:`fit_error` estimates the fit's error from the neglected term and
    :meth:`repass_pilot` asks for a second pass with the fit as every row's pilot (the
    orchestration in :mod:`weights_search.fitted` and :mod:`weights_search.cv` does it).
    Measured (tests, 1,010 and 10,000 classes, N = 1,500..3,000, three correlated members of
    which one weak, a long-tailed prior; rows in random order and sorted by class; with and
    without the third cumulants): weights and ``tau`` within 1e-3 of the exact fit
    (:func:`fit_pooling`), the whole split's and a fold's, the same held-out top-1. Without the
    third cumulants (large ``N * D**3``, see :data:`THIRD_ORDER_BYTES`) the estimate is of the
    third-order term, larger, so the second pass comes sooner (in the tests, for rows in
    random order too: 1.4e-4 there).

    Memory: ``D * N * W`` float32 for the kept classes plus ``N * (D + 1) ** 2`` float64 and
    ``N * D**3`` float32 for the rest, ``W`` about :data:`UNION_CLASSES`: 100,000 rows, 4 members
    and a prior take 239 MB
    (:meth:`subset` copies its rows: a CV fold's 80 % more while it is fitted); nothing ``(N, C)``. With ``C <= EXACT_CLASSES`` the kept classes are all classes,
    the rest is empty and the statistics are exact.
    """

    def __init__(self, labels, n_classes, union, pad, true, log_s0, mean, cov, skew, pilot, log_prior) -> None:
        self.labels, self.n_classes, self.log_prior = labels, n_classes, log_prior
        self.union, self.pad, self.true = union, pad, true
        self.log_s0, self.mean, self.cov, self.skew, self.pilot = log_s0, mean, cov, skew, pilot

    @property
    def n_rows(self) -> int:
        return self.labels.size

    @property
    def with_prior(self) -> bool:
        """Collected with a prior (``log_prior``, ``(C,)``): ``tau`` is the last parameter."""
        return self.log_prior is not None

    @property
    def n_params(self) -> int:
        return self.union.shape[0]

    def subset(self, rows: np.ndarray) -> "LogitStats":
        """The statistics of ``rows`` (sorted row indices, e.g. a CV fold's training rows)."""
        rows = check_rows(rows, self.n_rows)
        return LogitStats(self.labels[rows], self.n_classes, self.union[:, rows], self.pad[rows], self.true[:, rows],
                          self.log_s0[rows], self.mean[rows], self.cov[rows],
                          None if self.skew is None else self.skew[rows], self.pilot[rows], self.log_prior)

    def nll_and_grad(self, x: np.ndarray, rows: slice = slice(None)) -> tuple[float, np.ndarray]:
        """Mean NLL of the pooled (and corrected) prediction at ``x`` ``(D,)`` and its gradient.

        The kept classes' scores are taken relative to the true class's (``union`` holds
        ``v - v_true``), as in :func:`pooled_nll_and_grad`, so float32 rounding stays far below
        the solver's tolerance."""
        union = self.union[:, rows]
        true = self.true[:, rows]
        n_rows = union.shape[1]
        scores = np.tensordot(x.astype(np.float32), union, axes=1) + self.pad[rows]
        d = x[None, :] - self.pilot[rows]
        cov_d = np.einsum("nij,nj->ni", self.cov[rows], d)
        rest = self.log_s0[rows] + np.einsum("ni,ni->n", d, self.mean[rows] + cov_d / 2) - x @ true
        slope = self.mean[rows] + cov_d - true.T  # the rest's d(log sum)/dx, less the true class's
        if self.skew is not None:
            cubic, cubic_grad = _third_order(self.skew[rows], d, cov_d)
            rest += cubic
            slope += cubic_grad
        high = np.maximum(scores.max(axis=1).astype(np.float64), rest)
        e = np.exp(scores - high[:, None].astype(np.float32))
        e_rest = np.exp(rest - high)
        total = e.sum(axis=1, dtype=np.float64) + e_rest
        nll = float(np.mean(high + np.log(total)))
        e /= total[:, None].astype(np.float32)
        share = e_rest / total
        grad = np.einsum("dnw,nw->d", union, e, dtype=np.float64)
        grad += np.einsum("n,nd->d", share, slope)
        return nll, grad / n_rows

    def fit_error(self, x: np.ndarray, free: np.ndarray | None = None) -> float:
        """The estimated largest error of the parameters fitted at about ``x`` ``(D,)``, from the
        expansion's neglected term (``free``: ``(D,)`` bool, the parameters not held at a bound;
        by default those above 0).

        With ``d = x - pilot`` and ``q = sqrt(d' cov d)`` (the tilted standard deviation of the
        rest's score change), each row's rest is off by about ``q**4 / 24`` (the fourth cumulant of
        ``d . v`` taken as ``q**4``), or ``q**3 / 6`` when the third cumulants are not kept, so the
        NLL's gradient by ``share * q**2 cov d / 6`` (``share * q cov d / 2``), ``share`` the rest's
        part of the row's normaliser at ``x``. The fitted parameters move by the Hessian's inverse
        (forward differences of :meth:`nll_and_grad`, on the free parameters) times the mean of
        that (on :data:`CHECK_ROWS` evenly spread rows at most). Costs ``D + 2`` evaluations of
        the NLL, about a tenth of a fit. Near 0 when ``x`` is near the rows' pilots; large when a noticeable share of rows was
        expanded about a distant pilot."""
        x = np.asarray(x, dtype=np.float64)
        free = x > 0 if free is None else np.asarray(free, dtype=bool)
        if not free.any():
            return 0.0
        if self.n_rows > CHECK_ROWS:  # a mean over rows: evenly spread rows estimate it
            return self.subset(np.unique(np.linspace(0, self.n_rows - 1, CHECK_ROWS).astype(np.int64))).fit_error(x, free)
        scores = np.tensordot(x.astype(np.float32), self.union, axes=1) + self.pad
        d = x[None, :] - self.pilot
        cov_d = np.einsum("nij,nj->ni", self.cov, d)
        q2 = np.maximum(np.einsum("ni,ni->n", d, cov_d), 0.0)
        rest = self.log_s0 + np.einsum("ni,ni->n", d, self.mean + cov_d / 2) - x @ self.true
        high = np.maximum(scores.max(axis=1).astype(np.float64), rest)
        with np.errstate(invalid="ignore"):
            total = np.exp(scores - high[:, None].astype(np.float32)).sum(axis=1, dtype=np.float64) + np.exp(rest - high)
            share = np.where(np.isneginf(self.log_s0), 0.0, np.exp(rest - high) / total)
        factor = q2 / 6 if self.skew is not None else np.sqrt(q2) / 2
        slope = np.einsum("n,ni->i", share * factor, cov_d) / self.n_rows
        index = np.flatnonzero(free)
        h = 1e-3 * max(1.0, float(np.abs(x).max()))
        hessian = np.empty((index.size, index.size))
        grad = self.nll_and_grad(x)[1]
        for j, i in enumerate(index):
            step = np.zeros_like(x)
            step[i] = h
            hessian[:, j] = (self.nll_and_grad(x + step)[1] - grad)[index] / h
        hessian = (hessian + hessian.T) / 2
        try:
            move = np.linalg.solve(hessian + 1e-9 * np.eye(index.size), slope[index])
        except np.linalg.LinAlgError:
            return float("inf")
        return float(np.abs(move).max())

    def pilot_of(self, blender: "LogitBlend", prior: LogitAdjustment | None) -> np.ndarray:
        """``(D,)``: the parameters of a fitted ``blender`` (weights, then ``tau`` with a prior),
        as a collector's ``pilot``."""
        x = np.asarray(blender.weights_, dtype=np.float64)
        return np.append(x, blender.tau_) if self.with_prior else x.copy()

    def repass_pilot(self, blender: "LogitBlend", prior: LogitAdjustment | None) -> np.ndarray | None:
        """The parameters of ``blender`` (fitted on these statistics, or on a subset of them) when
        their estimated error (:meth:`fit_error`) exceeds :data:`REPASS_ERROR`: collect again with
        them as every row's pilot (:meth:`LogitCollector.with_pilot`); else None."""
        x = self.pilot_of(blender, prior)
        free = x > 0
        if self.with_prior:
            free[-1] = prior is None or prior.tau is None
        if not np.isfinite(self.log_s0).any():
            return None  # no rest: exact
        return x if self.fit_error(x, free) > REPASS_ERROR else None

    def fit(self, prior: LogitAdjustment | None, max_iter: int, tol: float, rows: slice = slice(None),
            start: np.ndarray | None = None):
        """L-BFGS-B on :meth:`nll_and_grad` with the bounds of :func:`fit_pooling` (from its start,
        or ``start``); scipy's ``OptimizeResult``."""
        bounds, x0 = _bounds_and_start(self.n_params - (prior is not None), prior)
        if start is not None:
            x0 = np.clip(start, [b[0] for b in bounds], [np.inf if b[1] is None else b[1] for b in bounds])
        return minimize(self.nll_and_grad, x0, args=(rows,), jac=True, method="L-BFGS-B", bounds=bounds,
                        options={"maxiter": max_iter, "ftol": tol, "gtol": tol})


class LogitCollector(PilotedCollector):
    """Collects :class:`LogitStats` in one pass over ``(M, b, C)`` float32 member log-probability
    blocks (rows in order): one pass serves every CV fold (``stats.subset(train)``) and the
    final fit.

    ``labels`` ``(N,)``, ``n_classes``, ``n_members`` (None: taken from the first block),
    ``prior`` (None, or the :class:`LogitAdjustment` the fits
    will use: its log-prior is one more member, a given ``tau`` is kept fixed in the pilots),
    ``max_iter``/``tol``: the pilots' solver options; ``pilot``: ``(D,)`` ``(w, tau)`` to expand
    every row's rest about, or None to fit pilots from the rows (:mod:`weights_search.expansion`).

    Work per block: each member's largest log-probabilities (:func:`~weights_search.expansion.largest`);
    then, per row and class, the pilot score, one exponential and ``D**3`` products (batched
    matrix products), in pieces of :data:`~weights_search.expansion.CHUNK_VALUES` values.
    Measured peak memory beyond the caller's blocks (4 members, 10,000 classes, a prior): about
    150 MB (the held first rows and their exact fit), plus the statistics.
    """

    def __init__(self, labels: np.ndarray, n_classes: int, prior: LogitAdjustment | None = None, *,
                 n_members: int | None = None, max_iter: int = 200, tol: float = 1e-7,
                 pilot: np.ndarray | None = None) -> None:
        if prior is not None:
            prior.check(n_classes)
        if pilot is not None:
            pilot = np.asarray(pilot, dtype=np.float64)
            if pilot.ndim != 1 or not np.isfinite(pilot).all():
                raise ValueError(f"pilot must be finite values (weights, then tau with a prior), got {pilot}")
        super().__init__(labels, n_members, pilot)
        self.expected_classes = n_classes
        self.prior = prior
        self.max_iter, self.tol = max_iter, tol
        self.shift = None if prior is None else (prior.log_prior - prior.log_prior.min()).astype(np.float32)

    def with_pilot(self, pilot: np.ndarray) -> "LogitCollector":
        """A new collector of the same rows with ``pilot`` fixed for every row (the re-pass)."""
        return LogitCollector(self.labels, self.expected_classes, self.prior, n_members=self.n_members,
                              max_iter=self.max_iter, tol=self.tol, pilot=pilot)

    def _needs_pilot(self, n_classes: int) -> bool:
        return n_classes > EXACT_CLASSES

    def _start(self, n_classes: int) -> None:
        if n_classes != self.expected_classes:
            raise ValueError(f"blocks of {n_classes} classes for a collector of {self.expected_classes}")
        n, m = self.n_rows, self.n_members
        d = m + (self.prior is not None)
        if self._pilot is not None and self._pilot.shape != (d,):
            raise ValueError(f"pilot must be {d} values (weights, then tau with a prior), got {self._pilot.size}")
        self.per_member = -(-UNION_CLASSES // m)
        width = n_classes if not self._needs_pilot(n_classes) else m * self.per_member + 1
        third = self._needs_pilot(n_classes) and n * d ** 3 * 4 <= THIRD_ORDER_BYTES
        self._stats_ = LogitStats(self.labels, n_classes, np.zeros((d, n, width), dtype=np.float32),
                                  np.zeros((n, width), dtype=np.float32), np.zeros((d, n)), np.full(n, -np.inf),
                                  np.zeros((n, d)), np.zeros((n, d, d)),
                                  np.zeros((n, d, d, d), dtype=np.float32) if third else None, np.zeros((n, d)),
                                  None if self.prior is None else self.prior.log_prior)

    def _exact_pilot(self, block: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(fit_pooling(block, labels, self.prior, self.max_iter, self.tol).x, dtype=np.float64)

    def _refit(self, stop: int) -> np.ndarray:
        return np.asarray(self._stats_.fit(self.prior, self.max_iter, self.tol, slice(0, stop), self._pilot).x)

    def _summarise(self, start: int, block: np.ndarray, pilot: np.ndarray | None) -> None:
        st = self._stats_
        n_members, b, n_classes = block.shape
        rows = slice(start, start + b)
        labels = self.labels[rows]
        # Values v: (b, D, C) float32, one row's parameters' values contiguous per class axis.
        values = np.empty((b, st.n_params, n_classes), dtype=np.float32)
        np.maximum(np.asarray(block, dtype=np.float32).transpose(1, 0, 2), np.float32(LOG_FLOOR), out=values[:, :n_members])
        if self.shift is not None:
            values[:, n_members] = -self.shift
        true = values[np.arange(b), :, labels]  # (b, D)
        st.true[:, rows] = true.T
        if not self._needs_pilot(n_classes):
            st.union[:, rows] = (values - true[:, :, None]).transpose(1, 0, 2)
            return
        k = self.per_member
        kept = np.concatenate([largest(values[:, m], k) for m in range(n_members)] + [labels[:, None]], axis=1)
        kept.sort(axis=1)
        repeated = np.zeros(kept.shape, dtype=bool)
        repeated[:, 1:] = kept[:, 1:] == kept[:, :-1]
        st.union[:, rows] = (np.take_along_axis(values, kept[:, None, :], axis=2) - true[:, :, None]).transpose(1, 0, 2)
        st.pad[rows] = np.where(repeated, np.float32(-np.inf), np.float32(0))
        # The rest: every class not kept, tilted by exp(pilot . v).
        scores = np.matmul(pilot.astype(np.float32), values)  # (b, C)
        np.put_along_axis(scores, kept, -np.inf, axis=1)
        high = scores.max(axis=1, keepdims=True)
        # A row whose every class is kept has an empty rest: log_s0 = -inf, the moments 0.
        empty = np.isneginf(high[:, 0])
        high[empty] = 0
        e = np.exp(scores - high)
        s0 = e.sum(axis=1, dtype=np.float64)
        s0[empty] = 1.0
        mean = np.matmul(values, e[:, :, None])[:, :, 0].astype(np.float64) / s0[:, None]
        values -= mean[:, :, None].astype(np.float32)
        weighted = values * e[:, None, :]
        centred_t = values.transpose(0, 2, 1)
        cov = np.matmul(weighted, centred_t).astype(np.float64) / s0[:, None, None]
        if st.skew is not None:
            # Symmetric in its three indices: the entries whose smallest index is i, once per i.
            for i in range(st.n_params):
                block = np.matmul(weighted[:, i:] * values[:, i:i + 1], centred_t[:, :, i:]) / s0[:, None, None]
                st.skew[rows, i, i:, i:] = block
                st.skew[rows, i:, i, i:] = block
                st.skew[rows, i:, i:, i] = block
        st.log_s0[rows] = np.where(empty, -np.inf, high[:, 0] + np.log(s0))
        st.mean[rows] = mean
        st.cov[rows] = cov
        st.pilot[rows] = pilot

    def _stats(self) -> LogitStats:
        return self._stats_


def _third_order(skew: np.ndarray, d: np.ndarray, cov_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The expansion's third-order term ``skew[e, e, e] / 6`` per row and its gradient in ``d``,
    where ``e = d`` within :data:`TRUST` tilted standard deviations (``d' cov d <= TRUST**2``) and
    ``d`` scaled down to that beyond (see :class:`LogitStats`)."""
    q = np.maximum(np.einsum("ni,ni->n", d, cov_d), 0.0)
    scale = np.minimum(1.0, TRUST / np.sqrt(np.maximum(q, 1e-300)))
    e = d * scale[:, None]
    half = np.einsum("nij,nj->ni", np.einsum("nijk,nk->nij", skew, e, dtype=np.float64), e) / 2
    cubic = np.einsum("ni,ni->n", half, e) / 3
    # d e / d d = scale (I - d (cov d)' / q) where scaled, the identity elsewhere.
    clipped = scale < 1
    along = np.where(clipped, np.einsum("ni,ni->n", half, d) / np.where(clipped, q, 1.0), 0.0)
    return cubic, scale[:, None] * (half - along[:, None] * cov_d)


class LogitBlend(Blender):
    """Non-negative weights on member log-probabilities (geometric pooling), fitted by NLL.

    Minimised by scipy's L-BFGS-B with bounds ``w >= 0`` and the analytic gradient, from
    ``w = 0`` (the uniform prediction): a member's weight only grows when that lowers the NLL,
    so members that do not help keep exactly 0.
    The weights do not sum to 1 (see the module docstring); a member that is always right
    can push its weight up until the gradient vanishes, which ``max_iter`` / ``tol`` bound.

    ``max_iter``, ``tol``: L-BFGS-B's iteration limit and its ``ftol`` / ``gtol``. Evaluations
    run in float32, whose rounding (about 1e-7 of the NLL) is the floor: a tighter ``tol`` only
    buys failing line searches (five times the evaluations in ``benchmarks/blend.py``).
    ``train_score_``: NLL of the pooled prediction on the fitting rows. ``n_iter_``: iterations.
    With a prior, ``tau`` is one more variable of the same fit, bounded to
    :data:`~weights_search.prior.TAU_BOUNDS` (or fixed at the given value), starting from 0.

    :meth:`fit` and :meth:`fit_stats` fit from :class:`LogitStats` (see the module docstring):
    each evaluation reads the ``(D, N, W)`` kept values twice, not the ``(M, N, C)`` stack.
    :meth:`fit_exact` is the reference on the whole stack (:func:`fit_pooling`).
    """

    fusion = GEOMETRIC

    def __init__(self, max_iter: int = 200, tol: float = 1e-7) -> None:
        check_solver_options(max_iter, tol)
        self.max_iter = max_iter
        self.tol = tol

    def collector(self, labels: np.ndarray, n_classes: int, prior: LogitAdjustment | None) -> LogitCollector:
        return LogitCollector(labels, n_classes, prior, max_iter=self.max_iter, tol=self.tol)

    def collector_key(self, prior: LogitAdjustment | None) -> Hashable:
        # The pilots depend on the solver's options and on a given tau (kept fixed in them).
        return ("logit", self.max_iter, self.tol, None if prior is None else (prior.log_prior.tobytes(), prior.tau))

    def fit_stats(self, stats: Stats, prior: LogitAdjustment | None = None) -> "LogitBlend":
        """Fit from :class:`LogitStats` collected with the same ``prior`` (or a subset of them)."""
        if not isinstance(stats, LogitStats):
            raise ValueError(f"LogitBlend fits on LogitStats, got {type(stats).__name__}")
        if stats.with_prior != (prior is not None):
            raise ValueError("LogitBlend fits on statistics collected with the prior it fits with"
                             + (" (these have none)" if prior is not None else " (these have one)"))
        n_members = stats.n_params - (prior is not None)
        if prior is not None:
            prior.check(stats.n_classes)
            if not np.array_equal(prior.log_prior, stats.log_prior):
                raise ValueError("LogitBlend fits on statistics collected with the prior it fits with "
                                 "(these were collected with another log-prior)")
        return self._set(stats.fit(prior, self.max_iter, self.tol), n_members, prior)

    def fit_exact(self, log_probs: np.ndarray, labels: np.ndarray, prior: LogitAdjustment | None = None) -> "LogitBlend":
        """The exact fit on the ``(M, N, C)`` stack in hand (:func:`fit_pooling`): the reference."""
        log_probs, labels = check_members(log_probs, labels)
        return self._set(fit_pooling(log_probs, labels, prior, self.max_iter, self.tol), log_probs.shape[0], prior)

    def _set(self, result, n_members: int, prior: LogitAdjustment | None) -> "LogitBlend":
        x = np.asarray(result.x, dtype=np.float64)
        self.weights_ = x[:n_members]
        self.tau_, self.log_prior_ = (None, None) if prior is None else (float(x[n_members]), prior.log_prior)
        self.n_iter_ = int(result.nit)
        self.train_score_ = float(result.fun)
        return self
