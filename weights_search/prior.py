"""Long-tail prior correction: post-hoc logit adjustment of the blend (Menon, Jayasumana, Rawat,
Jain, Veit and Kumar, "Long-tail learning via logit adjustment", ICLR 2021).

Members trained by cross-entropy on a long-tailed training set learn its class prior ``pi``
(the training class frequencies), so on a balanced split they over-predict common classes.
The blend's prediction is corrected once, after fusion::

    log q[n, c] = s[n, c] - tau * log pi_c - logsumexp_c' (s[n, c'] - tau * log pi_c')

where ``s`` is what the fusion produces: for a mixture the log of the fused probabilities
``log sum_m w_m p_m``, for geometric pooling the pooled logits ``sum_m w_m log p_m``. ``tau = 1``
divides the blend's probabilities by the prior (Bayes' rule for a balanced test split when the
blend is calibrated); ``tau = 0`` is the plain blend. A ``tau`` is either given or fitted on the
labelled rows by the NLL of the corrected blend, together with the weights (see
:class:`LogitAdjustment` and the methods).

Why after fusion: every member's probability carries the same training prior as a factor,
``p_m(c | x) = pi_c g_m(c | x) / Z_m(x)``, so it factors out of a mixture,
``sum_m w_m p_m(c | x) = pi_c sum_m (w_m / Z_m(x)) g_m(c | x)``, and dividing the fused
probability by ``pi_c ** tau`` removes it once, whatever the weights; the fitted ``tau`` measures
how much prior the *blend* carries. Pooled logits are a weighted sum of member log-probabilities,
each holding ``log pi``, so they hold ``(sum_m w_m) log pi`` and the correction is one more
weighted term on them (which keeps the pooling fit convex).

Shapes: ``M`` members, ``N`` rows, ``C`` classes, as in :mod:`weights_search.functional`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy.special import logsumexp

from weights_search.functional import _normalise, check_members
from weights_search.stats import MixtureCollector, MixtureStats, PriorBins

if TYPE_CHECKING:
    from weights_search.margins import MixtureMargins

#: Range of a fitted ``tau`` (a given one must lie in it too): 0 is the plain blend, 1 removes the
#: prior once; more than 3 would trust the rarest classes more than any evidence on validation does.
TAU_BOUNDS = (0.0, 3.0)
#: A class with no training image counts as this many images, so that its log-prior stays finite
#: (half the rarest count a class can have).
ZERO_COUNT = 0.5
#: Fitting ``tau`` together with the weights of a mixture stops when ``tau`` moves less than
#: this between rounds, or after :data:`MAX_ROUNDS` rounds.
TAU_TOL = 1e-3
MAX_ROUNDS = 10
#: The most ``tau`` moves between two expansion points of the ``nll`` method's joint fit, and how
#: near the expansion point its solution must lie to be kept. The fit's model of the normalisers
#: is exact to second order there, so a solution ``d`` away is off by about ``d**2`` times the
#: third cumulant of the log-prior over the curvature (measured: ``0.5 d**2``), under 1e-3 at 0.02.
TAU_STEP = 0.5
TAU_NEAR = 0.02
#: Rows of per-bin masses per block when the normalisers' moments are summed (float64 copies
#: of a block stay small).
MOMENT_ROWS = 4096


def class_log_prior(counts: np.ndarray, zero_count: float = ZERO_COUNT) -> np.ndarray:
    """``(C,)`` float64 log class frequencies of the ``(C,)`` non-negative training counts.

    A count of 0 is replaced by ``zero_count`` before normalising (the log of 0 would be -inf).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"expected class counts of shape (n_classes,), got {counts.shape}")
    if not (np.isfinite(counts).all() and (counts >= 0).all()):
        raise ValueError("class counts must be finite and non-negative")
    if not zero_count > 0:
        raise ValueError(f"zero_count must be positive, got {zero_count}")
    smoothed = np.where(counts > 0, counts, zero_count)
    return np.log(smoothed / smoothed.sum())


def adjust(log_probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """``(n, C)`` float32: ``log_probs - tau * log_prior``, renormalised over classes.

    ``log_probs``: ``(n, C)`` fused class log-probabilities (entries of -inf stay -inf);
    ``log_prior``: ``(C,)``. Rows are independent, so chunks of rows give the same result.
    """
    log_probs = np.asarray(log_probs, dtype=np.float32)
    log_prior = np.asarray(log_prior)
    if log_probs.ndim != 2 or log_prior.shape != log_probs.shape[1:]:
        raise ValueError(f"log_prior of shape {log_prior.shape} does not match log_probs of shape {log_probs.shape}")
    if tau == 0:
        return log_probs
    return _normalise(log_probs - np.float32(tau) * log_prior.astype(np.float32))


@dataclass(frozen=True)
class LogitAdjustment:
    """The prior correction a method fits with: ``log_prior`` ``(C,)`` (see
    :func:`class_log_prior`) and ``tau``, a float in :data:`TAU_BOUNDS`, or None to fit it."""

    log_prior: np.ndarray
    tau: float | None = None

    def __post_init__(self) -> None:
        log_prior = np.asarray(self.log_prior, dtype=np.float64)
        if log_prior.ndim != 1 or log_prior.size == 0 or not np.isfinite(log_prior).all():
            raise ValueError(f"log_prior must be a finite (n_classes,) array, got shape {log_prior.shape}")
        object.__setattr__(self, "log_prior", log_prior)
        low, high = TAU_BOUNDS
        if self.tau is not None and not low <= self.tau <= high:
            raise ValueError(f"tau must lie in [{low:g}, {high:g}], got {self.tau}")

    def check(self, n_classes: int) -> None:
        if self.log_prior.size != n_classes:
            raise ValueError(f"a prior of {self.log_prior.size} classes for members of {n_classes} classes")


class MixtureScores:
    """What a mixture method's fit reads at one ``tau`` (all from :class:`~weights_search.stats.MixtureStats`).

    ``true_lp``: ``(M, N)`` float64, each member's log-probability of the true class minus
    ``tau * shift[y]``; ``log_norm``: ``(M, N)`` float64, ``log sum_c p_m[n, c] exp(-tau shift_c)``,
    or None (0: the plain blend). The corrected mixture's probability of the true class is then
    ``sum_m w_m exp(true_lp[m]) / sum_m w_m exp(log_norm[m])``. :attr:`margins` (a
    :class:`~weights_search.margins.MixtureMargins` from the statistics' rival pairs) counts the
    rows the corrected mixture gets right, for the methods that count rows right.

    When asked for (:meth:`MixturePrior.at`), ``tilt_mean`` and ``tilt_var`` (``(M, N)``) are the
    mean and variance of ``shift`` under each member's corrected distribution: the first two
    derivatives of ``log_norm`` in ``tau`` are ``-tilt_mean`` and ``tilt_var``. ``true_shift``:
    ``(N,)``, ``shift`` of each row's true class.

    ``log_norm`` and ``margins`` may be given as functions of no arguments instead, called on
    first use (work the methods that do not read them never do).
    """

    def __init__(self, true_lp: np.ndarray, log_norm: np.ndarray | Callable[[], np.ndarray] | None = None, *,
                 tau: float = 0.0, true_shift: np.ndarray | None = None, tilt_mean: np.ndarray | None = None,
                 tilt_var: np.ndarray | None = None, margins: Callable[[], "MixtureMargins"] | None = None) -> None:
        self.true_lp = true_lp
        self._log_norm = log_norm
        self.tau = tau
        self.true_shift = true_shift
        self.tilt_mean = tilt_mean
        self.tilt_var = tilt_var
        self._margins = margins

    @cached_property
    def log_norm(self) -> np.ndarray | None:
        return self._log_norm() if callable(self._log_norm) else self._log_norm

    @cached_property
    def margins(self) -> "MixtureMargins":
        if self._margins is None:
            raise ValueError("these statistics were collected without rival pairs: collect them with the "
                             "collector of a method that counts rows right")
        return self._margins()


class MixturePrior:
    """The prior-corrected mixture problem for any ``tau``, from a mixture method's statistics.

    ``members``: :class:`~weights_search.stats.MixtureStats` collected with this prior, or an
    ``(M, N, C)`` stack of member log-probabilities (collected here, in one block);
    ``labels``: ``(N,)``; ``log_prior``: ``(C,)``. The log-prior is used shifted to
    ``shift = log_prior - min(log_prior) >= 0`` (the shift cancels in every corrected
    probability), so ``exp(-tau * shift) <= 1`` never overflows. Each ``tau`` costs one product
    of the ``(M, N, D)`` per-bin masses with ``D`` weights (see :mod:`weights_search.stats`).
    """

    def __init__(self, members: MixtureStats | np.ndarray, labels: np.ndarray, log_prior: np.ndarray) -> None:
        log_prior = np.asarray(log_prior, dtype=np.float64)
        if isinstance(members, MixtureStats):
            stats = members
            if not np.array_equal(stats.labels, labels):
                raise ValueError("labels differ from those the statistics were collected with")
        else:
            log_probs, labels = check_members(members, labels)
            collector = MixtureCollector(labels, log_probs.shape[2], log_prior)
            collector.add(0, log_probs)
            stats = collector.result()
        if stats.bins is None or not np.array_equal(stats.bins.log_prior, log_prior):
            raise ValueError("the statistics were collected without this prior: collect them with it")
        self.stats = stats
        self.labels = stats.labels
        self.bins = stats.bins
        self.shift = stats.bins.shift
        self.n_members = stats.n_members
        self.true_lp = stats.true_lp
        self.true_shift = self.shift[self.labels]

    def at(self, tau: float, moments: bool = False) -> MixtureScores:
        """The scores a mixture method fits its weights on, corrected with ``tau``; with
        ``moments``, also ``tilt_mean`` and ``tilt_var`` (from the same pass over the bins)."""
        stats = self.stats
        n_members, n_rows = stats.true_lp.shape
        mass = stats.bin_probs.reshape(n_members * n_rows, -1)
        offsets = None if stats.bin_shift is None else stats.bin_shift.reshape(mass.shape)
        mean = var = None
        if moments:
            total, mean, var = (v.reshape(n_members, n_rows) for v in _tilted(self.bins, mass, offsets, tau, True))
            log_norm = np.log(total)
        else:
            def log_norm() -> np.ndarray:
                return np.log(_tilted(self.bins, mass, offsets, tau, False)[0]).reshape(n_members, n_rows)

        def margins() -> "MixtureMargins":
            from weights_search.margins import MixtureMargins  # margins.py reads scores of this module
            return MixtureMargins.from_stats(stats, tau)
        return MixtureScores(self.true_lp - tau * self.true_shift, log_norm, tau=tau, true_shift=self.true_shift,
                             tilt_mean=mean, tilt_var=var, margins=margins if stats.pairs is not None else None)

    def mixture_bins(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, D)`` float64 per-bin masses of the mixture with ``(M,)`` weights (normalised
        here), and its offset sums (fine bins) or None: the members' added with the weights."""
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        stats = self.stats
        mass = np.zeros(stats.bin_probs.shape[1:])
        offsets = None if stats.bin_shift is None else np.zeros(mass.shape)
        for m in np.flatnonzero(w):
            mass += w[m] * stats.bin_probs[m]
            if offsets is not None:
                offsets += w[m] * stats.bin_shift[m]
        return mass, offsets

    def fit_tau(self, weights: np.ndarray, start: float = 1.0) -> float:
        """The ``tau`` in :data:`TAU_BOUNDS` that minimises the NLL of the corrected mixture with
        ``(M,)`` weights (see :func:`fit_tau`)."""
        w = np.asarray(weights, dtype=np.float64)
        with np.errstate(divide="ignore"):
            true = logsumexp(self.true_lp + np.log(w / w.sum())[:, None], axis=0)
        mass, offsets = self.mixture_bins(w)
        return _fit_tau(self.bins, mass, offsets, self.true_shift, np.isfinite(true), start)


def fit_tau(probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, start: float = 1.0) -> float:
    """The ``tau`` in :data:`TAU_BOUNDS` minimising the mean NLL of ``probs / prior ** tau``.

    ``probs``: ``(N, C)`` fused class probabilities (float32 or float64); ``labels``: ``(N,)``;
    ``log_prior``: ``(C,)``. With ``a = log_prior``, the NLL ``mean_n [-log probs[n, y] + tau a_y
    + log sum_c probs[n, c] exp(-tau a_c)]`` is convex in ``tau``: its derivative is
    ``mean_n (a_y - E_q[a])`` and its second derivative ``mean_n Var_q[a]`` under the corrected
    ``q``. The classes' probabilities are first summed per prior bin
    (:class:`~weights_search.stats.PriorBins`: exact when the prior has at most ``MAX_BINS``
    distinct values), then Newton's method from ``start``, kept inside a shrinking bracket,
    finds it to 1e-6 in a few products with ``(D, 3)``. Rows where the true class has
    probability 0 are left out (no ``tau`` changes their NLL).
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probs (n_samples, n_classes) and labels (n_samples,), got {probs.shape} and {labels.shape}")
    bins = PriorBins(log_prior)
    if bins.shift.size != probs.shape[1]:
        raise ValueError(f"a prior of {bins.shift.size} classes for probabilities of {probs.shape[1]} classes")
    mass, offsets = bins.sum(probs)
    return _fit_tau(bins, mass, offsets, bins.shift[labels], probs[np.arange(labels.size), labels] > 0, start)


def _fit_tau(bins: PriorBins, mass: np.ndarray, offsets: np.ndarray | None, true_shift: np.ndarray,
             kept: np.ndarray, start: float) -> float:
    """:func:`fit_tau` on ``(N, D)`` per-bin masses (and fine bins' offset sums), ``(N,)`` true
    class shifts and ``kept``, the rows whose true class has a non-zero probability."""
    if not kept.any():
        raise ValueError("the true class has probability 0 on every row: no tau to fit")
    if not kept.all():
        mass = mass[kept]
        offsets = None if offsets is None else offsets[kept]
    a_true = float(true_shift[kept].mean())
    low, high = TAU_BOUNDS
    low_seen = high_seen = False
    tau = float(np.clip(start, low, high))
    for _ in range(100):
        _, mean, variance = _tilted(bins, mass, offsets, tau, True)
        slope, curvature = a_true - float(mean.mean()), float(variance.mean())
        if slope > 0:
            high, high_seen = tau, True
        elif slope < 0:
            low, low_seen = tau, True
        if slope == 0 or high - low < 1e-9:
            return tau
        step = tau - slope / curvature if curvature > 0 else np.nan
        if not low < step < high:  # outside the bracket (or NaN): try the bound once, else bisect
            step = low if step <= low and not low_seen else high if step >= high and not high_seen else (low + high) / 2
        if abs(step - tau) < 1e-6:
            return float(step)
        tau = float(step)
    return tau


def _tilted(bins: PriorBins, mass: np.ndarray, offsets: np.ndarray | None, tau: float,
            moments: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """For ``(R, D)`` per-bin masses (float32 or float64; fine bins: with their offset sums),
    ``(R,)`` float64 ``sum_c p_c exp(-tau a_c)`` and, with ``moments``, the mean and variance of
    ``a`` under the tilted distribution; in blocks of :data:`MOMENT_ROWS` rows, in float64.

    Moments are taken about the middle of the shifts, which keeps the variance free of
    cancellation.
    """
    centre = (bins.shift.max() + bins.shift.min()) / 2
    n_rows = mass.shape[0]
    total = np.empty(n_rows)
    mean = np.empty(n_rows) if moments else None
    var = np.empty(n_rows) if moments else None
    if offsets is None:
        a = bins.low - centre
        tilt = np.exp(-tau * bins.low)
        basis = np.stack([tilt, a * tilt, a * a * tilt], axis=1) if moments else tilt
    for start in range(0, n_rows, MOMENT_ROWS):
        block = mass[start:start + MOMENT_ROWS].astype(np.float64)
        stop = start + block.shape[0]
        if offsets is None:
            sums = block @ basis
        else:
            a = bins.shifts_of(block, offsets[start:stop].astype(np.float64))
            weighted = block * np.exp(-tau * a)
            a -= centre
            sums = weighted.sum(axis=1) if not moments else np.stack(
                [weighted.sum(axis=1), (weighted * a).sum(axis=1), (weighted * a * a).sum(axis=1)], axis=1)
        if not moments:
            total[start:stop] = sums
            continue
        total[start:stop] = sums[:, 0]
        block_mean = sums[:, 1] / sums[:, 0]
        var[start:stop] = np.maximum(sums[:, 2] / sums[:, 0] - block_mean * block_mean, 0.0)
        mean[start:stop] = block_mean + centre
    return total, mean, var


def fit_mixture_prior(fit_at: Callable[[MixtureScores, np.ndarray | None], np.ndarray], problem: MixturePrior,
                      tau: float | None) -> float:
    """Fit a mixture method's weights with the prior correction; returns the ``tau`` used.

    ``fit_at(scores, start)`` fits the method's weights on ``scores`` (from
    :meth:`MixturePrior.at`), starting from ``start`` (the previous round's ``(M,)`` weights, or
    None), and returns them. A given ``tau`` is used as it is. Otherwise the weights and ``tau``
    are fitted in turns: ``tau`` for equal weights, then the weights at that ``tau``, then the
    ``tau`` of those weights, and so on until ``tau`` moves less than :data:`TAU_TOL` (at most
    :data:`MAX_ROUNDS` rounds). The weights returned were fitted at the returned ``tau``, and
    that ``tau`` is within :data:`TAU_TOL` of the best one for them; for a method whose
    objective is the corrected NLL (``nll``) each turn lowers it, so the pair approaches a joint
    optimum.
    """
    if tau is not None:
        fit_at(problem.at(tau), None)
        return float(tau)
    n_members = problem.n_members
    tau = problem.fit_tau(np.full(n_members, 1.0 / n_members))
    weights = None
    for round_ in range(MAX_ROUNDS):
        weights = fit_at(problem.at(tau), weights)
        if round_ == MAX_ROUNDS - 1:
            break
        new = problem.fit_tau(weights, start=tau)
        if abs(new - tau) < TAU_TOL:
            break
        tau = new
    return tau
