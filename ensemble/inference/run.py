"""`ens infer`: many models, test-time augmentation, one logit store per (model, split).

The run, for each split::

    split rows --chunks--> batches --Decoder (workers, prefetch)--> arrays per geometry
        --> for each model: one forward pass per view (batch_size images: --batch-size bounds
            every pass, whatever the views) --> (views, batch, classes)
        --> merge --> chunk files --> (at the end) logits.npy, ids.npy, manifest.json

Each image is decoded once per run, whatever the number of models and views (the arrays of
the one decode are keyed by geometry, and models with equal preprocessing share them). Batches
have a fixed shape: ``batch_size`` images, the last one padded. Chunks are ``chunk_size`` rows
(a multiple of the batch size, so batches never straddle chunks and an image always shares its
batch with the same images); a killed run resumes at the first chunk some model lacks and ends
with the same bytes as an uninterrupted one (see :mod:`ensemble.formats.store`). The arrays are
the same bytes at any chunk size, so a complete store is kept whatever chunk size a run derives
from ``--memory``; with ``--chunk-size`` left out, the chunks of an interrupted run resume at
their own size (:meth:`_SplitRun._resumed_chunk`).

Unreadable images (missing, empty, truncated, not an image) stop the run by default, naming the
image; with ``on_bad_image="skip"`` they get no row in the store and are listed in its manifest.
Progress goes to a callback as :class:`~ensemble.inference.engine.Event` s; presenting it is
the caller's business.

This module is the split loop: it opens an engine (:func:`engine_opener`: the local one,
:mod:`ensemble.inference.local`, or Ray's, :mod:`ensemble.inference.ray_engine`, both
implementing :mod:`ensemble.inference.engine`'s contract) and writes what it returns.

Decoding processes come from a fork server, so a script that calls :func:`infer` with workers
needs the usual ``if __name__ == "__main__":`` guard around its entry point.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ensemble import __version__
from ensemble.errors import EnsError
from ensemble.formats.dataset import Split, check_store_name
from ensemble.formats.common import read_json
from ensemble.formats.store import (DTYPES, PARTIAL, DatasetRecord, ModelRecord, RunFigures, StoreManifest,
                                    StoreWriter, TtaRecord, complete_key, infer_command, keeps, read_manifest_json,
                                    read_store, recorded_model, store_path, to_dtype)
from ensemble.inference.cam import CamSettings
from ensemble.formats.image import is_jpeg
from ensemble.inference.decode import PIXELS, PREFETCH_BYTES, QUEUE_SHARE, queue_budget
from ensemble.inference.engine import (CAM_OPTIONS, BatchOutput, Engine, EngineOpener, Event, cam_settings,
                                       gpu_options)
from ensemble.inference import forward
from ensemble.inference.forward import ModelPass
from ensemble.inference.local import open_local_engine
from ensemble.inference.options import DEFAULT_CHUNK_SIZE, InferOptions, option_flag
from ensemble.inference.runtime import Model, check_gpu_options, device_choices, load_model
from ensemble.inference.tta import View, merge_mode, plan_views, view_size
from ensemble.memory import GIB, MIN_GIB, memory_budget

BAD_IMAGE_POLICIES = ("fail", "skip")
#: ``--engine``: this machine (:mod:`ensemble.inference.local`) or a Ray cluster
#: (:mod:`ensemble.inference.ray_engine`, the optional extra ``ray``).
ENGINES = ("local", "ray")
#: The options a store's command repeats when they are not :class:`InferOptions`' defaults, in
#: the command's order, each as its flag (:func:`option_flag`; a bool as the flag alone).
#: ``--tta`` and ``--scales``, the cam options, the engine, the device, ``--out``, ``--name`` and
#: a foreign model's preprocessing follow rules of their own (see :func:`recorded_arguments`).
REPEATED_OPTIONS = ("merge", "batch_size", "chunk_size", "dtype", "on_bad_image", "keep_views")


@dataclass(frozen=True)
class StoreResult:
    """One store of the run. ``computed`` is False when it was already complete."""

    model: Path
    split: str
    path: Path
    rows: int
    classes: int
    skipped: int
    computed: bool
    images_per_s: float | None


@dataclass(frozen=True)
class InferResult:
    device: str
    provider: str
    workers: int
    stores: tuple[StoreResult, ...]
    decodes: int  #: image files decoded by this run
    seconds: float


#: Bytes a merge's float64 copies and temporaries take per logit (``mean-probs``, the most:
#: measured about 60); :data:`~ensemble.inference.forward.MERGE_LOGITS` logits merge at once.
MERGE_BYTES = 64


@dataclass(frozen=True)
class LogitMemory:
    """What a run's logits hold at once, in bytes: ``row`` per image of a chunk (every model's
    merged scores, kept views and cam box, in the stored dtype: the chunk buffers, filled batch
    by batch), and ``batch``: one batch's outputs of every model (float32 views, float64
    scores), one model's conversion to the stored dtype, and a merge's temporaries. A chunk of
    ``n`` images needs ``n * row + batch``; nothing grows with the split's rows."""

    row: int
    batch: int

    def need(self, chunk: int) -> int:
        return chunk * self.row + self.batch


def logit_memory(models: Sequence[Model], views: Sequence[View], options: InferOptions) -> LogitMemory:
    """The :class:`LogitMemory` of these models and views with these options (dtype,
    ``--keep-views``, ``--batch-size``)."""
    classes = [m.metadata.num_classes for m in models]
    itemsize = np.dtype(options.dtype).itemsize
    stored = 1 + (len(views) if options.keep_views else 0)
    box = 16 if any(v.cam for v in views) else 0
    batch, count = options.batch_size, len(views)
    held = batch * sum(c * (4 * count + 8) for c in classes)  # every model's BatchOutput
    # One model at a time: its pass's output, the finite check's mask, its scores converted and,
    # kept, the clipped float32 copy of its views and their stored dtype.
    kept = 4 + itemsize if options.keep_views else 0
    converting = batch * max(classes) * (count * (1 + kept) + 4 + 8 + itemsize)
    merging = min(forward.MERGE_LOGITS, batch * count * max(classes)) * MERGE_BYTES
    return LogitMemory(row=sum(c * itemsize * stored + box for c in classes), batch=held + converting + merging)


def default_chunk_size(batch_size: int) -> int:
    """:data:`~ensemble.inference.options.DEFAULT_CHUNK_SIZE` rounded up to whole batches."""
    return -(-DEFAULT_CHUNK_SIZE // batch_size) * batch_size


@dataclass(frozen=True)
class ChunkRoom:
    """Where a run's chunks must fit: ``usage`` of its models and views, ``budget`` the bytes
    ``memory`` (of ``--memory``) leaves beside the decoded batches, ``fit`` the most images of
    whole batches a chunk may have, and the words a message names them with."""

    usage: LogitMemory
    memory: int
    budget: int
    fit: int
    what: str
    room: str

    def fits(self, chunk: int) -> bool:
        return self.usage.need(chunk) <= self.budget

    def memory_for(self, chunk: int) -> float:
        """The least ``--memory`` in GiB (two decimals, at least the option's minimum) whose
        budget holds chunks of ``chunk`` images."""
        need = self.usage.need(chunk)
        # memory - min(PREFETCH_BYTES, memory * QUEUE_SHARE) >= need
        least = need / (1 - QUEUE_SHARE)
        if least * QUEUE_SHARE > PREFETCH_BYTES:
            least = need + PREFETCH_BYTES
        return max(MIN_GIB, math.ceil(least * 100 / GIB) / 100)


def chunk_room(models: Sequence[Model], views: Sequence[View], options: InferOptions, memory: int) -> ChunkRoom:
    """The :class:`ChunkRoom` of these models and views with these options under ``memory``."""
    batch = options.batch_size
    usage = logit_memory(models, views, options)
    budget = memory - queue_budget(memory)
    fit = max(0, budget - usage.batch) // usage.row // batch * batch
    what = (f"{len(models)} model{'s' if len(models) > 1 else ''} x {len(views)} view{'s' if len(views) > 1 else ''}"
            f"{' kept' if options.keep_views else ''} x {max(m.metadata.num_classes for m in models)} classes")
    room = (f"the {_size(budget)} that --memory {memory / GIB:g} GiB leaves beside the decoded images "
            "(--memory, else ENS_MEMORY, else 1/8 of physical memory)")
    return ChunkRoom(usage, memory, budget, fit, what, room)


def chunk_size(models: Sequence[Model], views: Sequence[View], options: InferOptions, memory: int) -> int:
    """The images of a chunk: ``--chunk-size`` rounded up to whole batches, or left out,
    :func:`default_chunk_size` or fewer whole batches where the chunk buffers of every model
    would not fit ``memory`` less the decoded batches' share
    (:func:`~ensemble.inference.decode.queue_budget`). One line naming both when a given
    chunk, or a single batch, cannot fit. (Left out, a split whose stores have chunks of an
    interrupted run resumes at their size instead, where it fits: see :class:`_SplitRun`.)"""
    batch = options.batch_size
    space = chunk_room(models, views, options, memory)
    usage, budget, fit, what, room = space.usage, space.budget, space.fit, space.what, space.room
    if fit < batch:
        raise EnsError(f"--batch-size {batch}: one chunk of a batch ({what}) needs about "
                       f"{_size(usage.need(batch))} of logits, over {room}; give a smaller --batch-size, or a "
                       "larger --memory")
    if options.chunk_size is None:
        return min(default_chunk_size(batch), fit)
    chunk = -(-options.chunk_size // batch) * batch
    if usage.need(chunk) > budget:
        raise EnsError(f"--chunk-size {options.chunk_size}: a chunk ({what}) needs about {_size(usage.need(chunk))} "
                       f"of logits, over {room}; give --chunk-size {fit} or less, or a larger --memory "
                       "(or leave --chunk-size out: it then follows --memory)")
    return chunk


@dataclass
class _Chunk:
    """One model's rows of one chunk, filled batch by batch in the stored dtype: merged scores
    ``(rows, classes)``, kept views ``(views, rows, classes)`` and cam boxes ``(rows, 4)``."""

    scores: np.ndarray
    views: np.ndarray | None = None
    boxes: np.ndarray | None = None

    @classmethod
    def empty(cls, rows: int, classes: int, views: int, dtype: str, keep_views: bool, boxes: bool) -> _Chunk:
        return cls(np.empty((rows, classes), dtype), np.empty((views, rows, classes), dtype) if keep_views else None,
                   np.zeros((rows, 4), np.float32) if boxes else None)


def recorded_arguments(model: Model, options: InferOptions, device: str) -> dict[str, Any]:
    """The options of the `ens infer` command that makes exactly the store of ``model`` with
    these options, beside the model file and the split: a store's ``arguments``, by
    :data:`~ensemble.formats.store.INFER_ARGUMENTS` name, as JSON values."""
    values: dict[str, Any] = {}
    defaults = InferOptions()
    if options.tta:
        values["tta"] = list(options.tta)
        if "scale" in options.tta and tuple(options.scales) != tuple(defaults.scales):
            values["scales"] = [float(s) for s in options.scales]
    for name in REPEATED_OPTIONS:
        value = getattr(options, name)
        if name == "chunk_size":  # the chunk the run used, where it is not the default's
            if value is not None and value != default_chunk_size(options.batch_size):
                values[name] = value
        elif value != getattr(defaults, name):
            values[name] = value
    if "cam" in options.tta:
        cam, default_cam = cam_settings(options), CamSettings()
        for name, setting in CAM_OPTIONS.items():  # the settings' values, given or default
            if getattr(cam, setting) != getattr(default_cam, setting):
                values[name] = float(getattr(cam, setting))
    if options.engine != defaults.engine:
        values["engine"] = options.engine
        if options.ray_address is not None:
            values["ray_address"] = options.ray_address
    values["device"] = device
    values["out"] = str(options.out)
    if options.name is not None:
        values["name"] = options.name
    if model.foreign:  # the values the model ran with, for the options that were given
        meta, given = model.metadata, options.foreign
        values["input_size"] = meta.input_size
        if given.mean is not None:
            values["mean"] = [float(v) for v in meta.mean]
            values["std"] = [float(v) for v in meta.std]
        if given.resize is not None:
            values["resize"] = meta.resize
        if given.crop_pct is not None:
            values["crop_pct"] = float(meta.crop_pct)
    return values


def finishing_command(model: Model, split: Split, options: InferOptions, device: str) -> str:
    """The `ens infer` command that makes exactly the store of ``model`` on ``split`` with these
    options: the one to rerun to finish it after an interruption."""
    return infer_command(str(model.path), split.name, str(split.source), recorded_arguments(model, options, device))


def _check_options(options: InferOptions) -> None:
    merge_mode(options.merge)
    if "cam" not in options.tta:
        for name in CAM_OPTIONS:
            if getattr(options, name) is not None:
                raise EnsError(f"{option_flag(name)} is for the cam view; add cam to --tta")
    cam_settings(options).check()
    if options.device not in device_choices():
        raise EnsError(f"--device {options.device}: choose from {', '.join(device_choices())}")
    if options.on_bad_image not in BAD_IMAGE_POLICIES:
        raise EnsError(f"--on-bad-image {options.on_bad_image}: choose from {', '.join(BAD_IMAGE_POLICIES)}")
    if options.dtype not in DTYPES:
        raise EnsError(f"--dtype {options.dtype}: choose from {', '.join(DTYPES)}")
    if options.batch_size < 1:
        raise EnsError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.workers is not None and options.workers < 0:
        raise EnsError(f"--workers {options.workers}: must be 0 (decode in this process) or more")
    if options.chunk_size is not None and options.chunk_size < 1:
        raise EnsError(f"--chunk-size {options.chunk_size}: must be at least 1")
    if options.engine not in ENGINES:
        raise EnsError(f"--engine {options.engine}: choose from {', '.join(ENGINES)}")
    if options.ray_address is not None and options.engine != "ray":
        raise EnsError("--ray-address is for --engine ray")
    if options.name is not None:
        check_store_name(options.name, "--name")
    check_gpu_options(gpu_options(options))


def _load_models(paths: Sequence[Path], options: InferOptions, views: Sequence[View]) -> list[Model]:
    if not paths:
        raise EnsError("no model given")
    if options.name is not None and len(paths) > 1:
        raise EnsError(f"--name {options.name}: names the store of one model, but {len(paths)} are given; "
                       "run each model on its own with its --name")
    models = [load_model(p, options.foreign) for p in paths]
    stems: dict[str, Path] = {}
    for model in models:
        if options.name is None:
            try:
                check_store_name(model.name, f"model file {model.path}:")
            except EnsError as exc:
                raise EnsError(f"{exc}; or give its store another name with --name NAME") from None
        if model.name in stems:
            raise EnsError(f"{model.path} and {stems[model.name]} would share the store folder "
                           f"{model.name!r}; rename one, or run each on its own with --name NAME "
                           "(the store's folder name instead of the file's stem)")
        stems[model.name] = model.path
    if options.foreign.given and not any(m.foreign for m in models):
        raise EnsError("--input-size, --mean, --std, --resize and --crop-pct are for ONNX files "
                       "without ens metadata; every model given has its own")
    for model in models:
        if any(v.cam for v in views) and model.metadata.cam is None:
            raise EnsError(f"{model.path}: has no cam output (a class activation map), so --tta cam cannot "
                           "run on it; export it again with this ens (its head must be global average pooling "
                           "+ one linear layer), or drop cam from --tta")
        sizes = sorted({view_size(model.preprocess, v) for v in views})
        if not model.metadata.dynamic_size and sizes != [model.metadata.input_size]:
            raise EnsError(f"{model.path}: takes only {model.metadata.input_size} px inputs, but the TTA "
                           f"views need {', '.join(map(str, sizes))} px; drop scale from --tta")
    return models


def infer(models: Sequence[str | Path], splits: Sequence[Split], options: InferOptions = InferOptions(),
          progress: Callable[[Event], None] | None = None) -> InferResult:
    """Run every model on every split with TTA and write their logit stores under ``options.out``.

    Raises :class:`EnsError` for bad options, models or images (see the module docstring).
    """
    start = time.perf_counter()
    report = progress or (lambda event: None)
    _check_options(options)
    views = plan_views(options.tta, options.scales)
    opened_models = _load_models([Path(p) for p in models], options, views)
    _check_owners(opened_models, splits, options)

    memory = memory_budget() if options.memory is None else options.memory
    chunk = chunk_size(opened_models, views, options, memory)
    # --chunk-size left out: a split's chunks of an interrupted run resume at their own size.
    room = chunk_room(opened_models, views, options, memory) if options.chunk_size is None else None
    # The chunk the stores record and the budget the engine sizes its queue of decoded batches by.
    options = dataclasses.replace(options, chunk_size=chunk, memory=memory)
    results: list[StoreResult] = []
    decodes = 0
    with engine_opener(options.engine)(opened_models, views, options, report) as opened:
        for split in splits:
            run = _SplitRun(split, opened.passes, views, options, opened.engine, opened.device, opened.provider,
                            chunk, report, opened.fallback, room)
            results.extend(run.execute())
            decodes += run.decodes
    return InferResult(device=opened.device, provider=opened.provider, workers=opened.engine.workers,
                       stores=tuple(results), decodes=decodes, seconds=time.perf_counter() - start)


def _check_owners(models: Sequence[Model], splits: Sequence[Split], options: InferOptions) -> None:
    """Refuse, before any work, to replace a store (complete or not) that another model made.

    Another model: another sha256 and another file. The same bytes (a copy) or the same file
    (exported again) are the same model, whose store a run with other arguments replaces.
    ``fold0/model.onnx`` and ``fold1/model.onnx`` would share ``<out>/model``: ``--name``
    gives the second a store of its own. The file is the manifest's ``realpath`` (absolute,
    recorded when it was written): its ``file`` is relative to wherever that run ran (``cd
    fold0 && ens infer model.onnx``), so a manifest of an older ens, without ``realpath``, is
    trusted by its sha256 alone.
    """
    for model in models:
        for split in splits:
            folder = store_path(options.out, model.path, split.name, options.name)
            recorded = recorded_model(folder)
            if recorded is None:
                continue
            file, sha256, realpath = recorded
            if sha256 == model.sha256 or (realpath is not None and _same_file(Path(realpath), model.path)):
                continue
            held = "another model" if file is None else f"the model file {file!r}"
            raise EnsError(f"{folder}: holds the store of {held}, not of {model.path} (another sha256); "
                           f"keep both with --name {_suggested_name(model, options)} (a store folder of its "
                           f"own), or delete {folder} to replace it")


def _same_file(recorded: Path, path: Path) -> bool:
    """Whether ``recorded`` (an absolute path) is the file at ``path``."""
    try:
        return os.path.samefile(recorded, path)
    except OSError:  # the recorded file is gone: compare the paths
        return recorded == Path(os.path.realpath(path))


def _suggested_name(model: Model, options: InferOptions) -> str:
    """A store name for ``model`` beside another model's store of the same stem: its folder's
    name before the stem (``fold1/model.onnx``: ``fold1-model``), where that makes a new name."""
    parent = Path(os.path.abspath(model.path)).parent.name
    name = f"{parent}-{model.name}"
    try:
        check_store_name(name, "")
    except EnsError:
        return "NAME"
    if name == options.name or not parent:
        return "NAME"
    return shlex.quote(name)


def engine_opener(engine: str) -> EngineOpener:
    """The opener of ``--engine`` ``engine`` (one of :data:`ENGINES`, checked by then)."""
    if engine == "ray":
        from ensemble.inference.ray_engine import open_ray_engine  # Ray only when it is asked for

        return open_ray_engine
    return open_local_engine


class _SplitRun:
    """All models on one split: resume state, the batch loop, chunk and store writing."""

    def __init__(self, split: Split, passes: Sequence[ModelPass], views: Sequence[View],
                 options: InferOptions, engine: Engine, device: str, provider: str,
                 chunk_size: int, report: Callable[[Event], None], fallback: str | None = None,
                 room: ChunkRoom | None = None):
        self.split, self.passes, self.views, self.options = split, passes, views, options
        self.engine, self.report = engine, report
        self.batch = options.batch_size
        self.decodes = 0
        self.decode_wait = 0.0
        #: Seconds inside each model's sessions on this split, by model name.
        self.model_seconds: dict[str, float] = {}
        self.writers = {}
        self.base: dict[str, StoreManifest] = {}  # each store's manifest before its run's figures
        self._jpegs: bool | None = None  # whether every image of the split is a JPEG file, once asked
        keys = {}
        for item in passes:
            model = item.model
            meta = model.metadata
            key = {
                "model_sha256": model.sha256, "dataset_sha256": split.sha256, "rows": len(split),
                "preprocess": dataclasses.asdict(model.preprocess), "mean": list(meta.mean),
                "std": list(meta.std), "views": [v.name for v in views], "merge": options.merge,
                "dtype": options.dtype, "keep_views": options.keep_views, "batch_size": self.batch,
                "chunk_size": chunk_size, "provider": provider,
                # The reduced JPEG decode keeps this model's largest canvas (not the run's).
                "decode_side": item.groups[0].members[0][0].min_side, "pixels": PIXELS,
            }
            if item.cam is not None:  # only then: stores without cam views keep their keys
                key["cam"] = item.cam.settings.record()
            keys[model.name] = key
        if room is not None:
            chunk_size = self._resumed_chunk(keys, chunk_size, room)
            options = dataclasses.replace(options, chunk_size=chunk_size)
        self.options, self.chunk_size = options, chunk_size
        for item in passes:
            model = item.model
            meta = model.metadata
            key = {**keys[model.name], "chunk_size": chunk_size}
            self.writers[model.name] = StoreWriter(store_path(options.out, model.path, split.name, options.name),
                                                   key, len(split), chunk_size)
            self.base[model.name] = StoreManifest(
                model=ModelRecord(file=str(model.path), realpath=os.path.realpath(model.path),
                                  sha256=model.sha256, architecture=meta.architecture,
                                  input_size=meta.input_size, mean=tuple(meta.mean), std=tuple(meta.std),
                                  resize=meta.resize, crop_pct=meta.crop_pct, interpolation=meta.interpolation,
                                  precision=meta.precision,
                                  class_ids=None if meta.class_ids is None else tuple(meta.class_ids),
                                  foreign=model.foreign),
                dataset=DatasetRecord(split=split.name, source=str(split.source), sha256=split.sha256,
                                      images=len(split)),
                tta=TtaRecord(views=tuple(v.name for v in views), merge=options.merge,
                              cam=None if item.cam is None else item.cam.settings.record()),
                pixels=PIXELS, device=device, provider=provider, device_fallback=fallback,
                batch_size=self.batch, chunk_size=chunk_size, ens_version=__version__,
                # Not in the key: both engines compute the same arrays, so either resumes the other's.
                engine=engine.name, cluster=engine.cluster,
                command=finishing_command(model, split, options, device),
                arguments=recorded_arguments(model, options, device),
            )

    def _resumed_chunk(self, keys: dict[str, dict[str, Any]], chunk: int, room: ChunkRoom) -> int:
        """The chunk size of this split with ``--chunk-size`` left out: ``chunk`` (from
        ``--memory``), or that of the chunks an interrupted run left in the stores' ``.partial``
        with these arguments (those with the most images done, where they differ), which then
        resume. A complete store is kept at any chunk size; these chunks only at their own.
        Chunks that do not fit ``room`` are one line saying what to pass, never dropped
        unasked."""
        found: dict[int, int] = {}  # chunk size: images done, over the models
        where: dict[int, Path] = {}
        for item in self.passes:
            folder = store_path(self.options.out, item.model.path, self.split.name, self.options.name)
            done = self._partial_chunks(folder, keys[item.model.name])
            if done is not None and done[1]:
                found[done[0]] = found.get(done[0], 0) + done[1]
                where.setdefault(done[0], folder)
        if not found:
            return chunk
        size = max(found, key=lambda c: (found[c], c == chunk))
        if size == chunk:
            return chunk
        if not room.fits(size):
            raise EnsError(f"{where[size]}: {found[size]} images of an interrupted run are saved in chunks of {size}, "
                           f"which need about {_size(room.usage.need(size))} of logits ({room.what}), over "
                           f"{room.room}; give --memory {room.memory_for(size):g} to resume them, or --chunk-size "
                           f"{chunk} to compute the {self.split.name} stores again from the start")
        self.report(Event("note", self.split.name, message=f"{self.split.name}: resuming the chunks of {size} "
                                                           f"images an interrupted run saved (--chunk-size {size})"))
        return size

    def _partial_chunks(self, folder: Path, key: dict[str, Any]) -> tuple[int, int] | None:
        """``(chunk size, images done)`` of the chunks under ``folder``'s ``.partial`` made with
        ``key`` (any chunk size; pixels of version 2 where every image is a JPEG file, as
        :meth:`_adopt_version2` keeps them); None when there are none."""
        try:
            if keeps(read_manifest_json(folder), key):  # complete: kept, whatever its chunks
                return None
            recorded = read_json(folder / PARTIAL / "key.json")
        except EnsError:
            return None
        if not isinstance(recorded, dict):
            return None
        size = recorded.get("chunk_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % self.batch:
            return None
        others = complete_key(recorded)
        base = complete_key(key)
        if others != base and not (base["pixels"] == 3 and others == {**base, "pixels": 2} and self._all_jpegs()):
            return None
        rows = len(self.split)
        done = sum(min(size, rows - c * size) for c in range(-(-rows // size))
                   if (folder / PARTIAL / f"chunk-{c:06d}.npz").is_file())
        return size, done

    def _all_jpegs(self) -> bool:
        """Whether every image of the split is a JPEG file (their first bytes read once)."""
        if self._jpegs is None:
            self._jpegs = all(is_jpeg(path) for path in self.split.paths)
        return self._jpegs

    def execute(self) -> list[StoreResult]:
        try:
            todo = self._open()
            chunks = sorted({c for item in todo for c in self._missing(item)})
            self._check_room(todo)
            processed, seconds = self._run(todo, chunks)
            return self._finish(todo, processed, seconds)
        finally:
            for writer in self.writers.values():
                writer.release()

    def _check_room(self, todo: Sequence[ModelPass]) -> None:
        """Refuse, before any image is decoded, a split whose stores the disk under ``--out``
        cannot hold: the chunks still to write (every model's, kept until its store is
        assembled) and the largest store's arrays, which assembly writes while its chunks are
        still there. Logits and kept views in the stored dtype; a run that keeps every store
        (nothing to do) or resumes checks only what is left."""
        if not todo:
            return
        itemsize = np.dtype(self.options.dtype).itemsize
        stored = 1 + (len(self.views) if self.options.keep_views else 0)  # logits, and each view's
        need = largest = 0
        for item in todo:
            row_bytes = item.model.metadata.num_classes * itemsize * stored + 16  # + a cam box
            need += sum(self._chunk_rows(c) for c in self._missing(item)) * row_bytes
            largest = max(largest, len(self.split) * row_bytes)
        need += largest
        folder = self.writers[todo[0].model.name].path
        try:
            free = shutil.disk_usage(folder).free
        except OSError:  # a file system that cannot say: the writes will, if it comes to that
            return
        if need > free:
            what = f"{len(todo)} model{'s' if len(todo) > 1 else ''}, {len(self.split)} images"
            raise EnsError(f"{self.options.out}: the {self.split.name} stores ({what}) need about {_size(need)} "
                           f"there, and its disk has {_size(free)} free; free space, or give --out on another "
                           "disk" + ("" if self.options.dtype == "float16" else ", or --dtype float16")
                           + (", or leave out --keep-views" if self.options.keep_views else ""))

    def _missing(self, item: ModelPass) -> list[int]:
        writer = self.writers[item.model.name]
        return [c for c in range(writer.chunks) if c not in writer.done]

    def _open(self) -> list[ModelPass]:
        """Open every store; the models whose store is not complete with these arguments."""
        todo = []
        for item in self.passes:
            writer = self.writers[item.model.name]
            adopted = self._adopt_version2(writer)
            upgraded = f"{writer.path}: pixels of version 2 are version 3's for JPEG files: kept"
            if writer.open(self.base[item.model.name]):
                self.report(Event("note", self.split.name, message=upgraded if adopted else
                                  f"{writer.path}: complete, with the same arguments; kept"))
            else:
                if adopted and not writer.note:  # its chunks are kept
                    self.report(Event("note", self.split.name, message=upgraded))
                if writer.note:
                    self.report(Event("note", self.split.name, message=writer.note))
                todo.append(item)
        return todo

    def _adopt_version2(self, writer: StoreWriter) -> bool:
        """Keep a store (complete, or its chunks) made with these arguments by pixel pipeline
        version 2 when every image of the split is a JPEG file: version 3 decodes differently
        only 16-bit, 32-bit and float grayscale and transparency, which a JPEG never has (L,
        RGB, CMYK), so its pixels are version 3's. The files' first 3 bytes are read only when
        such a store is there; one other file and the store is computed again."""
        if writer.key["pixels"] != 3:
            return False

        return writer.adopt({**writer.key, "pixels": 2}, {"pixels": 3}, self._all_jpegs)

    def _run(self, todo: Sequence[ModelPass], chunks: Sequence[int]) -> tuple[int, float]:
        """Decode the chunks' images once, run the models that lack each chunk, save chunks.

        Returns the number of images processed and the seconds it took.
        """
        split, total = self.split, len(self.split)
        before = total - sum(self._chunk_rows(c) for c in chunks)
        if todo and before:
            self.report(Event("note", split.name, message=f"{split.name}: resuming, {before} of {total} images done"))
        self.report(Event("start", split.name, done=before, total=total))
        needs = {c: [item for item in todo if c in self._missing(item)] for c in chunks}
        # One chunk's buffers per model at a time (batches come in order): never the split's rows.
        pending: dict[int, dict[str, _Chunk]] = {}
        dtype, keep_views, boxes = self.options.dtype, self.options.keep_views, any(v.cam for v in self.views)
        bad: dict[int, list[tuple[int, str]]] = {}
        self.model_seconds = {item.model.name: 0.0 for item in todo}
        models = {item.model.name: item.model for item in todo}
        started, processed, waited = time.perf_counter(), 0, self.engine.waited

        def lacking(start: int) -> list[str]:
            return [item.model.name for item in needs[start // self.chunk_size]]

        for out in self.engine.run(self._batches(chunks), lacking):
            self.decodes += out.decodes
            self._check_bad(out)
            c = out.start // self.chunk_size
            bad.setdefault(c, []).extend((out.start - c * self.chunk_size + r, why) for r, why in out.bad)
            if c not in pending:
                rows = self._chunk_rows(c)
                pending[c] = {item.model.name: _Chunk.empty(rows, item.model.metadata.num_classes, len(self.views),
                                                            dtype, keep_views, boxes) for item in needs[c]}
            parts = pending[c]
            lo = out.start - c * self.chunk_size
            hi = lo + out.count
            for name, result in out.models.items():
                self._check_finite(models[name], out, result.views)
                self.model_seconds[name] += result.seconds
                part = parts[name]
                # Converted batch by batch: the same values as converting the whole chunk.
                part.scores[lo:hi] = to_dtype(result.scores, dtype)
                if part.views is not None:
                    part.views[:, lo:hi] = to_dtype(result.views, dtype)
                if part.boxes is not None and result.boxes is not None:
                    part.boxes[lo:hi] = result.boxes
            processed += out.count
            rate = processed / max(time.perf_counter() - started, 1e-9)
            done = before + processed
            event = Event("batch", split.name, done, total, rate, (total - done) / rate)
            self.report(event)
            if out.start + out.count == c * self.chunk_size + self._chunk_rows(c):
                self._write_chunk(c, pending.pop(c), bad.pop(c, []))
                self.report(dataclasses.replace(event, kind="chunk"))
        self.decode_wait = self.engine.waited - waited
        return processed, time.perf_counter() - started

    def _finish(self, todo: Sequence[ModelPass], processed: int, seconds: float) -> list[StoreResult]:
        """Assemble the stores computed now; report every store of the split."""
        split = self.split
        rate = processed / seconds if processed and seconds else None
        results = []
        for item in self.passes:
            writer = self.writers[item.model.name]
            if item in todo:
                figures = RunFigures(
                    workers=self.engine.workers, images_per_s=rate, seconds=seconds if processed else None,
                    # Time the models waited for decoding; large means: more --workers.
                    decode_wait_s=self.decode_wait if processed else None,
                    model_images_per_s=self._model_rate(item.model.name, processed))
                manifest = writer.finish(split.ids, split.paths,
                                         dataclasses.replace(self.base[item.model.name], figures=figures))
            else:
                manifest = read_store(writer.path).manifest
            arrays = manifest.arrays
            results.append(StoreResult(model=item.model.path, split=split.name, path=writer.path,
                                       rows=arrays.rows, classes=arrays.classes, skipped=len(arrays.skipped),
                                       computed=item in todo, images_per_s=rate if item in todo else None))
        self.report(Event("done", split.name, len(split), len(split), rate or 0.0, 0.0))
        return results

    def _model_rate(self, name: str, processed: int) -> float | None:
        """The rate of the model's forward passes alone on this split."""
        seconds = self.model_seconds.get(name, 0.0)
        return processed / seconds if processed and seconds else None

    def _chunk_rows(self, c: int) -> int:
        return min(self.chunk_size, len(self.split) - c * self.chunk_size)

    def _batches(self, chunks: Sequence[int]) -> Iterator[tuple[int, Sequence[Path]]]:
        for c in chunks:
            first = c * self.chunk_size
            end = first + self._chunk_rows(c)
            for lo in range(first, end, self.batch):
                yield lo, self.split.paths[lo:min(lo + self.batch, end)]

    def _check_bad(self, out: BatchOutput) -> None:
        for row, reason in out.bad:
            index = out.start + row
            image_id, path = self.split.ids[index], self.split.paths[index]
            if self.options.on_bad_image == "fail":
                raise EnsError(f"image {image_id!r} ({path}): {reason}; --on-bad-image skip leaves "
                               "such images out")
            self.report(Event("note", self.split.name, message=f"skipped image {image_id!r} ({path}): {reason}"))

    def _check_finite(self, model: Model, out: BatchOutput, per_view: np.ndarray) -> None:
        """``per_view``: ``(views, count, classes)``. Bad rows hold the logits of a blank image:
        finite, written, then dropped by their mask."""
        good = np.ones(out.count, bool)
        good[[r for r, _ in out.bad]] = False
        finite = np.isfinite(per_view).all(axis=(0, 2)) | ~good
        if not finite.all():
            index = out.start + int(np.argmin(finite))
            raise EnsError(f"{model.path}: non-finite logits for image {self.split.ids[index]!r} "
                           f"({self.split.paths[index]})")

    def _write_chunk(self, c: int, parts: dict[str, _Chunk], bad: list[tuple[int, str]]) -> None:
        keep = np.ones(self._chunk_rows(c), bool)
        keep[[r for r, _ in bad]] = False
        for name, part in parts.items():
            self.writers[name].write_chunk(c, part.scores, keep, bad, part.views, part.boxes)


def _size(count: int) -> str:
    """A byte count as a message gives it: ``12.3 GB`` (decimal units, as ``df -H``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
