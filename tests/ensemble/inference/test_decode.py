"""decode_image and resize_region against Pillow itself: a view is the image resized onto its
canvas (torchvision's Resize: the shorter side to the canvas, or a square) with the model's
filter, then the crop cut at its position. Exact where ens resizes the whole canvas, within
the documented 2 levels where it resizes only the crop's region."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ensemble.inference.decode import RESAMPLE, decode_image, load_image, resize_region
from ensemble.inference.tta import Geometry

FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")


def _noise_png(path, width, height, seed=0):
    """Lossless noise: every pixel differs from its neighbours, so any shift or filter shows."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _reference(path, canvas: tuple[int, int], box: tuple[int, int, int, int], interpolation: str) -> np.ndarray:
    """The whole image resized to ``canvas`` (width, height) by Pillow, then ``box`` cut."""
    image = Image.open(path).convert("RGB")
    left, top, right, bottom = box
    return np.asarray(image.resize(canvas, RESAMPLE[interpolation]))[top:bottom, left:right]


@pytest.mark.parametrize("interpolation", FILTERS)
def test_a_square_canvas_view_is_pillows_resize_of_the_whole_image(tmp_path, interpolation):
    path = _noise_png(tmp_path / "a.png", 50, 30)
    geo = Geometry("square", 24, 24, "center", interpolation)
    [(got_geo, view)] = decode_image(path, [geo]).items()
    assert got_geo == geo and view.dtype == np.uint8 and view.shape == (24, 24, 3)
    np.testing.assert_array_equal(view, _reference(path, (24, 24), (0, 0, 24, 24), interpolation))


def test_a_centre_crop_is_cut_where_torchvision_cuts_it(tmp_path):
    # 50x30 (w x h) onto a short-side-36 canvas: 60x36; the 32 px centre crop starts at
    # row round(4 / 2) = 2 and column round(28 / 2) = 14. nearest: ens resizes the whole canvas.
    path = _noise_png(tmp_path / "a.png", 50, 30, seed=1)
    view = decode_image(path, [Geometry("short", 36, 32, "center", "nearest")])
    [view] = view.values()
    np.testing.assert_array_equal(view, _reference(path, (60, 36), (14, 2, 46, 34), "nearest"))


@pytest.mark.parametrize("position, box", [("top-left", (0, 0, 32, 32)), ("bottom-right", (28, 4, 60, 36)),
                                           ("top-right", (28, 0, 60, 32)), ("bottom-left", (0, 4, 32, 36))])
def test_corner_crops_are_cut_at_their_corners(tmp_path, position, box):
    path = _noise_png(tmp_path / "a.png", 50, 30, seed=2)
    [view] = decode_image(path, [Geometry("short", 36, 32, position, "nearest")]).values()
    np.testing.assert_array_equal(view, _reference(path, (60, 36), box, "nearest"))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_a_centre_crop_of_a_resized_region_is_within_two_levels_of_the_whole_canvas(tmp_path, interpolation):
    path = _noise_png(tmp_path / "a.png", 90, 60, seed=3)
    [view] = decode_image(path, [Geometry("short", 40, 32, "center", interpolation)]).values()
    # 90x60 onto short side 40: 60x40; the centre 32 px crop at row 4, column 14.
    want = _reference(path, (60, 40), (14, 4, 46, 36), interpolation)
    diff = np.abs(view.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.05


@pytest.mark.parametrize("interpolation", FILTERS)
def test_resize_region_of_the_whole_canvas_is_pillows_resize(tmp_path, interpolation):
    image = Image.open(_noise_png(tmp_path / "a.png", 37, 23, seed=4)).convert("RGB")
    got = resize_region(image, (20, 13), (0, 0, 20, 13), interpolation)
    np.testing.assert_array_equal(got, np.asarray(image.resize((20, 13), RESAMPLE[interpolation])))


@pytest.mark.parametrize("interpolation", FILTERS)
def test_resize_region_is_the_region_of_the_whole_resize_within_two_levels(tmp_path, interpolation):
    image = Image.open(_noise_png(tmp_path / "a.png", 120, 80, seed=5)).convert("RGB")
    region = (10, 7, 41, 33)  # left, top, right, bottom on a 60x40 canvas
    got = resize_region(image, (60, 40), region, interpolation)
    assert got.shape == (26, 31, 3) and got.dtype == np.uint8
    want = np.asarray(image.resize((60, 40), RESAMPLE[interpolation]))[7:33, 10:41]
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= (0 if interpolation == "nearest" else 2)


def test_geometries_of_one_decode_share_it_and_each_gets_its_own_view(tmp_path):
    path = _noise_png(tmp_path / "a.png", 64, 48, seed=6)
    geos = [Geometry("square", 32, 32, "center", "nearest"), Geometry("short", 40, 32, "center", "nearest"),
            Geometry("short", 40, 32, "top-left", "nearest")]
    views = decode_image(path, geos)
    assert set(views) == set(geos)
    np.testing.assert_array_equal(views[geos[0]], _reference(path, (32, 32), (0, 0, 32, 32), "nearest"))
    np.testing.assert_array_equal(views[geos[1]], _reference(path, (53, 40), (10, 4, 42, 36), "nearest"))
    np.testing.assert_array_equal(views[geos[2]], _reference(path, (53, 40), (0, 0, 32, 32), "nearest"))


def test_load_image_orients_and_converts_to_rgb(tmp_path):
    gray = Image.fromarray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown as 12 wide, 20 tall
    gray.save(tmp_path / "g.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "g.jpg", 12)
    assert image.mode == "RGB" and image.size == (12, 20)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg", 12)
