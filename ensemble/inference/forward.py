"""The compute of one decoded batch, the same whatever schedules it, and the plan it runs.

An engine (:mod:`ensemble.inference.engine`: the local one, the Ray one) turns batches of image
paths into :class:`~ensemble.inference.engine.BatchOutput` s: it decodes each batch once
(:mod:`ensemble.inference.decode`, the geometries and sources of :func:`decode_needs`), opens
every model's sessions with :func:`open_passes` and hands the decoded arrays to a
:class:`Forward`, which runs every model that needs the batch on each of its TTA views and
merges them. What an engine may not change: the view plan (:func:`view_groups`), the batch
shapes (``batch_size`` images per forward pass, the last batch padded) and the merge, so that
every engine writes the same stores.

A model with cam views (:class:`CamPlan`) runs them inside :class:`Forward` too: its identity
view's pass also returns the class activation map, from which each image's box is found
(:func:`ensemble.inference.cam.cam_box`), cut from the batch's :class:`~ensemble.inference.decode.CropSource`,
resized to the model's input and classified in one more pass per cam view; the boxes travel in
:attr:`~ensemble.inference.engine.ModelOutput.boxes`. The rows of a batch are resized on a few
threads (Pillow lets go of the GIL while it resamples), while the sessions wait for the crops.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from PIL import Image

from ensemble.inference.cam import CamSettings, cam_box, to_image
from ensemble.inference.decode import RESAMPLE, CropSource, DecodedBatch
from ensemble.inference.engine import BatchOutput, InferOptions, ModelOutput, cam_settings
from ensemble.inference.runtime import GpuOptions, Model, Runner, cpu_threads
from ensemble.inference.tta import CamSource, Geometry, View, cam_source, geometries, hflip, merge, view_size


#: The most logits (views x rows x classes) merged at once: the merge's float64 copies and
#: temporaries (up to ~60 bytes a logit for ``mean-probs``) stay within about 64 MB whatever
#: ``--batch-size`` and the classes. Rows merge apart with the same values (:func:`merge_rows`).
MERGE_LOGITS = 1 << 20
#: The most threads resizing one batch's cam crops. While they work the sessions wait for them,
#: but the decoding processes share the cores; at 8 a batch of 32 (the default) is 4 rows a
#: thread already, and more threads would mostly take cores from the decoding.
CROP_THREADS = 8


@dataclass(frozen=True)
class ViewGroup:
    """A model's views sharing one input size (one forward pass each)."""

    size: int
    members: tuple[tuple[Geometry, bool], ...]  # (geometry, flipped) per view
    rows: tuple[int, ...]  # the views' indices in the model's view list


def view_groups(model: Model, views: Sequence[View], cam: CamSettings = CamSettings()) -> tuple[ViewGroup, ...]:
    """``model``'s views grouped by input size, in the order of ``views``; cam views are not in
    them (see :func:`cam_plan`), but their needs shape the decode (``cam.min_size``)."""
    pre = model.preprocess
    geos = geometries(pre, views, cam.min_size)
    by_size: dict[int, list[int]] = {}
    for i, view in enumerate(views):
        if not view.cam:
            by_size.setdefault(view_size(pre, view), []).append(i)
    return tuple(
        ViewGroup(size, tuple((geos[i], views[i].flip) for i in rows), tuple(rows))
        for size, rows in by_size.items()
    )


def run_geometries(groups: Iterable[Sequence[ViewGroup]]) -> tuple[Geometry, ...]:
    """The geometries a decode must produce for models with these view groups, each once."""
    return tuple(dict.fromkeys(g for model_groups in groups for group in model_groups for g, _ in group.members))


@dataclass(frozen=True)
class CamPlan:
    """A model's cam views: where their crops come from, how their boxes are found, and their
    rows in the model's view list (``flips``: whether each is mirrored)."""

    source: CamSource
    settings: CamSettings
    size: int  # the model's input side: the crops are resized to it
    rows: tuple[int, ...]
    flips: tuple[bool, ...]


def cam_plan(model: Model, views: Sequence[View], cam: CamSettings = CamSettings()) -> CamPlan | None:
    """``model``'s :class:`CamPlan`, or ``None`` when ``views`` hold no cam view. Identity is
    ``views[0]`` (:func:`~ensemble.inference.tta.plan_views`): its pass gives the maps."""
    rows = tuple(i for i, view in enumerate(views) if view.cam)
    if not rows:
        return None
    pre = model.preprocess
    return CamPlan(cam_source(pre, views, cam.min_size), cam, pre.input_size, rows,
                   tuple(views[i].flip for i in rows))


def run_sources(plans: Iterable[CamPlan | None]) -> tuple[CamSource, ...]:
    """The cam sources a decode must produce for models with these plans, each once."""
    return tuple(dict.fromkeys(plan.source for plan in plans if plan is not None))


@dataclass(eq=False)
class ModelPass:
    """One model ready to run: its session (``None`` in a driver whose sessions live in its
    workers) and its views grouped by input size."""

    model: Model
    runner: Runner | None
    groups: tuple[ViewGroup, ...]
    cam: CamPlan | None = None


class Forward:
    """Runs models on decoded batches: every view, one forward pass per view, then the merge.

    Mirrored views are made once per batch and geometry and shared by the models with the same
    preprocessing. One instance per engine worker; not thread-safe.

    ``threads``: the threads resizing a batch's cam crops (default: the cores this process may
    use, at most :data:`CROP_THREADS`; 1 resizes in the calling thread). They are started with
    the first batch that needs them and stopped by :meth:`close` (or leaving a ``with`` block);
    a batch after that starts them again.
    """

    def __init__(self, merge_mode: str, threads: int | None = None):
        self.merge_mode = merge_mode
        self.threads = max(1, min(cpu_threads(), CROP_THREADS) if threads is None else threads)
        self._buffers: dict[Geometry, np.ndarray] = {}
        self._filled: set[Geometry] = set()
        self._crops: dict[tuple[int, int], np.ndarray] = {}  # (batch, size) -> the crop batch, reused
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the crop threads (after the rows they are resizing)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Threads do not pickle: a copy starts its own when it needs them.
        return {**self.__dict__, "_pool": None}

    def __call__(self, decoded: DecodedBatch, passes: Sequence[ModelPass]) -> BatchOutput:
        self._filled.clear()
        models = {item.model.name: self._model(item, decoded) for item in passes}
        return BatchOutput(decoded.start, decoded.count, tuple(decoded.bad), decoded.decodes, models)

    def _model(self, item: ModelPass, decoded: DecodedBatch) -> ModelOutput:
        count = decoded.count
        plan = item.cam
        views = sum(len(g.rows) for g in item.groups) + (len(plan.rows) if plan else 0)
        per_view: np.ndarray | None = None  # (views, count, classes) float32, filled pass by pass

        def put(row: int, logits: np.ndarray) -> None:
            nonlocal per_view
            if per_view is None:
                per_view = np.empty((views, count, logits.shape[1]), np.float32)
            per_view[row] = logits[:count]

        seconds = 0.0
        maps = None
        for group in item.groups:
            for (geo, flipped), row in zip(group.members, group.rows):
                view = self._view(geo, flipped, decoded)
                tick = time.perf_counter()
                if plan is not None and row == 0:
                    logits, maps = item.runner.with_cam(view)
                else:
                    logits = item.runner(view)
                seconds += time.perf_counter() - tick
                put(row, logits)
        boxes = None
        if plan is not None:
            crops, boxes = self.cam_crops(plan, decoded, maps)
            for flipped, row in zip(plan.flips, plan.rows):
                view = np.ascontiguousarray(hflip(crops)) if flipped else crops
                tick = time.perf_counter()
                logits = item.runner(view)
                seconds += time.perf_counter() - tick
                put(row, logits)
        return ModelOutput(merge_rows(per_view, self.merge_mode), per_view, seconds, boxes)

    def cam_crops(self, plan: CamPlan, decoded: DecodedBatch, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cam crops of a batch, uint8 ``(batch, size, size, 3)`` (zeros for padding and bad
        rows), and the boxes of its real rows, float32 ``(count, 4)``. ``maps``: the identity
        pass's ``(batch, h, w)`` class activation maps."""
        source: CropSource = decoded.sources[plan.source]
        batch = maps.shape[0]
        crops = self._crops.get((batch, plan.size))
        if crops is None:
            crops = self._crops[batch, plan.size] = np.empty((batch, plan.size, plan.size, 3), np.uint8)
        crops[:] = 0
        boxes = np.zeros((decoded.count, 4), np.float32)
        bad = {row for row, _ in decoded.bad}
        resample = RESAMPLE[plan.source.geometry.interpolation]

        def crop(row: int) -> None:  # writes row ``row`` of crops and boxes, nothing else
            height, width = (int(v) for v in source.shapes[row])
            box = cam_box(maps[row], height, width, plan.settings)
            region = Image.fromarray(source.pixels[row, :height, :width])
            crops[row] = np.asarray(region.resize((plan.size, plan.size), resample, box=box))
            boxes[row] = to_image(box, height, width, source.regions[row])

        rows = [row for row in range(decoded.count) if row not in bad]
        if self.threads == 1 or len(rows) < 2:
            for row in rows:
                crop(row)
        else:
            # list(): every row done before the crops are read; a row's exception raised here.
            list(self._crop_pool().map(crop, rows))
        return crops, boxes

    def _crop_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ens-crop")
        return self._pool

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


def merge_rows(per_view: np.ndarray, mode: str, most: int | None = None) -> np.ndarray:
    """:func:`~ensemble.inference.tta.merge` of ``(views, rows, classes)`` logits, a few rows at
    a time (at most ``most`` logits, default :data:`MERGE_LOGITS`; at least one row): each row
    merges on its own (reductions over its views and its classes only), so the scores equal one
    merge of them all, byte for byte, while the merge's float64 temporaries stay bounded."""
    most = MERGE_LOGITS if most is None else most
    views, rows, classes = per_view.shape
    step = max(1, most // max(1, views * classes))
    if step >= rows:
        return merge(per_view, mode)
    scores = np.empty((rows, classes), np.float64)
    for lo in range(0, rows, step):
        scores[lo:lo + step] = merge(per_view[:, lo:lo + step], mode)
    return scores


def make_forward(options: InferOptions) -> Forward:
    """The compute of one decoded batch for these options; every engine builds its own here."""
    return Forward(options.merge)


def open_passes(models: Sequence[Model], views: Sequence[View], options: InferOptions, device: str,
                gpu: GpuOptions, sessions: bool = True) -> list[ModelPass]:
    """Open every model's session on ``device``, with its views grouped by input size; every
    engine opens its sessions here (in this process, or in each of its workers). ``sessions=False``:
    the plan alone (``runner`` is ``None``), for a driver whose sessions live in its workers."""
    passes = []
    cam = cam_settings(options)
    for model in models:
        groups = view_groups(model, views, cam)
        sizes = [group.size for group in groups]
        runner = Runner(model, device, gpu, images=options.batch_size, sizes=sizes) if sessions else None
        if device != "cpu" and runner is not None:
            runner.warm_up(options.batch_size, sizes)  # before the first rate: cuDNN picks algorithms per shape
        passes.append(ModelPass(model, runner, groups, cam_plan(model, views, cam)))
    return passes


def decode_needs(models: Sequence[Model], views: Sequence[View], options: InferOptions) -> dict:
    """What every engine's decode must produce for these models: ``{"geometries": ...,
    "sources": ...}``, each once (the keyword arguments of :class:`~ensemble.inference.decode.Decoder`
    and :func:`~ensemble.inference.decode.decode_batch`)."""
    cam = cam_settings(options)
    return {"geometries": run_geometries(view_groups(m, views, cam) for m in models),
            "sources": run_sources(cam_plan(m, views, cam) for m in models)}
