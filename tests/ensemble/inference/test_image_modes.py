"""Every image mode Pillow opens decodes to the 8-bit RGB a photo viewer shows (docs/infer.md,
"Image modes"): 16-bit grayscale by its high byte, ``I`` read as 16-bit and clipped, ``F`` as
0.0 (black) .. 1.0 (white), transparency composited on white, the colour spaces (CMYK, YCbCr,
LAB, HSV) through Pillow's conversions.

The expected pixels come from a reference written here in numpy from each mode's definition,
applied to what the file holds (the mode and the raw values Pillow reopens it with: a writer
may convert, and JPEG is lossy), never from ens's decoder. Every mode is written to every
format Pillow can write it to, and decoded by ens as ``ens infer`` decodes files.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
from PIL import Image

from ensemble.formats.image import to_rgb
from ensemble.inference.decode import decode_image, load_image
from ensemble.inference.tta import Geometry

#: Every mode Pillow 13 has (``Image.MODES``).
MODES = ("1", "L", "LA", "La", "P", "PA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "RGB", "RGBA", "RGBa",
         "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
#: The formats of the image suffixes ens reads, with the options that make each as faithful as it goes.
FORMATS = {"PNG": {}, "TIFF": {}, "WEBP": {"lossless": True}, "JPEG": {"quality": 100, "subsampling": 0},
           "BMP": {}, "GIF": {}}
W, H = 16, 6


def _source(mode: str) -> Image.Image:
    """A ``W x H`` image of ``mode`` whose values span the mode's range: ramps, extremes and
    (for alpha) opaque, half and fully transparent pixels."""
    rng = np.random.default_rng(sum(map(ord, mode)))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (H, W)).astype(bool))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        values = rng.integers(0, 65536, (H, W)).astype(np.uint16)
        values[0, :4] = (0, 255, 256, 65535)
        image = Image.new(mode, (W, H))
        image.frombytes(values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        return image
    if mode == "I":
        values = rng.integers(-70000, 140000, (H, W)).astype(np.int32)
        values[0, :6] = (-1, 0, 255, 256, 65535, 65536)
        return Image.fromarray(values)
    if mode == "F":
        values = rng.uniform(-0.5, 1.5, (H, W)).astype(np.float32)
        values[0, :6] = (0.0, 1.0, 0.5, np.nan, np.inf, -np.inf)
        return Image.fromarray(values)
    if mode in ("P", "PA"):
        image = Image.new(mode, (W, H))
        image.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
        bands = [rng.integers(0, 256, (H, W)).astype(np.uint8)]
        if mode == "PA":
            bands.append(_alpha(rng))
        image.frombytes(np.dstack(bands).tobytes())
        return image
    bands = Image.getmodebands(mode)
    values = rng.integers(0, 256, (H, W, bands)).astype(np.uint8)
    if mode in ("LA", "La", "RGBA", "RGBa"):
        values[..., -1] = _alpha(rng)
    if mode in ("La", "RGBa"):  # premultiplied: no colour above its alpha
        values[..., :-1] = np.minimum(values[..., :-1], values[..., -1:])
    if mode == "RGBX":
        values[..., 3] = 255
    if mode == "LAB":  # colours inside sRGB's gamut (outside it, how littlecms clips is its own)
        values[..., 0] = rng.integers(60, 230, (H, W))
        values[..., 1:] = rng.integers(-8, 9, (H, W, 2)).astype(np.int8).view(np.uint8)
        values[0, :2] = ((0, 0, 0), (255, 0, 0))
    return Image.frombytes(mode, (W, H), values.tobytes())


def _alpha(rng) -> np.ndarray:
    alpha = rng.integers(0, 256, (H, W)).astype(np.uint8)
    alpha[0, :3] = (0, 128, 255)
    return alpha


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` (h, w, 3) with ``alpha`` (h, w), both 0..255, over a white background."""
    a = alpha[..., None].astype(np.float64) / 255
    return colour * a + 255 * (1 - a)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None].astype(np.float64), 3, axis=2)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (Pillow's LAB: L* scaled to 0..255, a* and b* signed bytes), D50, to sRGB,
    with Bradford adaptation to D65 as littlecms does."""
    L = lab[..., 0].astype(np.float64) * 100 / 255
    a, b = (lab[..., 1:3].astype(np.uint8).view(np.int8).astype(np.float64)).transpose(2, 0, 1)
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def finv(t):
        return np.where(t > 6 / 29, t ** 3, 3 * (6 / 29) ** 2 * (t - 4 / 29))

    xyz = np.stack([finv(fx) * 0.9642, finv(fy), finv(fz) * 0.8249], axis=-1)
    d50_to_srgb = np.array([[3.1338561, -1.6168667, -0.4906146], [-0.9787684, 1.9161415, 0.0334540],
                            [0.0719453, -0.2289914, 1.4052427]])
    linear = np.clip(xyz @ d50_to_srgb.T, 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return srgb * 255


def reference(image: Image.Image) -> np.ndarray:
    """The 8-bit RGB a viewer shows of ``image``, from its mode's definition, float (h, w, 3)."""
    mode = image.mode
    if mode == "1":
        return _gray(np.asarray(image).astype(np.uint8) * 255)
    if mode.startswith("I;16"):
        return _gray(np.asarray(image).astype(np.int64) >> 8)
    if mode == "I":
        return _gray(np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return _gray(np.clip(values, 0, 1) * 255)
    if mode == "L":
        gray = _gray(np.asarray(image))
        if "transparency" in image.info:
            return _on_white(gray, np.where(np.asarray(image) == image.info["transparency"], 0, 255))
        return gray
    if mode in ("LA", "La"):
        values = np.asarray(image).astype(np.float64)
        gray, alpha = values[..., 0], values[..., 1]
        if mode == "La":
            gray = np.where(alpha > 0, np.minimum(gray * 255 / np.maximum(alpha, 1), 255), 0)
        return _on_white(_gray(gray), alpha)
    if mode in ("P", "PA"):
        index = np.asarray(image)[..., 0] if mode == "PA" else np.asarray(image)
        palette = np.frombuffer(image.palette.tobytes(), np.uint8).reshape(-1, len(image.palette.mode))
        colour = palette[index][..., :3].astype(np.float64)
        alpha = np.full(index.shape, 255)
        if mode == "PA":
            alpha = np.asarray(image)[..., 1]
        elif image.palette.mode == "RGBA":
            alpha = palette[index][..., 3]
        elif isinstance(image.info.get("transparency"), bytes):
            table = np.full(256, 255)
            table[:len(image.info["transparency"])] = np.frombuffer(image.info["transparency"], np.uint8)
            alpha = table[index]
        elif "transparency" in image.info:
            alpha = np.where(index == image.info["transparency"], 0, 255)
        return _on_white(colour, alpha)
    if mode in ("RGB", "RGBX"):
        colour = np.asarray(image)[..., :3].astype(np.float64)
        if "transparency" in image.info:
            key = np.array(image.info["transparency"])
            return _on_white(colour, np.where((np.asarray(image)[..., :3] == key).all(-1), 0, 255))
        return colour
    if mode in ("RGBA", "RGBa"):
        values = np.asarray(image).astype(np.float64)
        colour, alpha = values[..., :3], values[..., 3]
        if mode == "RGBa":
            colour = np.where(alpha[..., None] > 0,
                              np.minimum(colour * 255 / np.maximum(alpha[..., None], 1), 255), 0)
        return _on_white(colour, alpha)
    if mode == "CMYK":
        c, m, y, k = (np.asarray(image).astype(np.float64) / 255).transpose(2, 0, 1)
        return np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1) * 255
    if mode == "YCbCr":  # JPEG's (ITU-R BT.601, full range)
        y, cb, cr = np.asarray(image).astype(np.float64).transpose(2, 0, 1)
        rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                        y + 1.772 * (cb - 128)], axis=-1)
        return np.clip(rgb, 0, 255)
    if mode == "HSV":
        values = np.asarray(image).astype(np.float64) / 255
        return np.array([[colorsys.hsv_to_rgb(*p) for p in row] for row in values]) * 255
    if mode == "LAB":
        return _lab_to_rgb(np.asarray(image))
    raise AssertionError(f"no reference for mode {mode}")


def _written(mode: str, fmt: str) -> bytes | None:
    """``_source(mode)`` saved as ``fmt``; None where Pillow cannot write that mode there."""
    buffer = io.BytesIO()
    try:
        _source(mode).save(buffer, fmt, **FORMATS[fmt])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return buffer.getvalue()


def _writable() -> list[tuple[str, str]]:
    return [(mode, fmt) for mode in MODES for fmt in FORMATS if _written(mode, fmt) is not None]


def _close(got: np.ndarray, want: np.ndarray, mode: str = "") -> None:
    # 1 level; LAB goes through littlecms, whose 8-bit tables round a little further.
    tolerance = 1.5 if mode == "LAB" else 1.0
    assert got.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= tolerance + 1e-9, f"pixel {worst[:2]}: got {got[worst[:2]]}, expected {want[worst[:2]].round(1)}"


def test_the_modes_every_format_writes_are_many():
    # The matrix below is the point: it must cover the modes the issue names, each in a file.
    written = {mode for mode, _ in _writable()}
    assert {"1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "F", "RGBA", "CMYK", "YCbCr", "LAB"} <= written


@pytest.mark.parametrize("mode, fmt", _writable())
def test_a_file_of_every_mode_decodes_to_what_a_viewer_shows(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_written(mode, fmt))
    with Image.open(path) as stored:
        stored.load()
        want, stored_mode = reference(stored), stored.mode
    _close(np.asarray(load_image(path, 1 << 20)), want, stored_mode)
    [view] = decode_image(path, [Geometry("square", W, W, "center", "nearest")]).values()
    expected = np.asarray(Image.fromarray(np.clip(want + 0.5, 0, 255).astype(np.uint8)).resize((W, W), Image.NEAREST))
    _close(view, expected.astype(np.float64), stored_mode)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_in_memory_converts_to_what_a_viewer_shows(mode):
    image = _source(mode)
    _close(np.asarray(to_rgb(image)), reference(image), mode)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF"), ("I", "TIFF"),
                                       ("F", "TIFF")])
def test_a_lossless_file_keeps_its_values_and_they_are_scaled_as_documented(tmp_path, mode, fmt):
    # Against the values written (not those read back): 16-bit by the high byte, I clipped to
    # 16 bits, F from 0..1.
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_written(mode, fmt))
    got = np.asarray(load_image(path, 1 << 20))
    assert got[0, :4, 0].tolist() == {"I;16": [0, 0, 1, 255], "I;16B": [0, 0, 1, 255], "I": [0, 0, 0, 1],
                                      "F": [0, 255, 128, 0]}[mode]
    if mode == "F":
        assert got[0, 4:6, 0].tolist() == [255, 0]  # +inf white, -inf black
    if mode == "I":
        assert got[0, 4:6, 0].tolist() == [255, 255]  # 65535 and above: white


def test_transparency_is_composited_on_white(tmp_path):
    # A fully transparent black pixel, a half transparent one and an opaque one, in every way a
    # file says so: an alpha band, a palette's transparent entry, PNG's tRNS colour key.
    rgba = Image.frombytes("RGBA", (3, 1), bytes([0, 0, 0, 0, 0, 0, 0, 128, 10, 20, 30, 255]))
    rgba.save(tmp_path / "rgba.png")
    got = np.asarray(load_image(tmp_path / "rgba.png", 1 << 20))
    assert got[0].tolist() == [[255, 255, 255], [127, 127, 127], [10, 20, 30]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=0)
    palette.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        assert np.asarray(load_image(tmp_path / name, 1 << 20))[0].tolist() == [[255, 255, 255], [200, 0, 0]], name
    keyed = Image.frombytes("RGB", (2, 1), bytes([0, 0, 0, 5, 6, 7]))
    keyed.save(tmp_path / "key.png", transparency=(0, 0, 0))
    assert np.asarray(load_image(tmp_path / "key.png", 1 << 20))[0].tolist() == [[255, 255, 255], [5, 6, 7]]
    gray = Image.frombytes("L", (2, 1), bytes([0, 9]))
    gray.save(tmp_path / "gray.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "gray.png", 1 << 20))[0].tolist() == [[255, 255, 255], [9, 9, 9]]


def test_a_16_bit_grayscale_png_with_a_transparent_value_is_white_there(tmp_path):
    image = Image.new("I;16", (2, 1))
    image.frombytes(np.array([1000, 51400], "<u2").tobytes())
    image.save(tmp_path / "g16.png", transparency=1000)
    assert np.asarray(load_image(tmp_path / "g16.png", 1 << 20))[0].tolist() == [[255, 255, 255], [200, 200, 200]]


def test_an_exif_rotated_16_bit_image_is_oriented_and_scaled(tmp_path):
    image = Image.new("I;16", (2, 1))
    image.frombytes(np.array([0, 51400], "<u2").tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.png", exif=exif)
    got = np.asarray(load_image(tmp_path / "r.png", 1 << 20))
    assert got.shape == (2, 1, 3) and got[:, 0, 0].tolist() == [0, 200]


def _png16(path, values: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG (colour type 2: RGB, 4: gray + alpha, 6: RGBA) of ``values`` (h, w, bands),
    written by hand: Pillow writes no 16-bit colour PNG."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_colour_pngs_keep_the_high_byte_and_their_alpha_goes_on_white(tmp_path):
    rgb = np.array([[[0, 255, 256], [51400, 65535, 12850]]], np.uint16)
    _png16(tmp_path / "rgb16.png", rgb, 2)
    assert np.asarray(load_image(tmp_path / "rgb16.png", 1 << 20)).tolist() == [[[0, 0, 1], [200, 255, 50]]]
    rgba = np.array([[[0, 0, 0, 0], [51400, 0, 12850, 65535]]], np.uint16)
    _png16(tmp_path / "rgba16.png", rgba, 6)
    assert np.asarray(load_image(tmp_path / "rgba16.png", 1 << 20)).tolist() == [[[255, 255, 255], [200, 0, 50]]]
    gray_alpha = np.array([[[0, 0], [25700, 65535]]], np.uint16)
    _png16(tmp_path / "la16.png", gray_alpha, 4)
    assert np.asarray(load_image(tmp_path / "la16.png", 1 << 20)).tolist() == [[[255, 255, 255], [100, 100, 100]]]


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "I", "F", "RGBA", "CMYK"])
@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_rotated_tiff_is_shown_rotated_whatever_its_mode_and_compression(tmp_path, mode, orientation, compression):
    # Pillow 13 maps an uncompressed single-strip TIFF's pixels at the displayed (swapped) size
    # before rotating them, scrambling every mode it can map: the file must not be mapped.
    source = _source(mode)
    path = tmp_path / "r.tiff"
    source.save(path, tiffinfo={0x0112: orientation}, compression=compression)
    method = {5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}[orientation]
    want = reference(source)
    want = np.asarray(Image.fromarray(np.clip(want + 0.5, 0, 255).astype(np.uint8)).transpose(method)).astype(np.float64)
    _close(np.asarray(load_image(path, 1 << 20)), want, mode)
