"""Geometric pooling: non-negative weights on member log-probabilities, fitted by validation NLL.

The pooled prediction is ``log q[n] = s[n] - logsumexp_c s[n]`` with
``s[n] = sum_m w_m log p_m[n]`` (a weighted geometric mean of the members' probabilities,
renormalised). The weights are not normalised: their sum also sharpens (> 1) or flattens (< 1)
the pooled distribution, so they act as a shared temperature as well. The NLL is convex in ``w``.

The prior correction (:mod:`weights_search.prior`) subtracts ``tau * log pi`` from the pooled
logits ``s``: one more term of the same weighted sum, as if ``-log pi`` were a member with
weight ``tau``. The NLL stays convex in ``(w, tau)``, and both are fitted together exactly.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from weights_search.base import Blender, check_solver_options
from weights_search.functional import GEOMETRIC, LOG_FLOOR, check_members
from weights_search.prior import TAU_BOUNDS, LogitAdjustment


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


class LogitBlend(Blender):
    """Non-negative weights on member log-probabilities (geometric pooling), fitted by NLL.

    Minimised by scipy's L-BFGS-B with bounds ``w >= 0`` and the analytic gradient of
    :func:`pooled_nll_and_grad`, from ``w = 0`` (the uniform prediction): a member's weight only
    grows when that lowers the NLL, so members that do not help keep exactly 0.
    The weights do not sum to 1 (see the module docstring); a member that is always right
    can push its weight up until the gradient vanishes, which ``max_iter`` / ``tol`` bound.

    ``max_iter``, ``tol``: L-BFGS-B's iteration limit and its ``ftol`` / ``gtol``. Evaluations
    run in float32, whose rounding (about 1e-7 of the NLL) is the floor: a tighter ``tol`` only
    buys failing line searches (five times the evaluations in ``benchmarks/blend.py``).
    ``train_score_``: NLL of the pooled prediction on the fitting rows. ``n_iter_``: iterations.
    Each evaluation reads the whole ``(M, N, C)`` stack twice (two float32 matrix-vector products).
    With a prior, ``tau`` is one more variable of the same fit, bounded to
    :data:`~weights_search.prior.TAU_BOUNDS` (or fixed at the given value), starting from 0.
    """

    fusion = GEOMETRIC

    def __init__(self, max_iter: int = 200, tol: float = 1e-7) -> None:
        check_solver_options(max_iter, tol)
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, log_probs: np.ndarray, labels: np.ndarray, prior: LogitAdjustment | None = None) -> "LogitBlend":
        log_probs, labels = check_members(log_probs, labels)
        n_members = log_probs.shape[0]
        bounds = [(0.0, None)] * n_members
        start = np.zeros(n_members)
        if prior is not None:
            prior.check(log_probs.shape[2])
            bounds.append(TAU_BOUNDS if prior.tau is None else (prior.tau, prior.tau))
            start = np.append(start, 0.0 if prior.tau is None else prior.tau)
        relative = relative_log_probs(log_probs, labels, None if prior is None else prior.log_prior)
        result = minimize(pooled_nll_and_grad, start, args=(relative,), jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": self.max_iter, "ftol": self.tol, "gtol": self.tol})
        x = np.asarray(result.x, dtype=np.float64)
        self.weights_ = x[:n_members]
        self.tau_, self.log_prior_ = (None, None) if prior is None else (float(x[n_members]), prior.log_prior)
        self.n_iter_ = int(result.nit)
        self.train_score_ = float(result.fun)
        return self
