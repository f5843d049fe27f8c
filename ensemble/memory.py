"""The memory a command may use for its work on rows: ``--memory GIB``, shared by every command
that streams stores (``ens blend``, ``ens report``, ``ens submit``, ...).

What the budget bounds: the arrays a command holds while it works through a split in blocks of
rows: each block of every member's logits (converted to float32) and the copies the work on it
makes (log-probabilities, the fused block, its top-k). The block's rows follow from the budget
(:func:`rows_per_block`), so the peak resident memory depends on the budget, the members and
the classes, not on the number of images. Not in it: the interpreter and its libraries (measured
peaks on tiny sets: about 90 MB for ``ens blend``, 130 MB for ``ens report``, which loads
matplotlib), and the per-row arrays of a whole split that a command keeps on purpose (ids, labels,
a few numbers per row and member, e.g. each member's log-probability of the true class: tens of
MB at 500,000 rows), which its documentation names.

The budget is, first found: ``--memory GIB``, the environment variable ``ENS_MEMORY`` (GiB),
else an eighth of the machine's physical memory (3 GiB of 24 GiB); never under
:data:`MIN_GIB`.
"""

from __future__ import annotations

import math
import os

from ensemble.errors import EnsError

#: The option every streaming command takes, and the environment variable that sets its default.
OPTION = "--memory"
ENV = "ENS_MEMORY"
GIB = 1 << 30
#: The smallest budget: below it the interpreter's own memory dominates and blocks get tiny.
MIN_GIB = 0.25
#: The largest budget (1 PiB): past it a value is a typo, and ``int(gib * GIB)`` of a huge float
#: would overflow.
MAX_GIB = 1 << 20
#: The default's share of the machine's physical memory.
DEFAULT_SHARE = 1 / 8

#: ``--help`` text of the option (the same for every command that takes it).
HELP = (f"Memory in GiB for the command's work on rows (ens infer: the chunks of logits it fills and its "
        f"queue of decoded batches; the other commands: the blocks of rows they read the stores in): their "
        f"size follows from it, so the command's memory does not grow with the number of images. At least "
        f"{MIN_GIB:g}. Also set by the environment variable {ENV}.")
#: What ``--help`` shows as the default.
DEFAULT_SHOWN = f"{ENV}, else 1/8 of physical memory"


def physical_memory() -> int | None:
    """The machine's physical memory in bytes, None where the system cannot say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def default_gib() -> float:
    """An eighth of physical memory in GiB, at least :data:`MIN_GIB` (and just that where the
    system does not tell its memory)."""
    total = physical_memory()
    return MIN_GIB if total is None else max(MIN_GIB, total * DEFAULT_SHARE / GIB)


def parse_gib(text: str, where: str) -> float:
    """``text`` as a number of GiB, at least :data:`MIN_GIB`, at most :data:`MAX_GIB`; otherwise an EnsError naming
    ``where`` (``--memory 0.1``, ``ENS_MEMORY=abc``)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise EnsError(f"{where}: expected a number of GiB, e.g. 3 or 0.5") from None
    if not math.isfinite(value):
        raise EnsError(f"{where}: expected a finite number of GiB, e.g. 3 or 0.5")
    if value < MIN_GIB:
        raise EnsError(f"{where}: give at least {MIN_GIB:g} GiB (the row blocks need room beside the "
                       "interpreter's own memory)")
    if value > MAX_GIB:
        raise EnsError(f"{where}: give at most {MAX_GIB:,} GiB (a budget in GiB, e.g. 3 or 0.5)")
    return value


def memory_budget(option: str | None = None) -> int:
    """The budget in bytes: ``option`` (the text of ``--memory``), else ``$ENS_MEMORY``, else
    :func:`default_gib`. A bad value is a one-line EnsError naming the option or the variable."""
    if option is not None:
        gib = parse_gib(option, f"{OPTION} {option}")
    elif (env := os.environ.get(ENV)) is not None and env.strip():
        gib = parse_gib(env, f"{ENV}={env}")
    else:
        gib = default_gib()
    return int(gib * GIB)


def rows_per_block(budget_bytes: int, members: int, classes: int, copies: float = 1.0) -> int:
    """Rows per block so that ``copies`` float32 arrays of ``(members, rows, classes)`` fit in
    ``budget_bytes``; at least 1 (one row of a very wide set may exceed a small budget).

    ``copies``: how many such arrays the caller's work on a block holds at once (the block read,
    its log-probabilities, temporaries), counted generously; fractions are fine (a fused
    ``(rows, classes)`` array is ``1 / members`` of a copy).
    """
    if members < 1 or classes < 1:
        raise ValueError(f"members and classes must be at least 1, got {members} and {classes}")
    if not copies > 0:
        raise ValueError(f"copies must be positive, got {copies}")
    row_bytes = members * classes * 4 * copies
    return max(1, int(budget_bytes // row_bytes))
