"""Exact top-1 of mixtures as a function of their weights.

Row ``n`` (true class ``y``) is right under mixture weights ``w`` when every other class ``c``
scores lower: ``sum_m w_m (p_m[n, y] - p_m[n, c]) > 0``, a linear function of ``w``. Only
*rival* classes, which some member scores at least as high as ``y``, can break that; rows
without rivals are right for every ``w`` and rows with a class that every member scores at
least as high as ``y`` are wrong for every ``w``. What is left is a short list of
``(row, rival)`` margin vectors, so the top-1 of any mixture, or of a whole line of mixtures,
costs a small matrix-vector product instead of a pass over ``(M, N, C)``.

The pairs come from :mod:`weights_search.stats`, collected in the pass over the members at
``tau = 0`` and ``tau = TAU_BOUNDS[1]``, which covers the prior correction at every ``tau``.

Exact ties count as errors here (a strict argmax), where the metrics rank ties by class index;
the two differ only on rows with exactly equal blended scores.
"""

from __future__ import annotations

import numpy as np

from weights_search.functional import check_members
from weights_search.stats import MixtureStats, RivalCollector, RivalPairs


class MixtureMargins:
    """Counts the rows a mixture gets right, for any weights.

    ``log_probs``: ``(M, N, C)`` member log-probabilities; ``labels``: ``(N,)``; ``class_shift``:
    None, or ``(C,)`` float32, subtracted from every member's scores first (a prior correction).
    That builds the margins of one in-memory stack; :meth:`from_stats` builds them from the
    rival pairs a :class:`~weights_search.stats.MixtureCollector` streamed, at any ``tau``, with
    the same result. Weights given to the methods are ``(M,)`` and non-negative; only their
    direction matters. Memory: :attr:`margins` is ``(K, M)`` float64, one row per rival pair
    of the rows that are neither right nor wrong for every weights, float64 so that the counts
    are those of the exact argmax (building them holds a few ``(chunk, M)`` temporaries more, not
    ``(K, M)`` ones; a line search adds a few ``(K,)`` float64 arrays: see
    :func:`weights_search.stats.pair_bytes`).
    """

    #: Pairs per chunk of the work done a chunk at a time.
    CHUNK = 1 << 14

    def __init__(self, log_probs: np.ndarray, labels: np.ndarray, class_shift: np.ndarray | None = None) -> None:
        log_probs, labels = check_members(log_probs, labels)
        n_members, n_rows, n_classes = log_probs.shape
        shift = None if class_shift is None else np.asarray(class_shift).astype(np.float64)
        # One end, tau = 1: the scores compared are log_probs - 1 * class_shift, exactly.
        collector = RivalCollector(n_rows, shift, (1.0,), max_pairs=n_rows * n_classes)
        block = np.asarray(log_probs, dtype=np.float32)
        true = block[:, np.arange(n_rows), labels]
        collector.add(0, block, labels, true)
        self._build(collector.result(n_members), true, labels, 1.0)

    @classmethod
    def from_stats(cls, stats: MixtureStats, tau: float = 0.0) -> "MixtureMargins":
        """The margins of the mixture corrected with ``tau`` (0: none), from the rival pairs of
        ``stats`` (collected with ``pairs=True``, and with a prior for ``tau > 0``)."""
        if stats.pairs is None:
            raise ValueError("these statistics were collected without rival pairs: collect them with the "
                             "collector of a method that counts rows right")
        if tau != 0 and (stats.pairs.shift is None or not min(stats.pairs.ends) <= tau <= max(stats.pairs.ends)):
            raise ValueError(f"rival pairs collected at tau in {stats.pairs.ends} cannot count rows at tau={tau}")
        margins = cls.__new__(cls)
        margins._build(stats.pairs, stats.true_lp.astype(np.float32), stats.labels, tau)
        return margins

    def _build(self, pairs: RivalPairs, true_lp: np.ndarray, labels: np.ndarray, tau: float) -> None:
        """Margins at ``tau`` from ``pairs`` and the ``(M, N)`` float32 true-class log-probabilities:
        the pairs that are rivals at ``tau`` (some member scores the class at least as high as
        the true class there), of rows no class beats for every member.

        The pairs are read in chunks (:meth:`RivalPairs.chunks`) three times: to find the rows
        some rival beats for every member, to count the pairs kept, to fill :attr:`margins`; so
        besides the margins themselves this holds a few ``(chunk, M)`` temporaries, one bool and
        one row index per pair."""
        n_members, n_rows = true_lp.shape
        shift = pairs.class_shift(tau)
        true = true_lp if shift is None else true_lp - shift[labels]
        dominated = pairs.dominated.copy()
        has_rival = np.zeros(n_rows, dtype=bool)
        some = np.empty(pairs.n_pairs, dtype=bool)
        at = 0
        for row, rival, lp in pairs.chunks():
            scores = lp if shift is None else lp - shift[rival][:, None]
            at_least = scores >= true[:, row].T
            rivals, every = at_least.any(axis=1), at_least.all(axis=1)
            dominated[row[every]] = True
            has_rival[row[rivals]] = True
            some[at:at + row.size] = rivals
            at += row.size
        at = 0
        for row, _, _ in pairs.chunks():
            some[at:at + row.size] &= ~dominated[row]
            at += row.size
        n_kept = int(some.sum())
        margins = np.empty((n_kept, n_members))
        pair_row = np.empty(n_kept, dtype=np.int32 if n_rows < 2**31 else np.int64)
        at = filled = 0
        for row, rival, lp in pairs.chunks():
            keep = some[at:at + row.size]
            at += row.size
            row, rival, lp = row[keep], rival[keep], lp[keep]
            scores = lp if shift is None else lp - shift[rival][:, None]
            here = slice(filled, filled + row.size)
            np.subtract(np.exp(true[:, row].T.astype(np.float64)), np.exp(scores.astype(np.float64)), out=margins[here])
            pair_row[here] = row
            filled += row.size
        del some
        self.n_members = n_members
        self.n_rows = n_rows
        self.n_always = int((~has_rival & ~dominated).sum())
        #: ``(K, M)``: one margin vector per (active row, rival) pair, grouped by row.
        self.margins = margins
        #: Index in :attr:`margins` where each active row's pairs begin.
        self.starts = np.flatnonzero(np.diff(pair_row, prepend=-1))
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def _row_chunks(self):
        """Yields ``(lo, hi, starts)``: ranges of :attr:`margins` of about :data:`CHUNK` pairs
        that hold whole rows, and those rows' starts relative to ``lo``."""
        total = self.margins.shape[0]
        cuts = np.unique(np.searchsorted(self.starts, np.arange(0, total, self.CHUNK)))
        cuts = np.append(cuts[cuts < self.starts.size], self.starts.size)
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo = int(self.starts[a])
            hi = int(self.starts[b]) if b < self.starts.size else total
            yield lo, hi, self.starts[a:b] - lo

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
        at_base = self.margins @ base
        right = np.zeros(self.n_members, dtype=np.int64)
        for lo, hi, starts in self._row_chunks():  # a (chunk, M) sum at a time, not (K, M)
            worst = np.minimum.reduceat(at_base[lo:hi, None] + self.margins[lo:hi], starts, axis=0)
            right += (worst > 0).sum(axis=0)
        return self.n_always + right

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
