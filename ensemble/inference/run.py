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
with the same bytes as an uninterrupted one (see :mod:`ensemble.formats.store`).

Unreadable images (missing, empty, truncated, not an image) stop the run by default, naming the
image; with ``on_bad_image="skip"`` they get no row in the store and are listed in its manifest.
Progress goes to a callback as :class:`Event` s; presenting it is the caller's business.

Decoding processes come from a fork server, so a script that calls :func:`infer` with workers
needs the usual ``if __name__ == "__main__":`` guard around its entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from ensemble import __version__
from ensemble.formats.dataset import Split, check_store_name, split_name
from ensemble.inference.decode import PIXELS, Decoder
from ensemble.errors import EnsError
from ensemble.inference.runtime import (TRT_CACHE, ForeignPreprocess, GpuOptions, Model, Runner,
                                        available_providers, check_gpu_options, cpu_threads, device_choices,
                                        load_model, prepare_trt_cache, probe_device, select_device)
from ensemble.formats.store import DTYPES, StoreWriter, read_store, store_path
from ensemble.inference.cam import CamSettings
from ensemble.inference.forward import (BatchOutput, Forward, LocalEngine, ModelPass, cam_plan, run_geometries,
                                        run_sources, view_groups)
from ensemble.inference.tta import DEFAULT_SCALES, View, merge_mode, plan_views, view_size

BAD_IMAGE_POLICIES = ("fail", "skip")
#: ``--engine``: this machine (:class:`~ensemble.inference.forward.LocalEngine`) or a Ray cluster
#: (:mod:`ensemble.inference.ray_engine`, the optional extra ``ray``).
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class InferOptions:
    """How to run. ``workers=None`` picks a default for the device: a quarter of the cores on
    CPU (the model needs the rest), all cores but one on a GPU. ``batch_size`` is the images of
    one decoded batch and of one forward pass. ``chunk_size`` (images per resumable chunk) is
    rounded up to a multiple of ``batch_size``. ``cudnn_search``, ``gpu_mem_limit`` (GiB per
    model) and ``trt_fp16`` only matter on a GPU (see :class:`~ensemble.inference.runtime.GpuOptions`).
    """

    tta: tuple[str, ...] = ()
    scales: tuple[float, ...] = DEFAULT_SCALES
    merge: str = "mean-logits"
    keep_views: bool = False
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    on_bad_image: str = "fail"
    dtype: str = "float16"
    chunk_size: int = 1024
    out: Path = Path("runs")
    foreign: ForeignPreprocess = ForeignPreprocess()
    cudnn_search: str = "heuristic"
    gpu_mem_limit: float | None = None
    trt_fp16: bool = False
    #: The cam views' box (:class:`~ensemble.inference.cam.CamSettings`); ``None``: its default.
    cam_threshold: float | None = None
    cam_pad: float | None = None
    cam_min: float | None = None
    engine: str = "local"
    #: ``--engine ray``: the cluster to join; ``None`` is Ray's own resolution (``RAY_ADDRESS``,
    #: a running local cluster, else a new one on this machine).
    ray_address: str | None = None


class Engine(Protocol):
    """What :class:`_SplitRun` needs of an engine: the batches' outputs in order, and figures
    for the manifest (``cluster``: the Ray cluster's resources, ``None`` for this machine)."""

    name: str
    cluster: dict | None

    @property
    def workers(self) -> int: ...

    @property
    def waited(self) -> float: ...

    def run(self, batches, needs) -> Iterator[BatchOutput]: ...


@dataclass(frozen=True)
class Event:
    """Progress of a run, for the caller to show.

    ``kind``: ``note`` (a line in ``message``), ``start`` (a split begins; ``done`` counts rows
    finished by an earlier run), ``batch``, ``chunk`` (a chunk is safely on disk), ``done``.
    ``images_per_s`` is this run's rate over all models; ``eta_s`` is ``None`` until known.
    """

    kind: str
    split: str = ""
    done: int = 0
    total: int = 0
    images_per_s: float = 0.0
    eta_s: float | None = None
    message: str = ""


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


@dataclass(eq=False)
class _Loaded(ModelPass):
    seconds: float = 0.0  # time inside the runner, this split


@dataclass
class _Chunk:
    """Rows of one chunk collected for one model, batch by batch."""

    scores: list[np.ndarray] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)


def finishing_command(model: Model, split: Split, options: InferOptions, device: str) -> str:
    """The `ens infer` command that makes exactly the store of ``model`` on ``split`` with these
    options: the one to rerun to finish it after an interruption."""
    args = ["ens", "infer", str(model.path)]
    if split_name(split.source) == split.name:
        args += ["--index", str(split.source)]
    else:
        args += ["--data", str(split.source.parent), "--split", split.name]
    defaults = InferOptions()
    if options.tta:
        args += ["--tta", ",".join(options.tta)]
        if "scale" in options.tta and tuple(options.scales) != tuple(defaults.scales):
            args += ["--scales", ",".join(f"{s:g}" for s in options.scales)]
    for flag, value, default in (("--merge", options.merge, defaults.merge),
                                 ("--batch-size", options.batch_size, defaults.batch_size),
                                 ("--chunk-size", options.chunk_size, defaults.chunk_size),
                                 ("--dtype", options.dtype, defaults.dtype),
                                 ("--on-bad-image", options.on_bad_image, defaults.on_bad_image)):
        if value != default:
            args += [flag, str(value)]
    if options.keep_views:
        args.append("--keep-views")
    if "cam" in options.tta:
        cam, default_cam = cam_settings(options), CamSettings()
        for flag, value, default in (("--cam-threshold", cam.threshold, default_cam.threshold),
                                     ("--cam-pad", cam.pad, default_cam.pad),
                                     ("--cam-min", cam.min_size, default_cam.min_size)):
            if value != default:
                args += [flag, f"{value:g}"]
    if options.engine != defaults.engine:
        args += ["--engine", options.engine]
        if options.ray_address is not None:
            args += ["--ray-address", options.ray_address]
    args += ["--device", device, "--out", str(options.out)]
    if model.foreign:
        meta, given = model.metadata, options.foreign
        args += ["--input-size", str(meta.input_size)]
        if given.mean is not None:
            args += ["--mean", ",".join(f"{v:g}" for v in meta.mean), "--std", ",".join(f"{v:g}" for v in meta.std)]
        if given.resize is not None:
            args += ["--resize", meta.resize]
        if given.crop_pct is not None:
            args += ["--crop-pct", f"{meta.crop_pct:g}"]
    return shlex.join(args)


def cam_settings(options: InferOptions) -> CamSettings:
    """The cam views' settings: the options given, the library's defaults for the others."""
    given = {"threshold": options.cam_threshold, "pad": options.cam_pad, "min_size": options.cam_min}
    return CamSettings(**{k: v for k, v in given.items() if v is not None})


def _check_options(options: InferOptions) -> None:
    merge_mode(options.merge)
    if "cam" not in options.tta:
        for flag, value in (("--cam-threshold", options.cam_threshold), ("--cam-pad", options.cam_pad),
                            ("--cam-min", options.cam_min)):
            if value is not None:
                raise EnsError(f"{flag} is for the cam view; add cam to --tta")
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
    if options.chunk_size < 1:
        raise EnsError(f"--chunk-size {options.chunk_size}: must be at least 1")
    if options.engine not in ENGINES:
        raise EnsError(f"--engine {options.engine}: choose from {', '.join(ENGINES)}")
    if options.ray_address is not None and options.engine != "ray":
        raise EnsError("--ray-address is for --engine ray")
    check_gpu_options(GpuOptions(options.cudnn_search, options.gpu_mem_limit))


def _load_models(paths: Sequence[Path], options: InferOptions, views: Sequence[View]) -> list[Model]:
    if not paths:
        raise EnsError("no model given")
    models = [load_model(p, options.foreign) for p in paths]
    stems: dict[str, Path] = {}
    for model in models:
        check_store_name(model.name, f"model file {model.path}:")
        if model.name in stems:
            raise EnsError(f"{model.path} and {stems[model.name]} would share the store folder "
                           f"{model.name!r}; rename one")
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


def resolve_device(requested: str, gpu: GpuOptions = GpuOptions()) -> tuple[str, str | None]:
    """``(device, fallback)``: the device to run on and, when ``auto`` found CUDA listed but
    unable to run and fell back to the CPU, why (for a warning and the manifests).

    An explicit ``cuda`` or ``tensorrt`` that cannot run is an :class:`EnsError` instead.
    """
    device = select_device(requested, available_providers())
    why = probe_device(device, gpu)
    if why is None:
        return device, None
    if requested != "auto":
        raise EnsError(f"--device {requested}: {why}; check the CUDA / cuDNN / TensorRT libraries it needs")
    return "cpu", f"--device auto: {why}; running on the CPU"


def infer(models: Sequence[str | Path], splits: Sequence[Split], options: InferOptions = InferOptions(),
          progress: Callable[[Event], None] | None = None) -> InferResult:
    """Run every model on every split with TTA and write their logit stores under ``options.out``.

    Raises :class:`EnsError` for bad options, models or images (see the module docstring).
    """
    start = time.perf_counter()
    report = progress or (lambda event: None)
    _check_options(options)
    views = plan_views(options.tta, options.scales)
    loaded_models = _load_models([Path(p) for p in models], options, views)

    chunk_size = -(-options.chunk_size // options.batch_size) * options.batch_size
    if options.engine == "ray":
        from ensemble.inference.ray_engine import ray_engine as opened
    else:
        opened = _local_engine
    results: list[StoreResult] = []
    decodes = 0
    with opened(loaded_models, views, options, report) as ready:
        for split in splits:
            run = _SplitRun(split, ready.loaded, views, options, ready.engine, ready.device, ready.provider,
                            chunk_size, report, ready.fallback)
            results.extend(run.execute())
            decodes += run.decodes
    return InferResult(device=ready.device, provider=ready.provider, workers=ready.engine.workers,
                       stores=tuple(results), decodes=decodes, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class Ready:
    """An engine ready to run: its sessions (``loaded``, without runners where they live in
    other processes), the device they run on, its provider, and why ``auto`` fell back to the CPU."""

    engine: Engine
    loaded: Sequence[_Loaded]
    device: str
    provider: str
    fallback: str | None = None


def gpu_options(options: InferOptions) -> GpuOptions:
    return GpuOptions(options.cudnn_search, options.gpu_mem_limit, options.trt_fp16)


def make_forward(options: InferOptions) -> Forward:
    """The compute of one decoded batch for these options; every engine builds its own here."""
    return Forward(options.merge)


def open_passes(models: Sequence[Model], views: Sequence[View], options: InferOptions, device: str,
                gpu: GpuOptions, sessions: bool = True) -> list[_Loaded]:
    """Open every model's session on ``device``, with its views grouped by input size; every
    engine opens its sessions here (in this process, or in each of its workers). ``sessions=False``:
    the plan alone (``runner`` is ``None``), for a driver whose sessions live in its workers."""
    loaded = []
    cam = cam_settings(options)
    for model in models:
        groups = view_groups(model, views, cam)
        sizes = [group.size for group in groups]
        runner = Runner(model, device, gpu, images=options.batch_size, sizes=sizes) if sessions else None
        if device != "cpu" and runner is not None:
            runner.warm_up(options.batch_size, sizes)  # before the first rate: cuDNN picks algorithms per shape
        loaded.append(_Loaded(model, runner, groups, cam_plan(model, views, cam)))
    return loaded


def decode_needs(models: Sequence[Model], views: Sequence[View], options: InferOptions) -> dict:
    """What every engine's decode must produce for these models: ``{"geometries": ...,
    "sources": ...}``, each once (the keyword arguments of :class:`~ensemble.inference.decode.Decoder`
    and :func:`~ensemble.inference.decode.decode_batch`)."""
    cam = cam_settings(options)
    return {"geometries": run_geometries(view_groups(m, views, cam) for m in models),
            "sources": run_sources(cam_plan(m, views, cam) for m in models)}


@contextlib.contextmanager
def _local_engine(models: Sequence[Model], views: Sequence[View], options: InferOptions,
                  report: Callable[[Event], None]) -> Iterator[Ready]:
    """This machine: decoding processes feeding sessions in this process."""
    gpu = gpu_options(options)
    device, fallback = resolve_device(options.device, gpu)
    if fallback:
        report(Event("note", message=f"warning: {fallback}"))
    workers = options.workers
    if workers is None:
        cores = cpu_threads()
        workers = max(1, cores // 4) if device == "cpu" else max(1, cores - 1)
    # The decoding processes start first, so that they come up while the sessions load.
    with Decoder(batch_size=options.batch_size, workers=workers, **decode_needs(models, views, options)) as decoder:
        if device == "tensorrt":
            gpu = dataclasses.replace(gpu, trt_cache=prepare_trt_cache(Path(options.out) / TRT_CACHE))
        loaded = open_passes(models, views, options, device, gpu)
        provider = loaded[0].runner.provider
        chosen = " (--device auto)" if options.device == "auto" else ""
        decoding = (f"{workers} decoding process{'es' if workers > 1 else ''}" if workers
                    else "decoding in this process")
        report(Event("note", message=f"device {device}{chosen}: {provider}, {decoding}"))
        yield Ready(LocalEngine(decoder, loaded, make_forward(options)), loaded, device, provider, fallback)


class _SplitRun:
    """All models on one split: resume state, the batch loop, chunk and store writing."""

    def __init__(self, split: Split, loaded: Sequence[_Loaded], views: Sequence[View],
                 options: InferOptions, engine: Engine, device: str, provider: str,
                 chunk_size: int, report: Callable[[Event], None], fallback: str | None = None):
        self.split, self.loaded, self.views, self.options = split, loaded, views, options
        self.engine, self.chunk_size, self.report = engine, chunk_size, report
        self.batch = options.batch_size
        self.decodes = 0
        self.decode_wait = 0.0
        self.writers = {}
        self.base = {}
        for item in loaded:
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
            self.writers[model.name] = StoreWriter(store_path(options.out, model.path, split.name),
                                                   key, len(split), chunk_size)
            self.base[model.name] = {
                "model": {"file": str(model.path), "sha256": model.sha256, "architecture": meta.architecture,
                          "input_size": meta.input_size, "mean": list(meta.mean), "std": list(meta.std),
                          "resize": meta.resize, "crop_pct": meta.crop_pct,
                          "interpolation": meta.interpolation, "precision": meta.precision,
                          "class_ids": None if meta.class_ids is None else list(meta.class_ids),
                          "foreign": model.foreign},
                "dataset": {"split": split.name, "source": str(split.source), "sha256": split.sha256,
                            "images": len(split)},
                "tta": {"views": [v.name for v in views], "merge": options.merge,
                        **({} if item.cam is None else {"cam": item.cam.settings.record()})},
                "pixels": PIXELS,
                "device": device, "provider": provider, "device_fallback": fallback, "batch_size": self.batch,
                "chunk_size": chunk_size, "ens_version": __version__,
                # Not in the key: both engines compute the same arrays, so either resumes the other's.
                "engine": engine.name, "cluster": engine.cluster,
                "command": finishing_command(model, split, options, device),
            }

    def execute(self) -> list[StoreResult]:
        try:
            todo = self._open()
            chunks = sorted({c for item in todo for c in self._missing(item)})
            processed, seconds = self._run(todo, chunks)
            return self._finish(todo, processed, seconds)
        finally:
            for writer in self.writers.values():
                writer.release()

    def _missing(self, item: _Loaded) -> list[int]:
        writer = self.writers[item.model.name]
        return [c for c in range(writer.chunks) if c not in writer.done]

    def _open(self) -> list[_Loaded]:
        """Open every store; the models whose store is not complete with these arguments."""
        todo = []
        for item in self.loaded:
            writer = self.writers[item.model.name]
            if writer.open(self.base[item.model.name]):
                self.report(Event("note", self.split.name,
                                  message=f"{writer.path}: complete, with the same arguments; kept"))
            else:
                if writer.note:
                    self.report(Event("note", self.split.name, message=writer.note))
                todo.append(item)
        return todo

    def _run(self, todo: Sequence[_Loaded], chunks: Sequence[int]) -> tuple[int, float]:
        """Decode the chunks' images once, run the models that lack each chunk, save chunks.

        Returns the number of images processed and the seconds it took.
        """
        split, total = self.split, len(self.split)
        before = total - sum(self._chunk_rows(c) for c in chunks)
        if todo and before:
            self.report(Event("note", split.name, message=f"{split.name}: resuming, {before} of {total} images done"))
        self.report(Event("start", split.name, done=before, total=total))
        needs = {c: [item for item in todo if c in self._missing(item)] for c in chunks}
        pending: dict[int, dict[str, _Chunk]] = {}
        bad: dict[int, list[tuple[int, str]]] = {}
        for item in todo:
            item.seconds = 0.0
        started, processed, waited = time.perf_counter(), 0, self.engine.waited
        seconds = {item.model.name: item for item in todo}

        def lacking(start: int) -> list[str]:
            return [item.model.name for item in needs[start // self.chunk_size]]

        for out in self.engine.run(self._batches(chunks), lacking):
            self.decodes += out.decodes
            self._check_bad(out)
            c = out.start // self.chunk_size
            bad.setdefault(c, []).extend((out.start - c * self.chunk_size + r, why) for r, why in out.bad)
            parts = pending.setdefault(c, {item.model.name: _Chunk() for item in needs[c]})
            for name, result in out.models.items():
                self._check_finite(seconds[name].model, out, result.views)
                seconds[name].seconds += result.seconds
                parts[name].scores.append(result.scores)
                if self.options.keep_views:
                    parts[name].views.append(result.views)
                if result.boxes is not None:
                    parts[name].boxes.append(result.boxes)
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

    def _finish(self, todo: Sequence[_Loaded], processed: int, seconds: float) -> list[StoreResult]:
        """Assemble the stores computed now; report every store of the split."""
        split = self.split
        rate = processed / seconds if processed and seconds else None
        results = []
        for item in self.loaded:
            writer = self.writers[item.model.name]
            if item in todo:
                manifest = writer.finish(split.ids, split.paths, {
                    **self.base[item.model.name], "workers": self.engine.workers,
                    "images_per_s": rate, "seconds": seconds if processed else None,
                    # Time the models waited for decoding; large means: more --workers.
                    "decode_wait_s": self.decode_wait if processed else None,
                    "model_images_per_s": processed / item.seconds if processed and item.seconds else None})
            else:
                manifest = dict(read_store(writer.path).manifest)
            results.append(StoreResult(model=item.model.path, split=split.name, path=writer.path,
                                       rows=manifest["rows"], classes=manifest["classes"],
                                       skipped=len(manifest["skipped"]), computed=item in todo,
                                       images_per_s=rate if item in todo else None))
        self.report(Event("done", split.name, len(split), len(split), rate or 0.0, 0.0))
        return results

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
            views = np.concatenate(part.views, axis=1) if part.views else None
            boxes = np.concatenate(part.boxes) if part.boxes else None
            self.writers[name].write_chunk(c, np.concatenate(part.scores), keep, bad, views, boxes)
