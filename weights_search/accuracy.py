"""Mixture weights that maximise validation top-1 directly, by exact line searches on the simplex."""

from __future__ import annotations

import numpy as np

from weights_search.base import MixtureBlender
from weights_search.prior import MixtureScores


class AccuracyBlend(MixtureBlender):
    """Weights on the simplex that maximise the number of validation rows a mixture gets right.

    Top-1 is piecewise constant in the weights, so gradients are useless. Starting from equal
    weights, each pass searches along the lines from the current weights towards every vertex
    (one member alone) and towards ``n_random`` random points of the simplex (Dirichlet(1),
    drawn from ``seed``). On each line the best top-1 is found exactly
    (:meth:`MixtureMargins.best_on_line`) and the weights move to the middle of the best piece
    when it gets strictly more rows right. The search stops after a pass without a move or
    after ``max_passes``.

    This fits 3 images per class of noise as readily as signal: expect the fitted top-1 to
    overstate what the weights do on new images, and read the cross-validated report (fitted on
    K-1 folds, scored on the held-out one) to see how it does held out.

    With a prior, the rows counted are those the corrected mixture gets right at the round's
    ``tau`` (see :func:`weights_search.prior.fit_mixture_prior`; ``tau`` itself is fitted by NLL).

    Its statistics hold rival pairs (:mod:`weights_search.stats`): every (row, class) that some
    member scores at least as high as the true class (with a fitted prior, at ``tau`` 0 or 3),
    ``8 + 4 M`` bytes each, bounded by the collector's ``max_pairs``; a fit on ``K`` pairs adds
    about ``K (8 M + 64)`` bytes (:func:`weights_search.stats.pair_bytes`).

    ``train_score_``: top-1 error on the fitting rows (ties count as errors).
    ``n_passes_``: passes run (by the last round, with a prior).
    """

    def __init__(self, max_passes: int = 20, n_random: int = 8, seed: int = 0) -> None:
        if max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, got {max_passes}")
        if n_random < 0:
            raise ValueError(f"n_random must be non-negative, got {n_random}")
        self.max_passes = max_passes
        self.n_random = n_random
        self.seed = seed

    counts_rows = True

    def _fit_scores(self, scores: MixtureScores, start: np.ndarray | None) -> np.ndarray:
        margins = scores.margins
        n_members = margins.n_members
        rng = np.random.default_rng(self.seed)
        weights = np.full(n_members, 1.0 / n_members)
        right = margins.count(weights)
        self.n_passes_ = 0
        while n_members > 1 and self.n_passes_ < self.max_passes:
            self.n_passes_ += 1
            targets = np.vstack([np.eye(n_members), rng.dirichlet(np.ones(n_members), size=self.n_random)])
            moved = False
            for target in targets:
                direction = target - weights
                t_low, t_high = _feasible_steps(weights, direction)
                best, t = margins.best_on_line(weights, direction, t_low, t_high)
                if best > right:
                    weights = np.clip(weights + t * direction, 0.0, None)
                    weights /= weights.sum()
                    right = margins.count(weights)
                    moved = True
            if not moved:
                break
        self.weights_ = weights
        self.train_score_ = 1.0 - right / margins.n_rows
        return self.weights_


def _feasible_steps(weights: np.ndarray, direction: np.ndarray) -> tuple[float, float]:
    """The range of ``t`` for which ``weights + t * direction`` stays non-negative.

    ``direction`` sums to 0 (both ends on the simplex), so the sum stays 1.
    """
    down, up = direction < 0, direction > 0
    t_high = float(np.min(weights[down] / -direction[down])) if down.any() else 0.0
    t_low = float(np.max(-weights[up] / direction[up])) if up.any() else 0.0
    return t_low, t_high
