"""Mixtures of member probabilities: equal weights, and weights fitted by validation NLL.

A mixture predicts ``p_n = sum_m w_m p_m[n]`` with ``w`` on the simplex. Its NLL on labelled
rows depends only on the true-class log-probabilities ``L[m, n] = log p_m[n, y_n]``, an
``(M, N)`` matrix, so a fit never touches the ``(M, N, C)`` stack after extracting that column.
Corrected for a prior (:mod:`weights_search.prior`), the mixture's true-class probability is
``sum_m w_m exp(L'[m, n]) / sum_m w_m exp(G[m, n])``, with ``L'`` the true-class column and
``G`` each member's log-normaliser at that ``tau``: two ``(M, N)`` matrices, still linear in ``w``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from weights_search.base import MixtureBlender, check_solver_options
from weights_search.prior import MAX_ROUNDS, TAU_BOUNDS, TAU_NEAR, TAU_STEP, MixturePrior, MixtureScores


def mixture_nll(true_lp: np.ndarray, weights: np.ndarray, log_norm: np.ndarray | None = None) -> float:
    """Mean NLL of the mixture with ``(M,)`` weights (normalised here) on ``(M, N)`` true-class log-probs.

    ``log_norm``: ``(M, N)`` member log-normalisers of a prior-corrected mixture (see the module
    docstring), or None (the plain mixture). ``inf`` when some row has probability 0 under every
    weighted member.
    """
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_w = np.log(w / w.sum())
    nll = -logsumexp(true_lp + log_w[:, None], axis=0)
    if log_norm is not None:
        nll += logsumexp(log_norm + log_w[:, None], axis=0)
    return float(nll.mean())


def mixture_nll_and_grad(theta: np.ndarray, true_lp: np.ndarray,
                         log_norm: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Mean mixture NLL and its gradient with respect to ``theta``, where ``w = softmax(theta)``.

    ``theta``: ``(M,)``; ``true_lp``: ``(M, N)`` with at least one finite entry per column. With
    responsibilities ``r[m, n] = w_m p_m[n] / p_n``, the gradient is ``w - mean_n r[:, n]``
    (zero exactly at the EM fixed point). With ``log_norm`` (``(M, N)``, finite), the NLL gains
    ``mean_n log sum_m w_m exp(log_norm[m, n])`` and the gradient ``mean_n s[:, n] - w``, ``s``
    being the responsibilities of ``log_norm``.
    """
    log_w = theta - logsumexp(theta)
    nll, r = _log_mix(true_lp, log_w)
    if log_norm is None:
        return -nll, np.exp(log_w) - r
    norm, s = _log_mix(log_norm, log_w)
    return norm - nll, s - r


def prior_nll_and_grad(x: np.ndarray, true_lp: np.ndarray, true_shift: np.ndarray, log_norm: np.ndarray,
                       tilt_mean: np.ndarray, tilt_var: np.ndarray, tau0: float) -> tuple[float, np.ndarray]:
    """Mean NLL of the prior-corrected mixture and its gradient in ``x = (theta, tau)``.

    ``theta``: ``(M,)`` with ``w = softmax(theta)``; the other arrays are those of
    :class:`~weights_search.prior.MixtureScores` at ``tau0`` (``(M, N)``; ``true_shift``
    ``(N,)``), all rows informative. Moving ``tau`` from ``tau0`` by ``d`` lowers every
    true-class term by ``d * true_shift`` and changes each log-normaliser by its second-order
    Taylor expansion ``-d * tilt_mean + d**2 / 2 * tilt_var`` (a cumulant expansion, exact in
    value, slope and curvature at ``tau0``), so an evaluation costs ``O(M N)`` whatever ``tau``.
    """
    theta, d = x[:-1], x[-1] - tau0
    log_w = theta - theta.max()
    log_w -= np.log(np.exp(log_w).sum())
    fit, r = _log_mix(true_lp, log_w)
    slope = d * tilt_var
    slope -= tilt_mean
    model = slope - tilt_mean
    model *= d / 2
    model += log_norm
    norm, s, resp = _log_mix(model, log_w, rows=True)
    shift = float(true_shift.mean())
    resp *= slope
    grad = np.append(s - r, resp.sum() / resp.shape[1] + shift)
    return norm - fit + d * shift, grad


def _positive_definite(matrix: np.ndarray) -> np.ndarray:
    """The symmetric positive definite matrix nearest ``matrix`` (eigenvalues floored at 1e-6 of the
    largest): BFGS's inverse-Hessian estimate, which rounding can push slightly indefinite along
    the softmax's flat direction, made fit to start the next round's BFGS from."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    values = np.maximum(values, 1e-6 * max(values.max(), 1e-12))
    matrix = (vectors * values) @ vectors.T
    return (matrix + matrix.T) / 2  # scipy checks exact symmetry


def _log_mix(x: np.ndarray, log_w: np.ndarray, rows: bool = False):
    """``mean_n log sum_m w_m exp(x[m, n])`` and the mean responsibilities ``(M,)`` (with
    ``rows``, also the ``(M, N)`` responsibilities themselves)."""
    e = x + log_w[:, None]
    top = e.max(axis=0)
    e -= top
    np.exp(e, out=e)
    total = e.sum(axis=0)
    e /= total
    value = float((top + np.log(total)).mean())
    return (value, e.mean(axis=1), e) if rows else (value, e.mean(axis=1))


def informative_rows(true_lp: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: rows where some member gives the true class a non-zero probability.

    On the other rows every mixture has NLL ``inf``, whatever the weights, so they carry no
    information about the weights and the fits leave them out.
    """
    return np.isfinite(true_lp.max(axis=0))


class UniformBlend(MixtureBlender):
    """Equal weights ``1 / M``: the baseline every report shows (with a prior, only ``tau`` is fitted).

    ``train_score_``: mixture NLL on the fitting rows.
    """

    def _fit_scores(self, scores: MixtureScores, start: np.ndarray | None) -> np.ndarray:
        n_members = scores.true_lp.shape[0]
        self.weights_ = np.full(n_members, 1.0 / n_members)
        self.train_score_ = mixture_nll(scores.true_lp, self.weights_, scores.log_norm)
        return self.weights_

    def _fit_prior(self, problem: MixturePrior, tau: float | None) -> float:
        # The weights do not depend on tau: one exact fit of tau, no rounds.
        if tau is None:
            n_members = problem.n_members
            tau = problem.fit_tau(np.full(n_members, 1.0 / n_members))
        self._fit_scores(problem.at(tau), None)
        return tau


class NllBlend(MixtureBlender):
    """Weights on the simplex that minimise the validation NLL of the mixture.

    The objective is convex in ``w`` on the simplex. It is minimised over ``theta`` with
    ``w = softmax(theta)`` (no constraints left) by scipy's BFGS with the analytic gradient of
    :func:`mixture_nll_and_grad`, from equal weights; each evaluation costs ``O(M N)``. BFGS
    rather than L-BFGS-B: with no bounds to handle and ``M`` small (even one member per
    (model, view) pair), a dense ``M x M`` inverse-Hessian estimate is cheap, and it reached
    the same optimum 3-4 times faster on the development machine (L-BFGS-B's per-iteration
    overhead dominated an evaluation this cheap). Members that do not help
    end with weights near 0 (``theta`` drifting towards -inf), not exactly 0.

    With a prior the objective is the NLL of the corrected mixture (see the module docstring),
    no longer convex in ``w``. A given ``tau`` is kept; otherwise ``theta`` and ``tau`` are
    minimised together by BFGS (:func:`prior_nll_and_grad`) on a model of the normalisers that
    is exact to second order around an expansion point: first ``tau = 1``, then the last
    solution (moved at most ``TAU_STEP``, kept in ``TAU_BOUNDS``), until the solution lies within
    ``TAU_NEAR`` of the point it was expanded at. Each round reads the member probabilities once
    (:meth:`~weights_search.prior.MixturePrior.at`) and starts BFGS from the last round's
    solution and inverse-Hessian estimate; two rounds are usual.

    ``max_iter``, ``tol``: BFGS's iteration limit and its ``gtol`` (largest gradient entry,
    ``max |w - mean responsibilities|``, at which it stops).
    ``train_score_``: mixture NLL on the fitting rows (``inf`` if some row has probability 0
    under every member; those rows are left out of the fit). ``n_iter_``: iterations used (by
    the last round, with a prior).
    """

    def __init__(self, max_iter: int = 1000, tol: float = 1e-8) -> None:
        check_solver_options(max_iter, tol)
        self.max_iter = max_iter
        self.tol = tol

    def _fit_scores(self, scores: MixtureScores, start: np.ndarray | None) -> np.ndarray:
        true_lp, log_norm = scores.true_lp, scores.log_norm
        rows = informative_rows(true_lp)
        if not rows.any():
            raise ValueError("no member gives the true class a non-zero probability on any row: nothing to fit")
        n_members = true_lp.shape[0]
        if n_members == 1:
            theta, self.n_iter_ = np.zeros(1), 0
        else:
            theta = np.zeros(n_members) if start is None else np.log(np.maximum(start, 1e-12))
            args = (true_lp[:, rows], None if log_norm is None else log_norm[:, rows])
            result = minimize(mixture_nll_and_grad, theta - theta.mean(), args=args, jac=True, method="BFGS",
                              options={"maxiter": self.max_iter, "gtol": self.tol})
            theta, self.n_iter_ = result.x, int(result.nit)
        self.weights_ = np.exp(theta - logsumexp(theta))
        self.train_score_ = mixture_nll(true_lp, self.weights_, log_norm)
        return self.weights_

    def _fit_prior(self, problem: MixturePrior, tau: float | None) -> float:
        if tau is not None or problem.n_members == 1:
            return super()._fit_prior(problem, tau)
        low, high = TAU_BOUNDS
        theta = np.zeros(problem.n_members)
        point, iterations, curvature = float(np.clip(1.0, low, high)), 0, None
        for _ in range(MAX_ROUNDS):
            scores = problem.at(point, moments=True)
            rows = informative_rows(scores.true_lp)
            if not rows.any():
                raise ValueError("no member gives the true class a non-zero probability on any row: nothing to fit")
            arrays = (scores.true_lp, scores.true_shift, scores.log_norm, scores.tilt_mean, scores.tilt_var)
            # Each round starts from the last one's solution and its inverse-Hessian estimate.
            result = minimize(prior_nll_and_grad, np.append(theta - theta.mean(), point),
                              args=(*(a[..., rows] for a in arrays), point), jac=True, method="BFGS",
                              options={"maxiter": self.max_iter, "gtol": self.tol, "hess_inv0": curvature})
            theta, tau, iterations = result.x[:-1], float(result.x[-1]), iterations + int(result.nit)
            curvature = _positive_definite(result.hess_inv)
            if low <= tau <= high and abs(tau - point) < TAU_NEAR:
                break
            step = float(np.clip(tau, max(low, point - TAU_STEP), min(high, point + TAU_STEP)))
            if step == point:  # the best tau lies beyond the bound this round sat on: keep the bound
                self._fit_scores(scores, None)
                return point
            point = step
        else:
            tau = float(np.clip(tau, low, high))
        self.n_iter_ = iterations
        self.weights_ = np.exp(theta - logsumexp(theta))
        d = tau - point
        self.train_score_ = mixture_nll(scores.true_lp - d * scores.true_shift, self.weights_,
                                        scores.log_norm + d * (d * scores.tilt_var / 2 - scores.tilt_mean))
        return tau
