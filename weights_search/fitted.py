"""A fitted blend as data, fitting one on the whole validation split, and fusing large splits in chunks.

Everything here reads members through a member source (:mod:`weights_search.source`), a block
of rows at a time; arrays in hand (an ``(M, N, C)`` stack, or one ``(N, C)`` array per member)
are wrapped in an :class:`~weights_search.source.ArraySource`. A *stats pass* reads the source
once, turns each block into member log-probabilities (at the fitted temperatures, if any) and
feeds them to the collectors of the methods to fit (:meth:`weights_search.base.Blender.collector`);
the fits then run on the collected statistics, never on the ``(M, N, C)`` stack.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
from scipy import special

from weights_search import temperature as _temperature
from weights_search.base import Blender
from weights_search.parallel import default_workers, ordered_map
from weights_search.functional import FUSIONS, MIXTURE, _check_weights, _normalise, fuse, log_softmax
from weights_search.prior import LogitAdjustment, adjust
from weights_search.registry import DEFAULT_METHOD, get_method
from weights_search.source import ArraySource, MemberSource, as_source, blocks, check_labels, default_block_rows


@dataclass(frozen=True)
class FittedBlend:
    """Everything needed to fuse new member logits: what ``blend.json`` records.

    ``weights``: one per member, in member order, combined by ``fusion``; ``temperatures``: one
    per member, or None when logits are used as they are; ``train_score``: the method's
    objective on the rows it was fitted on (see :class:`weights_search.base.Blender`);
    ``log_prior`` (one per class) and ``tau``: the prior correction applied after fusion
    (:func:`weights_search.prior.adjust`), or both None.
    """

    method: str
    fusion: str
    weights: tuple[float, ...]
    temperatures: tuple[float, ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    train_score: float = float("nan")
    log_prior: tuple[float, ...] | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose from: {', '.join(FUSIONS)}")
        if self.temperatures is not None and len(self.temperatures) != len(self.weights):
            raise ValueError(f"{len(self.temperatures)} temperatures for {len(self.weights)} weights")
        if (self.log_prior is None) != (self.tau is None):
            raise ValueError("a prior correction needs both log_prior and tau")
        if self.tau is not None:
            LogitAdjustment(np.asarray(self.log_prior), self.tau)  # the same checks as for fitting

    @classmethod
    def of(cls, blender: Blender, method: str, temperatures: np.ndarray | None = None) -> "FittedBlend":
        """The record of a fitted ``blender`` (registered as ``method``), fitted on member
        log-probabilities at ``temperatures`` (``(M,)``, or None)."""
        return cls(method=method, fusion=blender.fusion, weights=tuple(float(w) for w in blender.weights_),
                   temperatures=None if temperatures is None else tuple(float(t) for t in temperatures),
                   params=blender.params, train_score=blender.train_score_,
                   log_prior=None if blender.tau_ is None else tuple(float(v) for v in blender.log_prior_),
                   tau=blender.tau_)

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        return (np.asarray(self.weights), None if self.temperatures is None else np.asarray(self.temperatures),
                None if self.log_prior is None else np.asarray(self.log_prior))

    def log_proba(self, logits: np.ndarray) -> np.ndarray:
        """Blended class log-probabilities ``(n, C)`` float32 of member logits ``(M, n, C)``,
        corrected for the prior when the blend has one.

        A mixture is computed by :func:`mixture_of_logits` (one exponential per member value);
        geometric pooling as :meth:`fuse_log_probs` of the members' log-softmax."""
        weights, temperatures, log_prior = self._arrays
        if self.fusion != MIXTURE:
            return self.fuse_log_probs(log_softmax(logits, temperatures))
        fused = mixture_of_logits(logits, weights, temperatures)
        return fused if self.tau is None else adjust_own(fused, log_prior, self.tau)

    def fuse_log_probs(self, log_probs: np.ndarray) -> np.ndarray:
        """:meth:`log_proba` of member log-probabilities ``(M, n, C)`` already at the blend's
        temperatures (the log-softmax done)."""
        weights, _, log_prior = self._arrays
        fused = fuse(log_probs, weights, self.fusion)
        return fused if self.tau is None else adjust(fused, log_prior, self.tau)


def adjust_own(log_probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """:func:`~weights_search.prior.adjust` of an ``(n, C)`` float32 array the caller made and
    needs no more (a fused block), computed in its place: no ``(n, C)`` temporary, whose fresh
    pages cost the kernel about as much as the subtraction itself; the same values, bit for bit
    (the same subtraction of the same float32 shifts, then the same normalisation)."""
    log_prior = np.asarray(log_prior)
    if (tau == 0 or log_probs.dtype != np.float32 or log_probs.ndim != 2 or not log_probs.flags.c_contiguous
            or not log_probs.flags.writeable or log_prior.shape != log_probs.shape[1:]):
        return adjust(log_probs, log_prior, tau)  # its own checks and errors
    log_probs -= np.float32(tau) * log_prior.astype(np.float32)
    return _normalise(log_probs)


#: :func:`mixture_of_logits` recomputes at most this fraction of a block's values exactly; a
#: block with more values below float32's normal range is fused the slow, stable way throughout.
MAX_EXACT_SHARE = 1 / 16

#: :func:`mixture_of_logits` works on about this many values of a member at a time (1 MB).
CACHE_VALUES = 2**18


def mixture_of_logits(logits: np.ndarray, weights: np.ndarray, temperatures: np.ndarray | None = None) -> np.ndarray:
    """``log sum_m w_m softmax(logits[m] / T_m)``: ``(n, C)`` float32 of ``(M, n, C)`` member
    logits, ``(M,)`` non-negative weights (normalised here) and optional ``(M,)`` temperatures.

    The value of ``fuse(log_softmax(logits, temperatures), weights, "mixture")`` (to float32
    rounding) at about a third of its cost: each member's probabilities are exponentiated once,
    ``exp(z - max z)``, and added up scaled by ``w_m / sum``; the log-softmax's exponential and
    the fusion's two passes (a running maximum, then exponentials shifted by it) are saved.
    Where the mixture's probability falls below float32's normal range (about ``e**-87``: the
    summed exponentials lost precision or underflowed to 0), the value is recomputed exactly
    from the members' log-probabilities, in float64, so such classes keep the finite
    log-probability the stable fusion gives them; a block where more than
    :data:`MAX_EXACT_SHARE` of the values need it is fused the stable way throughout.
    """
    logits = np.asarray(logits)
    used, w = _mixture_weights(weights, logits)
    t = None if temperatures is None else np.asarray(temperatures, dtype=np.float32)
    if t is not None and (t.shape != (logits.shape[0],) or not (np.isfinite(t).all() and (t > 0).all())):
        return fuse(log_softmax(logits, t), np.asarray(weights), MIXTURE)  # its own error for bad temperatures
    n_rows, n_classes = logits.shape[1:]
    total = _fused_array((n_rows, n_classes))
    # A few rows at a time, every member's in turn: the rows' values stay in the processor's
    # cache through the steps (each a pass over them), a third faster than whole blocks at
    # 10,000 classes; the same operations on each row, so the same values.
    step = max(1, CACHE_VALUES // n_classes)
    scratch = np.empty((min(step, n_rows), n_classes), dtype=np.float32)
    log_norm = np.empty((used.size, n_rows, 1), dtype=np.float32)
    for first in range(0, n_rows, step):
        last = min(first + step, n_rows)
        part = total[first:last]
        for i, m in enumerate(used):
            values = part if i == 0 else scratch[:last - first]  # the first member's go straight to the total
            if t is None:
                top = logits[m, first:last].max(axis=1, keepdims=True)
                np.subtract(logits[m, first:last], top, out=values, dtype=np.float32)
            else:
                np.divide(logits[m, first:last], t[m], out=values, dtype=np.float32)
                top = values.max(axis=1, keepdims=True)
                values -= top
            if not np.isfinite(top).all():
                raise ValueError("logits have a row whose largest value is not finite (all -inf, +inf or NaN)")
            np.exp(values, out=values)
            sums = values.sum(axis=1, keepdims=True)
            values *= (w[i] / sums).astype(np.float32)
            if i:
                part += values
            log_norm[i, first:last] = top + np.log(sums)

    def member_log_probs(i: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        z = logits[used[i]][rows, cols].astype(np.float32)
        return (z if t is None else z / t[used[i]]) - log_norm[i, rows, 0]

    out = _log_total(total, w, member_log_probs)
    return fuse(log_softmax(logits, temperatures), np.asarray(weights), MIXTURE) if out is None else out


#: Each thread's last fused array (:func:`_fused_array`).
_FUSED = threading.local()


def _held_refs() -> int:
    """What ``sys.getrefcount`` says in :func:`_fused_array` of an array only the thread's
    store holds (the count includes the local name and the call's own argument)."""
    store = threading.local()
    store.array = np.empty(0)
    held = store.array
    return sys.getrefcount(held)


_UNHELD = _held_refs()


def _fused_array(shape: tuple[int, int]) -> np.ndarray:
    """An ``(n, C)`` float32 array for :func:`mixture_of_logits` to fill: this thread's last one
    when nothing else holds it any more (the fused block of the previous call, its block done)
    and it has this shape, else a new one, kept. A pass fusing block after block then writes
    into one array per thread instead of a new one per block, whose fresh pages cost the kernel
    about 0.85 ns a value of system time (measured here). Every value is written, so the
    result is the same."""
    held = getattr(_FUSED, "array", None)
    if held is not None and held.shape == shape and sys.getrefcount(held) <= _UNHELD:
        return held
    held = None
    array = np.empty(shape, dtype=np.float32)
    _FUSED.array = array
    return array


def _mixture_weights(weights: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The members with a positive weight (checked against ``members``, ``(M, n, C)``) and their
    weights normalised to sum 1; ValueError when every weight is zero."""
    w = _check_weights(weights, members)
    used = np.flatnonzero(w > 0)
    if used.size == 0:
        raise ValueError("mixture weights are all zero")
    return used, w[used] / w[used].sum()


def mixture_of_log_probs(log_probs: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``fuse(log_probs[:, rows], weights, "mixture")`` (all rows when ``rows`` is None), to
    float32 rounding, with one exponential per member value and no running maximum:
    ``log sum_m w_m exp(log_probs[m])``, the values below float32's normal range recomputed
    exactly as :func:`mixture_of_logits` does. The rows are gathered member by member, so no
    ``(M, n, C)`` copy is made."""
    log_probs = np.asarray(log_probs)
    used, w = _mixture_weights(weights, log_probs)
    n_rows, n_classes = (log_probs.shape[1] if rows is None else rows.size), log_probs.shape[2]
    total = np.empty((n_rows, n_classes), dtype=np.float32)
    # A few rows at a time through every member, in cache (as mixture_of_logits); the first
    # member's straight into the total (0 + x is x): the same values.
    step = max(1, CACHE_VALUES // max(n_classes, 1))
    scratch = np.empty((min(step, n_rows), n_classes), dtype=np.float32)
    for first in range(0, n_rows, step):
        last = min(first + step, n_rows)
        part = total[first:last]
        for i, m in enumerate(used):
            values = part if i == 0 else scratch[:last - first]
            if rows is None:
                np.exp(log_probs[m, first:last], out=values)
            else:
                if log_probs.dtype == np.float32:
                    np.take(log_probs[m], rows[first:last], axis=0, out=values)
                else:
                    values[...] = log_probs[m][rows[first:last]]
                np.exp(values, out=values)
            values *= np.float32(w[i])
            if i:
                part += values
    picked = (lambda r: r) if rows is None else (lambda r: rows[r])
    out = _log_total(total, w, lambda i, r, c: log_probs[used[i]][picked(r), c])
    if out is None:
        return fuse(log_probs if rows is None else log_probs[:, rows], weights, MIXTURE)
    return out


def mixtures_of_log_probs(log_probs: np.ndarray, weights: Sequence[np.ndarray],
                          rows: np.ndarray | None = None) -> list[np.ndarray]:
    """``[mixture_of_log_probs(log_probs, w, rows) for w in weights]``, the same values bit for
    bit, with one exponential per member value for all of them instead of one per mixture: a
    few rows at a time (in cache), each member's probabilities are exponentiated once and added,
    scaled, into every mixture that uses the member (the same products, added in the same
    order). Several blends of the same rows (each fold's uniform, method and their
    prior-corrected variants) share the exponentials this way."""
    log_probs = np.asarray(log_probs)
    mixtures = [_mixture_weights(w, log_probs) for w in weights]
    n_rows, n_classes = (log_probs.shape[1] if rows is None else rows.size), log_probs.shape[2]
    totals = [np.empty((n_rows, n_classes), dtype=np.float32) for _ in mixtures]
    position = [{int(m): i for i, m in enumerate(used)} for used, _ in mixtures]
    members = sorted(set().union(*position))
    step = max(1, CACHE_VALUES // max(n_classes, 1))
    chunk = min(step, n_rows)
    exps = np.empty((chunk, n_classes), dtype=np.float32)
    scratch = np.empty((chunk, n_classes), dtype=np.float32)
    for first in range(0, n_rows, step):
        last = min(first + step, n_rows)
        e = exps[:last - first]
        for m in members:
            if rows is None:
                np.exp(log_probs[m, first:last], out=e)
            else:
                if log_probs.dtype == np.float32:
                    np.take(log_probs[m], rows[first:last], axis=0, out=e)
                else:
                    e[...] = log_probs[m][rows[first:last]]
                np.exp(e, out=e)
            for (_, w), at, total in zip(mixtures, position, totals):
                i = at.get(m)
                if i is None:
                    continue
                part = total[first:last]
                if i == 0:
                    np.multiply(e, np.float32(w[i]), out=part)
                else:
                    values = scratch[:last - first]
                    np.multiply(e, np.float32(w[i]), out=values)
                    part += values
    picked = (lambda r: r) if rows is None else (lambda r: rows[r])
    out = []
    for (used, w), total, given in zip(mixtures, totals, weights):
        fused = _log_total(total, w, lambda i, r, c, used=used: log_probs[used[i]][picked(r), c])
        out.append(fuse(log_probs if rows is None else log_probs[:, rows], given, MIXTURE) if fused is None else fused)
    return out


def _log_total(total: np.ndarray, w: np.ndarray, member_log_probs) -> np.ndarray | None:
    """``log(total)`` in place, the values below float32's normal range recomputed as
    ``logsumexp_m(log w_m + member_log_probs(m, rows, cols))`` in float64; None when more than
    :data:`MAX_EXACT_SHARE` of them need it (the caller fuses the stable way)."""
    low = total < np.finfo(np.float32).tiny
    with np.errstate(divide="ignore"):
        out = np.log(total, out=total)
    if not low.any():
        return out
    rows, cols = np.nonzero(low)
    if rows.size > MAX_EXACT_SHARE * low.size:
        return None
    terms = np.empty((w.size, rows.size))
    for i in range(w.size):
        terms[i] = member_log_probs(i, rows, cols).astype(np.float64) + np.log(w[i])
    with np.errstate(divide="ignore"):
        out[rows, cols] = special.logsumexp(terms, axis=0)
    return out


def fit_blend(logits: MemberSource | np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
              method: str = DEFAULT_METHOD, params: Mapping[str, Any] | None = None, *, temperature: bool = False,
              prior: LogitAdjustment | None = None, block_rows: int | None = None) -> FittedBlend:
    """Fit temperatures (when ``temperature``) and then ``method``'s weights on all labelled rows,
    with ``tau`` when ``prior`` asks for it fitted.

    ``logits``: a member source, or ``(M, N, C)`` member logits (float16 or float32), or one
    ``(N, C)`` array per member; ``labels``: ``(N,)``. Reads the source in blocks of
    ``block_rows`` rows (None: :func:`weights_search.source.default_block_rows`): one pass
    without ``temperature``, two with it (the temperatures' pass, then the stats pass at them);
    a source that fits in one block is read once (see :class:`Reader`). Each pass whose fit
    lies too far from the pilots its statistics were expanded about (rows in an unfavourable
    order: :func:`fitted_temperatures`, :func:`far_from_pilots`) is repeated once with the fit
    as every row's pilot: up to four passes with ``temperature`` and ``logit``.
    """
    source = as_source(logits)
    labels = check_labels(source, labels)
    blender = get_method(method, **dict(params or {}))
    if prior is not None:
        prior.check(source.n_classes)
    reader = Reader(source, block_rows)
    temperatures = fitted_temperatures(reader, labels)[1] if temperature else None
    key = blender.collector_key(prior)
    stats = collect_stats(reader, labels, [(blender, prior)], temperatures)
    blender.fit_stats(stats[key], prior)
    pilot = far_from_pilots(stats[key], blender, prior)
    if pilot is not None:
        del stats
        stats = collect_stats(reader, labels, [(blender, prior)], temperatures, pilots={key: pilot})
        blender.fit_stats(stats[key], prior)
    return FittedBlend.of(blender, method, temperatures)


#: Threads a :class:`Reader` pass works on its blocks with, beside the reading one (0: all on
#: the reading thread; None: :func:`~weights_search.parallel.default_workers`, 2 on 2 cores).
#: The work on the blocks runs in row order, one block at a time, whatever the number; a second
#: thread converts the next block from its stored float16 meanwhile (a source with
#: ``read_raw``, :class:`ensemble.formats.members.Members`; other sources use one thread).
OVERLAP_WORKERS: int | None = None


class Reader:
    """Passes over a member source in blocks of ``block_rows`` rows (None:
    :func:`~weights_search.source.default_block_rows`), and their log-probabilities.

    A source whose rows fit in one block is read once, however many passes run: the block and
    the log-probabilities of its last temperatures are kept (what one block's pass holds anyway),
    so a split within the caller's block size costs one read and, without temperatures, one
    log-softmax. (Not faster per value: on a loaded 2-core machine blocks of a few hundred rows
    ran CV at 10,000 classes faster than one block of 1,500; the saving is the second read.)"""

    def __init__(self, source: MemberSource, block_rows: int | None) -> None:
        self.source = source
        self.rows = default_block_rows(source) if block_rows is None else block_rows
        if self.rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {self.rows}")
        self.single = source.n_rows <= self.rows
        self._block: np.ndarray | None = None
        self._log_probs: tuple[Any, np.ndarray] | None = None

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """One pass: ``(start, (M, b, C) float32 logits)`` in row order."""
        if not self.single:
            yield from blocks(self.source, self.rows)
            return
        if self._block is None:
            self._block = next(blocks(self.source, self.rows))[1]
        yield 0, self._block

    def each_block(self, work: Callable[[int, Any], None],
                   prepare: Callable[[int, np.ndarray], Any] | None = None) -> None:
        """One pass: ``work(start, block)`` of each block of :meth:`blocks`, in row order, one
        block at a time, on threads beside this one (:data:`OVERLAP_WORKERS`) while this thread
        reads the next block (:func:`~weights_search.parallel.ordered_map`; ``work`` sees the
        blocks in row order, as in a plain loop, so a collector gives the same values). With a
        source that reads its rows as stored (``read_raw``) and converts them apart
        (``convert``: :class:`ensemble.formats.members.Members`), this thread only reads, and
        a block is converted to float32 on one worker while the block before is worked on, on
        the other (two blocks more held: one read, one converted).

        ``prepare``: ``work(start, prepare(start, block))`` instead, ``prepare`` on the workers
        beside the conversion, blocks in any order, two at a time (what does not depend on the
        rows before: the log-softmax, a collector's per-row sums). A source of one block is
        worked on here. An exception in ``work`` or ``prepare`` is raised here."""
        workers = 0 if self.single else (default_workers(2) if OVERLAP_WORKERS is None else OVERLAP_WORKERS)
        source = self.source
        ready = (lambda start, block: block) if prepare is None else prepare
        if not workers:
            for start, block in self.blocks():
                work(start, ready(start, block))
            return
        if callable(getattr(source, "read_raw", None)) and callable(getattr(source, "convert", None)):
            items = (source.read_raw(start, start + self.rows) for start in range(0, source.n_rows, self.rows))

            def convert(raw: Any) -> tuple[int, Any]:
                start = raw.start
                return start, ready(start, source.convert(raw))

            for _ in ordered_map(lambda item: work(*item), items, min(workers, 2), prepare=convert):
                pass
            return
        if prepare is not None:
            for _ in ordered_map(lambda item: work(*item), self.blocks(), min(workers, 2),
                                 prepare=lambda item: (item[0], prepare(*item))):
                pass
            return
        for _ in ordered_map(lambda item: work(*item), self.blocks(), min(workers, 1)):
            pass

    def log_probs(self, block: np.ndarray, temperatures: np.ndarray | None, *, last: bool = False) -> np.ndarray:
        """``log_softmax(block, temperatures)`` of a block from :meth:`blocks` (kept for the next
        pass when the source is one block; do not change it). ``last``: the pass needs nothing
        more of ``block``, which then becomes the log-probabilities (no copy) unless it is kept."""
        if not self.single:
            return log_softmax_into(block if last else np.array(block), temperatures)
        key = None if temperatures is None else tuple(np.asarray(temperatures, dtype=np.float64).tolist())
        if self._log_probs is None or self._log_probs[0] != key:
            self._log_probs = None  # free the old one first
            self._log_probs = (key, log_softmax_into(np.array(block), temperatures))
        return self._log_probs[1]


def log_softmax_into(logits: np.ndarray, temperatures: np.ndarray | None) -> np.ndarray:
    """:func:`~weights_search.functional.log_softmax` of ``(M, n, C)`` float32 ``logits``
    computed in their place (the same values, bit for bit: the same operations in the same
    order, without its copy of the input and its temporaries); returns ``logits``."""
    if logits.dtype != np.float32 or logits.ndim != 3 or not logits.flags.c_contiguous:
        return log_softmax(logits, temperatures)
    t = None if temperatures is None else np.asarray(temperatures, dtype=np.float32)
    if t is not None and (t.shape != logits.shape[:1] or not (np.isfinite(t).all() and (t > 0).all())):
        return log_softmax(logits, temperatures)  # its own error
    # A few rows at a time (as mixture_of_logits): each row's values stay in the processor's
    # cache through the steps; the same operations on each row, so the same values.
    n_rows, n_classes = logits.shape[1:]
    step = max(1, CACHE_VALUES // max(n_classes, 1))
    scratch = np.empty((min(step, n_rows), n_classes), dtype=np.float32)
    for m, member in enumerate(logits):
        for first in range(0, n_rows, step):
            x = member[first:first + step]
            if t is not None:
                x /= t[m]
            top = x.max(axis=-1, keepdims=True)
            if not np.isfinite(top).all():
                raise ValueError("logits have a row whose largest value is not finite (all -inf, +inf or NaN)")
            x -= top
            e = scratch[:x.shape[0]]
            np.exp(x, out=e)
            with np.errstate(divide="ignore"):
                x -= np.log(e.sum(axis=-1, keepdims=True))
    return logits


class StatsPass:
    """The collectors of one stats pass: one per distinct
    :meth:`~weights_search.base.Blender.collector_key` of the ``(blender, prior)`` pairs in
    ``needs`` (methods whose keys agree share one), fed the same blocks of member
    log-probabilities; :meth:`result` maps each key to its statistics."""

    def __init__(self, labels: np.ndarray, n_classes: int,
                 needs: Sequence[tuple[Blender, LogitAdjustment | None]], max_pairs: int | None = None, *,
                 pilots: Mapping[Hashable, np.ndarray] | None = None) -> None:
        self.collectors: dict[Hashable, Any] = {}
        for blender, prior in needs:
            key = blender.collector_key(prior)
            if key not in self.collectors:
                # max_pairs: the most rival pairs each collector of a method that counts rows
                # right may hold (None: the collector's default)
                bound = {} if max_pairs is None or not getattr(blender, "counts_rows", False) else {"max_pairs": max_pairs}
                self.collectors[key] = blender.collector(labels, n_classes, prior, **bound)
                # pilots: a fixed pilot for the collectors of these keys (a re-pass, see repass_keys)
                if pilots is not None and key in pilots:
                    self.collectors[key] = self.collectors[key].with_pilot(pilots[key])
        self._prepared: dict[int, dict[Hashable, Any]] = {}
        self._lock = threading.Lock()

    def prepare(self, start: int, log_probs: np.ndarray) -> None:
        """What the collectors can make of rows ``start..`` apart from the rows before (those
        with a ``prepare``: a mixture's mass per prior bin), kept for :meth:`add` of the same
        rows; any thread, blocks in any order (a pass prepares one block on one worker while
        the block before is added on another)."""
        prepared = {key: collector.prepare(start, log_probs) for key, collector in self.collectors.items()
                    if callable(getattr(collector, "prepare", None))}
        with self._lock:
            self._prepared[start] = prepared

    def add(self, start: int, log_probs: np.ndarray) -> None:
        """Member log-probabilities ``(M, b, C)`` of rows ``start..start+b`` (in row order),
        with what :meth:`prepare` made of them, if it did."""
        with self._lock:
            prepared = self._prepared.pop(start, {})
        for key, collector in self.collectors.items():
            if key in prepared:
                collector.add(start, log_probs, prepared=prepared[key])
            else:
                collector.add(start, log_probs)

    def result(self) -> dict[Hashable, Any]:
        return {key: collector.result() for key, collector in self.collectors.items()}


def collect_stats(reader: Reader, labels: np.ndarray, needs: Sequence[tuple[Blender, LogitAdjustment | None]],
                  temperatures: np.ndarray | None, max_pairs: int | None = None, *,
                  pilots: Mapping[Hashable, np.ndarray] | None = None) -> dict[Hashable, Any]:
    """One stats pass over ``reader``'s source: the statistics of every ``(blender, prior)`` in
    ``needs`` (see :class:`StatsPass`) from member log-probabilities at ``temperatures``
    (``(M,)``, or None); ``pilots``: the collectors of these keys expand every row about the
    given pilot (a re-pass: see :func:`far_from_pilots`)."""
    stats = StatsPass(labels, reader.source.n_classes, needs, max_pairs, pilots=pilots)

    def prepare(start: int, block: np.ndarray) -> np.ndarray:
        log_probs = reader.log_probs(block, temperatures, last=True)
        stats.prepare(start, log_probs)
        return log_probs

    reader.each_block(stats.add, prepare=prepare)
    return stats.result()


def temperature_stats(reader: Reader, labels: np.ndarray, pilot: np.ndarray | None = None) -> Any:
    """One pass over ``reader``'s source (logits) through a
    :class:`~weights_search.temperature.TemperatureCollector` (with ``pilot``: every row expanded
    about those ``(M,)`` temperatures): its stats, whose ``.fit()`` gives the ``(M,)``
    temperatures of all rows and ``.subset(rows).fit()`` those of some rows."""
    collector = _temperature.TemperatureCollector(labels, reader.source.n_members,
                                                  **({} if pilot is None else {"pilot": pilot}))
    reader.each_block(collector.add)
    return collector.result()


def fitted_temperatures(reader: Reader, labels: np.ndarray, folds: Sequence[np.ndarray] = ()) -> tuple[Any, np.ndarray, list]:
    """The temperatures of all rows and of each of ``folds`` (training rows), with their stats:
    one pass (:func:`temperature_stats`), and one more, with every row expanded about the
    temperatures of all rows, when the fit of all rows or of a fold is too far from the pilots
    its rows were expanded about (:meth:`~weights_search.temperature.TemperatureStats.repass_pilot`:
    rows in an unfavourable order)."""
    stats = temperature_stats(reader, labels)
    temperatures = stats.fit()
    fold_temperatures = [stats.subset(rows).fit() for rows in folds]
    check = getattr(stats, "repass_pilot", None)  # (statistics with pilots have it)
    if check is not None and (check(temperatures) is not None or any(
            check(t, rows) is not None for t, rows in zip(fold_temperatures, folds))):
        stats = None  # freed before the re-pass collects its own
        stats = temperature_stats(reader, labels, temperatures)
        temperatures = stats.fit()
        fold_temperatures = [stats.subset(rows).fit() for rows in folds]
    return stats, temperatures, fold_temperatures


def far_from_pilots(stats: Any, blender: Blender, prior: LogitAdjustment | None,
                    rows: np.ndarray | None = None) -> np.ndarray | None:
    """The pilot to collect ``stats`` again with (``blender``'s parameters), when ``blender``,
    fitted on ``stats`` (or on its ``rows``), lies so far from the pilots those rows were
    expanded about that the fit's estimated error asks for it (see
    :meth:`~weights_search.pooling.LogitStats.repass_pilot`); None otherwise, and for
    statistics without pilots (exact ones)."""
    if getattr(stats, "repass_pilot", None) is None:
        return None
    return (stats if rows is None else stats.subset(rows)).repass_pilot(blender, prior)


def blend_chunks(members: MemberSource | np.ndarray | Sequence[np.ndarray], blend: FittedBlend,
                 chunk_rows: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """Fuse a split chunk by chunk: yields ``(first row, (n, C) float32 log-probs)`` in row order.

    ``members``: a member source, or one ``(N, C)`` array per member, in the blend's member
    order; memory-mapped float16 stores work as they are, since only ``chunk_rows`` rows of
    each are read at a time (memory stays about ``M * chunk_rows * C`` float32 values,
    whatever ``N``). One pass over the members.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if not isinstance(members, (np.ndarray, Sequence)):
        source = as_source(members)
        if source.n_members != len(blend.weights):
            raise ValueError(f"{source.n_members} members for a blend of {len(blend.weights)}")
    else:
        if len(members) != len(blend.weights):
            raise ValueError(f"{len(members)} members for a blend of {len(blend.weights)}")
        shapes = {np.shape(m) for m in members}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"members must all be (n_samples, n_classes) arrays of one shape, got {sorted(shapes)}")
        if next(iter(shapes))[0] == 0:
            return
        source = ArraySource(list(members))
    for start, block in blocks(source, chunk_rows):
        yield start, blend.log_proba(block)
