"""The cam view's box: where a class activation map says the subject is, as a square to crop.

Pure maths on numpy arrays; no file or model IO. A model exported with a CAM output
(:data:`ensemble.formats.model.CAM_OUTPUT`) gives, with its identity view's logits, a ``(h, w)`` map
per image: the top-1 class's classifier row dotted with the last feature map. Its grid covers
the *region* of the image that the identity view sees (the centred ``crop_pct`` square of a
``center-crop`` model, the whole image for ``squash``). :func:`cam_box` turns it into the pixel
box that the cam view crops from that region, following CAM (Zhou et al., CVPR 2016: "Learning
Deep Features for Discriminative Localization", segment at 20% of the map's maximum, take the
bounding box of the largest part) and WS-DAN's test-time crop (Hu et al. 2019):

1. the map is scaled to [0, 1] (its minimum to 0, its maximum to 1: a CAM is a signed sum, so
   "threshold x maximum" is taken above the minimum), and the cells at or above ``threshold``
   are kept;
2. of those, the 4-connected part that holds the maximum (the first maximum in row-major order
   on ties), not the largest part: the box follows the evidence for the predicted class;
3. its bounding box in the region's pixels (each grid cell covers ``region / grid`` pixels),
   grown on every side by ``pad`` times its width and height;
4. made square (the models' inputs are square; a square crop resized to the input is not
   distorted), at least ``min_size`` of the region's shorter side, at most that side;
5. moved, not shrunk, to lie inside the region, and rounded to whole pixels.

A flat map (or one with no finite value) has no place to point at: its box is the whole region
(the largest centred square of it when the region is not square).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ensemble.errors import EnsError
from ensemble.formats.common import is_finite


@dataclass(frozen=True)
class CamSettings:
    """``--cam-threshold``, ``--cam-pad`` and ``--cam-min``: see the module docstring."""

    threshold: float = 0.2
    pad: float = 0.1
    min_size: float = 0.25

    def check(self) -> "CamSettings":
        """``self``, or :class:`EnsError` naming the option out of its range."""
        for flag, value, low, high in (("--cam-threshold", self.threshold, 0.0, 1.0),
                                       ("--cam-pad", self.pad, 0.0, 1.0),
                                       ("--cam-min", self.min_size, 0.01, 1.0)):
            if not (is_finite(value) and low <= value <= high):
                raise EnsError(f"{flag} {value}: must lie in [{low:g}, {high:g}]")
        return self

    def record(self) -> dict[str, float]:
        """The settings as stores and run keys record them."""
        return {"threshold": float(self.threshold), "pad": float(self.pad), "min": float(self.min_size)}

    @classmethod
    def from_record(cls, values: dict) -> "CamSettings":
        return cls(values["threshold"], values["pad"], values["min"])


def _round(value: float) -> int:
    return int(math.floor(value + 0.5))  # half up, the same on every platform


def cam_box(cam: np.ndarray, height: int, width: int, settings: CamSettings = CamSettings()) -> tuple[int, int, int, int]:
    """The square pixel box ``(x0, y0, x1, y1)`` (ends exclusive) that ``cam`` points at, inside
    a ``(height, width)`` region that the ``(h, w)`` map covers."""
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"expected a (h, w) map, got shape {cam.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"a {height}x{width} region holds no box")
    grid_h, grid_w = cam.shape
    values = np.asarray(cam, np.float64)
    finite = np.isfinite(values)
    low = values[finite].min() if finite.any() else 0.0
    high = values[finite].max() if finite.any() else 0.0
    if high > low:
        scaled = np.where(finite, (values - low) / (high - low), 0.0)
        parts, _ = ndimage.label(scaled >= settings.threshold)  # 4-connected: the default structure
        peak = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
        rows, cols = np.nonzero(parts == parts[peak])
        x0, x1 = cols.min() * width / grid_w, (cols.max() + 1) * width / grid_w
        y0, y1 = rows.min() * height / grid_h, (rows.max() + 1) * height / grid_h
    else:
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    grow_x, grow_y = settings.pad * (x1 - x0), settings.pad * (y1 - y0)
    x0, x1, y0, y1 = x0 - grow_x, x1 + grow_x, y0 - grow_y, y1 + grow_y
    shorter = min(height, width)
    side = min(max(x1 - x0, y1 - y0, settings.min_size * shorter), shorter)
    side = min(max(_round(side), 1), shorter)
    left = min(max(_round((x0 + x1 - side) / 2), 0), width - side)
    top = min(max(_round((y0 + y1 - side) / 2), 0), height - side)
    return left, top, left + side, top + side


def to_image(box: tuple[int, int, int, int], height: int, width: int, region: np.ndarray) -> np.ndarray:
    """A pixel box of a ``(height, width)`` region as normalised ``(x0, y0, x1, y1)`` float32 of
    the whole image, given the region's own normalised box ``region`` ``(4,)``."""
    rx0, ry0, rx1, ry1 = (float(v) for v in region)
    x0, y0, x1, y1 = box
    return np.array([rx0 + x0 / width * (rx1 - rx0), ry0 + y0 / height * (ry1 - ry0),
                     rx0 + x1 / width * (rx1 - rx0), ry0 + y1 / height * (ry1 - ry0)], np.float32)

