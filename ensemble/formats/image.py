"""An image file of a dataset split, read the same way by every reader of one (`ens infer` decodes
the images, `ens report` draws the hardest ones as thumbnails): :func:`open_image` with its
checks, :func:`unreadable_reason` (why one could not be read, in a few words) and
:func:`to_rgb`, the 8-bit RGB a photo viewer shows of any image mode.

* Only a regular file is opened: a FIFO nobody writes to would block the read forever, and a
  device such as ``/dev/zero`` never ends (:class:`NotRegularFile`).
* Pillow's decompression-bomb limit holds (``PIL.Image.MAX_IMAGE_PIXELS``, unchanged): a file
  of a few bytes whose header declares more than twice that many pixels (30000 x 30000) is
  refused when opened, before any pixel is decoded (``PIL.Image.DecompressionBombError``).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ensemble.formats.common import describe


class NotRegularFile(OSError):
    """A FIFO, device, socket or folder where an image file should be: reading it could wait forever."""

    def __init__(self, path: str | Path, folder: bool = False):
        super().__init__(f"{path}: {'a folder' if folder else 'not a regular file'}")
        self.folder = folder


def open_image(path: str | Path) -> Image.Image:
    """Open the image at ``path`` (its header only: nothing is decoded yet), once it is known to be
    a regular file. Raises :class:`NotRegularFile`, the :class:`OSError` of a missing or
    unreadable file, Pillow's ``UnidentifiedImageError`` and ``DecompressionBombError``."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, folder=stat.S_ISDIR(mode))
    image = Image.open(path)
    if image.format == "TIFF" and image.getexif().get(0x0112) in (5, 6, 7, 8):
        # Pillow 13 maps an uncompressed TIFF's pixels from the file at the size its EXIF rotation
        # swaps, then rotates them: scrambled. Read from memory, they decode right.
        image.close()
        image = Image.open(io.BytesIO(Path(path).read_bytes()))
    return image


#: The first bytes of every JPEG file (SOI, then a marker's 0xFF): what Pillow's JPEG plugin checks.
JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(path: str | Path) -> bool:
    """Whether ``path`` is a regular file that starts as a JPEG does (:data:`JPEG_MAGIC`, 3 bytes
    read); ``False`` for anything else, and for a file that cannot be read. A JPEG decodes to
    L, RGB or CMYK only (never 16 bits, never transparency), the modes whose pixels
    :func:`to_rgb` makes as Pillow's ``convert("RGB")`` does. A FIFO is never opened."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:  # swapped for a FIFO since the stat: nothing waits on it
            return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, len(JPEG_MAGIC)) == JPEG_MAGIC
        finally:
            os.close(fd)
    except OSError:
        return False


def unreadable_reason(exc: BaseException, path: str | Path) -> str:
    """Why the image at ``path`` could not be read (``exc``: what opening or decoding it raised),
    in a few words; the caller names the path."""
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, NotRegularFile):
        return "a folder, not an image file" if exc.folder else "not a regular file (a FIFO, device or socket)"
    if isinstance(exc, UnidentifiedImageError):
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "empty file" if empty else "not an image Pillow can read"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels to decode safely, over Pillow's decompression-bomb limit ({describe(exc)})"
    return describe(exc)


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB a photo viewer shows of ``image``, whatever its mode; a new image (even of
    an RGB one), detached from the file.

    * 16-bit grayscale (``I;16``, ``I;16B``, ...): the high byte of each value (``v >> 8``);
    * ``I`` (32-bit integers): read as 16-bit values, as Pillow hands over many 16-bit files:
      clipped to 0..65535, then ``v >> 8``, so a 16-bit image reads the same in either mode;
    * ``F`` (32-bit floats): 0.0 is black and 1.0 white, as image editors show float images;
      values outside are clipped, NaN is black;
    * transparency (an alpha band, premultiplied or not, a palette's transparent entries, PNG's
      transparent colour or gray value): composited on white, as viewers show it;
    * the rest (bilevel, palette, CMYK, YCbCr, LAB, HSV, RGBX): Pillow's conversion to RGB.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image)
        if mode == "F":
            gray = np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0) * np.float32(255) + np.float32(0.5)
        else:  # int32 or uint16 (either byte order): no wider copy of a large image
            gray = np.clip(values, 0, 65535) >> 8
        gray = Image.fromarray(gray.astype(np.uint8))
        if "transparency" in image.info and mode != "F":  # PNG's transparent gray value
            alpha = np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)
            return _on_white(Image.merge("RGBA", (gray, gray, gray, Image.fromarray(alpha))))
        return gray.convert("RGB")
    if image.has_transparency_data:  # Pillow converts premultiplied La only to LA
        return _on_white((image.convert("LA") if mode == "La" else image).convert("RGBA"))
    # convert copies even an RGB image, which detaches the result from the closed file.
    return image.convert("RGB")


def _on_white(image: Image.Image) -> Image.Image:
    """An RGBA image composited on a white background, as RGB."""
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
