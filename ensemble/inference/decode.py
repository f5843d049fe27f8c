"""Decoding images into model-ready uint8 arrays: each image once, in worker processes.

One decode of an image serves every model and every view of a run: :func:`decode_image` opens
the file and returns, for each requested :class:`~ensemble.inference.tta.Geometry`, the
``(size, size, 3)`` uint8 RGB array: each distinct canvas is resized once, and only over the
part its crops cut (:func:`resize_region`; a centre crop is about 57% of a 4:3 photo's canvas),
then the crops are cut from it. The decode itself

* asks libjpeg for a reduced-size decode (Pillow's ``draft``: 1/2, 1/4 or 1/8 in the DCT
  domain) whenever a model's largest canvas is at most half the stored size;
* applies the EXIF orientation (phone photos are stored sideways);
* converts every mode Pillow opens (grayscale of 1 to 32 bits, float, CMYK, palette,
  transparency, ...) to the 8-bit RGB a photo viewer shows (:func:`~ensemble.formats.image.to_rgb`).

The reduction is chosen per model (each geometry carries the shorter side its model's decode
keeps, ``Geometry.min_side``), never from the whole run, so the pixels a model sees, and so
its logit store, do not depend on which other models share the run. Models whose needs give
the same reduction share one decode; a JPEG that a 560 px model needs whole and a 224 px model
only at 1/2 is decoded twice, the second time at a quarter of the cost.

:class:`Decoder` runs :func:`decode_batch` in worker processes (or inline with ``workers=0``),
keeps a bounded number of batches in flight ahead of the consumer, and yields them in order.
Workers write each batch straight into a block of shared memory (one block per batch in flight,
reused), so only a few numbers travel through the pipes, not the pixels (a batch of 32 at
560 px with ``scale`` is 241 MiB); all blocks together stay within :data:`PREFETCH_BYTES`,
and only the blocks the batches at hand can use are made (a one-batch split makes one).
For models with a cam view the batch also holds each :class:`~ensemble.inference.tta.CamSource`:
the region the model's identity view sees, cut from the same decode (whose reduction keeps
what the crops need, see :func:`~ensemble.inference.tta.geometries`), at most ``side`` px on
its longer side, in the top-left corner of a ``(side, side)`` square per row, with its size and
place in the image (:class:`CropSource`).
Batches have a fixed shape: the last one is padded with zero images. A file that cannot be read
as an image is not an exception here: it is reported in :attr:`DecodedBatch.bad` and its rows
are zeros, so the caller decides whether to stop or skip.
"""

from __future__ import annotations

import collections
import errno
import itertools
import math
import multiprocessing
import os
import secrets
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import shared_memory
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from ensemble.formats.image import open_image, to_rgb, unreadable_reason
from ensemble.inference.tta import CamSource, Geometry, canvas_shape, crop_box, source_box

#: Decoded batches, in flight and waiting for the model, take at most this much memory, or two
#: batches when one is larger than half of it. Fewer batches than workers may then be decoded
#: at once: the bound wins.
PREFETCH_BYTES = 1 << 30
#: The share of `ens infer --memory` the decoded batches may take (at most :data:`PREFETCH_BYTES`).
QUEUE_SHARE = 0.25

#: ``interpolation`` (the model metadata's name) -> Pillow's resampling filter.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
#: How this ens makes a view's pixels from a decoded image. In every store's run key, so a
#: store is never resumed with pixels made another way, and compared by ``ens blend`` across a
#: model's stores. 1: each canvas resized whole, then cropped (stores made before this field
#: existed); 2: only the region the crops cut is resized (:func:`resize_region`); 3: every
#: image mode decoded as a viewer shows it (:func:`~ensemble.formats.image.to_rgb`: 16-bit and float grayscale scaled,
#: transparency on white; 2 clipped them and dropped the alpha). A JPEG has none of those modes
#: (L, RGB, CMYK), so a version 2 store of JPEG files only is kept as version 3's
#: (:meth:`ensemble.inference.run._SplitRun._adopt_version2`).
PIXELS = 3
#: How far each filter reaches, in source pixels at scale 1 (Pillow's supports).
_SUPPORT = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}


@dataclass(frozen=True)
class CropSource:
    """One :class:`~ensemble.inference.tta.CamSource` of a batch.

    ``pixels``: uint8 ``(batch, side, side, 3)``, row ``i``'s region in ``pixels[i, :h, :w]``
    with ``(h, w) = shapes[i]`` (int32 ``(batch, 2)``; ``(0, 0)`` for padding and bad rows);
    ``regions``: float32 ``(batch, 4)``, where that region lies in the image, normalised
    ``(x0, y0, x1, y1)``.
    """

    pixels: np.ndarray
    shapes: np.ndarray
    regions: np.ndarray


@dataclass(frozen=True)
class DecodedBatch:
    """One batch of images as arrays, one per geometry.

    ``arrays[g]`` is uint8 ``(batch_size, g.size, g.size, 3)``; rows past ``count`` (padding)
    and rows of bad images are zeros. ``bad`` holds ``(row, reason)`` of each image that could
    not be read. ``decodes`` counts the decodes made for the batch: one per image, plus one per
    further JPEG reduction some model needed. ``sources``: the :class:`CropSource` of each
    model's cam views.
    """

    start: int
    count: int
    arrays: dict[Geometry, np.ndarray]
    bad: tuple[tuple[int, str], ...] = ()
    decodes: int = 0
    sources: dict[CamSource, CropSource] = field(default_factory=dict)


def _open(path: str | Path, min_side: int) -> Image.Image:
    """Open one image, set up for a reduced decode when ``min_side`` allows; nothing decoded yet.

    The image's ``size`` is already the size the decode will have.
    """
    image = open_image(path)  # a regular file, within Pillow's decompression-bomb limit
    width, height = image.size
    if image.format == "JPEG" and min_side * 2 <= min(width, height):
        # draft picks the largest DCT reduction that keeps both sides >= the request, so the
        # shorter side stays >= min_side; orientation swaps sides but not the minimum.
        ratio = min_side / min(width, height)
        image.draft("RGB", (max(1, int(width * ratio + 0.999)), max(1, int(height * ratio + 0.999))))
    return image


def _finish(image: Image.Image) -> Image.Image:
    """Decode an opened image, orient it and convert it to RGB; the file is closed after."""
    with image:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def load_image(path: str | Path, min_side: int) -> Image.Image:
    """Open, decode (reduced when ``min_side`` allows), orient and convert one image to RGB."""
    return _finish(_open(path, min_side))


def decode_image(path: str | Path, geometries: Sequence[Geometry]) -> dict[Geometry, np.ndarray]:
    """Decode ``path`` and cut every geometry from it: ``{geometry: (size, size, 3) uint8}``.

    Geometries whose ``min_side`` gives the same reduced decode share it. Raises whatever Pillow raises for a missing, empty,
    truncated or foreign file.
    """
    out, _, _ = _decode_image(path, geometries)
    return out


def cut_source(image: Image.Image, source: CamSource) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (h, w, 3) uint8, region (4,) float32)``: the region of a decoded image that
    ``source``'s identity view sees, shrunk to at most ``source.side`` on its longer side, and
    where it lies, normalised ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = source_box(image.height, image.width, source.geometry)
    width, height = x1 - x0, y1 - y0
    if max(width, height) > source.side:
        ratio = source.side / max(width, height)
        size = (max(1, min(source.side, int(width * ratio + 0.5))), max(1, min(source.side, int(height * ratio + 0.5))))
        pixels = image.resize(size, RESAMPLE[source.geometry.interpolation], box=(x0, y0, x1, y1))
    else:
        pixels = image.crop((x0, y0, x1, y1))
    region = np.array([x0 / image.width, y0 / image.height, x1 / image.width, y1 / image.height], np.float32)
    return np.asarray(pixels), region


def _decode_image(path: str | Path, geometries: Sequence[Geometry], sources: Sequence[CamSource] = ()
                  ) -> tuple[dict[Geometry, np.ndarray], dict[CamSource, tuple[np.ndarray, np.ndarray]], int]:
    by_side: dict[int, list[Geometry | CamSource]] = {}
    for g in geometries:
        by_side.setdefault(g.min_side, []).append(g)
    for source in sources:  # cut from its model's decode: min_side keeps what the crops need
        by_side.setdefault(source.geometry.min_side, []).append(source)
    decoded: dict[tuple[int, int], tuple[Image.Image, list[Geometry]]] = {}  # stored size -> image, views
    cuts = {}
    for side, members in sorted(by_side.items(), reverse=True):
        opened = _open(path, side)
        if opened.size in decoded:
            opened.close()  # another model's decode has exactly these pixels
            image, views = decoded[opened.size]
        else:
            image, views = decoded[opened.size] = _finish(opened), []
        for g in members:
            if isinstance(g, CamSource):
                cuts[g] = cut_source(image, g)
            else:
                views.append(g)
    out = {}
    for image, views in decoded.values():
        out.update(canvas_views(image, views))
    return out, cuts, len(decoded)


def canvas_views(image: Image.Image, geometries: Sequence[Geometry]) -> dict[Geometry, np.ndarray]:
    """Each geometry's ``(size, size, 3)`` uint8 view of one decoded image.

    Geometries on the same canvas with the same crop size share one resize, and it covers only
    the part of the canvas their crops cut (:func:`resize_region`): a centre crop of a 4:3 photo
    is 57% of its canvas. The crop size is part of the group because the region's pixels depend
    (by rounding) on the region: views of one size have the run's positions whichever model asks,
    so a model's pixels never depend on the other models of a run.
    """
    by_canvas: dict[tuple[str, int, str, int], list[Geometry]] = {}
    for g in geometries:
        by_canvas.setdefault((g.canvas, g.canvas_size, g.interpolation, g.size), []).append(g)
    out = {}
    for (canvas, side, interpolation, _), group in by_canvas.items():
        height, width = canvas_shape(image.height, image.width, canvas, side)
        for g in group:
            if height < g.size or width < g.size:
                raise ValueError(f"a {height}x{width} canvas cannot hold a {g.size} px crop")
        corners = [crop_box(height, width, g.size, g.position) for g in group]
        top, left = min(t for t, _ in corners), min(x for _, x in corners)
        bottom = max(t + g.size for (t, _), g in zip(corners, group))
        right = max(x + g.size for (_, x), g in zip(corners, group))
        region = resize_region(image, (width, height), (left, top, right, bottom), interpolation)
        for g, (t, x) in zip(group, corners):
            out[g] = region[t - top:t - top + g.size, x - left:x - left + g.size]
    return out


def resize_region(image: Image.Image, canvas: tuple[int, int], region: tuple[int, int, int, int],
                  interpolation: str) -> np.ndarray:
    """The ``(left, top, right, bottom)`` pixels of ``image`` resized to ``canvas`` ``(width,
    height)``, as uint8 ``(bottom - top, right - left, 3)``, computing only those pixels.

    Two passes, the horizontal first, as Pillow's whole-image resize runs them on images at most
    twice as tall as wide; the region's filter coefficients are computed from its own offsets,
    so a pixel may differ from the whole canvas's by rounding: measured on photos, at most 2
    levels, at 0.02-0.13% of the pixels. (One Pillow call with a box may run the vertical pass
    first, which moved pixels by up to 45 levels with ``lanczos``.) The whole canvas is resized
    for ``nearest`` (a rounding difference there picks another source pixel) and for images
    taller than 2:1 (Pillow 13 runs their vertical pass first).
    """
    width, height = canvas
    left, top, right, bottom = region
    resample = RESAMPLE[interpolation]
    if region == (0, 0, width, height) or interpolation == "nearest" or image.height > 2 * image.width:
        return np.asarray(image.resize(canvas, resample))[top:bottom, left:right]
    sx, sy = image.width / width, image.height / height
    # Only the rows the vertical pass reads (its filter's reach beyond the region included) go
    # through the horizontal one: a portrait photo's centre crop needs two thirds of them.
    reach = math.ceil(_SUPPORT[interpolation] * max(sy, 1.0)) + 1
    y0, y1 = max(0, int(top * sy) - reach), min(image.height, int(math.ceil(bottom * sy)) + reach)
    rows = image if (y0, y1) == (0, image.height) else image.crop((0, y0, image.width, y1))
    rows = rows.resize((right - left, y1 - y0), resample, box=(left * sx, 0, right * sx, y1 - y0))
    return np.asarray(rows.resize((right - left, bottom - top), resample,
                                  box=(0, top * sy - y0, right - left, bottom * sy - y0)))


def _new_sources(batch_size: int, sources: Sequence[CamSource]) -> dict[CamSource, CropSource]:
    return {s: CropSource(np.zeros((batch_size, s.side, s.side, 3), np.uint8), np.zeros((batch_size, 2), np.int32),
                          np.zeros((batch_size, 4), np.float32)) for s in sources}


def decode_batch(start: int, paths: Sequence[str], batch_size: int, geometries: Sequence[Geometry],
                 out: dict[Geometry, np.ndarray] | None = None, sources: Sequence[CamSource] = (),
                 out_sources: dict[CamSource, CropSource] | None = None) -> DecodedBatch:
    """Decode ``paths`` (at most ``batch_size``) into one fixed-shape :class:`DecodedBatch`.

    ``out`` (and ``out_sources``): arrays to fill (a reused shared-memory block) instead of new
    ones; every row is written, padding and bad images as zeros (a source's pixels past its
    recorded shape are left as they are: nothing reads them).
    """
    arrays = out if out is not None else {g: np.zeros((batch_size, g.size, g.size, 3), np.uint8)
                                          for g in geometries}
    crops = out_sources if out_sources is not None else _new_sources(batch_size, sources)
    bad = []
    decodes = 0
    for row, path in enumerate(paths):
        try:
            views, cuts, count = _decode_image(path, geometries, sources)
        except Exception as exc:  # any file Pillow cannot turn into pixels is a bad image
            bad.append((row, unreadable_reason(exc, path)))
            decodes += 1
            if out is not None:
                for g in geometries:
                    arrays[g][row] = 0
            for s in sources:
                crops[s].shapes[row] = 0
                crops[s].regions[row] = 0
            continue
        decodes += count
        for g, view in views.items():
            arrays[g][row] = view
        for s, (pixels, region) in cuts.items():
            height, width = pixels.shape[:2]
            crops[s].pixels[row, :height, :width] = pixels
            crops[s].shapes[row] = (height, width)
            crops[s].regions[row] = region
    if out is not None:
        for g in geometries:
            arrays[g][len(paths):] = 0
    for s in sources:
        crops[s].shapes[len(paths):] = 0
        crops[s].regions[len(paths):] = 0
    return DecodedBatch(start=start, count=len(paths), arrays=arrays, bad=tuple(bad), decodes=decodes,
                        sources=crops)


def _fields(batch_size: int, geometries: Sequence[Geometry], sources: Sequence[CamSource]) -> list[tuple]:
    """``(key, shape, dtype)`` of every array of a block: the geometries', then each source's
    pixels, shapes and regions."""
    fields = [(g, (batch_size, g.size, g.size, 3), np.uint8) for g in geometries]
    for s in sources:
        fields += [((s, "pixels"), (batch_size, s.side, s.side, 3), np.uint8),
                   ((s, "shapes"), (batch_size, 2), np.int32), ((s, "regions"), (batch_size, 4), np.float32)]
    return fields


def _layout(batch_size: int, geometries: Sequence[Geometry], sources: Sequence[CamSource] = ()) -> tuple[list[int], int]:
    """Byte offsets of each array of a block (:func:`_fields`' order), and the block's size."""
    offsets, total = [], 0
    for _, shape, dtype in _fields(batch_size, geometries, sources):
        total = -(-total // 64) * 64  # every array aligned, whatever its dtype
        offsets.append(total)
        total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return offsets, total


def batch_bytes(batch_size: int, geometries: Sequence[Geometry], sources: Sequence[CamSource] = ()) -> int:
    """The bytes of one decoded batch (a shared-memory block of the local engine), cam sources included."""
    return _layout(batch_size, geometries, sources)[1]


def _arrays(buffer, batch_size: int, geometries: Sequence[Geometry], sources: Sequence[CamSource] = ()
            ) -> tuple[dict[Geometry, np.ndarray], dict[CamSource, CropSource]]:
    offsets, _ = _layout(batch_size, geometries, sources)
    views = {key: np.ndarray(shape, dtype, buffer, offset)
             for (key, shape, dtype), offset in zip(_fields(batch_size, geometries, sources), offsets)}
    return ({g: views[g] for g in geometries},
            {s: CropSource(views[s, "pixels"], views[s, "shapes"], views[s, "regions"]) for s in sources})


#: In a worker: the blocks it has attached, by name (attached once, kept for the pool's life).
_ATTACHED: dict[str, tuple[shared_memory.SharedMemory, tuple]] = {}


def _decode_into(block: str, start: int, paths: Sequence[str], batch_size: int,
                 geometries: Sequence[Geometry], sources: Sequence[CamSource] = ()) -> tuple[int, int, tuple, int]:
    """In a worker: decode a batch into the shared block ``block``; ``(start, count, bad, decodes)``."""
    if block not in _ATTACHED:
        memory = shared_memory.SharedMemory(block)
        _ATTACHED[block] = (memory, _arrays(memory.buf, batch_size, geometries, sources))
    arrays, crops = _ATTACHED[block][1]
    decoded = decode_batch(start, paths, batch_size, geometries, arrays, sources, crops)
    return decoded.start, decoded.count, decoded.bad, decoded.decodes


_SHM = Path("/dev/shm")


def _new_block(name: str, size: int) -> shared_memory.SharedMemory:
    """A new shared-memory block of ``size`` bytes; :class:`OSError` when it cannot be had (a
    file-size limit, ``ulimit -f``; a full /dev/shm), the block removed (:func:`block_error`
    says it in one line). Sized, and its memory claimed, on a descriptor of its own before
    ``SharedMemory`` attaches: when sizing fails, ``SharedMemory(create=True)`` unregisters a
    block it never registered and the resource tracker prints a traceback; and a worker writing
    into memory /dev/shm has no room for would die of SIGBUS. Whatever stops it (a Ctrl-C
    too), no block is left behind."""
    try:
        import _posixshmem
    except ImportError:  # Windows: no resource tracker
        return shared_memory.SharedMemory(name, create=True, size=size)
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
        except AttributeError:  # macOS: no posix_fallocate
            pass
        except OSError as exc:  # a system whose shared memory cannot claim ahead: used as it is
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise
    except BaseException:
        _unlink_block(_posixshmem, name)
        raise
    finally:
        os.close(fd)
    try:
        return shared_memory.SharedMemory(name)
    except BaseException:
        _unlink_block(_posixshmem, name)  # (SharedMemory unlinks it itself when its mmap fails)
        raise


def _unlink_block(posixshmem, name: str) -> None:
    try:
        posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def block_error(name: str, size: int, exc: OSError):
    """The one line (an :class:`EnsError`) of a block :func:`_new_block` could not make."""
    from ensemble.errors import EnsError

    fix = {errno.EFBIG: "raise the file-size limit (ulimit -f), or use a smaller --batch-size",
           errno.ENOSPC: "the shared memory is full (a container's is 64 MB unless given --shm-size): give it "
                         "more, or use a smaller --batch-size, or --workers 0 (decoding without it)",
           }.get(exc.errno, "use a smaller --batch-size, or --workers 0 (decoding without shared memory)")
    return EnsError(f"shared memory {_SHM / name if _SHM.is_dir() else name} ({size} bytes, a batch of decoded "
                    f"images): {exc.strerror}; {fix}")


def remove_stale_blocks(folder: Path = _SHM) -> list[str]:
    """Unlink the shared-memory blocks of ``ens infer`` runs that were killed (SIGKILL, the OOM
    killer, a restarted notebook kernel) before they could; the names of those removed.

    Blocks are named ``ens-<pid>-...``; those whose process is gone are stale.
    """
    removed = []
    try:
        names = [p.name for p in folder.iterdir() if p.name.startswith("ens-")]
    except OSError:  # no /dev/shm here (macOS): named blocks live elsewhere, and are left alone
        return removed
    for name in names:
        pid = name.split("-")[1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            (folder / name).unlink()
            removed.append(name)
        except OSError:  # another user's, or another run removed it first
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def queue_budget(memory: int | None) -> int:
    """The bytes the decoded batches may take of a run's ``memory`` (bytes of ``--memory``;
    ``None``: :data:`PREFETCH_BYTES`)."""
    return PREFETCH_BYTES if memory is None else min(PREFETCH_BYTES, int(memory * QUEUE_SHARE))


def queue_batches(workers: int, batch_bytes: int, budget: int = PREFETCH_BYTES) -> int:
    """Batches in flight (the one the model holds included): two per worker, plus two, within
    ``budget`` bytes; never fewer than two, so decoding overlaps the model."""
    return max(2, min(2 * workers + 2, budget // max(batch_bytes, 1)))


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
    process can deadlock) and run at a lower priority than the parent. They decode into
    shared-memory blocks, one batch each, reused: the arrays of a batch yielded by :meth:`map`
    stay valid until the next batch is asked for. Blocks are made as batches need them, up to
    ``prefetch`` (a one-batch run makes one); when the shared memory is full, decoding goes on
    with the blocks made if there are two or more (``note`` says so, once), else stops in one
    line.
    """

    geometries: tuple[Geometry, ...]
    batch_size: int
    workers: int = 1
    prefetch: int | None = None
    sources: tuple[CamSource, ...] = ()
    #: Where a line for the user goes (the shared memory had room for fewer blocks).
    note: Callable[[str], None] | None = None
    #: The bytes the blocks may take together (:func:`queue_batches`; `ens infer` gives its
    #: share of ``--memory``).
    queue_budget: int = PREFETCH_BYTES
    #: Seconds the consumer spent waiting for decoded batches (the decoding was the bottleneck).
    waited: float = field(init=False, default=0.0)
    _pool: ProcessPoolExecutor | None = field(init=False, default=None)
    _blocks: list = field(init=False, default_factory=list)
    _prefix: str = field(init=False, default="")
    _full: bool = field(init=False, default=False)  # the shared memory had no room for another block

    def __post_init__(self) -> None:
        self.batch_bytes = batch_bytes(self.batch_size, self.geometries, self.sources)
        if self.prefetch is None:
            self.prefetch = queue_batches(self.workers, self.batch_bytes, self.queue_budget)

    @property
    def queue_bytes(self) -> int:
        """The memory of the decoded batches in flight and waiting (0 when decoding inline)."""
        return len(self._blocks) * self.batch_bytes

    def __enter__(self) -> "Decoder":
        if self.workers > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["ensemble.inference.decode"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init)
            self._pool.submit(int)  # the first task starts the processes: now, not at the first batch
            remove_stale_blocks()
            self._prefix = f"ens-{os.getpid()}-{secrets.token_hex(4)}"
        return self

    def _grow(self, wanted: int) -> None:
        """Make blocks up to ``wanted`` (at most ``prefetch``): as many as the batches at hand
        can use. A full shared memory with two blocks made or more: decode with those."""
        wanted = min(wanted, self.prefetch)
        while len(self._blocks) < wanted and not self._full:
            name, size = f"{self._prefix}-{len(self._blocks)}", max(self.batch_bytes, 1)
            try:
                memory = _new_block(name, size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or len(self._blocks) < 2:
                    raise block_error(name, size, exc) from None
                self._full = True
                if self.note is not None:
                    where = _SHM if _SHM.is_dir() else "the shared memory"
                    self.note(f"shared memory: {where} has room for {len(self._blocks)} of the {wanted} batches of "
                              f"decoded images ({size} bytes each) the decoding processes could use; decoding with "
                              f"{len(self._blocks)} (a smaller --batch-size or --workers, or a larger {where}, "
                              "would use more)")
                return
            self._blocks.append((memory, _arrays(memory.buf, self.batch_size, self.geometries, self.sources)))

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for memory, _ in self._blocks:
            try:
                memory.close()
            except BufferError:  # a caller still holds a batch's arrays: the mapping goes with them
                pass
            memory.unlink()
        self._blocks = []

    def map(self, batches: Iterable[tuple[int, Sequence[str]]]) -> Iterator[DecodedBatch]:
        """``(start row, paths)`` batches -> :class:`DecodedBatch` es, in the same order."""
        args = (self.batch_size, self.geometries, self.sources)
        if self._pool is None:
            for start, paths in batches:
                yield decode_batch(start, paths, self.batch_size, self.geometries, sources=self.sources)
            return
        pool = self._pool

        def submit(block: int, start: int, paths: Sequence[str]) -> tuple[int, Future]:
            name = self._blocks[block][0].name
            return block, pool.submit(_decode_into, name, start, [str(p) for p in paths], *args)

        batches = iter(batches)
        first = list(itertools.islice(batches, self.prefetch))
        self._grow(len(first))
        waiting = collections.deque(first[len(self._blocks):])  # taken, for a block to come free
        pending = collections.deque(submit(i, *b) for i, b in enumerate(first[:len(self._blocks)]))
        while pending:
            block, future = pending.popleft()
            tick = time.perf_counter()
            start, count, bad, decodes = future.result()
            self.waited += time.perf_counter() - tick
            arrays, crops = self._blocks[block][1]
            yield DecodedBatch(start=start, count=count, arrays=arrays, bad=bad, decodes=decodes, sources=crops)
            # The consumer is done with this block: it takes the next batch.
            following = waiting.popleft() if waiting else next(batches, None)
            if following is not None:
                pending.append(submit(block, *following))
