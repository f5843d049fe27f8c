"""Temperature scaling: one temperature per member, fitted by validation NLL.

A temperature ``T`` divides a member's logits before the softmax; ``T > 1`` softens
over-confident members, ``T < 1`` sharpens timid ones. Apply fitted temperatures with
:func:`weights_search.functional.log_softmax`.

:func:`fit_temperature` / :func:`fit_temperatures` fit on logits in hand and are the exact
reference. For a split read in blocks (10,000 classes, 100,000 rows), a
:class:`TemperatureCollector` keeps in one pass what fits the temperatures of any subset of the
rows (:class:`TemperatureStats`: each row's largest logits exactly, the rest by a cumulant
expansion; its error is bounded there), so every CV fold and the final fit cost no further read.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from weights_search.expansion import PilotedCollector, check_rows, largest
from weights_search.functional import check_members

#: Search interval for temperatures.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature in ``bounds`` that minimises the mean NLL of ``softmax(logits / T)``.

    ``logits``: ``(N, C)`` (float16 or float32); ``labels``: ``(N,)``. The NLL is convex in
    ``1 / T``; it is minimised over ``log T`` by scipy's bounded scalar search (Brent).
    """
    low, high = bounds
    if not 0 < low < high < np.inf:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high < inf, got {bounds}")
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (n_samples, n_classes), got {logits.shape}")
    stack, labels = check_members(logits[None], labels)
    shifted = np.array(stack[0], dtype=np.float32, copy=True)
    top = shifted.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError("logits have a row whose largest value is not finite (all -inf, +inf or NaN)")
    # Subtracting the row maximum leaves every log-softmax unchanged and keeps exp from overflowing.
    shifted -= top
    true_mean = float(shifted[np.arange(labels.size), labels].mean(dtype=np.float64))

    def nll(log_t: float) -> float:
        inv_t = np.float32(np.exp(-log_t))
        log_norm = np.log(np.exp(shifted * inv_t).sum(axis=1))
        return float(log_norm.mean(dtype=np.float64) - inv_t * true_mean)

    result = minimize_scalar(nll, bounds=(np.log(low), np.log(high)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def fit_temperatures(logits: np.ndarray, labels: np.ndarray,
                     bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> np.ndarray:
    """One temperature per member: ``(M,)`` float64 for ``(M, N, C)`` logits and ``(N,)`` labels."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"expected member logits of shape (n_members, n_samples, n_classes), got {logits.shape}")
    return np.array([fit_temperature(member, labels, bounds) for member in logits])


#: Logits kept exactly per row and member by :class:`TemperatureCollector` (the largest ones).
TOP_LOGITS = 32
#: The expansion's third-order term is used up to this many tilted standard deviations of the
#: rest's logits times ``d`` (beyond, it stays at that value: the second-order part, convex,
#: carries the rest).
TRUST = 1.0
#: Logits below the row's largest by more than this are counted at this depth (their exponential
#: is 0 in float32 at any temperature in :data:`TEMPERATURE_BOUNDS` but the highest, where it is
#: below ``exp(-U_FLOOR / 20)`` = ``e**-500``).
U_FLOOR = 1e4


#: A fit whose estimated error (:meth:`TemperatureStats.fit_error`) exceeds this asks for a
#: second pass with the fit as every row's pilot. Measured, the actual error was 3 to 6 times
#: the estimate (1,010 and 10,000 classes, rows sorted by class or in halves of different
#: sharpness), so fits that pass stay within 1e-3; rows in random order estimate 1e-6.
REPASS_ERROR = 1e-4


class TemperatureStats:
    """What :class:`TemperatureCollector` keeps of each row and member, to fit temperatures.

    For member ``m`` and row ``n`` with logits ``z`` and ``s = z - max(z)``: ``row_max`` and
    ``true`` (``s`` of the true class), ``(M, N)`` float64; ``top`` ``(M, N, K)`` float32, the
    ``K`` largest ``s`` (all of them when ``C <= K``, then there is no rest); and, of the other
    ``C - K`` classes (the *rest*), ``rest_max`` (their largest ``s``, ``r``) and, with
    ``u = s - r <= 0`` tilted by ``exp(beta0 * u)`` at the row's pilot ``beta0 = 1 / T0``:
    ``log_s0 = log sum exp(beta0 u)``, the tilted ``mean``, ``var`` and third cumulant ``skew``
    of ``u``. Then

        log sum_rest exp(beta u) ~= log_s0 + mean d + var d**2 / 2 + skew d**3 / 6,   d = beta - beta0,

    the third-order cumulant expansion: exact at ``beta0`` with its first three derivatives; the
    error at ``beta`` is about ``k4 d**4 / 24`` (``k4`` the next cumulant), and it enters the row's
    log-normaliser multiplied by the rest's share of it. The third-order term is only followed
    for ``|d| sqrt(var) <= TRUST`` (held at its value there beyond), so far from the pilot the
    expansion is the convex second-order one and the bounded search over ``T`` meets no false
    minimum. The pilots come from :mod:`weights_search.expansion`: most rows' pilots are fitted
    on half the rows or more, so in random order ``d`` is a few percent of ``beta``. In an
    unfavourable order (rows sorted by class, the members' sharpness rising across classes:
    off by 5e-3..1e-2 from one pass) :meth:`fit_error` estimates the fit's error from the
    neglected term and :meth:`repass_pilot` asks for a second pass with the fit as every row's
    pilot (:func:`weights_search.fitted.fitted_temperatures` does it), after which ``d`` is the
    difference between a fold's fit and the whole split's. Measured at 1,010 and 10,000 classes
    (tests, rows in random order and sorted by class): fitted temperatures within 1e-3
    (relative; 1e-4 or so) of the exact :func:`fit_temperatures`, the whole split's and a fold's. The
    row log-normaliser (:meth:`log_norm`) is off by about 1e-5 at 10 % from the pilot, 1e-3 at
    30 %, 1e-2 at twice the pilot's temperature and 1e-1 at half of it.

    Memory: ``M * N * (K + 9)`` values (``K`` = :data:`TOP_LOGITS`), float32 for ``top``, float64
    for the rest (74 MB at 100,000 rows and 4 members); nothing ``(N, C)``.
    """

    def __init__(self, row_max, true, top, rest_max, log_s0, mean, var, skew, beta0) -> None:
        self.skew = skew
        self.row_max, self.true, self.top = row_max, true, top
        self.rest_max, self.log_s0, self.mean, self.var, self.beta0 = rest_max, log_s0, mean, var, beta0

    @property
    def n_rows(self) -> int:
        return self.true.shape[1]

    @property
    def n_members(self) -> int:
        return self.true.shape[0]

    def subset(self, rows: np.ndarray) -> "TemperatureStats":
        """The statistics of ``rows`` (sorted row indices, e.g. a CV fold's training rows)."""
        rows = check_rows(rows, self.n_rows)
        return TemperatureStats(*(a[:, rows] for a in (self.row_max, self.true, self.top, self.rest_max, self.log_s0,
                                                       self.mean, self.var, self.skew, self.beta0)))

    def _shifted_log_norm(self, m: int, beta: float, rows: slice = slice(None)) -> np.ndarray:
        """``(n,)`` float64: ``logsumexp_c(beta * s)`` of member ``m``'s rows (see the class docstring)."""
        top = self.top[m, rows].astype(np.float64) * beta
        d = beta - self.beta0[m, rows]
        with np.errstate(invalid="ignore"):
            var = self.var[m, rows]
            # The third-order term only within TRUST tilted standard deviations (see the class docstring).
            reach = TRUST / np.sqrt(np.maximum(var, 1e-300))
            cubic = np.clip(d, -reach, reach) ** 3 * self.skew[m, rows] / 6
            rest = beta * self.rest_max[m, rows] + self.log_s0[m, rows] + d * (self.mean[m, rows] + d * var / 2) + cubic
        rest = np.where(np.isneginf(self.log_s0[m, rows]), -np.inf, rest)
        high = np.maximum(top.max(axis=1), rest)
        total = np.exp(top - high[:, None]).sum(axis=1) + np.exp(rest - high)
        return high + np.log(total)

    def log_norm(self, temperatures: np.ndarray) -> np.ndarray:
        """``(M, N)`` float64: each row's log-softmax denominator ``logsumexp_c(z / T_m)`` at the
        ``(M,)`` temperatures (the rest by the expansion of the class docstring)."""
        t = np.asarray(temperatures, dtype=np.float64)
        if t.shape != (self.n_members,) or not (np.isfinite(t).all() and (t > 0).all()):
            raise ValueError(f"expected {self.n_members} positive finite temperatures, got {t}")
        return np.stack([self._shifted_log_norm(m, 1 / t[m]) + self.row_max[m] / t[m] for m in range(self.n_members)])

    def nll(self, m: int, temperature: float, rows: slice = slice(None)) -> float:
        """Mean NLL of member ``m`` at ``temperature`` (of ``rows``, all by default)."""
        beta = 1.0 / temperature
        return float(np.mean(self._shifted_log_norm(m, beta, rows) - beta * self.true[m, rows]))

    def fit_error(self, temperatures: np.ndarray, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """``(M,)``: the estimated relative error of temperatures fitted on ``rows`` at about
        ``temperatures``, from the expansion's neglected fourth-order term.

        Each row's rest is off by about ``k4 d**4 / 24`` (``d = beta - beta0``), so the NLL's slope
        in ``beta`` by ``share * k4 d**3 / 6`` (``share``: the rest's part of the row's normaliser at
        ``beta``); with ``k4`` taken as ``var**2`` (a rest of moderate kurtosis), the fitted
        ``beta`` moves by the mean of that over the slope's change (the NLL's second derivative,
        by finite differences), and ``T`` by the same relative amount. Near 0 when ``beta`` is
        within a few percent of the rows' pilots; large when a noticeable share of rows was
        expanded about a distant pilot (rows in an unfavourable order)."""
        t = np.asarray(temperatures, dtype=np.float64)
        out = np.zeros(self.n_members)
        for m in range(self.n_members):
            beta = 1.0 / t[m]
            beta0, var = self.beta0[m, rows], self.var[m, rows]
            d = beta - beta0
            rest = beta * self.rest_max[m, rows] + self.log_s0[m, rows] + d * (self.mean[m, rows] + d * var / 2)
            with np.errstate(invalid="ignore", over="ignore"):
                share = np.where(np.isneginf(self.log_s0[m, rows]), 0.0,
                                 np.exp(np.minimum(rest - self._shifted_log_norm(m, beta, rows), 0.0)))
            slope = np.mean(share * var * var * d ** 3 / 6)
            h = 1e-3 * beta
            curve = [np.mean(self._shifted_log_norm(m, b, rows) - b * self.true[m, rows]) for b in (beta - h, beta, beta + h)]
            second = (curve[0] - 2 * curve[1] + curve[2]) / h ** 2
            out[m] = abs(slope) / max(second, 1e-12) / beta
        return out

    def repass_pilot(self, temperatures: np.ndarray, rows: slice | np.ndarray = slice(None)) -> np.ndarray | None:
        """``temperatures`` when :meth:`fit_error` exceeds :data:`REPASS_ERROR` for some member
        (collect again with them as the fixed pilot: :meth:`TemperatureCollector.with_pilot`),
        else None."""
        return np.asarray(temperatures, dtype=np.float64) if (self.fit_error(temperatures, rows) > REPASS_ERROR).any() else None

    def fit(self, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, rows: slice = slice(None)) -> np.ndarray:
        """``(M,)`` float64: each member's temperature in ``bounds`` minimising the NLL (the same
        bounded search over ``log T`` as :func:`fit_temperature`), of ``rows`` (all by default)."""
        low, high = _check_bounds(bounds)
        out = np.empty(self.n_members)
        for m in range(self.n_members):
            result = minimize_scalar(lambda log_t: self.nll(m, float(np.exp(log_t)), rows),
                                     bounds=(np.log(low), np.log(high)), method="bounded", options={"xatol": 1e-4})
            out[m] = float(np.exp(result.x))
        return out


class TemperatureCollector(PilotedCollector):
    """Collects, in one pass over ``(M, b, C)`` float32 LOGITS blocks (rows in order), what
    :class:`TemperatureStats` needs to fit every member's temperature on any subset of the rows:
    one pass serves every CV fold (``stats.subset(train).fit()``) and the final fit.

    ``labels``: ``(N,)``; ``top``: logits kept exactly per row (:data:`TOP_LOGITS`);
    ``pilot``: ``(M,)`` temperatures to expand every row's rest about, or None to fit them from
    the rows as they come (see :mod:`weights_search.expansion`). With ``C <= top`` classes
    every logit is kept and the fit is exact (no pilot).

    Work per block: the largest logits (:func:`~weights_search.expansion.largest`), one
    exponential and a few products and sums per value, member by member, in pieces of
    :data:`~weights_search.expansion.CHUNK_VALUES` values. Measured peak memory beyond the
    caller's blocks (4 members, 10,000 classes): about 50 MB (the held first rows), plus the
    statistics.
    """

    def __init__(self, labels: np.ndarray, n_members: int, *, top: int = TOP_LOGITS,
                 pilot: np.ndarray | None = None) -> None:
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        if pilot is not None:
            pilot = np.asarray(pilot, dtype=np.float64)
            if pilot.shape != (n_members,) or not (np.isfinite(pilot).all() and (pilot > 0).all()):
                raise ValueError(f"pilot must be {n_members} positive finite temperatures, got {pilot}")
        super().__init__(labels, n_members, pilot)
        self.top = top

    def with_pilot(self, pilot: np.ndarray) -> "TemperatureCollector":
        """A new collector of the same rows with ``pilot`` fixed for every row (the re-pass)."""
        return TemperatureCollector(self.labels, self.n_members, top=self.top, pilot=pilot)

    def _needs_pilot(self, n_classes: int) -> bool:
        return n_classes > self.top

    def _start(self, n_classes: int) -> None:
        shape = (self.n_members, self.n_rows)
        k = min(self.top, n_classes)
        self._stats_ = TemperatureStats(np.zeros(shape), np.zeros(shape), np.zeros(shape + (k,), dtype=np.float32),
                                        np.zeros(shape), np.full(shape, -np.inf), np.zeros(shape), np.zeros(shape),
                                        np.zeros(shape), np.ones(shape))

    def _exact_pilot(self, block: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return fit_temperatures(block, labels)

    def _refit(self, stop: int) -> np.ndarray:
        return self._stats_.fit(rows=slice(0, stop))

    def _summarise(self, start: int, block: np.ndarray, pilot: np.ndarray | None) -> None:
        st = self._stats_
        n_classes = block.shape[2]
        rows = slice(start, start + block.shape[1])
        labels = self.labels[rows]
        k = st.top.shape[2]
        for m in range(self.n_members):
            z = np.asarray(block[m], dtype=np.float32)
            high = z.max(axis=1)
            if not np.isfinite(high).all():
                raise ValueError("logits have a row whose largest value is not finite (all -inf, +inf or NaN)")
            s = z - high[:, None]
            st.row_max[m, rows] = high
            st.true[m, rows] = s[np.arange(labels.size), labels]
            if n_classes <= k:
                st.top[m, rows] = s
                continue
            # The k + 1 largest, in increasing order: the first is the rest's largest, r.
            columns = largest(s, k + 1)
            values = np.take_along_axis(s, columns, axis=1)
            order = np.argsort(values, axis=1)
            values = np.take_along_axis(values, order, axis=1)
            columns = np.take_along_axis(columns, order, axis=1)[:, 1:]
            st.top[m, rows] = values[:, 1:]
            r = values[:, 0]
            # A rest whose largest logit is -inf is empty in effect: every term is 0.
            empty = np.isneginf(r)
            u = s
            u -= np.where(empty, np.float32(0), r)[:, None]
            np.clip(u, np.float32(-U_FLOOR), np.float32(0), out=u)  # the kept classes' terms are dropped below
            beta0 = 1.0 / pilot[m]
            e = np.exp(np.float32(beta0) * u)
            np.put_along_axis(e, columns, np.float32(0), axis=1)
            s0 = e.sum(axis=1, dtype=np.float64)
            e *= u
            s1 = e.sum(axis=1, dtype=np.float64)
            e *= u
            s2 = e.sum(axis=1, dtype=np.float64)
            e *= u
            s3 = e.sum(axis=1, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(empty, 0.0, s1 / s0)
                st.skew[m, rows] = np.where(empty, 0.0, s3 / s0 - 3 * mean * s2 / s0 + 2 * mean ** 3)
                st.log_s0[m, rows] = np.where(empty, -np.inf, np.log(s0))
                st.var[m, rows] = np.where(empty, 0.0, np.maximum(s2 / s0 - mean * mean, 0.0))
            st.rest_max[m, rows] = r
            st.mean[m, rows] = mean
            st.beta0[m, rows] = beta0

    def _stats(self) -> TemperatureStats:
        return self._stats_


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = bounds
    if not 0 < low < high < np.inf:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high < inf, got {bounds}")
    return low, high
