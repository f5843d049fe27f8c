"""What the mixture methods (``uniform``, ``nll``, ``greedy``, ``accuracy``) keep of the members:
statistics collected in one pass over row blocks, from which every fit is exact.

Shapes: ``M`` members, ``N`` rows, ``C`` classes, ``D`` prior bins, ``K`` rival pairs. A
:class:`MixtureCollector` takes ``(M, b, C)`` float32 member log-probabilities block by block
(in row order) and keeps, in :class:`MixtureStats`:

- ``true_lp`` ``(M, N)`` float64: each member's log-probability of the true class. A mixture's
  NLL depends on nothing else (exact: the float32 inputs, widened).
- With a prior (``a_c = log_prior_c - min log_prior >= 0``, the class's *shift*): classes are
  grouped by their shift into ``D`` bins (:class:`PriorBins`) and ``bin_probs`` ``(M, N, D)``
  float32 holds each member's probability mass in each bin (runs of :data:`SUM_RUN` classes
  summed in float32, then added in float64: relative error about 3e-7 per bin). Every quantity the prior correction needs at any ``tau``
  is a sum over classes of ``p_m[n, c] f(a_c)``: the log-normaliser
  ``log sum_c p_m[n, c] exp(-tau a_c)`` and its ``tau``-derivatives (the mean and variance of
  ``a`` under the corrected distribution); a mixture's are the same sums of the weighted member
  masses. When the prior has at most :data:`MAX_BINS` distinct shifts (iNat's training counts
  do: 2021 has about 150 distinct counts), each bin holds one shift value and these sums are
  exact. Otherwise :data:`FINE_BINS` bins of equal width hold each ``(member, row)``'s mass and
  its mean shift (``bin_shift`` ``(M, N, D)`` float32 as the mass-weighted offset from the bin's
  lowest shift); each bin then acts as its mass at its mean shift, which by Jensen's and
  Hoeffding's inequalities lowers the log-normaliser by at most ``tau**2 r**2 / 8``, ``r`` being
  the widest bin's range of shifts (:meth:`PriorBins.error_bound`; about 1e-3 at ``tau = 3``
  for a prior of 1000:1 over 128 bins, and under 1e-4 at ``tau = 1``). The bins are summed
  with one column permutation (classes sorted by bin) and ``np.add.reduceat`` per block.
- For the methods that count rows right (``accuracy``, ``greedy`` with ``score="accuracy"``)
  only, rival pairs (:class:`RivalPairs`): for row ``n`` with true class ``y``, class ``c`` is a
  *rival* when some member scores it at least as high as ``y`` at ``tau = 0`` or (with a prior
  whose ``tau`` is fitted) at ``tau = TAU_BOUNDS[1]`` (with a given ``tau``: at that one). A member's corrected score difference
  ``log p_m[c] - log p_m[y] - tau (a_c - a_y)`` is linear in ``tau``, so a class below ``y`` for
  every member at both ends is below it at every ``tau`` between and cannot change the row's
  top-1 under any weights; the pairs give the exact top-1 of every mixture at every ``tau``
  (:class:`~weights_search.margins.MixtureMargins`). Rows where one class scores at least as
  high as ``y`` for every member at both ends are wrong for every weights and ``tau``: they are
  counted (``dominated``), with no pairs. Per pair: its row (int32), class (int32) and the
  members' log-probabilities of the rival (``M`` float32), ``8 + 4 M`` bytes
  (:func:`held_pair_bytes`), held once (arrays grown in place, a quarter at a time); a fold's
  subset copies none; :class:`~weights_search.margins.MixtureMargins` holds ``8 M`` more per
  pair at one ``tau`` (float64, built a chunk of pairs at a time), and a fit's line searches
  under 64 more: :func:`pair_bytes` in all (264 bytes at 16 members), and
  :func:`max_pairs_within` the bound a memory budget allows. How many pairs there are depends
  on the members: a few per row for members that rank the true class near the top, but with a
  steep prior the ``tau = 3`` end makes many rare classes rivals (at 10,000 classes, thousands
  per row); a given ``tau`` finds far fewer. The collector refuses (:class:`TooManyPairs`, a
  ValueError) to hold more than ``max_pairs``.

Memory: the statistics are ``(M, N)`` and ``(M, N, D)`` (plus pairs); a pass holds one block of
``(M, b, C)`` and a few ``(b, C)`` temporaries, never ``(M, N, C)``.
"""

from __future__ import annotations

import numpy as np

#: A prior with at most this many distinct shifts is binned exactly (one bin per value).
MAX_BINS = 256
#: Bins of equal width used when the prior has more distinct shifts than :data:`MAX_BINS`
#: (each holds two numbers per member and row, mass and mean shift, so memory stays that of
#: :data:`MAX_BINS` exact bins).
FINE_BINS = MAX_BINS // 2
#: With a prior, a class within this much (in log-probability) of the true class at either end
#: of ``tau`` is kept as a rival, and a row counts as dominated only by a class this far above
#: it: float32 rounding of the corrected scores (about 1e-5 at these magnitudes) cannot then
#: turn a class left out into a rival at a ``tau`` between the ends. Pairs kept this way that
#: are no rival at a ``tau`` are left out there, so the counts stay exact.
RIVAL_SLACK = 1e-4
#: Classes per run summed in the input's precision before the runs of a bin are added in
#: float64: a bin's mass is then off by at most ``SUM_RUN * 2**-24`` (4e-6) of itself with
#: float32 inputs, about 3e-7 in practice, like the float32 matrix products used before.
SUM_RUN = 64
#: The default bound on rival pairs held (each :func:`held_pair_bytes` in the statistics; callers
#: with a memory budget pass :func:`max_pairs_within` of it instead).
MAX_PAIRS = 20_000_000


class PriorBins:
    """Classes grouped by their prior shift ``a_c = log_prior_c - min log_prior``.

    ``shift``: ``(C,)`` float64; ``order``: ``(C,)`` classes sorted by bin; ``starts``: ``(D,)``
    where each bin begins in ``order`` (for ``np.add.reduceat``); ``low``: ``(D,)`` float64, each
    bin's lowest shift (its only one when :attr:`exact`); ``width``: ``(D,)`` each bin's range of
    shifts (all 0 when exact).
    """

    def __init__(self, log_prior: np.ndarray, max_bins: int = MAX_BINS) -> None:
        log_prior = np.asarray(log_prior, dtype=np.float64)
        self.log_prior = log_prior
        self.shift = log_prior - log_prior.min()
        values, inverse = np.unique(self.shift, return_inverse=True)
        self.exact = values.size <= max_bins
        if self.exact:
            bin_of = inverse.reshape(-1)
        else:
            n_bins = max(1, max_bins // 2)
            top = float(self.shift.max())
            bin_of = np.minimum((self.shift / top * n_bins).astype(np.int64), n_bins - 1)
            _, bin_of = np.unique(bin_of, return_inverse=True)  # empty bins dropped
            bin_of = bin_of.reshape(-1)
        self.order = np.argsort(bin_of, kind="stable")
        sorted_bins = bin_of[self.order]
        self.starts = np.flatnonzero(np.diff(sorted_bins, prepend=-1))
        sorted_shift = self.shift[self.order]
        self.low = np.minimum.reduceat(sorted_shift, self.starts)
        self.width = np.maximum.reduceat(sorted_shift, self.starts) - self.low
        sizes = np.diff(np.append(self.starts, sorted_shift.size))
        #: ``(C,)`` float32 in class order of ``order``: each class's shift above its bin's lowest.
        self.offset = (sorted_shift - np.repeat(self.low, sizes)).astype(np.float32)
        # Runs of at most SUM_RUN classes inside each bin, summed in float32 first (reduceat in
        # float64 casts every element, 4 times slower), then the runs of a bin in float64.
        position = np.arange(sorted_shift.size) - np.repeat(self.starts, sizes)
        self._runs = np.flatnonzero((position % SUM_RUN) == 0)
        self._run_bins = np.flatnonzero(position[self._runs] == 0)

    @property
    def n_bins(self) -> int:
        return int(self.starts.size)

    def error_bound(self, tau: float) -> float:
        """The most the binned log-normaliser (of any member, row or mixture) lies below the
        exact one at ``tau``: 0 when exact, else ``tau**2 max(width)**2 / 8``."""
        return 0.0 if self.exact else float(tau * tau * self.width.max() ** 2 / 8)

    def sum(self, probs: np.ndarray, exp: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-bin mass ``(..., D)`` float64 of class probabilities ``(..., C)`` (float32 or
        float64; with ``exp``, log-probabilities), and with fine bins the mass-weighted offset
        sums ``(..., D)`` (else None)."""
        permuted = np.take(probs, self.order, axis=-1)
        if exp:
            np.exp(permuted, out=permuted)
        mass = self._reduce(permuted)
        if self.exact:
            return mass, None
        permuted *= self.offset.astype(permuted.dtype)
        return mass, self._reduce(permuted)

    def _reduce(self, permuted: np.ndarray) -> np.ndarray:
        runs = np.add.reduceat(permuted, self._runs, axis=-1)
        return np.add.reduceat(runs, self._run_bins, axis=-1, dtype=np.float64)

    def shifts_of(self, mass: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
        """The shift each bin acts at: ``low`` ``(D,)`` when exact, else ``low + offsets / mass``
        (of the shape of ``mass``; ``low`` where the mass is 0)."""
        if offsets is None:
            return self.low
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = offsets / mass
        return self.low + np.where(mass > 0, mean, 0.0)


class RivalPairs:
    """The ``(row, rival class)`` pairs of :mod:`weights_search.stats` (see the module docstring).

    ``row``: ``(K,)`` int32 (int64 past 2**31 rows), sorted; ``rival``: ``(K,)`` int32; ``lp``:
    ``(M, K)`` float32, the members' log-probabilities of the rival class (held as ``(K, M)``,
    :attr:`lp` is its transposed view); ``dominated``: ``(N,)`` bool, rows wrong at every weights
    and ``tau``; ``shift``: ``(C,)`` float64 class shifts (None without a prior); ``ends``: the
    ``tau`` values the rivals were found at.

    :meth:`subset` copies no pair: the subset keeps the whole set's arrays and the rows it
    selects, and :meth:`chunks` yields its pairs (rows renumbered) a chunk at a time, which is
    how :class:`~weights_search.margins.MixtureMargins` reads them. :attr:`row`, :attr:`rival`
    and :attr:`lp` of a subset are built on demand (copies, for tests and small sets).
    """

    #: Pairs per chunk of :meth:`chunks` (temporaries of a few ``(CHUNK, M)`` arrays).
    CHUNK = 1 << 14

    def __init__(self, row: np.ndarray, rival: np.ndarray, lp: np.ndarray, dominated: np.ndarray,
                 shift: np.ndarray | None, ends: tuple[float, ...], rows: np.ndarray | None = None) -> None:
        """``lp``: ``(K, M)`` float32 (pair by pair); ``rows``: None (every row of ``row``'s
        numbering) or the sorted rows this set keeps, renumbered ``0..len(rows)-1``
        (``dominated`` is then of those rows)."""
        self._row, self._rival, self._lp = row, rival, lp
        self.dominated, self.shift, self.ends = dominated, shift, ends
        self._rows = rows
        self._count: int | None = None if rows is not None else int(row.size)

    @property
    def n_members(self) -> int:
        return int(self._lp.shape[1])

    @property
    def n_pairs(self) -> int:
        if self._count is None:
            self._count = sum(int(part[0].size) for part in self.chunks())
        return self._count

    def chunks(self, size: int | None = None):
        """Yields ``(row, rival, lp)`` of at most ``size`` (:data:`CHUNK`) pairs at a time, in
        order: ``(k,)`` int64 rows (of this set's numbering), ``(k,)`` int32 classes, ``(k, M)``
        float32 log-probabilities."""
        size = size or self.CHUNK
        total = int(self._row.size)
        for lo in range(0, total, size):
            row = self._row[lo:lo + size].astype(np.int64)
            rival, lp = self._rival[lo:lo + size], self._lp[lo:lo + size]
            if self._rows is not None:
                position = np.searchsorted(self._rows, row)
                inside = position < self._rows.size
                inside[inside] = self._rows[position[inside]] == row[inside]
                row, rival, lp = position[inside], rival[inside], lp[inside]
            yield row, rival, lp

    def _gather(self, index: int) -> np.ndarray:
        parts = [part[index] for part in self.chunks()]
        if parts:
            return np.concatenate(parts)
        return [np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, self.n_members), np.float32)][index]

    @property
    def row(self) -> np.ndarray:
        return self._row if self._rows is None else self._gather(0)

    @property
    def rival(self) -> np.ndarray:
        return self._rival if self._rows is None else self._gather(1)

    @property
    def lp(self) -> np.ndarray:
        return (self._lp if self._rows is None else self._gather(2)).T

    def class_shift(self, tau: float) -> np.ndarray | None:
        """``(C,)`` float32 ``tau * shift`` as the corrected scores subtract it (None at 0)."""
        if self.shift is None or tau == 0:
            return None
        return np.float32(tau) * self.shift.astype(np.float32)

    def subset(self, rows: np.ndarray) -> "RivalPairs":
        """The pairs of ``rows`` (sorted indices of this set's rows), renumbered: no pair is
        copied (see the class docstring)."""
        rows = np.asarray(rows, dtype=np.int64)
        kept = rows if self._rows is None else self._rows[rows]
        return RivalPairs(self._row, self._rival, self._lp, self.dominated[rows], self.shift, self.ends, kept)


class MixtureStats:
    """Everything a mixture method fits on (see the module docstring for each array).

    ``labels`` ``(N,)``; ``true_lp`` ``(M, N)`` float64; ``bins`` (:class:`PriorBins`) with
    ``bin_probs`` ``(M, N, D)`` float32 and, for fine bins, ``bin_shift`` ``(M, N, D)`` float32
    offset sums, or all None without a prior; ``pairs`` (:class:`RivalPairs`) or None.
    """

    def __init__(self, labels: np.ndarray, n_classes: int, true_lp: np.ndarray, bins: PriorBins | None = None,
                 bin_probs: np.ndarray | None = None, bin_shift: np.ndarray | None = None,
                 pairs: RivalPairs | None = None) -> None:
        self.labels, self.n_classes, self.true_lp = labels, n_classes, true_lp
        self.bins, self.bin_probs, self.bin_shift, self.pairs = bins, bin_probs, bin_shift, pairs

    @property
    def n_rows(self) -> int:
        return int(self.labels.size)

    @property
    def n_members(self) -> int:
        return int(self.true_lp.shape[0])

    def subset(self, rows: np.ndarray) -> "MixtureStats":
        """The statistics of ``rows`` (sorted row indices) alone."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows[0] < 0 or rows[-1] >= self.n_rows)) or (np.diff(rows) <= 0).any():
            raise ValueError(f"rows must be sorted distinct indices in 0..{self.n_rows - 1}")

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[:, rows]
        return MixtureStats(self.labels[rows], self.n_classes, self.true_lp[:, rows], self.bins,
                            take(self.bin_probs), take(self.bin_shift),
                            None if self.pairs is None else self.pairs.subset(rows))


class TooManyPairs(ValueError):
    """More rival pairs than the collector may hold (:class:`RivalCollector`'s ``max_pairs``).

    ``rows``: the rows seen when the bound was passed, of ``n_rows``; ``n_pairs``: the pairs
    they have; ``max_pairs``; ``n_members``; ``ends``: the ``tau`` values rivals were sought at
    (two: a fitted ``tau``; one: ``tau`` given, or no prior), so a caller can say what to change.
    """

    def __init__(self, rows: int, n_rows: int, n_pairs: int, max_pairs: int, n_members: int,
                 ends: tuple[float, ...]) -> None:
        self.rows, self.n_rows, self.n_pairs, self.max_pairs = rows, n_rows, n_pairs, max_pairs
        self.n_members, self.ends = n_members, ends
        super().__init__(
            f"the rows up to {rows} already have {n_pairs} rival pairs (classes some member scores at least as "
            f"high as the true class), more than max_pairs={max_pairs} (each holds {held_pair_bytes(n_members)} bytes, "
            f"{pair_bytes(n_members)} over the fit): raise the bound if memory allows, give tau (rivals at one tau, "
            "fewer than at both ends of its range), or use a method that does not count rows right (nll, "
            "greedy with score=nll)")


def held_pair_bytes(n_members: int, n_rows: int = 0) -> int:
    """Bytes one rival pair takes in :class:`RivalPairs`: its row (int32 below 2**31 rows, else
    int64), its class (int32) and ``M`` float32 log-probabilities."""
    return (4 if n_rows < 2**31 else 8) + 4 + 4 * n_members


#: Bytes per pair that a fit on the pairs adds to them, besides the ``8 M`` of its float64
#: margins (:class:`~weights_search.margins.MixtureMargins`): the line search's ``(K,)`` float64
#: products, roots and bounds (``best_on_line``: 5 arrays, with a few bool masks), measured with
#: tracemalloc at 4 and 16 members (tests/weights_search/test_stats_pairs.py).
FIT_PAIR_BYTES = 64


def pair_bytes(n_members: int, n_rows: int = 0) -> int:
    """Bytes per rival pair over a whole fit that counts rows right: the pair held
    (:func:`held_pair_bytes`), its float64 margin vector (``8 M``) and the search's per-pair
    work (:data:`FIT_PAIR_BYTES`). A cross-validation's fold subsets copy no pair, and one fit's
    margins at a time are held, so a fit on ``K`` pairs peaks at about ``K * pair_bytes`` above
    the ``(M, N)`` statistics."""
    return held_pair_bytes(n_members, n_rows) + 8 * n_members + FIT_PAIR_BYTES


def max_pairs_within(budget: int, n_members: int, n_rows: int = 0, sets: int = 1) -> int:
    """The most rival pairs whose fit stays within ``budget`` bytes: ``sets`` collectors of pairs
    held at once (a cross-validation with a prior keeps the pairs of the blend without it too),
    each up to the bound, and the fit's work on one of them (:func:`pair_bytes`)."""
    per_pair = sets * held_pair_bytes(n_members, n_rows) + pair_bytes(n_members, n_rows) - held_pair_bytes(n_members, n_rows)
    return max(0, int(budget) // per_pair)


class RivalCollector:
    """Collects :class:`RivalPairs` block by block: a class is a rival of row ``n``'s true class
    when some member scores it at least as high at some ``tau`` of ``ends`` (scores corrected by
    ``tau * shift``; ``shift`` ``(C,)`` float64 or None). With two ends or more the comparison
    has :data:`RIVAL_SLACK`, with one it is exact. Raises :class:`TooManyPairs` (a ValueError)
    past ``max_pairs`` pairs.

    The pairs go into arrays grown in place (``ndarray.resize``: a ``realloc``, which moves a
    large block's pages without copying them) by a quarter at a time, never past ``max_pairs``:
    no list of parts to concatenate, so the pairs are held once.
    """

    #: Pairs the arrays start with.
    START = 1 << 12

    def __init__(self, n_rows: int, shift: np.ndarray | None, ends: tuple[float, ...], max_pairs: int) -> None:
        self.shift, self.ends, self.max_pairs = shift, tuple(ends), max_pairs
        self.n_rows = n_rows
        self.n_pairs = 0
        self._row_type = np.int32 if n_rows < 2**31 else np.int64
        self._row: np.ndarray | None = None
        self._rival: np.ndarray | None = None
        self._lp: np.ndarray | None = None
        self._dominated = np.zeros(n_rows, dtype=bool)

    def _reserve(self, n_members: int, need: int) -> None:
        if self._lp is None:
            size = max(min(self.START, self.max_pairs), need)
            self._row = np.empty(size, self._row_type)
            self._rival = np.empty(size, np.int32)
            self._lp = np.empty((size, n_members), np.float32)
            return
        size = self._row.size
        if need <= size:
            return
        size = min(max(need, size + size // 4 + 1), max(need, self.max_pairs))
        for a in (self._row, self._rival, self._lp):
            a.resize((size,) + a.shape[1:], refcheck=False)

    def add(self, start: int, log_probs: np.ndarray, labels: np.ndarray, true: np.ndarray) -> None:
        """Rows ``start ..`` of ``(M, b, C)`` float32 log-probabilities, their ``(b,)`` labels and
        ``(M, b)`` true-class log-probabilities."""
        n_members, size, n_classes = log_probs.shape
        rows = np.arange(size)
        slack = np.float32(RIVAL_SLACK if len(self.ends) > 1 else 0.0)
        rival = np.zeros((size, n_classes), dtype=bool)
        dominant = np.ones((size, n_classes), dtype=bool)
        for tau in self.ends:
            shift = None if self.shift is None or tau == 0 else np.float32(tau) * self.shift.astype(np.float32)
            for m in range(n_members):
                scores = log_probs[m] if shift is None else log_probs[m] - shift
                true_m = true[m] if shift is None else true[m] - shift[labels]
                rival |= scores >= (true_m - slack)[:, None]
                dominant &= scores >= (true_m + slack)[:, None]
        rival[rows, labels] = False
        dominant[rows, labels] = False
        dominated = dominant.any(axis=1)
        del dominant
        self._dominated[start:start + size] = dominated
        rival[dominated] = False
        local, classes = np.nonzero(rival)
        del rival
        if not local.size:
            return
        total = self.n_pairs + local.size
        if total > self.max_pairs:
            raise TooManyPairs(start + size, self.n_rows, total, self.max_pairs, n_members, self.ends)
        self._reserve(n_members, total)
        here = slice(self.n_pairs, total)
        self._row[here] = local + start
        self._rival[here] = classes
        for m in range(n_members):
            self._lp[here, m] = log_probs[m, local, classes]
        self.n_pairs = total

    def result(self, n_members: int) -> RivalPairs:
        """The pairs collected (its arrays, trimmed to them: call it once, after the last block)."""
        if self._lp is None:
            self._reserve(n_members, 0)
        row, rival, lp = self._row, self._rival, self._lp
        for a in (row, rival, lp):
            a.resize((self.n_pairs,) + a.shape[1:], refcheck=False)
        return RivalPairs(row, rival, lp, self._dominated.copy(), self.shift, self.ends)


class MixtureCollector:
    """Collects :class:`MixtureStats` over row blocks (see :class:`weights_search.base.Collector`).

    ``labels``: ``(N,)`` integer classes in ``0..n_classes-1``; ``log_prior``: ``(C,)`` or None
    (no prior: no bins, and rivals at ``tau = 0`` only); ``pairs``: collect rival pairs (the
    methods that count rows right); ``tau``: with a prior, the ``tau`` the fits will use when
    it is given (rivals are then found at that ``tau`` alone, fewer than at both ends), or None
    (fitted: rivals at ``tau = 0`` and ``TAU_BOUNDS[1]``); ``max_pairs``: the most pairs held,
    beyond which :meth:`add` raises ValueError; ``max_bins``: see :class:`PriorBins`.
    """

    def __init__(self, labels: np.ndarray, n_classes: int, log_prior: np.ndarray | None = None, *,
                 pairs: bool = False, tau: float | None = None, max_pairs: int = MAX_PAIRS,
                 max_bins: int = MAX_BINS) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a (n_samples,) integer array, got {labels.dtype} of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {labels.min()}..{labels.max()}")
        if log_prior is not None and np.shape(log_prior) != (n_classes,):
            raise ValueError(f"a prior of {np.size(log_prior)} classes for members of {n_classes} classes")
        if max_pairs < 0:
            raise ValueError(f"max_pairs must be non-negative, got {max_pairs}")
        self.labels = labels.astype(np.int64)
        self.n_classes = n_classes
        self.bins = None if log_prior is None else PriorBins(log_prior, max_bins)
        from weights_search.prior import TAU_BOUNDS  # prior.py builds its problems with this collector
        ends = (0.0,) if log_prior is None else (0.0, TAU_BOUNDS[1]) if tau is None else (float(tau),)
        self._rivals = None if not pairs else RivalCollector(
            self.labels.size, None if self.bins is None else self.bins.shift, ends, max_pairs)
        self._next = 0
        self._members: int | None = None
        self._true_lp: np.ndarray | None = None
        self._bin_probs = self._bin_shift = None

    def _allocate(self, n_members: int) -> None:
        n_rows = self.labels.size
        self._members = n_members
        self._true_lp = np.empty((n_members, n_rows))
        if self.bins is not None:
            self._bin_probs = np.empty((n_members, n_rows, self.bins.n_bins), dtype=np.float32)
            if not self.bins.exact:
                self._bin_shift = np.empty_like(self._bin_probs)

    def prepare(self, start: int, log_probs: np.ndarray) -> list | None:
        """What :meth:`add` makes of the rows apart from the rows before: with a prior, each
        member's mass (and offset sums) per bin, the costly part (an exponential and a
        permutation of every value); None without one. Any thread, blocks in any order; give
        it to :meth:`add` of the same rows (``prepared``)."""
        if self.bins is None:
            return None
        log_probs = np.asarray(log_probs)
        if log_probs.ndim != 3 or log_probs.shape[2] != self.n_classes:
            return None  # add says what is wrong
        if log_probs.dtype != np.float32:
            log_probs = log_probs.astype(np.float32)
        return [self.bins.sum(log_probs[m], exp=True) for m in range(log_probs.shape[0])]

    def add(self, start: int, log_probs: np.ndarray, prepared: list | None = None) -> None:
        """Take ``(M, b, C)`` member log-probabilities of rows ``start .. start + b - 1``
        (``prepared``: :meth:`prepare` of the same rows, or None)."""
        log_probs = np.asarray(log_probs)
        if log_probs.ndim != 3 or log_probs.shape[2] != self.n_classes:
            raise ValueError(f"expected a block of shape (n_members, n_rows, {self.n_classes}), got {log_probs.shape}")
        if log_probs.dtype != np.float32:
            log_probs = log_probs.astype(np.float32)
        n_members, size, _ = log_probs.shape
        if start != self._next or start + size > self.labels.size:
            raise ValueError(f"rows {start}..{start + size - 1} added after rows 0..{self._next - 1} of "
                             f"{self.labels.size}: blocks must come in row order, each row once")
        if self._members is None:
            self._allocate(n_members)
        elif n_members != self._members:
            raise ValueError(f"a block of {n_members} members after blocks of {self._members}")
        stop = start + size
        labels = self.labels[start:stop]
        true = log_probs[:, np.arange(size), labels]  # (M, b) float32
        self._true_lp[:, start:stop] = true
        if self.bins is not None:
            if prepared is not None and len(prepared) != n_members:
                raise ValueError(f"prepared sums of {len(prepared)} members for a block of {n_members}")
            for m in range(n_members):  # one member at a time: (b, C) temporaries
                mass, offsets = self.bins.sum(log_probs[m], exp=True) if prepared is None else prepared[m]
                self._bin_probs[m, start:stop] = mass
                if offsets is not None:
                    self._bin_shift[m, start:stop] = offsets
        if self._rivals is not None:
            self._rivals.add(start, log_probs, labels, true)
        self._next = stop

    def result(self) -> MixtureStats:
        """The statistics of all rows; raises ValueError when some rows were not added."""
        if self._next != self.labels.size or self._members is None:
            raise ValueError(f"statistics of {self.labels.size} rows asked for after {self._next} were added")
        pairs = None if self._rivals is None else self._rivals.result(self._members)
        return MixtureStats(self.labels, self.n_classes, self._true_lp, self.bins, self._bin_probs,
                            self._bin_shift, pairs)
