"""The compute of one decoded batch, the same whatever schedules it.

An engine (:class:`LocalEngine` here; others may run the same pieces elsewhere) turns batches of
image paths into :class:`BatchOutput` s: it decodes each batch once (:mod:`ensemble.inference.decode`)
and hands the decoded arrays to a :class:`Forward`, which runs every model that needs the batch
on each of its TTA views and merges them. What an engine may not change: the view plan
(:func:`view_groups`), the batch shapes (``batch_size`` images per forward pass, the last batch
padded) and the merge, so that every engine writes the same stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ensemble.inference.decode import DecodedBatch, Decoder
from ensemble.inference.runtime import Model, Runner
from ensemble.inference.tta import Geometry, View, geometries, hflip, merge, view_size


@dataclass(frozen=True)
class ViewGroup:
    """A model's views sharing one input size (one forward pass each)."""

    size: int
    members: tuple[tuple[Geometry, bool], ...]  # (geometry, flipped) per view
    rows: tuple[int, ...]  # the views' indices in the model's view list


def view_groups(model: Model, views: Sequence[View]) -> tuple[ViewGroup, ...]:
    """``model``'s views grouped by input size, in the order of ``views``."""
    pre = model.preprocess
    geos = geometries(pre, views)
    by_size: dict[int, list[int]] = {}
    for i, view in enumerate(views):
        by_size.setdefault(view_size(pre, view), []).append(i)
    return tuple(
        ViewGroup(size, tuple((geos[i], views[i].flip) for i in rows), tuple(rows))
        for size, rows in by_size.items()
    )


def run_geometries(groups: Iterable[Sequence[ViewGroup]]) -> tuple[Geometry, ...]:
    """The geometries a decode must produce for models with these view groups, each once."""
    return tuple(dict.fromkeys(g for model_groups in groups for group in model_groups for g, _ in group.members))


@dataclass(eq=False)
class ModelPass:
    """One model ready to run: its session and its views grouped by input size."""

    model: Model
    runner: Runner
    groups: tuple[ViewGroup, ...]


@dataclass(frozen=True)
class ModelOutput:
    """One model's results for the real rows of one batch.

    ``scores``: merged, ``(count, classes)``; ``views``: ``(views, count, classes)``, the
    per-view logits before merging; ``seconds``: time inside the model's session.
    """

    scores: np.ndarray
    views: np.ndarray
    seconds: float


@dataclass(frozen=True)
class BatchOutput:
    """A batch's results: where it starts in the split, its real rows, the images that could
    not be read ``(row, reason)``, the decodes it took, and each model's :class:`ModelOutput`
    by model name (only the models that needed the batch)."""

    start: int
    count: int
    bad: tuple[tuple[int, str], ...]
    decodes: int
    models: Mapping[str, ModelOutput] = field(default_factory=dict)


class Forward:
    """Runs models on decoded batches: every view, one forward pass per view, then the merge.

    Mirrored views are made once per batch and geometry and shared by the models with the same
    preprocessing. One instance per engine worker; not thread-safe.
    """

    def __init__(self, merge_mode: str):
        self.merge_mode = merge_mode
        self._buffers: dict[Geometry, np.ndarray] = {}
        self._filled: set[Geometry] = set()

    def __call__(self, decoded: DecodedBatch, passes: Sequence[ModelPass]) -> BatchOutput:
        self._filled.clear()
        models = {item.model.name: self._model(item, decoded) for item in passes}
        return BatchOutput(decoded.start, decoded.count, tuple(decoded.bad), decoded.decodes, models)

    def _model(self, item: ModelPass, decoded: DecodedBatch) -> ModelOutput:
        count = decoded.count
        outputs: list[np.ndarray | None] = [None] * sum(len(g.rows) for g in item.groups)
        seconds = 0.0
        for group in item.groups:
            for (geo, flipped), row in zip(group.members, group.rows):
                view = self._view(geo, flipped, decoded)
                tick = time.perf_counter()
                logits = item.runner(view)
                seconds += time.perf_counter() - tick
                outputs[row] = logits[:count]
        per_view = np.stack(outputs)  # (views, count, classes)
        return ModelOutput(merge(per_view, self.merge_mode), per_view, seconds)

    def _view(self, geo: Geometry, flipped: bool, decoded: DecodedBatch) -> np.ndarray:
        """One view of the batch, ``(batch, size, size, 3)``: the decoded array itself, or its
        mirror image, made once per batch for every model that shares the geometry."""
        source = decoded.arrays[geo]
        if not flipped:
            return source
        if geo not in self._filled:
            mirrored = self._buffers.get(geo)
            if mirrored is None:
                mirrored = self._buffers[geo] = np.empty_like(source)
            np.copyto(mirrored, hflip(source))
            self._filled.add(geo)
        return self._buffers[geo]


class LocalEngine:
    """This machine: a :class:`Decoder` (worker processes, shared memory) feeding one
    :class:`Forward` in this process, batch after batch, in order."""

    name = "local"

    def __init__(self, decoder: Decoder, passes: Sequence[ModelPass], merge_mode: str):
        self.decoder = decoder
        self.passes = {item.model.name: item for item in passes}
        self.forward = Forward(merge_mode)

    @property
    def workers(self) -> int:
        return self.decoder.workers

    @property
    def waited(self) -> float:
        """Seconds spent waiting for decoded batches so far (large: decoding is the bottleneck)."""
        return self.decoder.waited

    def run(self, batches: Iterable[tuple[int, Sequence[str]]],
            needs: Callable[[int], Sequence[str]]) -> Iterator[BatchOutput]:
        """``(start row, paths)`` batches -> their outputs, in order; ``needs(start)`` names the
        models that lack the batch."""
        for decoded in self.decoder.map(batches):
            yield self.forward(decoded, [self.passes[name] for name in needs(decoded.start)])
