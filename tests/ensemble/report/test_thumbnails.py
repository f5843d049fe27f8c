"""The hardest images' thumbnails on the page: each model's CAM box drawn where the store puts it, in
the colour the key gives the model, and nothing drawn where a store has no box for the row. Read
from the page's decoded JPEGs, as a reader sees them."""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble.report import build as report_build
from ensemble.report import write_report
from ensemble.report.build import build_report
from ensemble.report.images import THUMB_SIZE

from tests.ensemble.report.conftest import MODELS


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty folder: nothing is found through ./runs or ./submissions by accident."""
    monkeypatch.chdir(tmp_path)


def cell(model: int, right: bool) -> tuple[float, float, float, float]:
    """A box apart from every other model's: model ``i`` in the ``i``-th third of the image's
    height, in its left or right half (normalised ``x0, y0, x1, y1``)."""
    x0 = 0.56 if right else 0.04
    return (x0, model / 3 + 0.04, x0 + 0.4, (model + 1) / 3 - 0.04)


def given_boxes(rows: int) -> dict[str, np.ndarray]:
    """Each store's ``(rows, 4)`` boxes: a model's box in its left cell on even rows and its right
    cell on odd ones (a box read from another row lands in the wrong cell); the last model has
    none (NaN) on even rows."""
    boxes = {m: np.array([cell(i, bool(r % 2)) for r in range(rows)], np.float32) for i, m in enumerate(MODELS)}
    boxes[MODELS[-1]][::2] = np.nan
    return boxes


def expected_boxes(row: int) -> dict[str, tuple[float, float, float, float]]:
    return {m: cell(i, bool(row % 2)) for i, m in enumerate(MODELS) if row % 2 or i < len(MODELS) - 1}


def decode(uri: str) -> np.ndarray:
    """A thumbnail's pixels in YCbCr, as its JPEG holds them (the colour at half resolution)."""
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("YCbCr"), dtype=float)


def plain(path: Path) -> np.ndarray:
    """The image as its thumbnail shows it without boxes (at most THUMB_SIZE px on its longest
    side), in YCbCr."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        return np.asarray(image.convert("YCbCr"), dtype=float)


def ycbcr(colour: str) -> np.ndarray:
    return np.asarray(Image.new("RGB", (1, 1), colour).convert("YCbCr"), dtype=float)[0, 0]


def edges(box, shape) -> list[tuple[slice, slice]]:
    """The 2 px bands of the outline drawn for ``box`` on an image of ``shape``: top, bottom, left,
    right (corners left out: there two edges meet)."""
    h, w = shape[:2]
    x0, y0, x1, y1 = (int(v * (n - 1)) for v, n in zip(box, (w, h, w, h)))  # PIL truncates
    return [(slice(y0, y0 + 2), slice(x0 + 2, x1 - 1)), (slice(y1 - 1, y1 + 1), slice(x0 + 2, x1 - 1)),
            (slice(y0 + 2, y1 - 1), slice(x0, x0 + 2)), (slice(y0 + 2, y1 - 1), slice(x1 - 1, x1 + 1))]


def outline(seen: np.ndarray, before: np.ndarray, colour: np.ndarray, where: str) -> None:
    """Check that the mean YCbCr ``seen`` along a box's edges is an outline in ``colour`` drawn
    on an image whose mean there was ``before``. JPEG keeps the brightness at full resolution: it is
    the colour's. It keeps the colour (Cb, Cr) at half resolution, in 2 x 2 pixel cells, so
    a 2 px line's colour is blended with the image's beside it: it moves from the image's toward
    the colour's, in that direction, and at least a third of the way (half of it, give or take
    where the line falls in the cells and the compression's error)."""
    assert abs(seen[0] - colour[0]) < 5, where
    moved, way = seen[1:] - before[1:], colour[1:] - before[1:]
    assert np.dot(moved, way) / np.dot(way, way) > 1 / 3, where
    assert np.dot(moved, way) / (np.linalg.norm(moved) * np.linalg.norm(way)) > 0.9, where


def thumbnails(page: str) -> dict[str, str]:
    """Each hardest image's thumbnail on the page, by its id."""
    cards = re.findall(r'<figure class="thumb" data-id="([^"]*)"[^>]*><img src="([^"]*)"', page)
    return {html.unescape(i): uri for i, uri in cards}


def key_colours(page: str) -> dict[str, str]:
    """The CAM boxes' key: model -> its colour."""
    [key] = re.findall(r'<p class="key">CAM boxes: (.*?)</p>', page)
    return {html.unescape(m): c for c, m in re.findall(r'<i style="border-color:(#[0-9a-f]{6})"></i>([^<]*)</span>', key)}


def test_cam_boxes_are_drawn_on_the_thumbnails(work, monkeypatch):
    ids = np.load(work.runs / "m0" / "val" / "ids.npy").tolist()
    given = given_boxes(len(ids))
    real = report_build.read_store

    def with_boxes(path):
        store = real(path)
        assert store.boxes is None  # the fixture's stores are not CAM runs: the boxes below are the only ones
        return replace(store, boxes=given[Path(path).parent.name])

    monkeypatch.setattr(report_build, "read_store", with_boxes)
    data = build_report(work.full)
    rows = {image.id: ids.index(image.id) for image in data.hardest}
    assert {r % 2 for r in rows.values()} == {0, 1}  # images with and without the last model's box
    for image in data.hardest:
        want = expected_boxes(rows[image.id])
        assert set(image.boxes) == set(want)
        for model, box in want.items():
            assert image.boxes[model] == pytest.approx(box)
    page = write_report(work.full).path.read_text()
    assert "No CAM boxes" not in page
    colours = key_colours(page)
    assert list(colours) == list(MODELS) and len(set(colours.values())) == len(MODELS)
    pictures = thumbnails(page)
    assert set(pictures) == {str(i) for i in rows}
    for image in data.hardest:
        got, bare = decode(pictures[str(image.id)]), plain(image.path)
        assert got.shape == bare.shape
        drawn = expected_boxes(rows[image.id])
        for i, model in enumerate(MODELS):
            for right in (False, True):
                seen, before = (np.concatenate([a[b].reshape(-1, 3) for b in edges(cell(i, right), got.shape)]).mean(0)
                                for a in (got, bare))
                where = f"image {image.id}, {model}'s {'right' if right else 'left'} cell: {seen} on {before}"
                if drawn.get(model) == cell(i, right):
                    outline(seen, before, ycbcr(colours[model]), where)
                else:  # nothing drawn: the image as it was, give or take JPEG's error
                    assert np.abs(seen - before).max() < 6, where
    given[MODELS[-1]][:] = np.nan  # a store without a box on any row: not in the key
    assert list(key_colours(write_report(work.full).path.read_text())) == list(MODELS[:-1])
    monkeypatch.undo()
    assert "No CAM boxes" in write_report(work.full).path.read_text()
