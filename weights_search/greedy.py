"""Ensemble selection with replacement (Caruana, Niculescu-Mizil, Crew and Ksikes, "Ensemble
Selection from Libraries of Models", ICML 2004)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from weights_search.base import MixtureBlender
from weights_search.mixture import informative_rows, mixture_nll
from weights_search.prior import MixtureScores

#: What a selection round minimises: the mixture's NLL, or its top-1 error.
SCORES = ("nll", "accuracy")


@dataclass(frozen=True)
class GreedyStep:
    """One selection: in bag ``bag``, member ``member`` was added; ``score`` is the bag's
    ensemble score right after (mixture NLL, or top-1 error, on the rows selection uses)."""

    bag: int
    member: int
    score: float


class GreedyBlend(MixtureBlender):
    """Ensemble selection with replacement (Caruana et al., ICML 2004); weights are selection counts.

    Each bag starts from its ``n_init`` best single members (sorted initialisation, one
    selection each), then runs ``n_rounds`` rounds; a round adds the member (again, if it is
    already in) whose addition gives the best ``score``: ``"nll"``, the NLL of the mixture whose
    weights are the selection counts (the default: smooth, and it rewards calibration), or
    ``"accuracy"``, its top-1 error (ties count as errors, see :mod:`weights_search.margins`).
    Ties between candidates go to the lower member index. ``score="accuracy"`` fits from rival
    pairs, as :class:`~weights_search.accuracy.AccuracyBlend` does (memory: see
    :mod:`weights_search.stats`: each round's candidates are scored a chunk of pairs at a time);
    ``"nll"`` from the true-class columns alone.

    Bagging: each of ``n_bags`` bags draws ``round(bag_fraction * M)`` members (at least 1)
    without replacement, with ``seed``; the counts of all bags are added up. The default, one
    bag of every member, is plain selection.

    With a prior, every score is that of the corrected mixture at the round's ``tau`` (see
    :func:`weights_search.prior.fit_mixture_prior`; ``tau`` itself is fitted by NLL).

    ``weights_``: counts / total. ``counts_``: ``(M,)`` selections over all bags.
    ``trajectory_``: the :class:`GreedyStep` of every selection, bag by bag, in order.
    ``train_score_``: the score of the final weights on the fitting rows.
    """

    def __init__(self, n_rounds: int = 50, n_init: int = 1, score: str = "nll",
                 n_bags: int = 1, bag_fraction: float = 1.0, seed: int = 0) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown greedy score {score!r}; choose from: {', '.join(SCORES)}")
        if n_rounds < 0 or n_init < 0 or n_rounds + n_init < 1:
            raise ValueError(f"n_rounds and n_init must be non-negative and add up to at least 1, got {n_rounds} and {n_init}")
        if n_bags < 1:
            raise ValueError(f"n_bags must be at least 1, got {n_bags}")
        if not 0 < bag_fraction <= 1:
            raise ValueError(f"bag_fraction must lie in (0, 1], got {bag_fraction}")
        self.n_rounds = n_rounds
        self.n_init = n_init
        self.score = score
        self.n_bags = n_bags
        self.bag_fraction = bag_fraction
        self.seed = seed

    @property
    def counts_rows(self) -> bool:
        return self.score == "accuracy"

    def _fit_scores(self, scores: MixtureScores, start: np.ndarray | None) -> np.ndarray:
        n_members = scores.true_lp.shape[0]
        bag_size = max(1, round(self.bag_fraction * n_members))
        if self.n_init > bag_size:
            raise ValueError(f"n_init={self.n_init} exceeds the {bag_size} members in each bag")
        scorer = _NllScorer(scores) if self.score == "nll" else _ErrorScorer(scores)
        rng = np.random.default_rng(self.seed)
        total = np.zeros(n_members, dtype=np.int64)
        steps: list[GreedyStep] = []
        for bag in range(self.n_bags):
            members = np.sort(rng.choice(n_members, size=bag_size, replace=False))
            counts = np.zeros(n_members, dtype=np.int64)
            alone = scorer.each_added(counts)[members]
            for m in members[np.argsort(alone, kind="stable")[: self.n_init]]:
                after = float(scorer.each_added(counts)[m])
                counts[m] += 1
                steps.append(GreedyStep(bag, int(m), after))
            for _ in range(self.n_rounds):
                candidates = scorer.each_added(counts)[members]
                best = int(np.argmin(candidates))
                counts[members[best]] += 1
                steps.append(GreedyStep(bag, int(members[best]), float(candidates[best])))
            total += counts
        self.counts_ = total
        self.weights_ = total / total.sum()
        self.trajectory_ = tuple(steps)
        self.train_score_ = scorer.score(self.weights_)
        return self.weights_


class _NllScorer:
    """Mixture NLL of selection counts, from the ``(M, N)`` true-class log-probabilities (and,
    corrected for a prior, the ``(M, N)`` log-normalisers: see :mod:`weights_search.mixture`).

    Rows where no member gives the true class a non-zero probability are left out of the
    selection and its trajectory (every candidate would score ``inf`` there); :meth:`score`,
    which gives ``train_score_``, still counts them.
    """

    def __init__(self, scores: MixtureScores) -> None:
        self.true_lp, self.log_norm = scores.true_lp, scores.log_norm
        rows = informative_rows(self.true_lp)
        kept = self.true_lp[:, rows]
        if not kept.size:
            raise ValueError("no member gives the true class a non-zero probability on any row: nothing to select")
        self.kept = _Exponentials(kept)
        self.kept_norm = None if self.log_norm is None else _Exponentials(self.log_norm[:, rows])

    def each_added(self, counts: np.ndarray) -> np.ndarray:
        nll = -self.kept.log_added(counts)
        if self.kept_norm is None:
            return nll + np.log(counts.sum() + 1)
        return nll + self.kept_norm.log_added(counts)

    def score(self, weights: np.ndarray) -> float:
        return mixture_nll(self.true_lp, weights, self.log_norm)


class _Exponentials:
    """An ``(M, n)`` float64 matrix ``x`` (entries finite or -inf, every column with a finite
    maximum), held as ``exp(x - top)`` with ``top`` the column maxima, for :meth:`log_added`.

    A selection round asks :meth:`log_added` for every candidate at once; with the exponentials
    taken once here, that is one matrix-vector product and one log of ``(M, n)`` per round
    instead of a log-sum-exp and a ``logaddexp`` (exp, log1p) over ``(M, n)``: a fit with a prior
    asks it of two such matrices, in every round of ``tau``.
    """

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.top = x.max(axis=0)
        # A finite entry so far below its column's maximum that its exponential underflows would
        # count as -inf here: such a matrix takes the log-sum-exp path, exact at any range.
        self.exact = not np.isfinite(self.top).all()
        if not self.exact:
            self.exp = np.exp(x - self.top)
            self.exact = bool((np.isfinite(x) & (self.exp < np.finfo(np.float64).tiny)).any())
            self.top_mean = self.top.mean()
            self.has_zeros = not (self.exp > 0).all()  # -inf entries: their log warns
            self._buffer = np.empty_like(self.exp)  # reused: the log is most of a round's time

    def log_added(self, counts: np.ndarray) -> np.ndarray:
        """``(M,)``: ``mean_n log (sum_k counts_k exp(x[k, n]) + exp(x[m, n]))`` for each ``m``."""
        if self.exact:
            with np.errstate(divide="ignore"):
                log_sum = logsumexp(self.x + np.log(counts)[:, None], axis=0)
            return np.logaddexp(log_sum, self.x).mean(axis=1)
        total = counts.astype(np.float64) @ self.exp
        out = np.add(self.exp, total, out=self._buffer)
        if self.has_zeros:
            with np.errstate(divide="ignore"):
                np.log(out, out=out)
        else:
            np.log(out, out=out)
        return out.sum(axis=1) / out.shape[1] + self.top_mean


class _ErrorScorer:
    """Top-1 error of the mixture of selection counts (see :class:`MixtureMargins`)."""

    def __init__(self, scores: MixtureScores) -> None:
        self.margins = scores.margins

    def each_added(self, counts: np.ndarray) -> np.ndarray:
        return 1.0 - self.margins.count_each_added(counts.astype(np.float64)) / self.margins.n_rows

    def score(self, weights: np.ndarray) -> float:
        return 1.0 - self.margins.count(np.asarray(weights, dtype=np.float64)) / self.margins.n_rows
