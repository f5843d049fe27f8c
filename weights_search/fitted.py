"""A fitted blend as data, fitting one on the whole validation split, and fusing large splits in chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from weights_search.functional import FUSIONS, check_members, fuse, log_softmax
from weights_search.prior import LogitAdjustment, adjust
from weights_search.registry import DEFAULT_METHOD, get_method
from weights_search.temperature import fit_temperatures


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

    def log_proba(self, logits: np.ndarray) -> np.ndarray:
        """Blended class log-probabilities ``(n, C)`` float32 of member logits ``(M, n, C)``,
        corrected for the prior when the blend has one."""
        fused = fuse(log_softmax(logits, self.temperatures), np.asarray(self.weights), self.fusion)
        return fused if self.tau is None else adjust(fused, np.asarray(self.log_prior), self.tau)


def fit_blend(logits: np.ndarray, labels: np.ndarray, method: str = DEFAULT_METHOD,
              params: Mapping[str, Any] | None = None, *, temperature: bool = False,
              prior: LogitAdjustment | None = None) -> FittedBlend:
    """Fit temperatures (when ``temperature``) and then ``method``'s weights on all labelled rows,
    with ``tau`` when ``prior`` asks for it fitted.

    ``logits``: ``(M, N, C)`` member logits (float16 or float32); ``labels``: ``(N,)``.
    """
    logits, labels = check_members(logits, labels)
    blender = get_method(method, **dict(params or {}))
    temperatures = fit_temperatures(logits, labels) if temperature else None
    blender.fit(log_softmax(logits, temperatures), labels, prior)
    return FittedBlend(method=method, fusion=blender.fusion, weights=tuple(float(w) for w in blender.weights_),
                       temperatures=None if temperatures is None else tuple(float(t) for t in temperatures),
                       params=blender.params, train_score=blender.train_score_,
                       log_prior=None if prior is None else tuple(float(v) for v in prior.log_prior),
                       tau=blender.tau_)


def blend_chunks(members: Sequence[np.ndarray], blend: FittedBlend, chunk_rows: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """Fuse a split chunk by chunk: yields ``(first row, (n, C) float32 log-probs)`` in row order.

    ``members``: one ``(N, C)`` array per member, in the blend's member order; memory-mapped
    float16 stores work as they are, since only ``chunk_rows`` rows of each are read at a time
    (memory stays about ``M * chunk_rows * C`` float32 values, whatever ``N``).
    """
    if len(members) != len(blend.weights):
        raise ValueError(f"{len(members)} members for a blend of {len(blend.weights)}")
    shapes = {np.shape(m) for m in members}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"members must all be (n_samples, n_classes) arrays of one shape, got {sorted(shapes)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    n_rows = next(iter(shapes))[0]
    for start in range(0, n_rows, chunk_rows):
        yield start, blend.log_proba(np.stack([m[start:start + chunk_rows] for m in members]))
