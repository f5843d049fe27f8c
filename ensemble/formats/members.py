"""Blend members read from their stores in blocks of rows.

A member is a model's logits, or with ``--views`` one view of them (``views.npy``). Its rows are
read with plain reads (``os.preadv``) into a block buffer, never by slicing the store's memory
map: pages of a memory map that a command has touched count in its resident memory until the
kernel drops them, so a pass over a 10 GB store through the map grows the command to 10 GB,
while plain reads leave those pages in the page cache, shared and reclaimable, and the command
holds only the block it works on. Every block is checked to be finite as it is read, so no
separate pass checks the stores first.

:class:`Members` is what ``weights_search`` calls a member source: ``n_members``, ``n_rows``,
``n_classes`` and :meth:`Members.block`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.store import LOGITS, VIEWS, LogitStore


@dataclass(frozen=True)
class Member:
    """One member's ``(rows, classes)`` array inside a store file: ``file`` (logits.npy or
    views.npy), the byte ``offset`` of its first row, ``rows``, ``classes`` and ``dtype``."""

    name: str
    store: LogitStore
    file: Path
    offset: int
    rows: int
    classes: int
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return self.classes * self.dtype.itemsize

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new ``(stop - start, classes)`` array of the stored dtype (or
        into ``out``, C-contiguous of that shape and dtype). An OS error is an :class:`EnsError`
        naming the file."""
        n = stop - start
        if out is None:
            out = np.empty((n, self.classes), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        position, done = self.offset + start * self.row_bytes, 0
        try:
            with open(self.file, "rb", buffering=0) as fh:
                while done < view.nbytes:
                    got = os.preadv(fh.fileno(), [view[done:]], position + done)
                    if got == 0:
                        raise EnsError(f"{self.file}: ends before row {start + done // self.row_bytes} of {self.name} "
                                       "(the store was cut short; rerun `ens infer` on its split)")
                    done += got
        except OSError as exc:
            raise EnsError(f"{self.file}: cannot read {self.name}'s rows {start}..{stop - 1} ({exc.strerror or exc})") from None
        return out


def _member(name: str, store: LogitStore, array: np.ndarray, file: Path, index: int | None) -> Member:
    """The :class:`Member` of ``array`` (the store's memory map of ``file``, or of its view
    ``index``): its offset is the map's (the .npy header's length), plus the views before it."""
    root = array
    if not isinstance(root, np.memmap) or not root.flags.c_contiguous:
        raise EnsError(f"{file}: not a C-ordered .npy array; rerun `ens infer` on its split")
    rows, classes = array.shape[-2:]
    per_view = rows * classes * array.dtype.itemsize
    return Member(name=name, store=store, file=file, offset=int(root.offset) + (index or 0) * per_view,
                  rows=int(rows), classes=int(classes), dtype=np.dtype(array.dtype))


class Members:
    """The blend members of ``models``' ``stores``: each model, or with ``views`` each
    ``model/view``, read block by block (see the module docstring)."""

    def __init__(self, models: Sequence[str], stores: Sequence[LogitStore], views: bool) -> None:
        members: list[Member] = []
        for model, store in zip(models, stores):
            if not views:
                members.append(_member(model, store, store.logits, store.path / LOGITS, None))
                continue
            if store.views is None:
                raise EnsError(f"{store.path}: no per-view logits; rerun `ens infer` with --keep-views "
                               "to blend views")
            for v, view in enumerate(store.view_names):
                members.append(_member(f"{model}/{view}", store, store.views, store.path / VIEWS, v))
        if not members:
            raise ValueError("no members")
        shapes = {(m.rows, m.classes) for m in members}
        if len(shapes) != 1:
            raise EnsError(f"members of different shapes: {sorted(shapes)}")
        self.members = tuple(members)
        self.names = [m.name for m in members]
        self.n_members = len(members)
        self.n_rows, self.n_classes = next(iter(shapes))
        #: Called with ``(member, start, its rows as stored)`` after each member's rows are read,
        #: before any check or change (``ens blend`` hashes the stores' bytes in the same pass).
        self.on_read: Callable[[Member, int, np.ndarray], None] | None = None

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of every member: ``(M, stop - start, C)`` float32, checked to hold
        only finite values (an :class:`EnsError` naming the store, the member and the first ids
        otherwise)."""
        stop = min(stop, self.n_rows)
        out = np.empty((self.n_members, stop - start, self.n_classes), dtype=np.float32)
        buffer: np.ndarray | None = None
        for m, member in enumerate(self.members):
            if member.dtype == np.float32:
                raw = member.read(start, stop, out[m])
            else:
                if buffer is None or buffer.dtype != member.dtype:
                    buffer = np.empty((stop - start, self.n_classes), dtype=member.dtype)
                raw = out[m] = member.read(start, stop, buffer)
            if self.on_read is not None:
                self.on_read(member, start, raw)
            finite = np.isfinite(out[m].max(axis=1)) & np.isfinite(out[m].min(axis=1))
            if not finite.all():
                bad = member.store.ids[start + np.flatnonzero(~finite)[:3]]
                raise EnsError(f"{member.store.path}: {member.name} has NaN or infinite logits, first at image ids "
                               f"{', '.join(map(str, bad))}")
        return out

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, block)`` of ``rows`` rows each (the last shorter), in row order."""
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        for start in range(0, self.n_rows, rows):
            yield start, self.block(start, start + rows)
