"""The engine contract: what the split loop (:mod:`ensemble.inference.run`) asks of an engine.

An engine turns ``(start row, image paths)`` batches into :class:`BatchOutput` s, in order: it
decodes each batch once and runs the models that lack it on every view, through the one
compute both engines share (:class:`~ensemble.inference.forward.Forward`). What it may choose is
only where that runs: this machine (:mod:`ensemble.inference.local`) or a Ray cluster
(:mod:`ensemble.inference.ray_engine`). An :data:`EngineOpener` opens one for a run as a
context manager yielding an :class:`OpenedEngine` (the engine, the models' passes, the device).

Here too are the run's progress events (:class:`Event`) and the small rules both engines apply
to the run's options (:class:`~ensemble.inference.options.InferOptions`). This module imports no
engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.inference.cam import CamSettings
from ensemble.inference.options import InferOptions
from ensemble.inference.runtime import GpuOptions, Model, available_providers, probe_device, select_device
from ensemble.inference.tta import View

if TYPE_CHECKING:  # the plan's type only: forward imports this module
    from ensemble.inference.forward import ModelPass


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
class ModelOutput:
    """One model's results for the real rows of one batch.

    ``scores``: merged, ``(count, classes)``; ``views``: ``(views, count, classes)``, the
    per-view logits before merging; ``seconds``: time inside the model's session; ``boxes``:
    float32 ``(count, 4)``, each image's cam box, normalised ``(x0, y0, x1, y1)`` of the image
    (zeros for bad images), or ``None`` without cam views.
    """

    scores: np.ndarray
    views: np.ndarray
    seconds: float
    boxes: np.ndarray | None = None


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


class Engine(Protocol):
    """What the split loop needs of an engine: the batches' outputs in order, and figures for
    the manifest (``cluster``: the Ray cluster's resources, ``None`` for this machine)."""

    name: str
    cluster: dict | None

    @property
    def workers(self) -> int: ...

    @property
    def waited(self) -> float: ...

    def run(self, batches: Iterable[tuple[int, Sequence[str]]],
            needs: Callable[[int], Sequence[str]]) -> Iterator[BatchOutput]:
        """``(start row, paths)`` batches -> their outputs, in order; ``needs(start)`` names the
        models that lack the batch."""
        ...


@dataclass(frozen=True)
class OpenedEngine:
    """An engine ready to run: the models' passes (``passes``, without sessions where they live
    in other processes), the device they run on, its provider, and why ``auto`` fell back to
    the CPU."""

    engine: Engine
    passes: Sequence[ModelPass]
    device: str
    provider: str
    fallback: str | None = None


#: Opens an engine for a run: ``opener(models, views, options, report)`` is a context manager
#: yielding the :class:`OpenedEngine`, closing its workers (or its Ray connection) after.
EngineOpener = Callable[[Sequence[Model], Sequence[View], InferOptions, Callable[[Event], None]],
                        ContextManager[OpenedEngine]]


#: The cam view's options: :class:`InferOptions` field -> :class:`~ensemble.inference.cam.CamSettings`
#: field (``None`` in the option: the setting's default).
CAM_OPTIONS = {"cam_threshold": "threshold", "cam_pad": "pad", "cam_min": "min_size"}


def cam_settings(options: InferOptions) -> CamSettings:
    """The cam views' settings: the options given, the library's defaults for the others."""
    given = {setting: getattr(options, name) for name, setting in CAM_OPTIONS.items()}
    return CamSettings(**{k: v for k, v in given.items() if v is not None})


def gpu_options(options: InferOptions) -> GpuOptions:
    return GpuOptions(options.cudnn_search, options.gpu_mem_limit, options.trt_fp16)


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
