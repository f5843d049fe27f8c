"""Thumbnails for the report: small JPEGs as ``data:`` URIs, CAM boxes drawn on them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

#: Longest side of a thumbnail in pixels, and its JPEG quality: 24 of them stay near 100 kB.
THUMB_SIZE = 160
QUALITY = 70


def thumbnail(path: Path, boxes: Mapping[str, Sequence[float]] = {}, colours: Mapping[str, str] = {},
              size: int = THUMB_SIZE) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of the image at ``path``, one rectangle per
    model in ``boxes`` (normalised ``x0, y0, x1, y1`` of the image as the model saw it, drawn
    on the whole image) in ``colours[model]``; None when the image cannot be read."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    image.thumbnail((size, size))
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for model, box in boxes.items():
        x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
        draw.rectangle((x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1)), outline=colours.get(model, "#ff0000"),
                       width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
