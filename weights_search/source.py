"""Member sources: where a fit, a cross-validation or a fusion reads member logits from, block by block.

A *member source* is any object with ``n_members``, ``n_rows``, ``n_classes`` (ints) and
``block(start, stop)`` returning rows ``start:stop`` of every member as a new ``(M, stop - start,
C)`` float32 array of LOGITS, the caller's to overwrite (never a view of data the source keeps;
``stop`` may run past ``n_rows``: the block then ends at the last row). Everything in
:mod:`weights_search` that streams reads its members through one, a block of rows at a time,
so its memory depends on the block size, ``M`` and ``C``, not on ``N``.

:class:`ArraySource` wraps arrays already in hand (an ``(M, N, C)`` stack, or one ``(N, C)``
array per member, memory-mapped ones included); ``ensemble.formats.members.Members`` is the
source ``ens`` uses for stores on disk (plain reads, no memory-map pages kept).
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

#: A default block's size in bytes of float32 logits (``M * rows * C * 4``) when a caller gives
#: no ``block_rows``: large enough that per-block overheads vanish, small enough to stay far
#: below any memory budget (a pass holds a few copies of one block).
DEFAULT_BLOCK_BYTES = 32 * 2**20


@runtime_checkable
class MemberSource(Protocol):
    """What :mod:`weights_search` reads member logits from (see the module docstring)."""

    n_members: int
    n_rows: int
    n_classes: int

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of every member: a new ``(M, stop - start, C)`` float32 array of
        logits (the caller may overwrite it)."""


class ArraySource:
    """A member source over arrays in hand: an ``(M, N, C)`` stack, or a sequence of ``M``
    ``(N, C)`` arrays of one shape (float16 or float32; ``np.memmap`` works: only the rows of
    the block asked for are read and converted, though the map's pages it touches count in the
    process's resident memory until the kernel drops them; ``ens`` reads stores with plain reads
    instead, ``ensemble.formats.members.Members``). Entries of -inf are passed through (a member
    may rule a class out); checks of the values are left to what consumes the blocks."""

    def __init__(self, arrays: np.ndarray | Sequence[np.ndarray]) -> None:
        if isinstance(arrays, np.ndarray):
            if arrays.ndim != 3 or 0 in arrays.shape:
                raise ValueError(f"expected member outputs of shape (n_members, n_samples, n_classes), got {arrays.shape}")
            self._stack: np.ndarray | None = arrays
            self._members: tuple[np.ndarray, ...] = ()
            shape = arrays.shape
        else:
            members = tuple(a if isinstance(a, np.ndarray) else np.asarray(a) for a in arrays)
            if not members:
                raise ValueError("no members")
            shapes = {m.shape for m in members}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2 or 0 in next(iter(shapes)):
                raise ValueError(f"members must all be non-empty (n_samples, n_classes) arrays of one shape, "
                                 f"got {sorted(shapes)}")
            self._stack, self._members = None, members
            shape = (len(members), *next(iter(shapes)))
        self.n_members, self.n_rows, self.n_classes = (int(s) for s in shape)

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of every member, ``(M, b, C)`` float32 (a new array)."""
        start, stop = _clip(start, stop, self.n_rows)
        if self._stack is not None:
            return np.array(self._stack[:, start:stop], dtype=np.float32)
        out = np.empty((self.n_members, stop - start, self.n_classes), dtype=np.float32)
        for m, member in enumerate(self._members):
            out[m] = member[start:stop]
        return out


def _clip(start: int, stop: int, n_rows: int) -> tuple[int, int]:
    if not 0 <= start <= n_rows or stop < start:
        raise ValueError(f"rows {start}:{stop} lie outside 0..{n_rows}")
    return start, min(stop, n_rows)


def as_source(members: MemberSource | np.ndarray | Sequence[np.ndarray]) -> MemberSource:
    """``members`` itself when it is a member source, else an :class:`ArraySource` over it."""
    if all(hasattr(members, name) for name in ("n_members", "n_rows", "n_classes", "block")):
        return members  # type: ignore[return-value]
    return ArraySource(members)  # type: ignore[arg-type]


def default_block_rows(source: MemberSource, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that one float32 block of ``source`` takes about ``block_bytes``
    (at least one row)."""
    return max(1, int(block_bytes // (4 * source.n_members * source.n_classes)))


def blocks(source: MemberSource, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, (M, b, C) float32 block)`` of ``rows`` rows each (the last shorter), in row
    order: one pass over ``source``. ``rows`` None: :func:`default_block_rows`."""
    if rows is None:
        rows = default_block_rows(source)
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    for start in range(0, source.n_rows, rows):
        block = source.block(start, min(start + rows, source.n_rows))
        expected = (source.n_members, min(rows, source.n_rows - start), source.n_classes)
        if block.shape != expected:
            raise ValueError(f"the member source gave a block of shape {block.shape} for rows "
                             f"{start}:{start + expected[1]}, expected {expected}")
        yield start, block


def check_labels(source: MemberSource, labels: np.ndarray) -> np.ndarray:
    """``labels`` as an ``(N,)`` integer array, checked against ``source`` (one per row, each in
    ``0..C-1``)."""
    labels = np.asarray(labels)
    if labels.shape != (source.n_rows,):
        raise ValueError(f"labels of shape {labels.shape} do not match {source.n_rows} samples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= source.n_classes):
        raise ValueError(f"labels must lie in 0..{source.n_classes - 1}, got {labels.min()}..{labels.max()}")
    return labels
