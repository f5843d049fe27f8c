"""Scores of blended predictions: top-k accuracy, mean NLL and a bootstrap interval for top-1.

All take ``log_probs`` of shape ``(N, C)`` (class log-probabilities, e.g. from
:func:`weights_search.functional.fuse`) and ``labels`` of shape ``(N,)`` (column indices).
Ties are ranked as a stable sort by descending score ranks them (lower class index first), the
order :func:`weights_search.functional.top_k` and ``np.argmax`` use.
"""

from __future__ import annotations

import numpy as np


def correct_at_k(log_probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``(N,)`` bool: whether the true class is among the ``k`` best of its row."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return true_class_rank(log_probs, labels) < k


def true_class_rank(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(N,)`` int64: how many classes rank before the true one in its row (0: it is the best),
    ties ranked as the module docstring says. One rank gives every top-k at once."""
    log_probs, labels = check_scores(log_probs, labels)
    return rank_of_true(log_probs, labels)


def rank_of_true(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`true_class_rank` without the checks, for callers that made the scores.

    Counts the classes scoring above the true one and those scoring the same; only the rare
    rows where another class ties with the true one look at the column order."""
    rows = np.arange(labels.size)
    true = log_probs[rows, labels][:, None]
    rank = np.count_nonzero(log_probs > true, axis=1)
    tied = np.flatnonzero(np.count_nonzero(log_probs == true, axis=1) > 1)
    if tied.size:
        same = log_probs[tied] == true[tied]
        rank[tied] += np.count_nonzero(same & (np.arange(log_probs.shape[1]) < labels[tied, None]), axis=1)
    return rank


def top1(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose best class is the true one."""
    return float(correct_at_k(log_probs, labels, 1).mean())


def topk_accuracy(log_probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` best."""
    return float(correct_at_k(log_probs, labels, k).mean())


def mean_nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (``inf`` when one has probability 0)."""
    log_probs, labels = check_scores(log_probs, labels)
    return float(-log_probs[np.arange(labels.size), labels].astype(np.float64).mean())


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of a ``(N,)`` 0/1 array (e.g. top-1 hits).

    Resampling ``N`` rows with replacement from rows of which ``h`` are hits draws each hit with
    probability ``h / N`` independently, so the resampled hit count is exactly
    ``Binomial(N, h / N)``: the ``n_boot`` resamples are drawn as binomials, in one vectorised
    call, instead of as ``n_boot x N`` row indices. Deterministic for a given ``seed``.
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"expected a non-empty (n_samples,) array, got shape {correct.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n = correct.size
    means = np.random.default_rng(seed).binomial(n, correct.mean(), size=n_boot) / n
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def check_scores(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check ``(N, C)`` log-probabilities (no NaN) against ``(N,)`` integer labels in ``0..C-1``;
    return both as arrays. The one check of a scored ``(log_probs, labels)`` pair: the metrics
    here and :mod:`weights_search.calibration` use it; :func:`weights_search.functional.check_members`
    is its ``(M, N, C)`` counterpart."""
    log_probs = np.asarray(log_probs)
    labels = np.asarray(labels)
    if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(f"expected log_probs (n_samples, n_classes) and labels (n_samples,), "
                         f"got {log_probs.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.size and (labels.min() < 0 or labels.max() >= log_probs.shape[1]):
        raise ValueError(f"labels must be integer column indices in 0..{log_probs.shape[1] - 1}")
    if np.isnan(log_probs).any():
        raise ValueError("log_probs contain NaN")
    return log_probs, labels
