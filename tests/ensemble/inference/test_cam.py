"""The cam view's box maths on hand-made maps: golden boxes worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.inference.cam import CamSettings, cam_box, to_image

BARE = CamSettings(threshold=0.2, pad=0.0, min_size=0.01)


def grid(cells: dict[tuple[int, int], float], shape=(10, 10), fill=0.0) -> np.ndarray:
    cam = np.full(shape, fill, np.float32)
    for (r, c), value in cells.items():
        cam[r, c] = value
    return cam


def test_a_single_blob_is_boxed_padded_and_made_square():
    # Cells rows 2-3, columns 5-7 of a 10x10 map over 100x100 px: x 50..80, y 20..40; padded by
    # 0.1 of each side (3 and 2 px); square on the longer side (36 px), about the same centre.
    cam = grid({(r, c): 1.0 for r in (2, 3) for c in (5, 6, 7)})
    assert cam_box(cam, 100, 100, CamSettings(0.2, 0.1, 0.25)) == (47, 12, 83, 48)
    assert cam_box(cam, 100, 100, BARE) == (50, 15, 80, 45)


def test_two_blobs_the_box_covers_the_one_with_the_maximum():
    # The larger blob (0.8) lies apart from the peak (1.0): it is above the threshold, not in the box.
    cells = {(1, 1): 1.0, **{(r, c): 0.8 for r in (6, 7, 8) for c in (5, 6, 7, 8)}}
    assert cam_box(grid(cells), 100, 100, BARE) == (10, 10, 20, 20)
    # Joined to the peak by one cell, the same blob is part of it.
    cells.update({(r, 1): 0.5 for r in range(2, 7)})
    cells.update({(6, c): 0.5 for c in range(2, 5)})
    assert cam_box(grid(cells), 100, 100, BARE) == (10, 10, 90, 90)


def test_parts_touching_only_at_a_corner_are_apart():
    cam = grid({(2, 2): 1.0, (3, 3): 0.9})
    assert cam_box(cam, 100, 100, BARE) == (20, 20, 30, 30)


def test_the_threshold_is_a_fraction_of_the_range_above_the_minimum():
    # A signed map: -5 everywhere, the peak -1, a neighbour at -2.5 (0.625 of the range above -5).
    cam = grid({(4, 4): -1.0, (4, 5): -2.5}, fill=-5.0)
    assert cam_box(cam, 100, 100, CamSettings(0.6, 0.0, 0.01)) == (40, 35, 60, 55)
    assert cam_box(cam, 100, 100, CamSettings(0.7, 0.0, 0.01)) == (40, 40, 50, 50)


def test_a_flat_map_boxes_the_whole_region():
    for cam in (np.zeros((7, 7)), np.full((7, 7), 3.0), np.full((7, 7), np.nan)):
        assert cam_box(cam, 100, 100) == (0, 0, 100, 100)
    # Not square: the largest centred square.
    assert cam_box(np.zeros((7, 7)), 80, 120) == (20, 0, 100, 80)


def test_a_peak_at_the_border_is_shifted_inside_not_shrunk():
    # The top-right cell: x 90..100, y 0..10, padded to 89..101, -1..11, widened to 25 px (0.25
    # of 100) about its centre (95, 5): it would leave the region, so it moves to x 75, y 0.
    cam = grid({(0, 9): 1.0})
    assert cam_box(cam, 100, 100, CamSettings(0.2, 0.1, 0.25)) == (75, 0, 100, 25)
    assert cam_box(grid({(9, 0): 1.0}), 100, 100, CamSettings(0.2, 0.1, 0.25)) == (0, 75, 25, 100)


def test_the_minimum_side_is_a_fraction_of_the_shorter_side():
    cam = grid({(5, 5): 1.0}, shape=(10, 10))
    x0, y0, x1, y1 = cam_box(cam, 200, 400, CamSettings(0.2, 0.0, 0.5))
    assert (x1 - x0, y1 - y0) == (100, 100)  # half of 200, the shorter side
    # A box larger than the shorter side is capped at it.
    wide = grid({(5, c): 1.0 for c in range(10)})
    assert cam_box(wide, 200, 400, BARE) == (100, 0, 300, 200)


def test_grid_cells_map_to_the_region_per_axis():
    # A squash model: the 4x4 map covers a 60 x 120 px region; cell (0, 0) is 30 px wide, 15 high,
    # squared to 30.
    assert cam_box(grid({(0, 0): 1.0}, shape=(4, 4)), 60, 120, BARE) == (0, 0, 30, 30)


def test_to_image_maps_a_region_box_to_the_whole_image():
    region = np.array([0.1, 0.0, 0.9, 1.0], np.float32)
    np.testing.assert_allclose(to_image((0, 0, 50, 50), 100, 100, region), [0.1, 0.0, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(to_image((50, 50, 100, 100), 100, 100, region), [0.5, 0.5, 0.9, 1.0], atol=1e-6)


@pytest.mark.parametrize("settings, flag", [
    (CamSettings(threshold=1.5), "--cam-threshold 1.5: must lie in [0, 1]"),
    (CamSettings(threshold=float("nan")), "--cam-threshold nan"),
    (CamSettings(pad=-0.1), "--cam-pad -0.1: must lie in [0, 1]"),
    (CamSettings(min_size=0.0), "--cam-min 0.0: must lie in [0.01, 1]"),
    (CamSettings(min_size=2.0), "--cam-min 2.0"),
])
def test_settings_out_of_range_are_refused(settings, flag):
    with pytest.raises(EnsError, match=flag.replace("[", r"\[").replace("]", r"\]")):
        settings.check()
    assert CamSettings().check() == CamSettings()
