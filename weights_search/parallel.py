"""A pass's blocks worked on by other threads while the calling thread reads the next ones.

numpy releases the interpreter's lock inside its array operations (ufuncs, reductions,
partitions, sorts, float16 conversion), so reading and converting block ``i + 1`` on one
thread while block ``i`` is fused on another keeps two cores busy. The blocks are produced
(read) on the calling thread, one after another, so a reader that must see the rows in order
(a running checksum of the stores) still does; the results come back in that same order, each
the value ``func`` gives for its block alone, so the output is the one a sequential loop
gives, byte for byte, with the same blocks.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

class _Skipped(Exception):
    """An item not worked on, an earlier one having failed."""


def default_workers(threads: int = 1) -> int:
    """``threads`` worker threads beside the calling thread where this process may run on two
    cores or more, else 0 (all on the calling thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return threads if cores >= 2 else 0


def ordered_map(func: Callable[[T], R], items: Iterable[T], workers: int,
                prepare: Callable[[T], Any] | None = None) -> Iterator[R]:
    """``func(item)`` of each item, yielded in the items' order, computed on ``workers`` threads
    of a pool (0: on the calling thread, no pool) while the calling thread draws the next items.

    The next item is drawn while ``workers`` items are worked on (or wait for a thread), so a
    pass holds ``workers + 1`` items (blocks) at a time: size them for that. The items are
    drawn from ``items`` on the calling thread, never ahead of that bound. An exception in ``func`` is
    raised here when its item's turn comes (later items are not worked on: cancelled, or skipped
    when a thread takes them first; one already being worked on is awaited); one
    from ``items`` is raised as it happens.

    ``prepare``: each item is first ``prepare(item)``, on the workers, several items at once;
    then ``func`` of that, one item at a time, in the items' order (the item before's ``func``
    has returned before the next one's starts, on whichever worker): work that must see the
    items in order (a collector) keeps its order while the work that need not (converting a
    block) runs beside it. The value is then ``func(prepare(item))``.
    """
    if workers < 0:
        raise ValueError(f"workers must be at least 0, got {workers}")
    if workers == 0:
        for item in items:
            yield func(item if prepare is None else prepare(item))
        return
    pending: deque[Future] = deque()
    source = iter(items)
    failed = threading.Event()
    turn = threading.Condition()
    done = [0]  # items whose func has returned (with prepare)

    def work(index: int, item: T) -> R:
        # After an item's failure the items after it are not worked on: one already submitted
        # may start before the failure is raised here and the rest cancelled (its error is
        # raised first, in order, so what this raises is never seen).
        if failed.is_set():
            raise _Skipped
        try:
            if prepare is None:
                return func(item)
            prepared = prepare(item)
            del item
            with turn:  # the items before, submitted first, are being worked on or done
                while done[0] != index and not failed.is_set():
                    turn.wait()
            if failed.is_set():
                raise _Skipped
            try:
                return func(prepared)
            finally:
                with turn:
                    done[0] = index + 1
                    turn.notify_all()
        except _Skipped:
            raise
        except BaseException:
            failed.set()
            with turn:
                turn.notify_all()
            raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            index = 0
            while True:
                try:
                    item = next(source)  # drawn while the items before are worked on
                except StopIteration:
                    break
                pending.append(pool.submit(work, index, item))
                index += 1
                del item  # the work item holds it until its block is done, no longer
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            if pending:
                failed.set()  # the consumer stopped early: threads waiting for their turn go
                with turn:
                    turn.notify_all()
