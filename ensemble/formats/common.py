"""The small rules every format (and every stage) shares: reading a JSON file (or text), describing an
exception in one line, and the type checks of JSON values.

Each rule is written once here. The checks are predicates (``True`` when the value is fine):
the message stays with the caller, which knows the file and the key to name.

Why no validation library (pydantic, msgspec): every message ens prints names the file and the
key in its own words (``ens.num_classes 0: expected a positive integer``), and tests assert
them word for word. Either library would need a translation of its own error text for each
field, and strict modes to keep ``true`` from counting as ``1``; these few predicates say the
same in less code and add no dependency to an inference machine.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import TYPE_CHECKING, Any

from ensemble.errors import EnsError

if TYPE_CHECKING:
    import numpy as np


# --------------------------------------------------------------------------------------------
# Reading JSON

#: The deepest nesting of arrays and objects ens reads (serde_json's default limit). No file ens
#: reads needs more than a handful of levels; a deeper document is refused when it is read,
#: before Python's recursion (the parser's own, ``repr`` in a message, a comparison) meets it.
MAX_JSON_DEPTH = 128

#: What a path that is not a regular file is, by ``stat.S_IFMT``.
_FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _not_regular(mode: int, label: str) -> EnsError | None:
    if stat.S_ISREG(mode):
        return None
    return EnsError(f"{label}: {_FILE_KINDS.get(stat.S_IFMT(mode), 'not a file')}, not a regular file")


def check_regular(path: str | os.PathLike, label: str | None = None) -> None:
    """Nothing when ``path`` is a regular file (or a link to one); an :class:`EnsError`
    (``<label>: a named pipe (FIFO), not a regular file``) when it is a folder, FIFO, device or
    socket, for a reader that opens the path itself (``np.load``) and must not wait on a FIFO
    forever. A missing path raises the :class:`OSError` for the caller to word."""
    problem = _not_regular(os.stat(path).st_mode, str(path) if label is None else label)
    if problem is not None:
        raise problem


def read_regular(path: str | os.PathLike, label: str | None = None) -> bytes:
    """The bytes of the regular file at ``path``. A folder, named pipe (FIFO), device or socket
    is an :class:`EnsError` (``<label>: a named pipe (FIFO), not a regular file``) and is never
    opened for a blocking read: a FIFO nobody writes to would wait forever, ``/dev/zero`` never
    ends. The path is looked at first, then opened without blocking and looked at again (it may
    have been swapped in between). Other failures (missing, no permission) raise the
    :class:`OSError` for the caller to word."""
    label = str(path) if label is None else label
    check_regular(path, label)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as file:  # O_NONBLOCK changes nothing for a regular file
        problem = _not_regular(os.fstat(fd).st_mode, label)
        if problem is not None:
            raise problem
        return file.read()


#: The bytes of UTF-8 JSON text the depth scan deletes: all but the brackets, the quote and the
#: backslash.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"\\')

#: Bytes of text the depth scan reads at a time: its arrays hold a few int64 for each quote,
#: bracket and backslash of a chunk, whatever the size of the text.
DEPTH_CHUNK = 1 << 20


def _utf8(text: str | bytes | bytearray) -> bytes | bytearray:
    """``text`` as UTF-8 bytes: the encoding :func:`json.loads` detects in bytes (UTF-8, with or
    without a byte order mark, which no structural byte can be mistaken for, is kept as it is;
    UTF-16 and UTF-32 are decoded as json.loads decodes them); a str (lone surrogates
    included) encoded."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(text)
    if encoding.startswith("utf-8"):
        return text
    return text.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")


def json_depth(text: str | bytes | bytearray, *, chunk: int = DEPTH_CHUNK) -> int:
    """How deep the JSON ``text`` nests arrays and objects (0 for a scalar): the most brackets
    open at once outside strings. ``text`` must be JSON that :func:`json.loads` reads; the
    depth is then that of the value json.loads returns, or more where an object repeats a key
    and json.loads keeps the later, shallower value.

    Read off the UTF-8 bytes with numpy, ``chunk`` bytes at a time, instead of walking every
    parsed list and dict in Python, which added 38% to json.loads on an iNat-style split json
    where this adds 11-16% (``python -m benchmarks.json_read``). In UTF-8 the bytes of
    ``[ ] { } " \\`` stand for those characters only. In valid JSON a backslash occurs only in a
    string and escapes the character after it, so backslashes pair up from the start of each
    run and a quote is a string's edge unless an odd run of them comes right before it. Each
    chunk is cut down to its brackets, quotes and backslashes (``bytes.translate``); a bracket
    is outside strings when an even number of the edges come before it.
    """
    import numpy as np  # here, not at the top: `ens --help` and the light modules stay numpy-free

    data = _utf8(text)
    deepest = depth = 0
    in_string = escaped = False  # escaped: the chunk's first byte is escaped by the last one's
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        structure = piece.translate(None, _NOT_STRUCTURE)
        kept = np.frombuffer(structure, np.uint8)
        brackets = np.flatnonzero(kept & 1)  # [ ] { } are odd bytes, " and \ even
        quotes_before = brackets - np.arange(brackets.size)  # all else kept: quotes, unless...
        quotes = kept.size - brackets.size
        if escaped or b"\\" in structure:  # ...there are backslashes
            escaped_quotes, backslashes, escaped = _escaped_quotes(piece, kept, escaped)
            quotes_before -= np.searchsorted(backslashes, brackets) + np.searchsorted(escaped_quotes, brackets)
            quotes -= backslashes.size + escaped_quotes.size
        outside = brackets[((quotes_before + in_string) & 1) == 0]
        if outside.size:  # [ and { have bit 2 set, ] and } not
            levels = np.cumsum((kept[outside] & 2).astype(np.int8) - 1, dtype=np.int64) + depth
            deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        in_string ^= bool(quotes & 1)
    return deepest


def _escaped_quotes(piece: bytes | bytearray, kept: np.ndarray,
                    escaped: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """For one chunk of :func:`json_depth`: the indices in ``kept`` (the chunk's quotes,
    brackets and backslashes, in order) of the quotes a backslash escapes and of the
    backslashes, and whether the chunk's last byte escapes the next chunk's first.
    ``escaped``: whether the previous chunk's last byte escapes this one's first."""
    import numpy as np

    raw = np.frombuffer(piece, np.uint8)
    at = np.flatnonzero(raw == 0x5C)  # the backslashes, where they are in the chunk...
    backslashes = np.flatnonzero(kept == 0x5C)  # ...and in kept: the same ones, in order
    # Backslashes pair up from the start of each run: the 1st, 3rd, ... of a run escape the
    # byte after them. A run that starts the chunk after an escaping byte starts with an
    # escaped backslash.
    starts = np.ones(at.size, bool)
    starts[1:] = np.diff(at) != 1
    first = np.flatnonzero(starts)
    in_run = np.arange(at.size) - np.repeat(first, np.diff(np.append(first, at.size)))
    if escaped and at.size and at[0] == 0:
        in_run[:first[1] if first.size > 1 else at.size] += 1
    escaping = (in_run & 1) == 0
    after = at[escaping] + 1
    escapes_next = bool(after.size) and bool(after[-1] == len(piece))
    hit = after < len(piece)
    quote = np.zeros(after.size, bool)
    quote[hit] = raw[after[hit]] == 0x22
    escaped_quotes = backslashes[escaping][quote] + 1  # the quote is the next byte kept
    if escaped and raw.size and raw[0] == 0x22:
        escaped_quotes = np.concatenate(([0], escaped_quotes))
    return escaped_quotes, backslashes, escapes_next


def _deeper(text: str | bytes | bytearray, limit: int) -> bool:
    """Whether the JSON ``text`` (which json.loads has read) nests deeper than ``limit``. A
    short text with no more than ``limit`` opening brackets cannot (in UTF-16 and UTF-32 each
    ``[`` and ``{`` holds such a byte too, so the count is never too small)."""
    if len(text) <= 1 << 16:
        opens = ("[", "{") if isinstance(text, str) else (b"[", b"{")
        if text.count(opens[0]) + text.count(opens[1]) <= limit:
            return False
    return json_depth(text) > limit


def parse_json(text: str | bytes, label: str, *, problem: str = "not JSON", hint: str = "",
               where: bool = True) -> Any:
    """The value of the JSON ``text`` (bytes may be UTF-8, -16 or -32, as :func:`json.loads`
    takes them); an :class:`EnsError` ``<label>: <problem> (<why>)[; <hint>]`` when it is not
    JSON or nests arrays and objects deeper than :data:`MAX_JSON_DEPTH` levels (in its text:
    :func:`json_depth`). ``where``: whether ``why`` says where the parser stopped (``line 1
    column 7 (char 6)``), which a short value shown in the message does not need. For JSON that is not a file of its own
    (an ONNX metadata value, a ledger column, an option's text); files go through
    :func:`read_json`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        why: object = exc if where else exc.msg
    except UnicodeDecodeError as exc:
        why = exc
    except RecursionError:  # deeper than the C parser follows: deeper than the limit too
        why = f"nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError as exc:  # a number of more digits than Python parses (sys.get_int_max_str_digits)
        why = first_line(exc)
    else:
        if value.__class__ not in (list, dict) or not _deeper(text, MAX_JSON_DEPTH):
            return value
        why = f"nested deeper than {MAX_JSON_DEPTH} levels"
    raise EnsError(f"{label}: {problem} ({why})" + (f"; {hint}" if hint else ""))


def read_json(path: str | os.PathLike, label: str | None = None, *, problem: str = "not a JSON file",
              hint: str = "", missing: str | None = None) -> Any:
    """The value of the JSON file at ``path``; an :class:`EnsError` naming the file when it cannot
    be read, is not UTF-8 (nor UTF-16/32, which JSON allows), is not JSON, or nests deeper
    than :data:`MAX_JSON_DEPTH`: ``<label>: <problem> (<why>)[; <hint>]``. A folder, FIFO,
    device or socket is refused unopened (:func:`read_regular`).

    ``label`` names the file in the message (default: the path; e.g. ``--prior PATH``);
    ``missing``, when given, is the whole problem for a file that does not exist
    (``<label>: <missing>``). The bytes go to :func:`json.loads` as they are, so a UTF-8 byte
    order mark is allowed, as RFC 8259 permits.
    """
    return read_json_bytes(path, label, problem=problem, hint=hint, missing=missing)[0]


def read_json_bytes(path: str | os.PathLike, label: str | None = None, *, problem: str = "not a JSON file",
                    hint: str = "", missing: str | None = None) -> tuple[Any, bytes]:
    """:func:`read_json`'s value and the bytes it was read from, for a caller that also digests
    the file (a split json's sha256) without reading it a second time."""
    label = str(path) if label is None else label
    tail = f"; {hint}" if hint else ""
    try:
        data = read_regular(path, label)
    except EnsError as exc:  # each raised after this block: one message, no chained traceback
        failure = f"{exc}{tail}"
    except FileNotFoundError as exc:
        failure = f"{label}: {missing}" if missing is not None else f"{label}: {problem} ({exc}){tail}"
    except OSError as exc:
        failure = f"{label}: {problem} ({exc}){tail}"
    else:
        return parse_json(data, label, problem=problem, hint=hint), data
    raise EnsError(failure)


# --------------------------------------------------------------------------------------------
# Describing an exception


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (leading and trailing blanks dropped), at most
    ``limit`` characters; ``""`` for an empty message."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def describe(exc: BaseException, limit: int | None = None, *, whole: bool = False) -> str:
    """``exc`` in one line: ``Type: first line of the message`` (just ``Type`` when the message is
    empty). ``limit`` caps the message's characters; ``whole`` keeps the whole message with its
    runs of white space (newlines too) made one space, for libraries whose first line is not the
    reason (HTTP clients, onnxruntime)."""
    text = " ".join(str(exc).split())[:limit] if whole else first_line(exc, limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Options that take ``auto`` or a number


def auto_or_number(text: str | None, bounds: tuple[float, float], error: str) -> float | None:
    """An option's ``text``: ``None`` for ``auto`` (or no option given: the value is fitted), else
    the number it reads as, from ``bounds[0]`` to ``bounds[1]``; anything else (text, NaN, a number
    out of bounds) is an :class:`EnsError` with the caller's one-line ``error``."""
    if text is None or text == "auto":
        return None
    low, high = bounds
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise EnsError(error)
    return value


# --------------------------------------------------------------------------------------------
# Checks of JSON values. ``bool`` is a subclass of ``int`` in Python, and ``true`` must never
# pass for ``1``: every check below refuses booleans.


def is_int(value: Any) -> bool:
    """An integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any, least: int = 0) -> bool:
    """An integer (not a bool) of at least ``least``: a count by default (``>= 0``)."""
    return is_int(value) and value >= least


def is_number(value: Any) -> bool:
    """An int or a float (not a bool); NaN and infinities included (see :func:`is_finite`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A number (:func:`is_number`) that is neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def is_sha256(value: Any) -> bool:
    """A sha256 as ens writes it: 64 lower-case hex digits."""
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def is_id(value: Any) -> bool:
    """An image or category id as datasets hold them: an integer (not a bool) or a string."""
    return isinstance(value, str) or is_int(value)


def is_name(value: Any) -> bool:
    """A non-empty string."""
    return isinstance(value, str) and value != ""


def is_names(value: Any, least: int = 0) -> bool:
    """A list of at least ``least`` strings (model, member, view names, as the files hold them)."""
    return isinstance(value, list) and len(value) >= least and all(isinstance(v, str) for v in value)
