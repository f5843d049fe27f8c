"""What every blend method is: a scikit-learn-shaped estimator over member log-probabilities,
fitted from statistics streamed over row blocks.

A fit reads the members once, block by block of rows, through the method's :class:`Collector`,
which keeps only what the method's objective needs (its :class:`Stats`: for a mixture, per-row
statistics such as each member's true-class log-probability, see :mod:`weights_search.stats`),
then fits from those statistics alone (:meth:`Blender.fit_stats`). Cross-validation collects
the statistics of the whole split in one pass and fits each fold on ``stats.subset(train_rows)``;
methods whose :meth:`Blender.collector_key` are equal can share one collector.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Hashable, Protocol, TypeVar, runtime_checkable

import numpy as np

from weights_search.functional import MIXTURE, check_members, fuse
from weights_search.margins import MixtureMargins
from weights_search.prior import LogitAdjustment, MixturePrior, MixtureScores, adjust, fit_mixture_prior
from weights_search.stats import MAX_PAIRS, MixtureCollector, MixtureStats

B = TypeVar("B", bound="Blender")


@runtime_checkable
class Stats(Protocol):
    """What a collector keeps of ``n_rows`` labelled rows: enough for a method to fit on them."""

    n_rows: int

    def subset(self, rows: np.ndarray) -> "Stats":
        """The statistics of the given rows only (sorted row indices, e.g. a CV fold's training
        rows), as if they had been collected on those rows alone."""


@runtime_checkable
class Collector(Protocol):
    """Accumulates a method's :class:`Stats` over row blocks of member log-probabilities."""

    def add(self, start: int, log_probs: np.ndarray) -> None:
        """Take rows ``start .. start + b - 1``: ``(M, b, C)`` float32 member log-probabilities
        (log-softmax at the fit's temperatures). Blocks come in row order, each row once."""

    def result(self) -> Stats:
        """The statistics of every row added (all rows of the labels given, in order)."""


class Blender(ABC):
    """Learns one weight per member from labelled validation outputs.

    ``fit(log_probs, labels, prior=None)`` takes per-member log-softmax ``(M, N, C)`` (float16
    or float32; apply temperatures before, see :func:`weights_search.functional.log_softmax`),
    integer labels ``(N,)`` and optionally a :class:`~weights_search.prior.LogitAdjustment`, and
    returns ``self`` with:

    - ``weights_``: ``(M,)`` float64, non-negative; combined with :attr:`fusion` by
      :func:`weights_search.functional.fuse`;
    - ``train_score_``: the objective the method minimises, on the rows it was fitted on (lower
      is better; each method's docstring names it), of the corrected blend when there is a prior;
    - ``tau_``: the prior correction's ``tau`` (fitted, or the one given), None without a prior;
      ``log_prior_``: its ``(C,)`` log-prior. The correction applies after fusion
      (:func:`weights_search.prior.adjust`).

    The streaming form of the same fit: ``collector = method.collector(labels, C, prior)``,
    ``collector.add(start, block)`` for each ``(M, b, C)`` block of rows in order, then
    ``method.fit_stats(collector.result(), prior)``; :meth:`fit` is that with one block.
    Members are whatever the caller stacks: models, or (model, view) pairs.
    """

    #: How :attr:`weights_` combine members (see :data:`weights_search.functional.FUSIONS`).
    fusion: ClassVar[str] = MIXTURE

    weights_: np.ndarray
    train_score_: float
    tau_: float | None = None
    log_prior_: np.ndarray | None = None

    @abstractmethod
    def collector(self, labels: np.ndarray, n_classes: int, prior: LogitAdjustment | None) -> Collector:
        """A new :class:`Collector` of what :meth:`fit_stats` needs, for rows labelled ``labels``
        ``(N,)`` of ``n_classes`` classes, with ``prior`` (or None)."""

    def collector_key(self, prior: LogitAdjustment | None) -> Hashable:
        """Hashable; two methods (or two fits) with equal keys can be fitted from one
        collector's statistics, so a pass over the members can feed both."""
        return (type(self).__qualname__, _prior_key(prior))

    @abstractmethod
    def fit_stats(self: B, stats: Stats, prior: LogitAdjustment | None = None) -> B:
        """Fit ``weights_`` (and ``tau_``, ``log_prior_`` with a prior) from a collector's
        statistics (of :meth:`collector` with the same ``prior``, or of a subset of its rows)."""

    def fit(self: B, log_probs: np.ndarray, labels: np.ndarray, prior: LogitAdjustment | None = None) -> B:
        """Fit ``weights_`` (and ``tau_`` with a prior) on ``(M, N, C)`` member log-probabilities
        and ``(N,)`` labels: one block through :meth:`collector`, then :meth:`fit_stats`."""
        log_probs, labels = check_members(log_probs, labels)
        if prior is not None:
            prior.check(log_probs.shape[2])
        collector = self.collector(labels, log_probs.shape[2], prior)
        collector.add(0, log_probs)
        return self.fit_stats(collector.result(), prior)

    def predict_log_proba(self, log_probs: np.ndarray) -> np.ndarray:
        """Blended class log-probabilities ``(n, C)`` float32 of ``(M, n, C)`` member
        log-probabilities, corrected for the prior when fitted with one."""
        if not hasattr(self, "weights_"):
            raise ValueError(f"{type(self).__name__} is not fitted yet: call fit first")
        fused = fuse(log_probs, self.weights_, self.fusion)
        return fused if self.tau_ is None else adjust(fused, self.log_prior_, self.tau_)

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments, defaults included (to record with the weights)."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def _prior_key(prior: LogitAdjustment | None) -> Hashable:
    """What of ``prior`` a collector depends on: its log-prior (not ``tau``: the statistics serve
    every ``tau``)."""
    return None if prior is None else prior.log_prior.tobytes()


class MixtureBlender(Blender):
    """A method whose weights mix member probabilities (:data:`~weights_search.functional.MIXTURE`).

    Its statistics are :class:`~weights_search.stats.MixtureStats` (true-class log-probabilities;
    with a prior, per-member mass per prior bin; for the methods that count rows right
    (:attr:`counts_rows`), rival pairs), from which every fit is exact.
    Subclasses implement :meth:`_fit_scores`, the weights for one
    :class:`~weights_search.prior.MixtureScores`; :meth:`fit_stats` calls it once without a
    prior, and with one through :meth:`_fit_prior`, by default
    :func:`~weights_search.prior.fit_mixture_prior`, which corrects the log of the fused
    probabilities and fits ``tau`` in turns with the weights.
    """

    fusion = MIXTURE

    @property
    def counts_rows(self) -> bool:
        """Whether the fit counts rows right (needs rival pairs, see :mod:`weights_search.stats`)."""
        return False

    def collector(self, labels: np.ndarray, n_classes: int, prior: LogitAdjustment | None, *,
                  max_pairs: int = MAX_PAIRS) -> MixtureCollector:
        """A :class:`~weights_search.stats.MixtureCollector` (``max_pairs``: the most rival pairs
        it may hold, for the methods that count rows right)."""
        if prior is not None:
            prior.check(n_classes)
        return MixtureCollector(labels, n_classes, None if prior is None else prior.log_prior,
                                pairs=self.counts_rows, tau=None if prior is None else prior.tau, max_pairs=max_pairs)

    def collector_key(self, prior: LogitAdjustment | None) -> Hashable:
        # Rival pairs depend on a given tau (found at it alone); bins and true-class columns do not.
        tau = prior.tau if self.counts_rows and prior is not None else None
        return ("mixture", self.counts_rows, _prior_key(prior), tau)

    def fit_stats(self, stats: Stats, prior: LogitAdjustment | None = None) -> "MixtureBlender":
        """Fit from :class:`~weights_search.stats.MixtureStats` (collected with ``prior``'s
        log-prior when ``prior`` is given; statistics collected with a prior also serve a fit
        without one)."""
        if not isinstance(stats, MixtureStats):
            raise ValueError(f"{type(self).__name__} fits on MixtureStats, got {type(stats).__name__}")
        if self.counts_rows and stats.pairs is None:
            raise ValueError(f"{type(self).__name__} counts rows right: its statistics need rival pairs "
                             "(collect them with its own collector)")
        self.tau_ = self.log_prior_ = None
        if prior is None:
            margins = None if stats.pairs is None else (lambda: MixtureMargins.from_stats(stats, 0.0))
            self._fit_scores(MixtureScores(stats.true_lp, margins=margins), None)
            return self
        prior.check(stats.n_classes)
        tau = self._fit_prior(MixturePrior(stats, stats.labels, prior.log_prior), prior.tau)
        self.tau_, self.log_prior_ = tau, prior.log_prior
        return self

    def _fit_prior(self, problem: MixturePrior, tau: float | None) -> float:
        """Set ``weights_`` and ``train_score_`` with the prior correction (``tau`` given, or None
        to fit it); return the ``tau`` used."""
        return fit_mixture_prior(self._fit_scores, problem, tau)

    @abstractmethod
    def _fit_scores(self, scores: MixtureScores, start: np.ndarray | None) -> np.ndarray:
        """Set ``weights_`` and ``train_score_`` from ``scores`` (``start``: earlier weights a
        method may start from, or None); return ``weights_``."""


def check_solver_options(max_iter: int, tol: float) -> None:
    """Shared argument checks of the methods fitted by an iterative scipy solver."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
