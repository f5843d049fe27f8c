"""Test-time augmentation: which views of an image a model sees, and how their logits merge.

Pure maths on numpy arrays; no file or model IO. A *view* is one way of turning an image into
the model's input: a scale of the model's size, a crop position and an optional horizontal
flip. The ``--tta`` names add axes of views and the views are their product, identity first::

    flip    flips (no, yes)
    scale   scales (1.0 plus ``--scales``)
    crop5   positions (centre, top-left, top-right, bottom-left, bottom-right)
    crop10  crop5 and flip
    cam     a crop of where the model looks (with flip: flipped too), after the other views

How a view becomes pixels is its :class:`Geometry`: resize the image onto a *canvas*, then cut
a square from it. Views of different models that have equal geometries share one array, cut
from the single decode of each image (:mod:`ensemble.inference.decode`); flips are applied to whole
batches here (:func:`hflip`), not decoded separately. A cam view has no geometry of its own: its
pixels are cut, after the identity view's forward pass, from a :class:`CamSource` (the region
the identity view sees, kept at the decode's resolution) where the model's class activation
map points (:mod:`ensemble.inference.cam`).

Merging turns ``(views, batch, classes)`` logits into ``(batch, classes)`` scores whose softmax
is the merged probability. ``mean-probs`` and ``gmean`` work in log space through
:func:`scipy.special.log_softmax`, so no probability underflows to a log of zero and no merge returns NaN for
finite logits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.special import log_softmax, logsumexp

from ensemble.errors import EnsError
from ensemble.inference.cam import CamSettings
from ensemble.formats.model import check_preprocess
from ensemble.inference.options import DEFAULT_SCALES
POSITIONS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
_POSITION_LABELS = {"top-left": "tl", "top-right": "tr", "bottom-left": "bl", "bottom-right": "br"}
#: The canvas a policy resizes onto: the shorter side to a length, or a square.
CANVASES = ("short", "square")


@dataclass(frozen=True)
class View:
    """One test-time view: the model's size times ``scale``, a crop position, a flip; or, with
    ``cam``, the crop where the model's class activation map points (at the model's size)."""

    scale: float = 1.0
    position: str = "center"
    flip: bool = False
    cam: bool = False

    @property
    def name(self) -> str:
        """A stable label: ``identity``, ``flip``, ``scale0.875``, ``crop-tl+flip``, ``cam+flip``, ..."""
        parts = ["cam"] if self.cam else []
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:g}")
        if self.position != "center":
            parts.append(f"crop-{_POSITION_LABELS[self.position]}")
        if self.flip:
            parts.append("flip")
        return "+".join(parts) or "identity"


@dataclass(frozen=True)
class _Axes:
    scales: tuple[float, ...] = (1.0,)
    positions: tuple[str, ...] = ("center",)
    flips: tuple[bool, ...] = (False,)
    cam: bool = False


#: ``--tta`` name -> how it widens the view axes (given ``--scales``).
TTA: dict[str, Callable[[_Axes, tuple[float, ...]], _Axes]] = {
    "identity": lambda axes, scales: axes,
    "flip": lambda axes, scales: dataclasses.replace(axes, flips=(False, True)),
    "scale": lambda axes, scales: dataclasses.replace(axes, scales=scales),
    "crop5": lambda axes, scales: dataclasses.replace(axes, positions=POSITIONS),
    "crop10": lambda axes, scales: dataclasses.replace(axes, positions=POSITIONS, flips=(False, True)),
    "cam": lambda axes, scales: dataclasses.replace(axes, cam=True),
}


def tta_mode(name: str) -> Callable[[_Axes, tuple[float, ...]], _Axes]:
    """The registered TTA ``name``; :class:`EnsError` naming the valid choices otherwise."""
    try:
        return TTA[name]
    except KeyError:
        raise EnsError(f"--tta {name}: choose from {', '.join(TTA)}") from None


def plan_views(tta: Sequence[str], scales: Sequence[float] = DEFAULT_SCALES) -> tuple[View, ...]:
    """The views for ``--tta`` names: identity first, then scale x position x flip, no repeats;
    then, with ``cam``, the cam view and (with flips) its mirror image."""
    for scale in scales:
        if not (math.isfinite(scale) and 0.1 <= scale <= 10):
            raise EnsError(f"--scales {','.join(f'{s:g}' for s in scales)}: each scale must lie in [0.1, 10]")
    # Identity is always a view, so 1.0 leads the scales whatever order the user gave.
    ordered = tuple(dict.fromkeys((1.0, *(float(s) for s in scales))))
    axes = _Axes()
    for name in tta:
        axes = tta_mode(name)(axes, ordered)
    views = [View(s, p, f) for s, p, f in itertools.product(axes.scales, axes.positions, axes.flips)]
    if axes.cam:
        views += [View(flip=f, cam=True) for f in axes.flips]
    return tuple(dict.fromkeys(views))


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input made (the fields of :class:`~ensemble.formats.model.ModelMetadata`)."""

    input_size: int
    resize: str = "center-crop"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    @classmethod
    def of(cls, meta) -> "Preprocess":
        return cls(meta.input_size, meta.resize, meta.crop_pct, meta.interpolation)


@dataclass(frozen=True)
class Geometry:
    """How one decoded image becomes one ``(size, size, 3)`` uint8 array.

    Resize the image onto the canvas (``short``: its shorter side becomes ``canvas_size``, the
    aspect ratio kept; ``square``: ``canvas_size`` x ``canvas_size``), then cut the ``size``
    square at ``position``. ``decode_side`` (0: ``canvas_size``) is the shorter side a reduced
    JPEG decode must keep: the largest canvas among the views of the model that asked (see
    :func:`geometries`), so what a model sees never depends on the other models of a run.
    Equal geometries give equal arrays, whichever model asked.
    """

    canvas: str
    canvas_size: int
    size: int
    position: str = "center"
    interpolation: str = "bilinear"
    decode_side: int = 0

    @property
    def min_side(self) -> int:
        """The shorter side the decoded image keeps before it is resized onto the canvas."""
        return self.decode_side or self.canvas_size


def _canvas_side(size: int, crop_pct: float) -> int:
    # timm's rule (floor of size / crop_pct); the epsilon keeps 224 / 0.875 at 256, not 255.
    return int(math.floor(size / crop_pct + 1e-6))


def view_size(pre: Preprocess, view: View) -> int:
    """The input side a model gets for ``view``."""
    return int(round(pre.input_size * view.scale))


def geometry(pre: Preprocess, view: View) -> Geometry:
    """Where ``view``'s pixels come from for a model with preprocessing ``pre``.

    ``center-crop``: the shorter side goes to size / crop_pct and the crops (centre or corner,
    as torchvision's FiveCrop) are cut from that canvas. ``squash``: the centre view is the
    whole image squashed to size x size (the model's own view); corner crops come from the
    image squashed to (size / crop_pct) squared.
    """
    # Metadata and foreign-model options are checked when read; this keeps a hand-made
    # Preprocess to the same rules (the one check, ensemble.formats.model.check_preprocess).
    check_preprocess(resize=pre.resize, interpolation=pre.interpolation)
    size = view_size(pre, view)
    if pre.resize == "center-crop":
        canvas, side = "short", _canvas_side(size, pre.crop_pct)
    else:  # squash
        canvas = "square"
        side = size if view.position == "center" else _canvas_side(size, pre.crop_pct)
    return Geometry(canvas, side, size, view.position, pre.interpolation)


def geometries(pre: Preprocess, views: Sequence[View], cam_min: float = CamSettings.min_size) -> tuple[Geometry, ...]:
    """The geometry of each of a model's views, all decoded alike: from one decode whose shorter
    side keeps the largest canvas of these views (so a reduced decode never upsamples a view)
    and, with a cam view, the pixels its crops need (:func:`cam_source`; ``cam_min``:
    ``--cam-min``). A cam view's entry is the identity view's geometry, whose forward pass it
    follows."""
    plain = [geometry(pre, dataclasses.replace(view, cam=False)) for view in views]
    side = max(g.canvas_size for g in plain)
    if any(view.cam for view in views):
        side = max(side, _cam_decode_side(pre, cam_source_side(pre, cam_min)))
    return tuple(dataclasses.replace(g, decode_side=side) for g in plain)


#: The longest side a :class:`CamSource` keeps, whatever ``--cam-min``: bounds the memory of the
#: decoded batches (iNat photos, at most 800 px, are never shrunk by it).
CAM_SOURCE_MAX = 1024


@dataclass(frozen=True)
class CamSource:
    """The pixels a model's cam views crop from: the region of the image that its identity view
    (``geometry``) sees, as decoded, shrunk (aspect kept) only where its longer side exceeds
    ``side``. Models with equal sources share one array."""

    geometry: Geometry
    side: int


def cam_source_side(pre: Preprocess, cam_min: float) -> int:
    """The longest side a model's cam source keeps: the smallest crop (``cam_min`` of the
    region) then still has the model's input size in pixels, so nothing the crop pass could use
    is thrown away; at most :data:`CAM_SOURCE_MAX`."""
    return min(int(math.ceil(pre.input_size / cam_min - 1e-9)), CAM_SOURCE_MAX)


def _cam_decode_side(pre: Preprocess, side: int) -> int:
    """The shorter side a reduced decode must keep so that the region keeps ``side`` pixels."""
    if pre.resize == "squash":  # the whole image: its longer side is at least the shorter
        return side
    size = pre.input_size
    return int(math.ceil(side * _canvas_side(size, pre.crop_pct) / size))


def cam_source(pre: Preprocess, views: Sequence[View], cam_min: float = CamSettings.min_size) -> CamSource:
    """The :class:`CamSource` of a model with these views (one of them a cam view)."""
    return CamSource(geometries(pre, views, cam_min)[0], cam_source_side(pre, cam_min))


def source_box(height: int, width: int, geometry: Geometry) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` pixels of a ``(height, width)`` decoded image that the centre view
    ``geometry`` sees: the whole image on a square canvas; on a ``short`` canvas the crop,
    mapped back through the resize."""
    if geometry.canvas == "square":
        return 0, 0, width, height
    canvas_h, canvas_w = canvas_shape(height, width, geometry.canvas, geometry.canvas_size)
    top, left = crop_box(canvas_h, canvas_w, geometry.size, geometry.position)
    sx, sy = width / canvas_w, height / canvas_h
    x0, y0 = int(math.floor(left * sx + 0.5)), int(math.floor(top * sy + 0.5))
    x1 = min(int(math.floor((left + geometry.size) * sx + 0.5)), width)
    y1 = min(int(math.floor((top + geometry.size) * sy + 0.5)), height)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def canvas_shape(height: int, width: int, canvas: str, canvas_size: int) -> tuple[int, int]:
    """``(height, width)`` of an image of that size resized onto the canvas (torchvision's Resize)."""
    if canvas == "square":
        return canvas_size, canvas_size
    if height <= width:
        return canvas_size, int(canvas_size * width / height)
    return int(canvas_size * height / width), canvas_size


def crop_box(height: int, width: int, size: int, position: str) -> tuple[int, int]:
    """``(top, left)`` of the ``size`` square at ``position`` in a ``(height, width)`` canvas.

    The centre is rounded as torchvision's CenterCrop does. A canvas smaller than ``size`` (only
    from a crop_pct above 1) is not supported: :func:`crop` pads nothing.
    """
    if position == "center":
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    top = 0 if position.startswith("top") else height - size
    left = 0 if position.endswith("left") else width - size
    return top, left


def crop(image: np.ndarray, size: int, position: str) -> np.ndarray:
    """The ``(size, size, 3)`` view at ``position`` of an ``(height, width, 3)`` image."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"a {height}x{width} canvas cannot hold a {size} px crop")
    top, left = crop_box(height, width, size, position)
    return image[top:top + size, left:left + size]


def hflip(batch: np.ndarray) -> np.ndarray:
    """Mirror ``(batch, height, width, channels)`` images left to right (a view, not a copy)."""
    return batch[:, :, ::-1]


def _mean_logits(views: np.ndarray) -> np.ndarray:
    return views.astype(np.float64).mean(axis=0)


def _log_softmax(views: np.ndarray) -> np.ndarray:
    return log_softmax(views.astype(np.float64), axis=-1)


def _mean_probs(views: np.ndarray) -> np.ndarray:
    # log(mean_v softmax(x_v)) = logsumexp_v(log_softmax(x_v)) - log(V): no log of an underflow.
    return logsumexp(_log_softmax(views), axis=0) - math.log(views.shape[0])


def _gmean(views: np.ndarray) -> np.ndarray:
    # The log of the geometric mean of probabilities, up to a per-row constant that softmax drops.
    return _log_softmax(views).mean(axis=0)


#: ``--merge`` name -> ``(views, batch, classes)`` logits to ``(batch, classes)`` float64 scores.
MERGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean-logits": _mean_logits,
    "mean-probs": _mean_probs,
    "gmean": _gmean,
}


def merge_mode(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The registered merge ``name``; :class:`EnsError` naming the valid choices otherwise."""
    try:
        return MERGES[name]
    except KeyError:
        raise EnsError(f"--merge {name}: choose from {', '.join(MERGES)}") from None


def merge(views: np.ndarray, mode: str = "mean-logits") -> np.ndarray:
    """Merge ``(views, batch, classes)`` logits into ``(batch, classes)`` float64 scores.

    ``mean-logits``: the mean logit. ``mean-probs``: log of the mean probability. ``gmean``:
    mean log-probability (the log of the geometric mean, unnormalised). In every mode
    ``softmax(result)`` is the merged probability, and finite logits give finite results.
    """
    if views.ndim != 3:
        raise ValueError(f"expected (views, batch, classes) logits, got shape {views.shape}")
    return merge_mode(mode)(views)
