"""Mixtures of member probabilities: equal weights, and weights fitted by validation NLL.

A mixture predicts ``p_n = sum_m w_m p_m[n]`` with ``w`` on the simplex. Its NLL on labelled
rows depends only on the true-class log-probabilities ``L[m, n] = log p_m[n, y_n]``, an
``(M, N)`` matrix, so a fit never touches the ``(M, N, C)`` stack after extracting that column.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from weights_search.base import Blender, check_solver_options
from weights_search.functional import MIXTURE, true_class_log_probs


def mixture_nll(true_lp: np.ndarray, weights: np.ndarray) -> float:
    """Mean NLL of the mixture with ``(M,)`` weights (normalised here) on ``(M, N)`` true-class log-probs.

    ``inf`` when some row has probability 0 under every weighted member.
    """
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_w = np.log(w / w.sum())
    return float(-logsumexp(true_lp + log_w[:, None], axis=0).mean())


def mixture_nll_and_grad(theta: np.ndarray, true_lp: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean mixture NLL and its gradient with respect to ``theta``, where ``w = softmax(theta)``.

    ``theta``: ``(M,)``; ``true_lp``: ``(M, N)`` with at least one finite entry per column. With
    responsibilities ``r[m, n] = w_m p_m[n] / p_n``, the gradient is ``w - mean_n r[:, n]``
    (zero exactly at the EM fixed point).
    """
    log_w = theta - logsumexp(theta)
    x = true_lp + log_w[:, None]
    top = x.max(axis=0)
    e = np.exp(x - top)
    total = e.sum(axis=0)
    nll = -(top + np.log(total)).mean()
    grad = np.exp(log_w) - (e / total).mean(axis=1)
    return float(nll), grad


def informative_rows(true_lp: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: rows where some member gives the true class a non-zero probability.

    On the other rows every mixture has NLL ``inf``, whatever the weights, so they carry no
    information about the weights and the fits leave them out.
    """
    return np.isfinite(true_lp.max(axis=0))


class UniformBlend(Blender):
    """Equal weights ``1 / M``: the baseline every report shows.

    ``train_score_``: mixture NLL on the fitting rows.
    """

    fusion = MIXTURE

    def fit(self, log_probs: np.ndarray, labels: np.ndarray) -> "UniformBlend":
        true_lp = true_class_log_probs(log_probs, labels)
        self.weights_ = np.full(true_lp.shape[0], 1.0 / true_lp.shape[0])
        self.train_score_ = mixture_nll(true_lp, self.weights_)
        return self


class NllBlend(Blender):
    """Weights on the simplex that minimise the validation NLL of the mixture.

    The objective is convex in ``w`` on the simplex. It is minimised over ``theta`` with
    ``w = softmax(theta)`` (no constraints left) by scipy's BFGS with the analytic gradient of
    :func:`mixture_nll_and_grad`, from equal weights; each evaluation costs ``O(M N)``. BFGS
    rather than L-BFGS-B: with no bounds to handle and ``M`` small (even one member per
    (model, view) pair), a dense ``M x M`` inverse-Hessian estimate is cheap, and it reached
    the same optimum 3-4 times faster on the development machine (L-BFGS-B's per-iteration
    overhead dominated an evaluation this cheap). Members that do not help
    end with weights near 0 (``theta`` drifting towards -inf), not exactly 0.

    ``max_iter``, ``tol``: BFGS's iteration limit and its ``gtol`` (largest gradient entry,
    ``max |w - mean responsibilities|``, at which it stops).
    ``train_score_``: mixture NLL on the fitting rows (``inf`` if some row has probability 0
    under every member; those rows are left out of the fit). ``n_iter_``: iterations used.
    """

    fusion = MIXTURE

    def __init__(self, max_iter: int = 1000, tol: float = 1e-8) -> None:
        check_solver_options(max_iter, tol)
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, log_probs: np.ndarray, labels: np.ndarray) -> "NllBlend":
        true_lp = true_class_log_probs(log_probs, labels)
        kept = true_lp[:, informative_rows(true_lp)]
        if not kept.size:
            raise ValueError("no member gives the true class a non-zero probability on any row: nothing to fit")
        n_members = true_lp.shape[0]
        if n_members == 1:
            theta, self.n_iter_ = np.zeros(1), 0
        else:
            result = minimize(mixture_nll_and_grad, np.zeros(n_members), args=(kept,), jac=True, method="BFGS",
                              options={"maxiter": self.max_iter, "gtol": self.tol})
            theta, self.n_iter_ = result.x, int(result.nit)
        self.weights_ = np.exp(theta - logsumexp(theta))
        self.train_score_ = mixture_nll(true_lp, self.weights_)
        return self
