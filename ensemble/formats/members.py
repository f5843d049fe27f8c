"""Blend members read from their stores in blocks of rows.

A member is a model's logits, or with ``--views`` one view of them (``views.npy``). Its rows are
read with plain reads (``os.preadv``) into a block buffer, never by slicing the store's memory
map: pages of a memory map that a command has touched count in its resident memory until the
kernel drops them, so a pass over a 10 GB store through the map grows the command to 10 GB,
while plain reads leave those pages in the page cache, shared and reclaimable, and the command
holds only the block it works on. Every block is checked to be finite as it is read, so no
separate pass checks the stores first.

:class:`Members` opens each store file once and reads every block through that descriptor, after
checking that it is the file the store's memory map holds (same inode, not shorter): a store
replaced while a pass runs (``ens infer`` renames new arrays into place) is still read whole from
the file the pass started on, and one replaced between opening the store and reading it is an
:class:`EnsError` naming the file. Close it with :meth:`Members.close` (or use it as a context
manager; the descriptors are also closed when it is collected).

:class:`Members` is what ``weights_search`` calls a member source: ``n_members``, ``n_rows``,
``n_classes`` and :meth:`Members.block`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.store import IDS, LOGITS, VIEWS, LogitStore


#: :meth:`Members.block` keeps this many arrays of earlier blocks for reuse: a pass that reads
#: a block while two before are converted and worked on (``ens blend``'s fusion, two worker
#: threads) holds three float32 blocks and up to three of each float16 member's read buffers.
SPARE_ARRAYS = 8
#: :meth:`Members.convert` converts and checks this many values at a time (1 MiB of float32:
#: in the processor's cache between the conversion and the check).
CONVERT_VALUES = 2**18


@dataclass
class RawBlock:
    """Rows of every member as read (:meth:`Members.read_raw`): ``start``, the first row;
    ``rows``; ``out``, the ``(M, n, C)`` float32 block with float32 members' rows already in
    it, or None where every member is stored otherwise (:meth:`Members.convert` makes it);
    ``stored``, per member its rows in their stored dtype, or None where already in ``out``."""

    start: int
    rows: int
    out: np.ndarray | None
    stored: list


def _refs_of_unheld() -> int:
    """What ``sys.getrefcount(spares[i])`` says of an array only the list holds, on this
    interpreter (the count includes its own argument; interpreters differ in borrowing)."""
    spares = [np.empty(0)]
    for i in range(len(spares)):
        return sys.getrefcount(spares[i])
    return 0


_UNHELD = _refs_of_unheld()


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

    def read(self, start: int, stop: int, out: np.ndarray | None = None, fd: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new ``(stop - start, classes)`` array of the stored dtype (or
        into ``out``, C-contiguous of that shape and dtype), through ``fd`` (the file opened
        once, :class:`Members`), else the file opened for this read. An OS error is an
        :class:`EnsError` naming the file."""
        n = stop - start
        if out is None:
            out = np.empty((n, self.classes), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        position, done = self.offset + start * self.row_bytes, 0
        try:
            own = os.open(self.file, os.O_RDONLY) if fd is None else None
            try:
                while done < view.nbytes:
                    got = os.preadv(fd if own is None else own, [view[done:]], position + done)
                    if got == 0:
                        raise EnsError(f"{self.file}: ends before row {start + done // self.row_bytes} of {self.name} "
                                       "(the store was cut short; rerun `ens infer` on its split)")
                    done += got
            finally:
                if own is not None:
                    os.close(own)
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


def _mapped_inode(array: np.ndarray) -> tuple[int, int] | None:
    """``(device, inode)`` of the file ``array``'s memory map holds, from /proc/self/maps; None
    where the system does not say (then the file is checked by its size only). A stacked file
    system (overlayfs) may list the layer's device there: the inode is compared only when the
    devices agree."""
    address = array.ctypes.data
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high and len(fields) >= 5:
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    return os.makedev(major, minor), int(fields[4])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _open_mapped(file: Path, array: np.ndarray) -> int:
    """A descriptor of ``file``, checked to be the file ``array`` (the store's memory map of it)
    maps and to hold all its bytes; an :class:`EnsError` naming the file otherwise."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise EnsError(f"{file}: cannot open it ({exc.strerror or exc})") from None
    stat = os.fstat(fd)
    mapped = _mapped_inode(array)
    if mapped is not None and mapped[0] == stat.st_dev and mapped[1] != stat.st_ino:
        os.close(fd)
        raise EnsError(f"{file}: replaced since its store was opened (another command wrote it meanwhile); "
                       "run the command again once that one has finished")
    needed = int(array.offset) + array.nbytes if isinstance(array, np.memmap) else 0
    if stat.st_size < needed:
        os.close(fd)
        raise EnsError(f"{file}: {stat.st_size} bytes, fewer than the {needed} its header says (the store was cut "
                       "short; rerun `ens infer` on its split)")
    return fd


def _check_finite(member: Member, start: int, rows: np.ndarray) -> None:
    """An :class:`EnsError` naming the store, ``member`` and the first ids of its rows ``start..``
    (``rows``, float32) that hold a NaN or an infinity, if any."""
    finite = np.isfinite(rows.max(axis=1)) & np.isfinite(rows.min(axis=1))
    if not finite.all():
        bad = member.store.ids[start + np.flatnonzero(~finite)[:3]]
        raise EnsError(f"{member.store.path}: {member.name} has NaN or infinite logits, first at image "
                       f"id{'s' if bad.size > 1 else ''} {', '.join(map(str, bad))}")


class Members:
    """The blend members of ``models``' ``stores``: each model, or with ``views`` each
    ``model/view``, read block by block (see the module docstring)."""

    def __init__(self, models: Sequence[str], stores: Sequence[LogitStore], views: bool) -> None:
        self._fds: dict[Path, int] = {}
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
        try:
            for member, store in ((m, m.store) for m in members):
                if member.file not in self._fds:
                    array = store.logits if member.file.name == LOGITS else store.views
                    self._fds[member.file] = _open_mapped(member.file, array)
        except BaseException:
            self.close()
            raise
        self.members = tuple(members)
        self.names = [m.name for m in members]
        self.n_members = len(members)
        self.n_rows, self.n_classes = next(iter(shapes))
        #: Called with ``(member, start, its rows as stored)`` after each member's rows are read,
        #: before any check or change (``ens blend`` hashes the stores' bytes in the same pass).
        self.on_read: Callable[[Member, int, np.ndarray], None] | None = None
        #: Whether :meth:`block` reuses the arrays of earlier blocks that nothing holds (see
        #: :meth:`_array`). A kept array stays resident between blocks: with a pass that holds
        #: block ``i`` (a loop's variable) while reading ``i + 1`` and makes temporaries on each,
        #: that is one block more at the peak, so only passes sized for it turn this on
        #: (``ens blend``'s fusion: a block read while the one before is fused, two in all).
        self.reuse_arrays = False
        self._spares: list[np.ndarray] = []  # arrays of earlier blocks (see _array)
        self._lock = threading.Lock()

    def fd(self, member: Member) -> int:
        """The descriptor ``member``'s file is read through (open until :meth:`close`)."""
        return self._fds[member.file]

    def close(self) -> None:
        """Close the store files (a later :meth:`block` is an error)."""
        self._spares = []
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "Members":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of every member: ``(M, stop - start, C)`` float32, checked to hold
        only finite values (an :class:`EnsError` naming the store, the member and the first ids
        otherwise). :meth:`read_raw` then :meth:`convert`."""
        return self.convert(self.read_raw(start, stop))

    def read_raw(self, start: int, stop: int) -> "RawBlock":
        """Rows ``start:stop`` of every member as stored, read on this thread (float32 members
        straight into the block's array, others into a buffer of their dtype each), each
        member's rows handed to :attr:`on_read` as read; :meth:`convert` makes the float32
        block of it, on any thread. A pass reads its blocks in row order on one thread (so a
        running checksum sees the rows in order) while other threads convert and work on the
        blocks before (:func:`weights_search.parallel.ordered_map`): the conversion from float16,
        about as costly per value as reading a cold store, is off the reading thread."""
        stop = min(stop, self.n_rows)
        if not self._fds:
            raise ValueError("the members' files are closed")
        shape = (stop - start, self.n_classes)
        with self._lock:  # the arrays of blocks being converted on other threads are held, not reused
            # The float32 block is made by convert, on the thread that converts, unless a float32
            # member is read straight into it: a block waiting to be converted holds its stored
            # rows only (half a float32 block with float16 stores).
            out = None
            if any(m.dtype == np.float32 for m in self.members):
                out = self._array((self.n_members, *shape), np.dtype(np.float32))
            others = {m.dtype for m in self.members if m.dtype != np.float32}
            if len(others) == 1:  # (float16 stores) one array holds every member's rows as stored
                dtype = others.pop()
                whole = self._array((self.n_members, *shape), dtype)
                stored = [None if m.dtype == np.float32 else whole[i] for i, m in enumerate(self.members)]
                del whole
            else:
                stored = [None if m.dtype == np.float32 else self._array(shape, m.dtype) for m in self.members]
        for m, member in enumerate(self.members):
            raw = member.read(start, stop, out[m] if stored[m] is None else stored[m], self._fds[member.file])
            if self.on_read is not None:
                self.on_read(member, start, raw)
        self._read_ahead(stop, 2 * stop - start)
        return RawBlock(start, stop - start, out, stored)

    def _read_ahead(self, start: int, stop: int) -> None:
        """Ask the kernel to read rows ``start:stop`` of every member into the page cache now
        (``POSIX_FADV_WILLNEED``: it returns at once), so that a cold store is read from the
        disk while the blocks before are converted and worked on, not when this thread asks
        for them. A hint only: where the system has none, nothing happens."""
        stop = min(stop, self.n_rows)
        if start >= stop or not hasattr(os, "posix_fadvise"):
            return
        for member in self.members:
            try:
                os.posix_fadvise(self._fds[member.file], member.offset + start * member.row_bytes,
                                 (stop - start) * member.row_bytes, os.POSIX_FADV_WILLNEED)
            except (OSError, KeyError):
                return

    def convert(self, raw: "RawBlock") -> np.ndarray:
        """The ``(M, n, C)`` float32 block of ``raw`` (:meth:`read_raw`), checked to hold only
        finite values (an :class:`EnsError` naming the store, the member and the first ids
        otherwise). Works :data:`CONVERT_VALUES` values at a time, each converted and checked
        while in the processor's cache; the conversion is exact, so the block is the same
        whatever the pieces. Thread-safe for distinct blocks."""
        out, start = raw.out, raw.start
        if out is None:
            with self._lock:
                out = self._array((self.n_members, raw.rows, self.n_classes), np.dtype(np.float32))
        raw.out = None
        rows = max(1, CONVERT_VALUES // max(self.n_classes, 1))
        for m, member in enumerate(self.members):
            stored = raw.stored[m]
            raw.stored[m] = None
            target = out[m]
            for a in range(0, target.shape[0], rows):
                piece = target[a:a + rows]
                if stored is not None:
                    np.copyto(piece, stored[a:a + rows])
                # One sum a piece: finite values sum to a finite value (but for float32 stores of
                # values near the float32 limit, where the rows are then checked one by one), a
                # NaN or an infinity makes it NaN or infinite.
                if not np.isfinite(np.add.reduce(piece, axis=None)):
                    if stored is not None:
                        np.copyto(target[a:], stored[a:])
                    _check_finite(member, start + a, target[a:])
            del stored
        return out

    def _array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` for :meth:`block`: with :attr:`reuse_arrays`, one
        an earlier block used that nothing else holds any more (no reference, no view of it),
        else a new one, kept for later blocks (the last :data:`SPARE_ARRAYS`). A new array of
        hundreds of MB has its pages faulted in and zeroed as it is first written (measured:
        1.1-1.4 ns of system time a float32 value on a 2-core machine, about as much as the
        conversion from float16); a reused one's are in place. Every value is overwritten, so
        the block is the same."""
        if not self.reuse_arrays:
            return np.empty(shape, dtype=dtype)
        spares = self._spares
        for i in range(len(spares)):
            if spares[i].shape == shape and spares[i].dtype == dtype and sys.getrefcount(spares[i]) <= _UNHELD:
                return spares[i]
        array = np.empty(shape, dtype=dtype)
        self._spares = [*spares, array][-SPARE_ARRAYS:]
        return array

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, block)`` of ``rows`` rows each (the last shorter), in row order."""
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        for start in range(0, self.n_rows, rows):
            yield start, self.block(start, start + rows)


#: :class:`StoreDigests` copies a member's rows for its hashing thread into one of this many
#: buffers, reused (one is hashed while the reader fills the other): the reader goes on while
#: the rows before are hashed, and waits when both are full.
HASH_BUFFERS = 2
#: Whether :class:`StoreDigests` hashes on its own thread (False: on the reader's, as it reads).
HASH_THREAD = True


def _hash_rows(work: queue.Queue, free: queue.Queue, failed: list[str]) -> None:
    """:class:`StoreDigests`' hashing thread: ``(file, running sha256, buffer, bytes)`` from
    ``work``, each hashed in the order queued, the buffer then handed back through ``free``,
    until ``None``. An error is kept in ``failed`` as a line naming the file (the reader raises
    it); the rows queued after it are not hashed, their buffers handed back all the same."""
    while True:
        item = work.get()
        if item is None:
            return
        file, digest, buffer, size = item
        del item
        if not failed:
            try:
                digest.update(buffer[:size])
            except Exception as exc:  # noqa: BLE001 - any failure is reported by the reader, in one line
                failed.append(f"{file}: cannot take its sha256 ({type(exc).__name__}: {exc})")
        free.put(buffer)


class StoreDigests:
    """The sha256 of each of ``models``' ``stores`` as
    :func:`ensemble.formats.blend.store_digest` takes it (ids.npy, logits.npy and, with
    ``views``, views.npy, one after the other), taken from the bytes a pass over ``members``
    reads, so that the stores are not read a second time for it: ids.npy and logits.npy's
    header here, then each model's logits.npy rows as :class:`Members` reads them
    (:attr:`Members.on_read`), in order from the first row; a second pass over the rows is not
    hashed again. With ``views``, views.npy is then read from its file in :meth:`result` (its
    bytes follow logits.npy's in the digest, view after view, while a pass reads a block of
    every view at a time). A store whose logits.npy rows were not all read so (``members`` of
    views, rows out of order, bytes after the rows) is hashed by ``store_digest`` in
    :meth:`result`. The rows are hashed on a thread beside the reader's (:data:`HASH_THREAD`),
    from a copy of them, in the order read; :meth:`result` waits for it, and raises its error
    (an :class:`EnsError` naming the file)."""

    def __init__(self, models: Sequence[str], stores: Sequence[LogitStore], members: Members, views: bool) -> None:
        self._models, self._stores, self._members, self._views = tuple(models), tuple(stores), members, views
        self._hashes: dict[str, tuple[Member, Any]] = {}  # model: (its member, its running sha256)
        self._next: dict[str, int] = {}
        for member in members.members:
            if member.file.name != LOGITS:
                continue
            digest = hashlib.sha256()
            with open(member.store.path / IDS, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
            digest.update(os.pread(members.fd(member), member.offset, 0))
            self._hashes[member.name], self._next[member.name] = (member, digest), 0
        # The rows are hashed on a thread of their own (hashlib releases the interpreter's lock
        # for large buffers), from a copy in one of HASH_BUFFERS buffers (the reader's arrays
        # may be reused at once).
        self._work: queue.Queue | None = None
        self._free: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._failed: list[str] = []  # the hasher's error, as a line naming the file
        members.on_read = self._read

    def _read(self, member: Member, start: int, rows: np.ndarray) -> None:
        if self._next.get(member.name) != start:  # out of order, or a second pass
            return
        self._next[member.name] = start + rows.shape[0]
        if not HASH_THREAD:
            self._hashes[member.name][1].update(rows)
            return
        self._raise_failed()
        if self._work is None:
            self._work, self._free = queue.Queue(), queue.Queue()
            for _ in range(HASH_BUFFERS):
                self._free.put(np.empty(0, dtype=np.uint8))
            self._thread = threading.Thread(target=_hash_rows, args=(self._work, self._free, self._failed),
                                            name="ens-store-digests", daemon=True)
            self._thread.start()
        assert self._free is not None
        raw = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        buffer = self._free.get()  # waits while both buffers are being hashed or queued
        if buffer.size < raw.size:
            buffer = None  # the old one freed first
            buffer = np.empty(raw.size, dtype=np.uint8)
        np.copyto(buffer[:raw.size], raw)
        self._work.put((member.file, self._hashes[member.name][1], buffer, raw.size))

    def _raise_failed(self) -> None:
        if self._failed:
            raise EnsError(self._failed[0])

    def _finish(self) -> None:
        """Wait for the hasher to hash every row handed to it (its error raised here)."""
        if self._work is not None:
            self._work.put(None)
            assert self._thread is not None
            self._thread.join()
            self._work = self._free = self._thread = None
        self._raise_failed()

    def __del__(self) -> None:
        if getattr(self, "_work", None) is not None:  # a pass that failed: let the hasher end
            self._work.put(None)

    def _whole(self, member: Member) -> bool:
        """Every row of ``member`` hashed and nothing after them in its file."""
        try:
            size = os.fstat(self._members.fd(member)).st_size
        except KeyError:  # closed
            size = os.path.getsize(member.file)
        return self._next[member.name] == member.rows and size == member.offset + member.rows * member.row_bytes

    def result(self) -> dict[str, str]:
        """Each model's digest, after the pass."""
        from ensemble.formats.blend import store_digest  # formats.blend's digest, which this one equals

        self._finish()
        digests = {}
        for model, store in zip(self._models, self._stores):
            member, digest = self._hashes.get(model, (None, None))
            if member is None or not self._whole(member):
                digests[model] = store_digest(store, self._views)
                continue
            digest = digest.copy()
            if self._views and store.views is not None:
                with open(store.path / VIEWS, "rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
            digests[model] = digest.hexdigest()
        return digests
