"""Decoding images into model-ready uint8 arrays: each image once, in worker processes.

One decode of an image serves every model and every view of a run: :func:`decode_image` opens
the file once and returns, for each requested :class:`~ensemble.inference.tta.Geometry`, the
``(size, size, 3)`` uint8 RGB array (resizes onto each distinct canvas, crops cut from those).
The decode itself

* asks libjpeg for a reduced-size decode (Pillow's ``draft``: 1/2, 1/4 or 1/8 in the DCT
  domain) whenever the largest canvas needed is at most half the stored size;
* applies the EXIF orientation (phone photos are stored sideways);
* converts grayscale, CMYK, palette, RGBA, ... to RGB.

Because ``draft`` is chosen from the largest canvas of the whole run, the pixels a model sees
depend on which other models share the run; within one set of models they never change.

:class:`Decoder` runs :func:`decode_batch` in worker processes (or inline with ``workers=0``),
keeps a bounded number of batches in flight ahead of the consumer, and yields them in order.
Batches have a fixed shape: the last one is padded with zero images. A file that cannot be read
as an image is not an exception here: it is reported in :attr:`DecodedBatch.bad` and its rows
are zeros, so the caller decides whether to stop or skip.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ensemble.inference.tta import Geometry, canvas_shape, crop

#: Decoded batches waiting for the model take at most about this much memory (at least one
#: batch per worker, plus one).
PREFETCH_BYTES = 1 << 30

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class DecodedBatch:
    """One batch of images as arrays, one per geometry.

    ``arrays[g]`` is uint8 ``(batch_size, g.size, g.size, 3)``; rows past ``count`` (padding)
    and rows of bad images are zeros. ``bad`` holds ``(row, reason)`` of each image that could
    not be read. ``decodes`` counts the image files decoded to make the batch.
    """

    start: int
    count: int
    arrays: dict[Geometry, np.ndarray]
    bad: tuple[tuple[int, str], ...] = ()
    decodes: int = 0


def _load(path: str | Path, min_side: int) -> Image.Image:
    """Open, decode (reduced when ``min_side`` allows), orient and convert one image to RGB."""
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "JPEG" and min_side * 2 <= min(width, height):
            # draft picks the largest DCT reduction that keeps both sides >= the request, so
            # the shorter side stays >= min_side; orientation swaps sides but not the minimum.
            ratio = min_side / min(width, height)
            image.draft("RGB", (max(1, int(width * ratio + 0.999)), max(1, int(height * ratio + 0.999))))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        # convert copies even an RGB image, which detaches the result from the closed file.
        return image.convert("RGB")


def _min_side(geometries: Iterable[Geometry]) -> int:
    # Both canvas kinds need the decoded shorter side to reach canvas_size to avoid upsampling.
    return max(g.canvas_size for g in geometries)


def decode_image(path: str | Path, geometries: Sequence[Geometry],
                 min_side: int | None = None) -> dict[Geometry, np.ndarray]:
    """Decode ``path`` once and cut every geometry from it: ``{geometry: (size, size, 3) uint8}``.

    ``min_side`` (default: the largest canvas among ``geometries``) bounds the reduced decode;
    pass the same value for every image of a run so that its pixels do not depend on the batch.
    Raises whatever Pillow raises for a missing, empty, truncated or foreign file.
    """
    image = _load(path, min_side if min_side is not None else _min_side(geometries))
    canvases: dict[tuple[str, int, str], np.ndarray] = {}
    out = {}
    for g in geometries:
        key = (g.canvas, g.canvas_size, g.interpolation)
        if key not in canvases:
            height, width = canvas_shape(image.height, image.width, g.canvas, g.canvas_size)
            resized = image.resize((width, height), _RESAMPLE[g.interpolation])
            canvases[key] = np.asarray(resized)
        out[g] = crop(canvases[key], g.size, g.position)
    return out


def decode_batch(start: int, paths: Sequence[str], batch_size: int, geometries: Sequence[Geometry],
                 min_side: int) -> DecodedBatch:
    """Decode ``paths`` (at most ``batch_size``) into one fixed-shape :class:`DecodedBatch`."""
    arrays = {g: np.zeros((batch_size, g.size, g.size, 3), np.uint8) for g in geometries}
    bad = []
    for row, path in enumerate(paths):
        try:
            views = decode_image(path, geometries, min_side)
        except Exception as exc:  # any file Pillow cannot turn into pixels is a bad image
            bad.append((row, _reason(exc, path)))
            continue
        for g, view in views.items():
            arrays[g][row] = view
    return DecodedBatch(start=start, count=len(paths), arrays=arrays, bad=tuple(bad), decodes=len(paths))


def _reason(exc: Exception, path: str | Path) -> str:
    """Why an image could not be read, in a few words (the caller names the path)."""
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, UnidentifiedImageError):
        return "empty file" if os.path.getsize(path) == 0 else "not an image Pillow can read"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Decoding runs ahead (prefetch), so it can wait; the model's threads, or the thread that
    # feeds the GPU, should not wait for it.
    os.nice(10)


@dataclass
class Decoder:
    """Decodes batches of images in order, ``prefetch`` batches ahead of the consumer.

    ``workers=0`` decodes in the calling process (for debugging and tests). Worker processes
    come from a fork server (the parent holds onnxruntime's threads, and forking a threaded
    process can deadlock) and run at a lower priority than the parent.
    """

    geometries: tuple[Geometry, ...]
    batch_size: int
    workers: int = 1
    prefetch: int | None = None
    min_side: int = field(init=False)
    #: Seconds the consumer spent waiting for decoded batches (the decoding was the bottleneck).
    waited: float = field(init=False, default=0.0)
    _pool: ProcessPoolExecutor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.min_side = _min_side(self.geometries)
        if self.prefetch is None:
            # Two batches per worker keep every worker busy; many large views (crop10 x scales)
            # make batches big, so the memory waiting in the queue is bounded too.
            batch_bytes = self.batch_size * sum(3 * g.size * g.size for g in self.geometries)
            self.prefetch = max(self.workers + 1, min(2 * self.workers + 2, PREFETCH_BYTES // batch_bytes))

    def __enter__(self) -> "Decoder":
        if self.workers > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["ensemble.inference.decode"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init)
            self._pool.submit(int)  # the first task starts the processes: now, not at the first batch
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[tuple[int, Sequence[str]]]) -> Iterator[DecodedBatch]:
        """``(start row, paths)`` batches -> :class:`DecodedBatch` es, in the same order."""
        args = (self.batch_size, self.geometries, self.min_side)
        if self._pool is None:
            for start, paths in batches:
                yield decode_batch(start, paths, *args)
            return
        pool = self._pool

        def submit(start: int, paths: Sequence[str]) -> Future:
            return pool.submit(decode_batch, start, [str(p) for p in paths], *args)

        batches = iter(batches)
        pending = collections.deque(submit(*b) for b in itertools.islice(batches, self.prefetch))
        while pending:
            tick = time.perf_counter()
            result = pending.popleft().result()
            self.waited += time.perf_counter() - tick
            following = next(batches, None)
            if following is not None:
                pending.append(submit(*following))
            yield result
