"""How `ens infer` runs: :class:`InferOptions`, the one place its defaults are stated.

Light on purpose (no numpy, no onnxruntime): the command line reads its defaults from here
when it starts, and `ens --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ensemble.inference.foreign import ForeignPreprocess

#: ``--scales`` default: the multi-scale TTA of timm's validation recipes (x 7/8 and x 8/7).
DEFAULT_SCALES = (0.875, 1.0, 1.143)
#: Images per resumable chunk when ``--chunk-size`` is left out (rounded up to whole batches),
#: unless the models' chunk buffers would not fit ``--memory`` (see :func:`ensemble.inference.run.chunk_size`).
DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class InferOptions:
    """How to run. ``workers=None`` picks a default for the device: a quarter of the cores on
    CPU (the model needs the rest), all cores but one on a GPU. ``batch_size`` is the images of
    one decoded batch and of one forward pass. ``chunk_size`` (images per resumable chunk) is
    rounded up to a multiple of ``batch_size``; ``None``: :data:`DEFAULT_CHUNK_SIZE`, or fewer
    whole batches where every model's chunk buffers would not fit ``memory`` (or the size of an
    interrupted run's chunks, which then resume; a complete store is kept at any chunk size). ``memory``: the
    bytes of ``--memory`` (``None``: :func:`ensemble.memory.memory_budget`'s default), shared by
    the decoded batches waiting for the models (a quarter, at most 1 GiB) and the logits (the
    chunk buffers and one batch's work). ``cudnn_search``, ``gpu_mem_limit`` (GiB per model) and
    ``trt_fp16`` only matter on a GPU (see :class:`~ensemble.inference.runtime.GpuOptions`).
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
    chunk_size: int | None = None
    memory: int | None = None
    out: Path = Path("runs")
    #: ``--name``: the store folder's name under ``out`` instead of the model file's stem (one
    #: model only): how ``fold0/model.onnx`` and ``fold1/model.onnx`` keep a store each.
    name: str | None = None
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


def option_flag(name: str) -> str:
    """The `ens infer` flag of an :class:`InferOptions` or
    :class:`~ensemble.inference.foreign.ForeignPreprocess` field (``batch_size``: ``--batch-size``):
    the command line's parameters carry the fields' names."""
    return "--" + name.replace("_", "-")
