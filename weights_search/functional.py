"""Pure array functions every blend method shares: log-softmax, fusion, true-class columns, top-k.

Shapes use ``M`` for members (a model, or a (model, view) pair: nothing here assumes members
are whole models), ``N`` or ``n`` for rows (images) and ``C`` for classes. Stacks of member
outputs are ``(M, N, C)``; float16 and float32 inputs are accepted and the results are float32.
Everything works row by row, so a caller may stream a large split in chunks of rows and get the
same numbers as in one call.
"""

from __future__ import annotations

import numpy as np
from scipy import special

MIXTURE = "mixture"
GEOMETRIC = "geometric"
#: How member outputs are combined: ``mixture`` averages probabilities (``p = sum_m w_m p_m``),
#: ``geometric`` adds weighted log-probabilities and renormalises over classes.
FUSIONS = (MIXTURE, GEOMETRIC)

#: Log of the smallest normal float32. Geometric pooling multiplies log-probabilities by weights,
#: so a log-probability of -inf (a class a member rules out) is clipped here first: 0 * -inf
#: would be NaN, and a class no member may rule out alone keeps a finite score.
LOG_FLOOR = float(np.log(np.finfo(np.float32).tiny))


def log_softmax(logits: np.ndarray, temperatures: np.ndarray | float | None = None) -> np.ndarray:
    """Log-probabilities over the last axis, in float32.

    ``logits``: ``(..., C)``, e.g. ``(M, N, C)`` for a stack of members or ``(N, C)`` for one.
    ``temperatures``: None (1), one positive float, or one per leading index (shape ``(M,)`` for
    an ``(M, N, C)`` stack); logits are divided by it before the softmax. Entries of -inf are
    allowed (probability 0); a row whose largest logit is not finite (all -inf, +inf or NaN)
    raises ValueError.
    """
    logits = np.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty class axis, got shape {logits.shape}")
    out = np.array(logits, dtype=np.float32, copy=True)
    if temperatures is not None:
        t = np.asarray(temperatures, dtype=np.float32)
        if t.ndim > 1 or (t.ndim == 1 and (out.ndim < 2 or t.shape[0] != out.shape[0])):
            raise ValueError(f"temperatures of shape {t.shape} do not match logits of shape {out.shape}: "
                             "give one float or one per leading index")
        if not (np.isfinite(t).all() and (t > 0).all()):
            raise ValueError(f"temperatures must be positive and finite, got {t}")
        out /= t.reshape(t.shape + (1,) * (out.ndim - t.ndim))
    # One member (or the whole array) at a time keeps the temporaries small.
    for block in out if out.ndim == 3 else (out,):
        if not np.isfinite(block.max(axis=-1)).all():
            raise ValueError("logits have a row whose largest value is not finite (all -inf, +inf or NaN)")
        block[...] = special.log_softmax(block, axis=-1)
    return out


def fuse(log_probs: np.ndarray, weights: np.ndarray, fusion: str) -> np.ndarray:
    """Blend member log-probabilities into one ``(n, C)`` float32 array of class log-probabilities.

    ``log_probs``: ``(M, n, C)`` per-member log-softmax (from :func:`log_softmax`).
    ``weights``: ``(M,)`` non-negative (for ``mixture``, not all zero).
    ``fusion``: ``"mixture"``: ``log sum_m w_m p_m`` with the weights normalised to sum 1
    (log-sum-exp over members; a class every weighted member rules out stays -inf, never NaN);
    ``"geometric"``: ``s = sum_m w_m max(log p_m, LOG_FLOOR)``, then ``s - logsumexp_c(s)``; the
    weights are used as given (their sum acts as an inverse temperature; all zero gives the
    uniform distribution).

    Rows are independent, so fusing chunks of rows gives the same result as fusing all at once.
    """
    log_probs = np.asarray(log_probs)
    w = _check_weights(weights, log_probs)
    used = np.flatnonzero(w > 0)
    if fusion == MIXTURE:
        if used.size == 0:
            raise ValueError("mixture weights are all zero")
        log_w = np.log(w[used] / w[used].sum()).astype(np.float32)
        top = np.full(log_probs.shape[1:], -np.inf, dtype=np.float32)
        for m, lw in zip(used, log_w):
            np.maximum(top, log_probs[m] + lw, out=top)
        # Where every member rules a class out the shift is 0, so exp gives 0 and log gives -inf.
        shift = np.where(np.isfinite(top), top, np.float32(0))
        total = np.zeros_like(top)
        for m, lw in zip(used, log_w):
            total += np.exp(log_probs[m] + (lw - shift))
        with np.errstate(divide="ignore"):
            return np.log(total) + shift
    if fusion == GEOMETRIC:
        score = np.zeros(log_probs.shape[1:], dtype=np.float32)
        for m in used:
            score += np.float32(w[m]) * np.maximum(log_probs[m], np.float32(LOG_FLOOR))
        return _normalise(score)
    raise ValueError(f"unknown fusion {fusion!r}; choose from: {', '.join(FUSIONS)}")


#: :func:`_normalise` works on about this many values at a time (1 MB of float32, in cache).
NORMALISE_VALUES = 2**18


def _normalise(scores: np.ndarray) -> np.ndarray:
    """``scores - logsumexp(scores)`` over the last axis, for finite float32 ``(n, C)`` scores
    (entries of -inf stay -inf), computed in the place of ``scores`` (its callers pass arrays
    of their own making): a few rows at a time, each through the maximum, the shift, the
    exponential, the sum and the log in the processor's cache, with no ``(n, C)`` temporary.
    The same operations on each row as on the whole array, so the same values, bit for bit."""
    if scores.dtype != np.float32 or scores.ndim != 2 or not scores.flags.c_contiguous or not scores.flags.writeable:
        top = scores.max(axis=-1, keepdims=True)
        shifted = scores - top
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    n_rows, n_classes = scores.shape
    step = max(1, NORMALISE_VALUES // max(n_classes, 1))
    scratch = np.empty((min(step, n_rows), n_classes), dtype=np.float32)
    for first in range(0, n_rows, step):
        x = scores[first:first + step]
        e = scratch[:x.shape[0]]
        x -= x.max(axis=-1, keepdims=True)
        np.exp(x, out=e)
        x -= np.log(e.sum(axis=-1, keepdims=True))
    return scores


def true_class_log_probs(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The ``(M, N)`` float64 matrix ``log_probs[m, n, labels[n]]``: all a mixture's NLL needs."""
    log_probs, labels = check_members(log_probs, labels)
    return log_probs[:, np.arange(labels.size), labels].astype(np.float64)


def check_members(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check a ``(M, N, C)`` stack against ``(N,)`` integer labels in ``0..C-1``; return both as arrays."""
    log_probs = np.asarray(log_probs)
    labels = np.asarray(labels)
    if log_probs.ndim != 3 or 0 in log_probs.shape:
        raise ValueError(f"expected member outputs of shape (n_members, n_samples, n_classes), got {log_probs.shape}")
    if labels.shape != log_probs.shape[1:2]:
        raise ValueError(f"labels of shape {labels.shape} do not match {log_probs.shape[1]} samples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= log_probs.shape[2]:
        raise ValueError(f"labels must lie in 0..{log_probs.shape[2] - 1}, got {labels.min()}..{labels.max()}")
    return log_probs, labels


#: :func:`top_k` splits a row's columns into groups of this many (see there).
TOP_K_GROUP = 16


def top_k(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best classes of each row, best first (ties: lower index first).

    ``log_probs``: ``(n, C)``. Returns column indices ``(n, k)`` int64 and their probabilities
    ``(n, k)`` float32: the first ``k`` of a stable sort by descending value.

    With many classes (more than ``4 k`` groups of :data:`TOP_K_GROUP`) the candidates are found
    through group maxima (about 5 ns a value, against 25-30 for a partition of whole rows, the
    way :func:`weights_search.expansion.largest` does): the first ``G * TOP_K_GROUP`` columns
    form ``G = C // TOP_K_GROUP`` groups (group ``j``: columns ``j, j + G, j + 2G, ...``), and
    the columns of the ``k`` groups with the largest maxima, with the last ``C mod TOP_K_GROUP``
    columns, hold the ``k`` largest values. The tie rule needs every column whose value equals
    the ``k``-th largest among them too: that holds when at most ``k`` groups have a maximum at
    least that value, checked per row; a row where it does not (many equal values), or holding a
    NaN, is ranked by partitioning the whole row. The result is the same either way.
    """
    log_probs = np.asarray(log_probs)
    n_rows, n_classes = log_probs.shape
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must lie in 1..{n_classes}, got {k}")
    n_groups = n_classes // TOP_K_GROUP
    if n_groups <= 4 * k or n_rows == 0:
        return _top_k_rows(log_probs, k)
    maxima = log_probs[:, :n_groups * TOP_K_GROUP].reshape(n_rows, TOP_K_GROUP, n_groups).max(axis=1)
    groups = np.argpartition(maxima, n_groups - k, axis=1)[:, n_groups - k:]
    columns = (groups[:, :, None] + n_groups * np.arange(TOP_K_GROUP)).reshape(n_rows, -1)
    if n_classes % TOP_K_GROUP:
        tail = np.arange(n_groups * TOP_K_GROUP, n_classes)
        columns = np.concatenate([columns, np.broadcast_to(tail, (n_rows, tail.size))], axis=1)
    columns.sort(axis=1)
    values = np.take_along_axis(log_probs, columns, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(columns, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    with np.errstate(invalid="ignore"):
        kth = values[:, k - 1:]
        redo = (np.count_nonzero(maxima >= kth, axis=1) > k) | np.isnan(maxima).any(axis=1) | np.isnan(kth[:, 0])
    if redo.any():
        rows = np.flatnonzero(redo)
        idx[rows], values[rows] = _top_k_rows(log_probs[rows], k, log=True)
    return idx.astype(np.int64, copy=False), np.exp(values).astype(np.float32)


def _top_k_rows(log_probs: np.ndarray, k: int, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` by a partition of whole rows (``O(C)`` per row); ``log``: the values are
    returned as given, not exponentiated."""
    n_rows, n_classes = log_probs.shape
    kth = np.partition(log_probs, n_classes - k, axis=1)[:, n_classes - k, None]
    above = log_probs > kth
    # Values equal to the k-th largest fill the places left, lowest class index first.
    tied = log_probs == kth
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    idx = np.nonzero(chosen)[1].reshape(n_rows, k)
    values = np.take_along_axis(log_probs, idx, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    return idx, (values if log else np.exp(values).astype(np.float32))


def _check_weights(weights: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    if log_probs.ndim != 3:
        raise ValueError(f"expected member outputs of shape (n_members, n_rows, n_classes), got {log_probs.shape}")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != log_probs.shape[:1]:
        raise ValueError(f"{w.size} weights for {log_probs.shape[0]} members")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    return w
