"""Reading a big COCO/iNat json record by record: iNat 2021's ``train.json`` (2.7 M images and
2.7 M annotations, about 1 GB) in bounded memory.

:func:`json.loads` of that file holds several GB of Python objects at once; the readers of the
training json (:func:`ensemble.formats.places.read_observations` for ``--geo-prior``,
:func:`ensemble.formats.dataset.read_class_counts` for ``--prior``, the report and
``ens submit --missing prior``) need only a few fields of each record. They stream the records
of one top-level array (``images``, ``annotations``, ``categories``) with ijson's C backend
(``yajl2_c``), :data:`RECORDS` at a time (:func:`records`), and keep what they need in numpy
arrays.

The one file is read as ens reads every JSON (:func:`ensemble.formats.common.read_json`), and a
file the streaming parser could read otherwise is read whole by ``json.loads`` instead: the
reader raises :class:`NeedsLoads` and its caller takes its ``json.loads`` path, whose results
and messages are those of every other reader. That is the case

* without ijson's C backend (the pure Python one is about 30 times slower);
* for JSON that ``json.loads`` reads and yajl does not: ``NaN``, ``Infinity``, integers beyond
  64 bits, numbers beyond float64 (``1e400``), a byte order mark, UTF-16 or UTF-32, lone UTF-16
  surrogates (``"\\ud800"``, which yajl would read as ``"?"``);
* where the streamed records could be other than ``json.loads``'s: an object key ``"item"``
  or one ending ``.item`` anywhere (ijson's paths join keys with ``.`` and call array items
  ``item``: ``{"images": {"item": ...}}`` and ``{"images.item": ...}`` have the path of the
  images' items), or the text of an array's key (``"images"``) more than once (a repeated
  top-level key, whose later value json.loads keeps); a string value with these bytes costs
  only the fast path;
* for a file ijson refuses that is at most :data:`SMALL` bytes: ``json.loads``'s message gives
  the line and column. A bigger malformed file is one line naming the file, yajl's reason and
  the bytes read when it stopped (``in the MiB before byte N``).

A document nesting deeper than :data:`~ensemble.formats.common.MAX_JSON_DEPTH` is refused in
``read_json``'s words, the depth read off the bytes as they stream by (the scan of
:func:`~ensemble.formats.common.json_depth`, kept from chunk to chunk), before the parser
meets it; a file of at most :data:`SMALL` bytes goes to json.loads, whose first word may be a
syntax error further on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.common import MAX_JSON_DEPTH, _escaped_quotes, _not_regular, _NOT_STRUCTURE

try:
    import ijson
except ImportError:  # a core dependency; without it every file is read by json.loads
    ijson = None

#: Bytes handed to the parser at a time.
CHUNK = 1 << 20
#: Records (images, annotations) handed on at a time: a few tens of MB of Python dicts.
RECORDS = 1 << 14
#: A file ijson refuses is read again by json.loads (its message gives the line and column) when
#: it is at most this big; a bigger one is refused in yajl's words, in bounded memory.
SMALL = 64 << 20
#: The texts the scan counts (:class:`Scan`): the keys of the arrays read, a key ``"item"``, and a
#: key ending ``.item`` (a top-level ``"images.item"`` has ijson's path of the images' items).
KEYS = (b'"images"', b'"annotations"', b'"categories"', b'"item"', b'.item"')
#: A UTF-16 surrogate escape: the scan looks closer at a chunk holding one.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_HIGH = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LOW = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
#: Bytes of a chunk's end looked at again with the next chunk: a key or an escape cut in two (an
#: escape deferred from the last 12 bytes is then seen with the 12 before it: its high half).
_TAIL = 24


class NeedsLoads(Exception):
    """The file is to be read whole by json.loads (see the module docstring for when)."""


def available() -> bool:
    """Whether ijson's C backend is there (else the readers take their json.loads path)."""
    return ijson is not None and ijson.backend == "yajl2_c"


class Scan:
    """The file as the parser reads it (``read``), checked on the way: its sha256, its nesting
    depth (``deepest``), how often each of :data:`KEYS` occurs (``keys``), lone surrogate
    escapes (:class:`NeedsLoads`), and the encoding of its first bytes."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.keys = dict.fromkeys(KEYS, 0)
        self.deepest = self.depth = 0
        self.in_string = self.escaped = False
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(CHUNK if n is None or n < 0 else n)
        if not data:
            self._surrogates(self.tail, max(0, len(self.tail) - 12), len(self.tail))
            return data
        if self.size == 0 and (data[:3] == b"\xef\xbb\xbf" or json.detect_encoding(data[:4]) != "utf-8"):
            raise NeedsLoads  # a byte order mark, UTF-16 or UTF-32
        self.size += len(data)
        self.sha256.update(data)
        text = self.tail + data
        for key in KEYS:
            self.keys[key] += text.count(key) - self.tail.count(key)
        self._surrogates(text, max(0, len(self.tail) - 12), len(text) - 12)
        self._depth(data)
        if self.deepest > MAX_JSON_DEPTH:
            raise TooDeep  # before the parser meets it (ijson's paths grow with the depth)
        self.tail = text[-_TAIL:]
        return data

    def _surrogates(self, text: bytes, first: int, last: int) -> None:
        """NeedsLoads for a high surrogate escape not followed by a low one, or a low one not
        preceded by a high one, starting in ``text[first:last]`` (an escape in a chunk's last 12
        bytes waits for the next chunk, where it is looked at with what follows it)."""
        if _SURROGATE.search(text, first) is None:
            return
        for match in _SURROGATE.finditer(text, first):
            at = match.start()
            if at >= last:
                break
            if _HIGH.match(text, at):
                if not _LOW.match(text, at + 6):
                    raise NeedsLoads
            elif at < 6 or not _HIGH.match(text, at - 6):
                raise NeedsLoads

    def _depth(self, piece: bytes) -> None:
        """:func:`ensemble.formats.common.json_depth`'s scan of one chunk, its state kept."""
        structure = piece.translate(None, _NOT_STRUCTURE)
        kept = np.frombuffer(structure, np.uint8)
        brackets = np.flatnonzero(kept & 1)  # [ ] { } are odd bytes, " and \ even
        quotes_before = brackets - np.arange(brackets.size)
        quotes = kept.size - brackets.size
        if self.escaped or b"\\" in structure:
            escaped_quotes, backslashes, self.escaped = _escaped_quotes(piece, kept, self.escaped)
            quotes_before -= np.searchsorted(backslashes, brackets) + np.searchsorted(escaped_quotes, brackets)
            quotes -= backslashes.size + escaped_quotes.size
        outside = brackets[((quotes_before + self.in_string) & 1) == 0]
        if outside.size:
            levels = np.cumsum((kept[outside] & 2).astype(np.int8) - 1, dtype=np.int64) + self.depth
            self.deepest, self.depth = max(self.deepest, int(levels.max())), int(levels[-1])
        self.in_string ^= bool(quotes & 1)

class TooDeep(Exception):
    """The scan met a bracket deeper than MAX_JSON_DEPTH."""


def _open(path: Path, label: str, hint: str) -> BinaryIO:
    """``path`` opened for reading as :func:`ensemble.formats.common.read_regular` opens it
    (never blocking on a FIFO swapped in)."""
    tail = f"; {hint}" if hint else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise EnsError(f"{label}: not a JSON file ({exc}){tail}") from None
    file = open(fd, "rb")
    problem = _not_regular(os.fstat(fd).st_mode, label)
    if problem is not None:
        file.close()
        raise EnsError(f"{problem}{tail}")
    return file


def records(path: Path, prefix: str, label: str, *, scan: bool = False, hint: str = "") -> Iterator[Any]:
    """Lists of the records at ijson path ``prefix`` (``"images.item"``) of the json at
    ``path``, :data:`RECORDS` at a time, numbers as int and float (as json.loads gives them).
    ``scan``: the first item yielded is the :class:`Scan` the file is read through (its sha256,
    depth and key counts are complete once the records are). :class:`NeedsLoads` as the module
    docstring says; an :class:`EnsError` naming ``label`` for a malformed file over :data:`SMALL`."""
    if not available():
        raise NeedsLoads
    with _open(path, label, hint) as file:
        source = Scan(file) if scan else file
        if scan:
            yield source
        size = os.fstat(file.fileno()).st_size
        items = ijson.items(source, prefix, use_float=True, buf_size=CHUNK)
        while True:
            try:
                batch = list(islice(items, RECORDS))
            except UnicodeDecodeError:
                raise NeedsLoads from None  # json.loads decodes lone surrogates, and words what it does not
            except TooDeep:
                if size <= SMALL:
                    raise NeedsLoads from None  # a syntax error further on is json.loads's first word
                raise EnsError(f"{label}: not a JSON file (nested deeper than {MAX_JSON_DEPTH} levels)"
                               + (f"; {hint}" if hint else "")) from None
            except ijson.JSONError as exc:
                reason = exc.args[0] if exc.args else ""
                reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
                reason = (reason.strip().splitlines() or [""])[0].strip()
                if size <= SMALL or "overflow" in reason or "invalid char in json text" in reason:
                    raise NeedsLoads from None  # NaN, Infinity, 1e400, an integer beyond 64 bits
                where = file.tell()
                raise EnsError(f"{label}: not a JSON file ({reason.rstrip('.')}, in the "
                               f"{'MiB' if where > CHUNK else 'bytes'} before byte {where:,})"
                               + (f"; {hint}" if hint else "")) from None
            if not batch:
                return
            yield batch


def trusted(scan: Scan, *arrays: str) -> bool:
    """Whether the records streamed from the top-level ``arrays`` are json.loads's: no key
    ``"item"`` and none ending ``.item`` anywhere, each array's key written at most once (the
    caller tells none from one by the records it got)."""
    keys = scan.keys
    return keys[b'"item"'] == 0 and keys[b'.item"'] == 0 and all(keys[f'"{a}"'.encode()] <= 1 for a in arrays)


def grown(buffer: np.ndarray, used: int, extra: int) -> np.ndarray:
    """``buffer`` with room for ``extra`` more after its first ``used`` (doubled as needed)."""
    if used + extra <= buffer.size:
        return buffer
    bigger = np.empty(max(2 * buffer.size, used + extra, 1024), buffer.dtype)
    bigger[:used] = buffer[:used]
    return bigger
