"""The small rules every format (and every stage) shares: reading a JSON file, describing an
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
from pathlib import Path
from typing import Any

from ensemble.errors import EnsError


# --------------------------------------------------------------------------------------------
# Reading JSON


def read_json(path: str | os.PathLike, label: str | None = None, *, problem: str = "not a JSON file",
              hint: str = "", missing: str | None = None) -> Any:
    """The value of the JSON file at ``path``; an :class:`EnsError` naming the file when it cannot
    be read, is not UTF-8 (nor UTF-16/32, which JSON allows) or is not JSON:
    ``<label>: <problem> (<why>)[; <hint>]``.

    ``label`` names the file in the message (default: the path; e.g. ``--prior PATH``);
    ``missing``, when given, is the whole problem for a file that does not exist
    (``<label>: <missing>``). The bytes go to :func:`json.loads` as they are, so a UTF-8 byte
    order mark is allowed, as RFC 8259 permits.
    """
    label = str(path) if label is None else label
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError as exc:
        if missing is not None:
            raise EnsError(f"{label}: {missing}") from None
        why = exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc
    raise EnsError(f"{label}: {problem} ({why})" + (f"; {hint}" if hint else ""))


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
