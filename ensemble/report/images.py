"""Thumbnails for the report: small JPEGs as ``data:`` URIs, CAM boxes drawn on them.

The image files are opened as `ens infer` opens them (:func:`ensemble.formats.image.open_image`):
a FIFO or device is never read, and a file declaring more pixels than Pillow's decompression-bomb
limit is never decoded; either is an :class:`UnreadableImage` with the reason, which the page
shows in place of the picture.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageOps

from ensemble.formats.image import open_image, to_rgb, unreadable_reason

#: Longest side of a thumbnail in pixels, and its JPEG quality: 24 of them stay near 100 kB.
THUMB_SIZE = 160
QUALITY = 70


class UnreadableImage(OSError):
    """An image the report cannot draw; ``reason``: why, in a few words (the file is named apart)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def thumbnail(path: Path, boxes: Mapping[str, Sequence[float]] = {}, colours: Mapping[str, str] = {},
              size: int = THUMB_SIZE) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail of the image at ``path``, one rectangle per
    model in ``boxes`` (normalised ``x0, y0, x1, y1`` of the image as the model saw it, drawn
    on the whole image) in ``colours[model]``. :class:`UnreadableImage` (with the reason) when
    the image cannot be read: missing, not a regular file, not an image, damaged, over Pillow's
    decompression-bomb limit."""
    try:
        with warnings.catch_warnings():
            # Between Pillow's limit and twice it an image is decoded, as `ens infer` decodes it,
            # without Pillow's warning on stderr.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as image:
                image = to_rgb(ImageOps.exif_transpose(image))  # every mode as `ens infer` sees it
    except Exception as exc:  # whatever Pillow raises on a damaged file: the page says it, the report goes on
        raise UnreadableImage(path, unreadable_reason(exc, path)) from None
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
