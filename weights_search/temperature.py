"""Temperature scaling: one temperature per member, fitted by validation NLL.

A temperature ``T`` divides a member's logits before the softmax; ``T > 1`` softens
over-confident members, ``T < 1`` sharpens timid ones. Apply fitted temperatures with
:func:`weights_search.functional.log_softmax`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

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
