"""What every blend method is: a scikit-learn-shaped estimator over member log-probabilities."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np

from weights_search.functional import MIXTURE, fuse

B = TypeVar("B", bound="Blender")


class Blender(ABC):
    """Learns one weight per member from labelled validation outputs.

    ``fit(log_probs, labels)`` takes per-member log-softmax ``(M, N, C)`` (float16 or float32;
    apply temperatures before, see :func:`weights_search.functional.log_softmax`) and integer
    labels ``(N,)``, and returns ``self`` with:

    - ``weights_``: ``(M,)`` float64, non-negative; combined with :attr:`fusion` by
      :func:`weights_search.functional.fuse`;
    - ``train_score_``: the objective the method minimises, on the rows it was fitted on (lower
      is better; each method's docstring names it).

    Members are whatever the caller stacks: models, or (model, view) pairs.
    """

    #: How :attr:`weights_` combine members (see :data:`weights_search.functional.FUSIONS`).
    fusion: ClassVar[str] = MIXTURE

    weights_: np.ndarray
    train_score_: float

    @abstractmethod
    def fit(self: B, log_probs: np.ndarray, labels: np.ndarray) -> B:
        """Fit ``weights_`` on ``(M, N, C)`` member log-probabilities and ``(N,)`` labels."""

    def predict_log_proba(self, log_probs: np.ndarray) -> np.ndarray:
        """Blended class log-probabilities ``(n, C)`` float32 of ``(M, n, C)`` member log-probabilities."""
        if not hasattr(self, "weights_"):
            raise ValueError(f"{type(self).__name__} is not fitted yet: call fit first")
        return fuse(log_probs, self.weights_, self.fusion)

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments, defaults included (to record with the weights)."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def check_solver_options(max_iter: int, tol: float) -> None:
    """Shared argument checks of the methods fitted by an iterative scipy solver."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
