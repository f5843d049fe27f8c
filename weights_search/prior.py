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
from typing import Callable

import numpy as np

from weights_search.functional import _normalise, check_members

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
#: Rows of the member stack per block when the normalisers' moments are summed.
MOMENT_ROWS = 128


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
    """What a mixture method's fit reads at one ``tau``.

    ``true_lp``: ``(M, N)`` float64, each member's log-probability of the true class minus
    ``tau * shift[y]``; ``log_norm``: ``(M, N)`` float64, ``log sum_c p_m[n, c] exp(-tau shift_c)``,
    or None (0: the plain blend). The corrected mixture's probability of the true class is then
    ``sum_m w_m exp(true_lp[m]) / sum_m w_m exp(log_norm[m])``. :attr:`log_probs` (``(M, N, C)``,
    the member log-probabilities minus ``tau * shift``, not renormalised) ranks classes as the
    corrected mixture does, for the methods that count rows right; :attr:`class_shift` is that
    ``(C,)`` float32 ``tau * shift`` (None when 0), for those that subtract it member by member.

    When asked for (:meth:`MixturePrior.at`), ``tilt_mean`` and ``tilt_var`` (``(M, N)``) are the
    mean and variance of ``shift`` under each member's corrected distribution: the first two
    derivatives of ``log_norm`` in ``tau`` are ``-tilt_mean`` and ``tilt_var``. ``true_shift``:
    ``(N,)``, ``shift`` of each row's true class.

    ``log_norm`` may be given as a function of no arguments instead, called on first use (a
    pass over the member stack that the methods counting rows right never need).
    """

    def __init__(self, log_probs: np.ndarray, labels: np.ndarray, true_lp: np.ndarray,
                 log_norm: np.ndarray | Callable[[], np.ndarray] | None = None, shift: np.ndarray | None = None,
                 tau: float = 0.0, tilt_mean: np.ndarray | None = None, tilt_var: np.ndarray | None = None) -> None:
        self.labels = labels
        self.true_lp = true_lp
        self._log_norm = log_norm
        self._log_probs = log_probs
        self._shift = shift
        self.tau = tau
        self.tilt_mean = tilt_mean
        self.tilt_var = tilt_var

    @cached_property
    def log_norm(self) -> np.ndarray | None:
        return self._log_norm() if callable(self._log_norm) else self._log_norm

    @property
    def true_shift(self) -> np.ndarray:
        return self._shift[self.labels]

    @property
    def members(self) -> np.ndarray:
        """The ``(M, N, C)`` member log-probabilities, without the correction."""
        return self._log_probs

    @cached_property
    def class_shift(self) -> np.ndarray | None:
        if self._shift is None or self.tau == 0:
            return None
        return np.float32(self.tau) * self._shift.astype(np.float32)

    @cached_property
    def log_probs(self) -> np.ndarray:
        if self.class_shift is None:
            return self._log_probs
        return self._log_probs - self.class_shift


class MixturePrior:
    """The prior-corrected mixture problem of ``(M, N, C)`` member log-probabilities, ``(N,)``
    labels and a ``(C,)`` log-prior, for any ``tau``.

    The log-prior is used shifted to ``shift = log_prior - min(log_prior) >= 0`` (the shift
    cancels in every corrected probability), so ``exp(-tau * shift) <= 1`` never overflows.
    Holds the member probabilities ``(M, N, C)`` float32: one exponential of the stack, after
    which each ``tau`` costs one matrix-vector product over it.
    """

    def __init__(self, log_probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray) -> None:
        log_probs, labels = check_members(log_probs, labels)
        self.log_probs = log_probs
        self.labels = labels
        self.shift = np.asarray(log_prior, dtype=np.float64) - np.min(log_prior)
        self.probs = np.exp(log_probs, dtype=np.float32)
        self.true_lp = log_probs[:, np.arange(labels.size), labels].astype(np.float64)
        self.true_shift = self.shift[labels]

    def at(self, tau: float, moments: bool = False) -> MixtureScores:
        """The scores a mixture method fits its weights on, corrected with ``tau``; with
        ``moments``, also ``tilt_mean`` and ``tilt_var`` (from the same pass over the stack)."""
        n_members, n_rows, n_classes = self.probs.shape
        tilt = np.exp(-tau * self.shift)
        flat = self.probs.reshape(-1, n_classes)
        mean = var = None
        if moments:
            # Moments about the middle of the shifts keep the variance free of cancellation. The
            # stack is read once, in blocks of rows small enough to stay in cache for the product
            # with the (C, 3) basis (one product over the whole stack runs slower than three
            # matrix-vector products here; blocks of 128 rows run faster than either).
            centre = (self.shift.max() + self.shift.min()) / 2
            a = self.shift - centre
            basis = np.stack([tilt, a * tilt, a * a * tilt], axis=1).astype(np.float32)
            sums = np.empty((flat.shape[0], 3), dtype=np.float32)
            for start in range(0, flat.shape[0], MOMENT_ROWS):
                np.matmul(flat[start:start + MOMENT_ROWS], basis, out=sums[start:start + MOMENT_ROWS])
            sums = sums.astype(np.float64)
            total, mean = sums[:, 0], sums[:, 1] / sums[:, 0]
            var = np.maximum(sums[:, 2] / total - mean * mean, 0.0).reshape(n_members, n_rows)
            mean = (mean + centre).reshape(n_members, n_rows)
            log_norm = np.log(total).reshape(n_members, n_rows)
        else:
            def log_norm() -> np.ndarray:
                total = (flat @ tilt.astype(np.float32)).astype(np.float64)
                return np.log(total).reshape(n_members, n_rows)
        return MixtureScores(self.log_probs, self.labels, self.true_lp - tau * self.true_shift, log_norm,
                             self.shift, tau, mean, var)

    def mixture(self, weights: np.ndarray) -> np.ndarray:
        """``(N, C)`` float32 fused probabilities ``sum_m w_m p_m`` (``weights`` normalised here)."""
        w = np.asarray(weights, dtype=np.float64)
        w = (w / w.sum()).astype(np.float32)
        n_members, n_rows, n_classes = self.probs.shape
        return (w @ self.probs.reshape(n_members, -1)).reshape(n_rows, n_classes)

    def fit_tau(self, weights: np.ndarray, start: float = 1.0) -> float:
        """The ``tau`` in :data:`TAU_BOUNDS` that minimises the NLL of the corrected mixture with
        ``(M,)`` weights (see :func:`fit_tau`)."""
        return fit_tau(self.mixture(weights), self.labels, self.shift, start)


def fit_tau(probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, start: float = 1.0) -> float:
    """The ``tau`` in :data:`TAU_BOUNDS` minimising the mean NLL of ``probs / prior ** tau``.

    ``probs``: ``(N, C)`` fused class probabilities (float32 or float64); ``labels``: ``(N,)``;
    ``log_prior``: ``(C,)``. With ``a = log_prior``, the NLL ``mean_n [-log probs[n, y] + tau a_y
    + log sum_c probs[n, c] exp(-tau a_c)]`` is convex in ``tau``: its derivative is
    ``mean_n (a_y - E_q[a])`` and its second derivative ``mean_n Var_q[a]`` under the corrected
    ``q``. Newton's method from ``start``, kept inside a shrinking bracket, finds it to 1e-6 in a
    few matrix products with ``(C, 3)``. Rows where the true class has probability 0 are left out
    (no ``tau`` changes their NLL).
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probs (n_samples, n_classes) and labels (n_samples,), got {probs.shape} and {labels.shape}")
    a = np.asarray(log_prior, dtype=np.float64)
    a = a - a.min()
    kept = probs[np.arange(labels.size), labels] > 0
    if not kept.any():
        raise ValueError("the true class has probability 0 on every row: no tau to fit")
    if not kept.all():
        probs = probs[kept]
    a_true = a[labels[kept]].mean()
    low, high = TAU_BOUNDS
    low_seen = high_seen = False
    tau = float(np.clip(start, low, high))
    for _ in range(100):
        slope, curvature = _tau_derivatives(probs, a, tau, a_true)
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


def _tau_derivatives(probs: np.ndarray, a: np.ndarray, tau: float, a_true: float) -> tuple[float, float]:
    """First and second derivatives in ``tau`` of the corrected NLL (see :func:`fit_tau`)."""
    tilt = np.exp(-tau * a)
    basis = np.stack([tilt, a * tilt, a * a * tilt], axis=1).astype(probs.dtype)
    moments = (probs @ basis).astype(np.float64)
    mean = moments[:, 1] / moments[:, 0]
    variance = np.maximum(moments[:, 2] / moments[:, 0] - mean * mean, 0.0)
    return a_true - float(mean.mean()), float(variance.mean())


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
    n_members = problem.probs.shape[0]
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
