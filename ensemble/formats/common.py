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
from pathlib import Path
from typing import Any

from ensemble.errors import EnsError


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


def _nesting_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` (as :func:`json.loads` returns it) nests lists and dicts more than
    ``limit`` deep. Breadth first, one level at a time, without recursion."""
    containers = (list, dict)
    level, depth = ([value] if value.__class__ in containers else []), 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list = []
        add = below.extend
        for item in level:
            add([v for v in (item.values() if item.__class__ is dict else item) if v.__class__ in containers])
        level = below
    return False


def parse_json(text: str | bytes, label: str, *, problem: str = "not JSON", hint: str = "",
               where: bool = True) -> Any:
    """The value of the JSON ``text`` (bytes may be UTF-8, -16 or -32, as :func:`json.loads`
    takes them); an :class:`EnsError` ``<label>: <problem> (<why>)[; <hint>]`` when it is not
    JSON or nests arrays and objects deeper than :data:`MAX_JSON_DEPTH` levels. ``where``:
    whether ``why`` says where the parser stopped (``line 1 column 7 (char 6)``), which a
    short value shown in the message does not need. For JSON that is not a file of its own
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
        if not _nesting_deeper(value, MAX_JSON_DEPTH):
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
        return parse_json(data, label, problem=problem, hint=hint)
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


def is_id(value: Any) -> bool:
    """An image or category id as datasets hold them: an integer (not a bool) or a string."""
    return isinstance(value, str) or is_int(value)


def is_name(value: Any) -> bool:
    """A non-empty string."""
    return isinstance(value, str) and value != ""


def is_names(value: Any, least: int = 0) -> bool:
    """A list of at least ``least`` strings (model, member, view names, as the files hold them)."""
    return isinstance(value, list) and len(value) >= least and all(isinstance(v, str) for v in value)
