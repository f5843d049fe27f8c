"""Honest estimates: stratified folds, out-of-fold blended predictions and the CV report, streamed.

Every fitted quantity (temperatures when asked for, then the weights, and ``tau`` of a prior
correction) is fitted on K-1 folds and only used to predict the held-out fold, so no fold's rows
reach its own predictions.

Members are read from a member source (:mod:`weights_search.source`) a block of rows at a time,
so memory depends on the block, ``M``, ``C`` and the methods' statistics, never on an
``(M, N, C)`` stack. Reads of the source, ``K`` being the number of folds:

- without temperatures: **2 passes**, for every method, with or without a prior. A stats pass
  feeds the collectors of uniform and the method (with a prior, their corrected variants too;
  methods whose :meth:`~weights_search.base.Blender.collector_key` agree share one); each
  fold's fit runs on ``stats.subset(training rows)`` and the final fit on the full stats, so
  fitting reads nothing more. Then an evaluation pass fuses each block's rows with the blends
  fitted without their fold and scores every report row exactly.
- with temperatures: a member's log-probabilities, and so every statistic, depend on the
  fold's temperatures: one pass for the temperatures of every fold
  (:class:`~weights_search.temperature.TemperatureCollector`), one stats pass per fold at its
  temperatures, then the evaluation pass, which also feeds the final fit's collectors at the
  temperatures of all rows: **K + 2 passes** (:func:`cross_validate` alone: the same).
- re-passes, only when rows come in an unfavourable order: statistics expanded about pilots
  (``logit``'s, the temperatures') are collected once more, with the fit as every row's
  pilot, when a fit's estimated error asks for it
  (:func:`~weights_search.fitted.far_from_pilots`, :func:`~weights_search.fitted.fitted_temperatures`;
  in random order it does not). Without temperatures: one more pass, of those statistics
  alone, when some fold's fit asks for it, with the fit of all rows as the pilot (the folds'
  fits lie near it). With temperatures: one more temperature pass when the fit of all rows
  or a fold's asks for it; a fold's stats pass is repeated when its fit asks for it, and the
  pilot it found is then used by the later folds' passes and the final one from the start.
  :func:`cross_validate_and_fit` checks the final fit too, and reads once more should it
  alone ask (not seen in the tests).
- with the geo prior (:func:`cross_validate_and_fit`'s ``geo``): **one pass more**, after the
  final fit, fusing each row under every fold's blend and the final one (:func:`_geo_report`).
- a source whose rows fit in one block: **1 read**, whatever the options (the block and its
  log-probabilities are kept between passes, see :class:`~weights_search.fitted.Reader`).

:func:`cross_val_log_probs` reads as :func:`cross_validate` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from weights_search.base import Blender
from weights_search.fitted import (FittedBlend, Reader, StatsPass, adjust_own, collect_stats, far_from_pilots,
                                   fitted_temperatures, mixture_of_log_probs, mixtures_of_log_probs)
from weights_search.functional import MIXTURE, log_softmax
from weights_search.geo_fit import GEO_BOUNDS, FusedRows, GeoTerms, fit_beta, scores
from weights_search.metrics import bootstrap_ci, rank_of_true
from weights_search.prior import LogitAdjustment
from weights_search.registry import DEFAULT_METHOD, get_method
from weights_search.source import MemberSource, as_source, check_labels


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Split rows ``0..N-1`` into ``k`` folds; returns ``k`` sorted arrays of held-out row indices.

    Rows are shuffled, grouped by class (classes in random order) and dealt to folds in turn.
    A class with at least ``k`` rows is spread over every fold as evenly as it allows; a class
    with fewer rows lands in as many different folds as it has rows. Fold sizes differ by at
    most one. Deterministic for a given ``seed``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a (n_samples,) array, got shape {labels.shape}")
    if not 2 <= k <= labels.size:
        raise ValueError(f"the number of folds must lie in 2..{labels.size} (the number of rows), got {k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.size)
    classes, class_index = np.unique(labels, return_inverse=True)
    class_rank = rng.permutation(classes.size)
    grouped = order[np.argsort(class_rank[class_index[order]], kind="stable")]
    fold_of = np.empty(labels.size, dtype=np.int64)
    fold_of[grouped] = np.arange(labels.size) % k
    return tuple(np.flatnonzero(fold_of == f) for f in range(k))




def cross_val_log_probs(logits: MemberSource | np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
                        make_method: Callable[[], Blender], folds: Sequence[np.ndarray], *, temperature: bool = False,
                        prior: LogitAdjustment | None = None, block_rows: int | None = None) -> np.ndarray:
    """Out-of-fold blended log-probabilities ``(N, C)`` float32.

    ``logits``: a member source or ``(M, N, C)`` member logits; ``labels``: ``(N,)``;
    ``make_method``: returns a new unfitted method (e.g. ``lambda: get_method("nll")``);
    ``folds``: held-out row indices that partition ``0..N-1`` (e.g. from
    :func:`stratified_folds`). For each fold, temperatures (when ``temperature``), weights (and
    ``tau`` of ``prior``, when it leaves it to fit) are fitted on the other folds and the fold
    is predicted. The result is ``(N, C)`` by definition; the source is read as the module
    docstring says, in blocks of ``block_rows`` rows.
    """
    source = as_source(logits)
    labels = check_labels(source, labels)
    fold_of = _fold_of(folds, labels.size)
    out = np.empty((source.n_rows, source.n_classes), dtype=np.float32)

    def score(rows: np.ndarray, log_probs: np.ndarray, local: np.ndarray | None, blends: Sequence[Blender] | None) -> None:
        if blends is not None:
            out[rows] = blends[0].predict_log_proba(log_probs if local is None else log_probs[:, local])

    _fit_and_evaluate(source, labels, fold_of, [_Spec("", "method", "", make_method, prior)],
                      temperature=temperature, block_rows=block_rows, score=score)
    return out


@dataclass(frozen=True)
class CvRow:
    """Cross-validated scores of one blend: a single member, uniform weights or the fitted method,
    the last two also with the prior correction."""

    name: str  #: the member's name, "uniform", or the method's name; "+prior" appended with the prior
    kind: str  #: "member", "uniform" or "method"
    top1: float
    top1_low: float  #: bootstrap interval for top1
    top1_high: float
    topk: float  #: top-k accuracy, k being the report's top_k
    nll: float
    prior: bool = False  #: corrected for the prior, ``tau`` fitted (or given) in each fold
    geo: bool = False  #: with the geo prior, ``beta`` fitted (or given) in each fold


#: What a row's name gains when the blend is corrected for the prior, and with the geo prior.
PRIOR_SUFFIX = "+prior"
GEO_SUFFIX = "+geo"


@dataclass(frozen=True)
class CvReport:
    """The honest-estimate table: one :class:`CvRow` per member, then uniform, then the method;
    with a prior (``prior``), uniform and the method each twice, without and with the correction.

    ``fold_taus``: with a prior, the ``tau`` the method's corrected blend used in each fold.

    With the geo prior (:func:`cross_validate_and_fit`'s ``geo``), uniform's and the method's
    rows of the blend in use (with the prior when there is one) are each followed by the same
    blend with the geo prior (``+geo``); ``fold_betas``: kind -> its ``beta`` in each fold;
    ``geo_beta``: the ``beta`` of the blend returned (fitted on every row, or the one given).
    The rows without it, and so :attr:`method_row`, :attr:`uniform_row` and
    :attr:`beats_uniform`, are those of the blend without the geo prior.
    """

    method: str
    top_k: int
    n_folds: int
    temperature: bool
    rows: tuple[CvRow, ...]
    prior: bool = False
    fold_taus: tuple[float, ...] = ()
    geo: bool = False
    fold_betas: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    geo_beta: float | None = None

    def row(self, kind: str, prior: bool = False, geo: bool = False) -> CvRow | None:
        """The row of ``kind`` ("uniform" or "method"), with or without the prior and the geo
        prior; None if absent."""
        return next((r for r in self.rows if r.kind == kind and r.prior == prior and r.geo == geo), None)

    @property
    def uniform_row(self) -> CvRow:
        """Uniform weights, corrected for the prior when the report has one."""
        return self.row("uniform", self.prior)

    @property
    def method_row(self) -> CvRow:
        """The fitted method's row (the uniform row when the method is uniform), corrected for the
        prior when the report has one."""
        return self.row("method", self.prior) or self.uniform_row

    @property
    def beats_uniform(self) -> bool:
        """Whether the method's CV top-1 is higher than uniform's (on equal top-1: lower NLL);
        with a prior, both corrected."""
        method, uniform = self.method_row, self.uniform_row
        return (method.top1, -method.nll) > (uniform.top1, -uniform.nll)


def cross_validate(logits: MemberSource | np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
                   method: str = DEFAULT_METHOD, params: Mapping[str, Any] | None = None, *, n_folds: int = 5,
                   temperature: bool = False, member_names: Sequence[str] | None = None, top_k: int = 5,
                   n_boot: int = 1000, seed: int = 0, prior: LogitAdjustment | None = None,
                   block_rows: int | None = None) -> CvReport:
    """Score every single member, uniform weights and ``method`` by ``n_folds``-fold CV.

    ``logits``: a member source, or ``(M, N, C)`` member logits (or one ``(N, C)`` array per
    member); ``labels``: ``(N,)``. Folds come from :func:`stratified_folds` with ``seed``; with
    ``temperature``, each fold fits its own temperatures (single members too). With ``prior``,
    uniform and ``method`` are also scored corrected for it (rows named ``uniform+prior``,
    ``<method>+prior``), ``tau`` fitted in each fold like the weights (unless ``prior`` gives
    it). Each row reports out-of-fold top-1 with a ``n_boot``-resample 95% bootstrap interval,
    top-``top_k`` accuracy and mean NLL. ``member_names`` default to ``"member 0"``, ...
    The source is read in blocks of ``block_rows`` rows (None: a default of about 32 MiB of
    float32 logits), as often as the module docstring says. To fit the final blend too, call
    :func:`cross_validate_and_fit`: it reads no more.
    """
    return _cross_validate(logits, labels, method, params, n_folds=n_folds, temperature=temperature,
                           member_names=member_names, top_k=top_k, n_boot=n_boot, seed=seed, prior=prior,
                           block_rows=block_rows, final=False)[0]


def cross_validate_and_fit(logits: MemberSource | np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
                           method: str = DEFAULT_METHOD, params: Mapping[str, Any] | None = None, *,
                           n_folds: int = 5, temperature: bool = False, member_names: Sequence[str] | None = None,
                           top_k: int = 5, n_boot: int = 1000, seed: int = 0, prior: LogitAdjustment | None = None,
                           block_rows: int | None = None,
                           fallback: str | None = None, max_pairs: int | None = None,
                           geo: Any = None, geo_weight: float | None = None) -> tuple[CvReport, FittedBlend]:
    """:func:`cross_validate` and :func:`~weights_search.fitted.fit_blend` in one go: the
    report, and ``method`` fitted on every row (with ``prior`` when given), from the same
    passes over the source (2 without temperatures, K + 2 with them, and the re-passes of rows
    in an unfavourable order: see the module docstring).

    ``fallback``: None, or ``"uniform"``: when ``method`` does not beat uniform weights on CV
    (:attr:`CvReport.beats_uniform`), the blend returned is uniform's (its ``method`` says so),
    fitted from the same statistics. Same numbers as the two calls.

    ``max_pairs``: the most rival pairs each collector of a method that counts rows right may
    hold (None: :data:`weights_search.stats.MAX_PAIRS`); past it a
    :class:`weights_search.stats.TooManyPairs` (a ValueError) is raised during the pass.

    ``geo``: the rows' geo prior ``g'`` (a :class:`weights_search.geo.SparseGeo`, or anything
    with its ``indptr``, ``column`` and ``value``), or None. With it the report gains the rows of
    uniform and the method with the geo prior (see :class:`CvReport`): each fold's ``beta``
    fitted on its training rows under its own fold's blend (``geo_weight``: a given ``beta``
    instead, in :data:`weights_search.geo_fit.GEO_BOUNDS`) and scored on its held-out rows;
    :attr:`CvReport.geo_beta` is the returned blend's, fitted on every row under it. That takes
    one more pass over the source after the final fit (:func:`_geo_report`: the final weights,
    and with temperatures their fits, are known only after the evaluation pass), or none when
    its rows fit in one block.
    """
    if fallback not in (None, "uniform"):
        raise ValueError(f"unknown fallback {fallback!r}; choose from: uniform")
    low, high = GEO_BOUNDS
    if geo_weight is not None and not low <= geo_weight <= high:
        raise ValueError(f"geo_weight must lie in [{low:g}, {high:g}], got {geo_weight}")
    report, specs, final_stats, temperatures, fitted_folds = _cross_validate(
        logits, labels, method, params, n_folds=n_folds, temperature=temperature, member_names=member_names,
        top_k=top_k, n_boot=n_boot, seed=seed, prior=prior, block_rows=block_rows, final=True, max_pairs=max_pairs)
    wanted = "uniform" if method == "uniform" or (fallback == "uniform" and not report.beats_uniform) else "method"
    spec = next(s for s in specs if s.kind == wanted and (s.prior is None) == (prior is None))
    blender = spec.make()
    key = blender.collector_key(spec.prior)
    blender.fit_stats(final_stats[key], spec.prior)
    pilot = far_from_pilots(final_stats[key], blender, spec.prior)
    if pilot is not None:
        # Rarely: no fold's fit asked for a re-pass but the final one does (see the module docstring).
        del final_stats
        stats = collect_stats(Reader(as_source(logits), block_rows), check_labels(as_source(logits), labels),
                              [(blender, spec.prior)], temperatures, max_pairs, pilots={key: pilot})
        blender.fit_stats(stats[key], spec.prior)
    final = FittedBlend.of(blender, spec.method, temperatures)
    if geo is not None:
        source = as_source(logits)
        report = _geo_report(Reader(source, block_rows), check_labels(source, labels), report, specs, fitted_folds,
                             final, geo, geo_weight, n_boot, seed)
    return report, final


def _cross_validate(logits, labels, method, params, *, n_folds, temperature, member_names, top_k, n_boot, seed,
                    prior, block_rows, final, max_pairs=None):
    """The report, the specs of its fitted rows, and with ``final`` the statistics of every row
    (at the temperatures of every row, returned too) for the final fit."""
    source = as_source(logits)
    labels = check_labels(source, labels)
    n_members = source.n_members
    names = list(member_names) if member_names is not None else [f"member {m}" for m in range(n_members)]
    if len(names) != n_members:
        raise ValueError(f"{len(names)} member names for {n_members} members")
    params = dict(params or {})
    get_method(method, **params)  # a bad name or parameter fails before any reading
    if prior is not None:
        prior.check(source.n_classes)
    if top_k < 1:
        raise ValueError(f"k must be at least 1, got {top_k}")
    specs = [_Spec("uniform", "uniform", "uniform", lambda: get_method("uniform"), None)]
    if method != "uniform":
        specs.append(_Spec(method, "method", method, lambda: get_method(method, **params), None))
    if prior is not None:
        specs += [_Spec(s.name + PRIOR_SUFFIX, s.kind, s.method, s.make, prior) for s in specs]
    # Report order: members, then uniform (+prior), then the method (+prior).
    specs.sort(key=lambda s: s.kind != "uniform")
    tau_spec = next(i for i, s in enumerate(specs) if s.prior is not None and (s.kind == "method" or method == "uniform")) \
        if prior is not None else None
    fold_of = _fold_of(stratified_folds(labels, n_folds, seed), labels.size)
    n_blends = n_members + len(specs)
    hits = np.zeros((n_blends, 2, labels.size), dtype=bool)
    nll = np.zeros((n_blends, labels.size))
    fold_taus: list[float] = []

    def score(rows: np.ndarray, log_probs: np.ndarray, local: np.ndarray | None, blends: Sequence[Blender] | None) -> None:
        truth = labels[rows]
        fused = None if blends is None else _predict_all(blends, log_probs, local)
        for b in range(n_members) if blends is None else range(n_members, n_blends):
            held_out = log_probs[b] if b < n_members else fused[b - n_members]
            rank = rank_of_true(held_out, truth)
            hits[b, 0, rows] = rank < 1
            hits[b, 1, rows] = rank < top_k
            nll[b, rows] = -held_out[np.arange(rows.size), truth]

    kept: dict[str, Any] = {"fold_temperatures": None}
    fold_blends, final_stats, temperatures = _fit_and_evaluate(
        source, labels, fold_of, specs, temperature=temperature, block_rows=block_rows, score=score, final=final,
        max_pairs=max_pairs, kept=kept)
    if tau_spec is not None:
        fold_taus = [float(blends[tau_spec].tau_) for blends in fold_blends]
    rows = [(name, "member", False) for name in names] + [(s.name, s.kind, s.prior is not None) for s in specs]
    report_rows = tuple(CvRow(name, kind, float(hits[b, 0].mean()), *bootstrap_ci(hits[b, 0], n_boot, seed=seed),
                              float(hits[b, 1].mean()), float(nll[b].mean()), corrected)
                        for b, (name, kind, corrected) in enumerate(rows))
    report = CvReport(method, top_k, n_folds, temperature, report_rows, prior is not None, tuple(fold_taus))
    return report, specs, final_stats, temperatures, (fold_of, fold_blends, kept["fold_temperatures"])


def _geo_report(reader: Reader, labels: np.ndarray, report: CvReport, specs: Sequence[_Spec], fitted_folds,
                final: FittedBlend, geo: Any, geo_weight: float | None, n_boot: int, seed: int) -> CvReport:
    """``report`` with the rows of the geo prior (see :func:`cross_validate_and_fit`).

    One pass over the source: each block's rows are fused under every fold's blends of the
    specs in use (uniform's and the method's, with the prior when the report has one; for a
    fold's training rows and its held-out ones alike) and under ``final``, and the sparse
    statistics of each fusion kept (:class:`~weights_search.geo_fit.FusedRows`: 8 k + 4 bytes
    a row and 4 a sparse entry, for each distinct fusion: at most 2 K + 1). Then each fold's
    ``beta`` is fitted on its training rows (:func:`~weights_search.geo_fit.fit_beta`) and its
    held-out rows scored exactly (:func:`~weights_search.geo_fit.scores`); the final ``beta``
    on every row under ``final``."""
    fold_of, fold_blends, fold_temperatures = fitted_folds
    n_folds = len(fold_blends)
    terms = GeoTerms(geo.indptr, geo.column, geo.value, labels)
    used = [i for i, s in enumerate(specs) if (s.prior is not None) == report.prior]
    n_classes = reader.source.n_classes
    if terms.column.size and int(terms.column.max()) >= n_classes:
        raise ValueError(f"the geo prior names class column {int(terms.column.max())} of members of {n_classes} classes")
    k = min(report.top_k, n_classes)
    # Fusions that give the same values (uniform weights without a fitted tau or temperatures)
    # share their statistics.
    keyed: dict[Hashable, FusedRows] = {}
    fused_of: dict[tuple[int, int], FusedRows] = {}
    for f in range(n_folds):
        temps = None if fold_temperatures is None else tuple(np.asarray(fold_temperatures[f]).tolist())
        for i in used:
            blend = fold_blends[f][i]
            key = (temps, blend.fusion, tuple(np.asarray(blend.weights_).tolist()), blend.tau_)
            fused_of[f, i] = keyed.setdefault(key, FusedRows(terms, n_classes, k))
    final_rows = FusedRows(terms, n_classes, k)
    in_order = sorted(fused_of.items(), key=lambda item: item[0])  # by fold: one fold's temperatures at a time

    def gather(start: int, block: np.ndarray) -> None:
        rows = start + np.arange(block.shape[1])
        done: set[int] = set()
        log_probs, current = None, -1
        for (f, i), fused in in_order:
            if id(fused) in done:
                continue
            done.add(id(fused))
            at = 0 if fold_temperatures is None else f
            if at != current:
                log_probs = None  # the one held freed first
                log_probs = reader.log_probs(block, None if fold_temperatures is None else fold_temperatures[f])
                current = at
            fused.add(rows, _predict(fold_blends[f][i], log_probs, None))
        del log_probs
        final_rows.add(rows, final.log_proba(block))

    reader.each_block(gather)
    for fused in (*keyed.values(), final_rows):
        fused.check_complete()
    rows = list(report.rows)
    fold_betas: dict[str, tuple[float, ...]] = {}
    for i in used:
        spec = specs[i]
        hits = np.zeros((2, labels.size), dtype=bool)
        nll = np.zeros(labels.size)
        betas = []
        for f in range(n_folds):
            fused = fused_of[f, i]
            held_out = np.flatnonzero(fold_of == f)
            beta = fit_beta(fused, np.flatnonzero(fold_of != f)) if geo_weight is None else float(geo_weight)
            hits[0, held_out], hits[1, held_out], nll[held_out] = scores(fused, beta, held_out, k)
            betas.append(beta)
        fold_betas[spec.kind] = tuple(betas)
        name = spec.name + GEO_SUFFIX
        after = next(j for j, r in enumerate(rows) if r.name == spec.name and r.kind == spec.kind and not r.geo)
        rows.insert(after + 1, CvRow(name, spec.kind, float(hits[0].mean()), *bootstrap_ci(hits[0], n_boot, seed=seed),
                                     float(hits[1].mean()), float(nll.mean()), spec.prior is not None, True))
    final_beta = fit_beta(final_rows) if geo_weight is None else float(geo_weight)
    return replace(report, rows=tuple(rows), geo=True, fold_betas=fold_betas, geo_beta=final_beta)


def _predict(blender: Blender, log_probs: np.ndarray, local: np.ndarray | None) -> np.ndarray:
    """``blender.predict_log_proba(log_probs[:, local])`` (all rows when ``local`` is None); a
    mixture fused by :func:`~weights_search.fitted.mixture_of_log_probs` (the same values, a
    third of the work, the rows gathered member by member), its prior correction made in the
    fused array's place (:func:`~weights_search.fitted.adjust_own`: the same values)."""
    if blender.fusion != MIXTURE:
        return blender.predict_log_proba(log_probs if local is None else log_probs[:, local])
    fused = mixture_of_log_probs(log_probs, blender.weights_, local)
    return fused if blender.tau_ is None else adjust_own(fused, blender.log_prior_, blender.tau_)


def _predict_all(blenders: Sequence[Blender], log_probs: np.ndarray, local: np.ndarray | None) -> list[np.ndarray]:
    """``[_predict(b, log_probs, local) for b in blenders]``, the same values, the mixtures'
    exponentials shared: each member value of the rows is exponentiated once for all the
    mixtures (:func:`~weights_search.fitted.mixtures_of_log_probs`), each corrected for its
    prior after, in its place."""
    mixtures = [i for i, b in enumerate(blenders) if b.fusion == MIXTURE]
    out: list[Any] = [None] * len(blenders)
    if mixtures:
        for i, fused in zip(mixtures, mixtures_of_log_probs(log_probs, [blenders[i].weights_ for i in mixtures], local)):
            b = blenders[i]
            out[i] = fused if b.tau_ is None else adjust_own(fused, b.log_prior_, b.tau_)
    for i, b in enumerate(blenders):
        if out[i] is None:
            out[i] = _predict(b, log_probs, local)
    return out


@dataclass(frozen=True)
class _Spec:
    """One fitted blend of a report: its row ``name`` and ``kind``, the registered ``method``
    name, a maker of new unfitted blenders, and the prior it is fitted with (or None)."""

    name: str
    kind: str
    method: str
    make: Callable[[], Blender]
    prior: LogitAdjustment | None


#: ``score(rows, log_probs, local, blends)``: held-out ``rows`` (absolute, sorted), member
#: log-probabilities ``(M, n, C)`` at their fold's temperatures holding them (all of it when
#: ``local`` is None, else its rows ``local``), and the fold's fitted blenders (one per spec, in
#: spec order), or None: score the single members only. Called from two threads at once, on
#: different rows (see :func:`_evaluate`): it must only write each row's own results.
_Score = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", "Sequence[Blender] | None"], None]


def _fold_of(folds: Sequence[np.ndarray], n_rows: int) -> np.ndarray:
    """``(N,)`` int64: the fold of each row, for ``folds`` that partition ``0..N-1``."""
    folds = [np.asarray(f, dtype=np.int64) for f in folds]
    if len(folds) < 2 or any(f.size == 0 for f in folds) or not np.array_equal(np.sort(np.concatenate(folds)), np.arange(n_rows)):
        raise ValueError(f"folds must be at least 2 non-empty arrays of row indices that partition 0..{n_rows - 1}")
    fold_of = np.empty(n_rows, dtype=np.int64)
    for f, rows in enumerate(folds):
        fold_of[rows] = f
    return fold_of


def _fit_and_evaluate(source: MemberSource, labels: np.ndarray, fold_of: np.ndarray, specs: Sequence[_Spec], *,
                      temperature: bool, block_rows: int | None, score: _Score, final: bool = False,
                      max_pairs: int | None = None, kept: dict | None = None):
    """Fit every spec in every fold, then score each held-out row with its fold's blends (one
    evaluation pass); returns the fold blends ``[fold][spec]``, and with ``final`` the stats of
    every row and the temperatures of every row (None without ``temperature``). ``kept``: a dict
    that receives each fold's temperatures (``"fold_temperatures"``, None without them)."""
    n_folds = int(fold_of.max()) + 1
    trains = [np.flatnonzero(fold_of != f) for f in range(n_folds)]
    needs = [(s.make(), s.prior) for s in specs]
    reader = Reader(source, block_rows)

    def fit_folds(stats: dict[Hashable, Any], folds: range) -> list[list[Blender]]:
        fitted = []
        for f in folds:
            blends = []
            for (probe, prior), spec in zip(needs, specs):
                blender = spec.make()
                blender.fit_stats(stats[probe.collector_key(prior)].subset(trains[f]), prior)
                blends.append(blender)
            fitted.append(blends)
        return fitted

    def far_keys(stats: dict[Hashable, Any], fitted: list[list[Blender]], folds: range) -> list[int]:
        """The specs (one per key) whose fit in one of ``folds`` is too far from its rows' pilots."""
        far: dict[Hashable, int] = {}
        for i, (probe, prior) in enumerate(needs):
            key = probe.collector_key(prior)
            if key not in far and any(far_from_pilots(stats[key], fitted[j][i], prior, trains[f]) is not None
                                      for j, f in enumerate(folds)):
                far[key] = i
        return list(far.values())

    if not temperature:
        stats = collect_stats(reader, labels, needs, None, max_pairs)
        fold_blends = fit_folds(stats, range(n_folds))
        # A re-pass (rows in an unfavourable order): every row expanded about the fit of all
        # rows, which lies near every fold's too.
        pilots = {}
        for i in far_keys(stats, fold_blends, range(n_folds)):
            probe, prior = needs[i]
            key = probe.collector_key(prior)
            pilots[key] = stats[key].pilot_of(specs[i].make().fit_stats(stats[key], prior), prior)
        if pilots:
            for key in pilots:
                del stats[key]
            stats.update(collect_stats(reader, labels, _of_keys(needs, pilots), None, max_pairs, pilots=pilots))
            fold_blends = fit_folds(stats, range(n_folds))
        _evaluate(reader, fold_of, fold_blends, None, score)
        return fold_blends, stats if final else None, None
    temperature_fit, temperatures, fold_temperatures = fitted_temperatures(reader, labels, trains)
    if kept is not None:
        kept["fold_temperatures"] = fold_temperatures
    fold_blends = []
    # Pilots found by a fold's re-pass serve the later folds' passes and the final one from the start.
    carried: dict[Hashable, np.ndarray] = {}
    for f in range(n_folds):
        stats = collect_stats(reader, labels, needs, fold_temperatures[f], max_pairs, pilots=carried)
        fitted = fit_folds(stats, range(f, f + 1))
        pilots = {}
        for i in far_keys(stats, fitted, range(f, f + 1)):
            probe, prior = needs[i]
            key = probe.collector_key(prior)
            pilots[key] = stats[key].pilot_of(fitted[0][i], prior)
        if pilots:
            for key in pilots:
                del stats[key]
            stats.update(collect_stats(reader, labels, _of_keys(needs, pilots), fold_temperatures[f], max_pairs,
                                           pilots=pilots))
            fitted = fit_folds(stats, range(f, f + 1))
            carried.update(pilots)
        fold_blends += fitted
        del stats
    if not final:
        _evaluate(reader, fold_of, fold_blends, fold_temperatures, score)
        return fold_blends, None, None
    final_pass = StatsPass(labels, source.n_classes, needs, max_pairs, pilots=carried)
    _evaluate(reader, fold_of, fold_blends, fold_temperatures, score, (final_pass, temperatures))
    return fold_blends, final_pass.result(), temperatures


def _of_keys(needs: Sequence[tuple[Blender, LogitAdjustment | None]], keys) -> list:
    """The ``(blender, prior)`` pairs of ``needs`` whose collector key is in ``keys``."""
    return [(blender, prior) for blender, prior in needs if blender.collector_key(prior) in keys]


def _evaluate(reader: Reader, fold_of: np.ndarray, fold_blends: Sequence[Sequence[Blender]],
              fold_temperatures: Sequence[np.ndarray] | None, score: _Score,
              also: tuple[StatsPass, np.ndarray] | None = None) -> None:
    """The evaluation pass: per block, the single members' rows, then the rows of each fold with
    the fold's blends, at the fold's temperatures, go to ``score``; ``also`` (a stats pass and
    its temperatures) is fed every block too. Without temperatures the members' log-probabilities
    do not depend on the fold: the block's are scored at once, and each fold's rows are picked
    out of them by the fusion itself.

    Scoring a row needs no other row, and ``score`` writes each row's results in its own places:
    blocks are scored on the pass's worker threads, two at a time, in any order (the reader's
    ``prepare``); only ``also``'s collectors, which add rows in order, see the blocks one at a
    time in row order."""

    def scored(start: int, block: np.ndarray) -> np.ndarray | None:  # any thread, any order
        folds = fold_of[start:start + block.shape[1]]
        if fold_temperatures is None:
            log_probs = reader.log_probs(block, None, last=also is None)
            score(start + np.arange(folds.size), log_probs, None, None)
        for f in np.unique(folds):
            held_out = np.flatnonzero(folds == f)
            whole = held_out.size == folds.size
            if fold_temperatures is None:
                score(start + held_out, log_probs, None if whole else held_out, fold_blends[f])
                continue
            fold_log_probs = reader.log_probs(block, fold_temperatures[f]) if whole else \
                log_softmax(block[:, held_out], fold_temperatures[f])
            score(start + held_out, fold_log_probs, None, None)
            score(start + held_out, fold_log_probs, None, fold_blends[f])
            del fold_log_probs
        if also is None:
            return None
        stats_log_probs = reader.log_probs(block, also[1], last=True)
        also[0].prepare(start, stats_log_probs)
        return stats_log_probs

    def add(start: int, stats_log_probs: np.ndarray | None) -> None:  # block after block, in row order
        if also is not None:
            also[0].add(start, stats_log_probs)

    reader.each_block(add, prepare=scored)  # the next block read while these are scored

