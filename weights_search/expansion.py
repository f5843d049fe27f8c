"""Collectors whose per-row summaries are expansions about a pilot, fitted as the rows go by.

Temperature scaling and geometric pooling need every row's log-normaliser
``log sum_c exp(x . v_c)`` as a function of the parameters ``x`` (an inverse temperature; the
pooling weights and ``tau``). Their collectors (:class:`~weights_search.temperature.TemperatureCollector`,
:class:`~weights_search.pooling.LogitCollector`) keep each row's largest classes exactly and
summarise the rest by the first cumulants of ``v`` under the distribution tilted by ``exp(x0 . v)``,
where ``x0`` (the *pilot*) should lie near the ``x`` the fits will find. This module holds the
schedule that chooses ``x0`` from the rows themselves, in the one pass:

- the first ``min(N, pilot_rows)`` rows are held (a bounded buffer: ``M * pilot_rows * C``
  float32, at most :data:`PILOT_VALUES`) and the parameters are fitted on them exactly; that is
  the pilot of those rows;
- rows from ``P * 2**j`` to ``P * 2**(j+1)`` (``P`` the first segment's length) use the
  parameters fitted, from the summaries, on all rows before ``P * 2**j``: each row's pilot is
  stored with it, half of the rows use a pilot fitted on the other half, and only the first
  segments use pilots fitted on few rows.

Segment bounds depend on row numbers only, so blocks of any size give the same summaries, and a
subset of rows keeps each row's own pilot. A ``pilot`` given to a collector is used for every
row (no buffer, no refit): the summaries of a set of rows then do not depend on which other rows
were collected.

The schedule suits rows in random order. When the order is unfavourable (rows sorted by class,
the members' confidence changing across classes), the fit of all rows lies far from many rows'
pilots; the statistics estimate the fit's error from the expansion's neglected term
(``fit_error``) and ask (``repass_pilot``) for a second pass with a fixed pilot, the fit
(``with_pilot``): :mod:`weights_search.fitted` and :mod:`weights_search.cv` do that pass, only
then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

#: The first segment holds at most this many float32 values (64 MiB), and between 16 and 512 rows.
PILOT_VALUES = 2**24
PILOT_ROWS = (16, 512)
#: Blocks are summarised in pieces of at most this many member values (8 MiB of float32, at
#: least one row), which bounds a collector's temporaries whatever the caller's block size.
CHUNK_VALUES = 2**21


def pilot_rows(n_members: int, n_classes: int) -> int:
    """Rows held for the exact pilot fit: as many as :data:`PILOT_VALUES` allows, within :data:`PILOT_ROWS`."""
    low, high = PILOT_ROWS
    return int(min(high, max(low, PILOT_VALUES // max(1, n_members * n_classes))))


class PilotedCollector(ABC):
    """Feeds ``(M, b, C)`` blocks, in row order, to :meth:`_summarise` with the pilot each row gets.

    Subclasses say whether ``n_classes`` needs a pilot at all (:meth:`_needs_pilot`: with few
    classes everything is kept exactly), fit one exactly on held rows (:meth:`_exact_pilot`) or
    from the summaries of rows ``0..stop-1`` (:meth:`_refit`), and build the result (:meth:`_stats`).
    """

    def __init__(self, labels: np.ndarray, n_members: int | None, pilot: Any = None) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a non-empty (n_samples,) integer array, got shape {labels.shape} of {labels.dtype}")
        if n_members is not None and n_members < 1:
            raise ValueError(f"n_members must be at least 1, got {n_members}")
        self.labels = labels
        self.n_rows = labels.size
        self.n_members = n_members
        self.n_classes: int | None = None
        self._next = 0
        self._held: np.ndarray | None = None
        self._pilot = pilot
        self._fixed = pilot is not None
        self._first = 0

    def add(self, start: int, block: np.ndarray) -> None:
        """Rows ``start..start+b-1`` of every member, ``(M, b, C)`` float32, in row order, each row once."""
        block = np.asarray(block)
        if self.n_members is None and block.ndim == 3:
            self.n_members = block.shape[0]  # taken from the first block when not given
        if block.ndim != 3 or block.shape[0] != self.n_members or block.shape[1] == 0:
            raise ValueError(f"expected a block of shape ({self.n_members}, rows, classes), got {block.shape}")
        if start != self._next:
            raise ValueError(f"blocks must come in row order: expected row {self._next}, got {start}")
        if start + block.shape[1] > self.n_rows:
            raise ValueError(f"rows {start}..{start + block.shape[1] - 1} run past the {self.n_rows} labels")
        if self.n_classes is None:
            self.n_classes = block.shape[2]
            labels = self.labels
            if labels.min() < 0 or labels.max() >= self.n_classes:
                raise ValueError(f"labels must lie in 0..{self.n_classes - 1}, got {labels.min()}..{labels.max()}")
            self._start(self.n_classes)
            self._first = min(self.n_rows, pilot_rows(self.n_members, self.n_classes))
        elif block.shape[2] != self.n_classes:
            raise ValueError(f"a block of {block.shape[2]} classes after blocks of {self.n_classes}")
        self._next += block.shape[1]
        if self._fixed or not self._needs_pilot(self.n_classes):
            self._feed(start, block)
            return
        if self._pilot is None:
            if self._held is None:
                self._held = np.empty((self.n_members, self._first, self.n_classes), dtype=np.float32)
            taken = min(self._first, self._next) - start
            self._held[:, start:start + taken] = block[:, :taken]
            if self._next < self._first:
                return
            held, self._held = self._held, None
            self._pilot = self._exact_pilot(held, self.labels[:self._first])
            self._feed(0, held)
            del held
            block, start = block[:, taken:], start + taken
            if block.shape[1] == 0:
                return
        self._feed(start, block)

    def _feed(self, start: int, block: np.ndarray) -> None:
        """Summarise the block in pieces of at most :data:`CHUNK_VALUES` values (bounding the
        temporaries whatever the block's size), each with the pilot of its rows."""
        stop = start + block.shape[1]
        chunk = max(1, CHUNK_VALUES // (self.n_members * self.n_classes))
        if self._fixed or not self._needs_pilot(self.n_classes):
            for a in range(start, stop, chunk):
                self._summarise(a, block[:, a - start:min(stop, a + chunk) - start], self._pilot)
            return
        cuts = [start]
        bound = self._first
        while bound < stop:
            if bound > start:
                cuts.append(bound)
            bound *= 2
        cuts.append(stop)
        for a, b in zip(cuts[:-1], cuts[1:]):
            if _is_bound(a, self._first):
                self._pilot = self._refit(a)
            for c in range(a, b, chunk):
                self._summarise(c, block[:, c - start:min(b, c + chunk) - start], self._pilot)

    def result(self) -> Any:
        if self._next != self.n_rows:
            raise ValueError(f"collected {self._next} rows of {self.n_rows}")
        return self._stats()

    @abstractmethod
    def _start(self, n_classes: int) -> None:
        """Allocate the summaries once the number of classes is known."""

    @abstractmethod
    def _needs_pilot(self, n_classes: int) -> bool:
        """Whether rows have a rest to summarise (else every class is kept and no pilot is used)."""

    @abstractmethod
    def _exact_pilot(self, block: np.ndarray, labels: np.ndarray) -> Any:
        """The parameters fitted exactly on the held ``(M, P, C)`` rows."""

    @abstractmethod
    def _refit(self, stop: int) -> Any:
        """The parameters fitted on the summaries of rows ``0..stop-1``."""

    @abstractmethod
    def _summarise(self, start: int, block: np.ndarray, pilot: Any) -> None:
        """Store the summaries of the block's rows, expanded about ``pilot``."""

    @abstractmethod
    def _stats(self) -> Any:
        """The statistics of every row."""


def _is_bound(row: int, first: int) -> bool:
    """Whether ``row`` is ``first * 2**j`` for some ``j >= 1``."""
    if row <= first or row % first:
        return False
    q = row // first
    return q & (q - 1) == 0


#: Columns per group in :func:`largest`.
GROUP = 16


def largest(x: np.ndarray, k: int) -> np.ndarray:
    """``(b, k)`` int64 column indices of the ``k`` largest values of each row of ``(b, C)`` ``x``
    (in no order; among equal values, any).

    A partition of whole rows costs about 25 ns a value; this one splits the first
    ``G * (C // GROUP)`` columns into ``G = C // GROUP`` groups of :data:`GROUP` columns each,
    group ``j`` being columns ``j, j + G, j + 2G, ...`` (a strided view, maxima taken down the
    strides), partitions the group maxima, then the columns of the ``k`` groups with the largest
    maxima and the ``C mod GROUP`` last columns (in no group): every one of the ``k`` largest
    values lies among those, since a group holding one of them has a maximum at least that
    large, and fewer than ``k`` groups can have a larger maximum than the ``k``-th largest
    value (ties: any).
    """
    n_rows, n_classes = x.shape
    n_groups = n_classes // GROUP
    if not 0 < k <= n_classes:
        raise ValueError(f"k must lie in 1..{n_classes}, got {k}")
    if n_groups <= 4 * k:
        return np.argpartition(x, n_classes - k, axis=1)[:, n_classes - k:]
    maxima = x[:, :n_groups * GROUP].reshape(n_rows, GROUP, n_groups).max(axis=1)
    groups = np.argpartition(maxima, n_groups - k, axis=1)[:, n_groups - k:]
    columns = (groups[:, :, None] + n_groups * np.arange(GROUP)).reshape(n_rows, -1)
    if n_classes % GROUP:
        tail = np.arange(n_groups * GROUP, n_classes)
        columns = np.concatenate([columns, np.broadcast_to(tail, (n_rows, tail.size))], axis=1)
    values = np.take_along_axis(x, columns, axis=1)
    pick = np.argpartition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k:]
    return np.take_along_axis(columns, pick, axis=1)


def check_rows(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """``rows`` as an array, checked to be a ``(n,)`` array of integer row indices in ``0..n_rows-1``
    (a CV fold's training rows, given to a collector's ``subset``); ValueError otherwise."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or (rows.size and (rows.min() < 0 or rows.max() >= n_rows)):
        raise ValueError(f"rows must be a (n,) array of row indices in 0..{n_rows - 1}")
    return rows
