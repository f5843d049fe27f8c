"""Exact top-1 of mixtures as a function of their weights.

Row ``n`` (true class ``y``) is right under mixture weights ``w`` when every other class ``c``
scores lower: ``sum_m w_m (p_m[n, y] - p_m[n, c]) > 0``, a linear function of ``w``. Only
*rival* classes, which some member scores at least as high as ``y``, can break that; rows
without rivals are right for every ``w`` and rows with a class that every member scores at
least as high as ``y`` are wrong for every ``w``. What is left is a short list of
``(row, rival)`` margin vectors, so the top-1 of any mixture, or of a whole line of mixtures,
costs a small matrix-vector product instead of a pass over ``(M, N, C)``.

Exact ties count as errors here (a strict argmax), where the metrics rank ties by class index;
the two differ only on rows with exactly equal blended scores.
"""

from __future__ import annotations

import numpy as np

from weights_search.functional import check_members


class MixtureMargins:
    """Counts the rows a mixture gets right, for any weights.

    ``log_probs``: ``(M, N, C)`` member log-probabilities; ``labels``: ``(N,)``; ``class_shift``:
    None, or ``(C,)`` of the dtype of ``log_probs``, subtracted from every member's scores first
    (the prior correction, :class:`weights_search.prior.MixtureScores`), one member at a time
    rather than as a corrected copy of the stack. Weights given to the methods are ``(M,)`` and
    non-negative; only their direction matters.
    """

    def __init__(self, log_probs: np.ndarray, labels: np.ndarray, class_shift: np.ndarray | None = None) -> None:
        log_probs, labels = check_members(log_probs, labels)
        n_members, n_rows, n_classes = log_probs.shape
        rows = np.arange(n_rows)
        true = log_probs[:, rows, labels]
        if class_shift is not None:
            true = true - class_shift[labels]
        rival = np.zeros((n_rows, n_classes), dtype=bool)
        dominant = np.ones((n_rows, n_classes), dtype=bool)
        for m in range(n_members):
            scores = log_probs[m] if class_shift is None else log_probs[m] - class_shift
            at_least = scores >= true[m][:, None]
            rival |= at_least
            dominant &= at_least
        rival[rows, labels] = False
        dominant[rows, labels] = False
        always = ~rival.any(axis=1)
        active = np.flatnonzero(~always & ~dominant.any(axis=1))
        local_row, rival_class = np.nonzero(rival[active])
        pair_row = active[local_row]
        margins = np.empty((pair_row.size, n_members))
        for m in range(n_members):
            rival_lp = log_probs[m, pair_row, rival_class]
            if class_shift is not None:
                rival_lp = rival_lp - class_shift[rival_class]
            margins[:, m] = (np.exp(true[m, pair_row].astype(np.float64))
                             - np.exp(rival_lp.astype(np.float64)))
        self.n_members = n_members
        self.n_rows = n_rows
        self.n_always = int(always.sum())
        #: ``(K, M)``: one margin vector per (active row, rival) pair, grouped by row.
        self.margins = margins
        #: Index in :attr:`margins` where each active row's pairs begin.
        self.starts = np.flatnonzero(np.diff(local_row, prepend=-1))
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def _at(self, weights: np.ndarray) -> np.ndarray:
        """``(K,)`` ``margins @ weights``; the last one is kept, since a search scores many lines
        from the same weights (and counts the rows right at them first)."""
        if self._last is not None and np.array_equal(self._last[0], weights) and self._last[0].dtype == weights.dtype:
            return self._last[1]
        product = self.margins @ weights
        self._last = (np.array(weights), product)
        return product

    def count(self, weights: np.ndarray) -> int:
        """Rows right under the mixture with ``(M,)`` weights."""
        if not self.starts.size:
            return self.n_always
        worst = np.minimum.reduceat(self._at(weights), self.starts)
        return self.n_always + int((worst > 0).sum())

    def count_each_added(self, base: np.ndarray) -> np.ndarray:
        """``(M,)``: rows right under ``base + e_m`` for each member ``m`` (one selection added)."""
        if not self.starts.size:
            return np.full(self.n_members, self.n_always)
        worst = np.minimum.reduceat((self.margins @ base)[:, None] + self.margins, self.starts, axis=0)
        return self.n_always + (worst > 0).sum(axis=0)

    def best_on_line(self, weights: np.ndarray, direction: np.ndarray, t_low: float, t_high: float) -> tuple[int, float]:
        """The most rows right on the segment ``weights + t * direction``, ``t`` in ``[t_low, t_high]``.

        Each row is right on an open interval of ``t`` (an intersection of half-lines), so the
        count is piecewise constant; it is evaluated between consecutive interval ends. Returns
        the best count and the middle of the best piece (the piece closest to ``t = 0`` among
        equals), the point farthest from where a row flips.
        """
        if not self.starts.size or t_low >= t_high:
            return self.count(weights), 0.0
        at0 = self._at(weights)
        slope = self.margins @ direction
        with np.errstate(divide="ignore", invalid="ignore"):
            root = -at0 / slope
        lower = np.where(slope > 0, root, -np.inf)
        lower[(slope == 0) & (at0 <= 0)] = np.inf
        upper = np.where(slope < 0, root, np.inf)
        low = np.clip(np.maximum.reduceat(lower, self.starts), t_low, t_high)
        high = np.clip(np.minimum.reduceat(upper, self.starts), t_low, t_high)
        valid = low < high
        low, high = np.sort(low[valid]), np.sort(high[valid])
        ends = np.unique(np.concatenate([[t_low, t_high], low, high]))
        middles = (ends[:-1] + ends[1:]) / 2
        counts = np.searchsorted(low, middles, side="left") - np.searchsorted(high, middles, side="right")
        best = np.flatnonzero(counts == counts.max())
        pick = best[np.argmin(np.abs(middles[best]))]
        return self.n_always + int(counts[pick]), float(middles[pick])
