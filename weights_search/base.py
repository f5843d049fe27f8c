"""What every blend method is: a scikit-learn-shaped estimator over member log-probabilities."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np

from weights_search.functional import MIXTURE, check_members, fuse, true_class_log_probs
from weights_search.prior import LogitAdjustment, MixturePrior, MixtureScores, adjust, fit_mixture_prior

B = TypeVar("B", bound="Blender")


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

    Members are whatever the caller stacks: models, or (model, view) pairs.
    """

    #: How :attr:`weights_` combine members (see :data:`weights_search.functional.FUSIONS`).
    fusion: ClassVar[str] = MIXTURE

    weights_: np.ndarray
    train_score_: float
    tau_: float | None = None
    log_prior_: np.ndarray | None = None

    @abstractmethod
    def fit(self: B, log_probs: np.ndarray, labels: np.ndarray, prior: LogitAdjustment | None = None) -> B:
        """Fit ``weights_`` (and ``tau_`` with a prior) on ``(M, N, C)`` member log-probabilities
        and ``(N,)`` labels."""

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


class MixtureBlender(Blender):
    """A method whose weights mix member probabilities (:data:`~weights_search.functional.MIXTURE`).

    Subclasses implement :meth:`_fit_scores`, the weights for one
    :class:`~weights_search.prior.MixtureScores`; :meth:`fit` calls it once without a prior,
    and with one through :meth:`_fit_prior`, by default
    :func:`~weights_search.prior.fit_mixture_prior`, which corrects the log of the fused
    probabilities and fits ``tau`` in turns with the weights.
    """

    fusion = MIXTURE

    def fit(self, log_probs: np.ndarray, labels: np.ndarray, prior: LogitAdjustment | None = None) -> "MixtureBlender":
        log_probs, labels = check_members(log_probs, labels)
        self.tau_ = self.log_prior_ = None
        if prior is None:
            self._fit_scores(MixtureScores(log_probs, labels, true_class_log_probs(log_probs, labels)), None)
            return self
        prior.check(log_probs.shape[2])
        tau = self._fit_prior(MixturePrior(log_probs, labels, prior.log_prior), prior.tau)
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
