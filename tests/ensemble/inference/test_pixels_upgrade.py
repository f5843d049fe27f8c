"""Stores of pixel pipeline version 2 over JPEG files are version 3's (issue 23, second round).

Version 3 (:func:`ensemble.formats.image.to_rgb`) changed the decode only for 16-bit, 32-bit
and float grayscale and for images with transparency; a JPEG is L, RGB or CMYK (YCbCr decodes
to RGB), so its pixels are those version 2 made with ``convert("RGB")``. ``ens infer`` keeps
such a store (upgrading its manifest) instead of recomputing it: hours of GPU at iNat size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from ensemble.formats.dataset import load_split
from ensemble.formats.store import MANIFEST, PARTIAL, read_store
from ensemble.inference import decode, run as run_module
from ensemble.inference.run import InferOptions, infer

from tests.ensemble.conftest import Killed, ens, make_inat, ok, photo, store_bytes, tiny_onnx, write_images

NOTE = "pixels of version 2 are version 3's for JPEG files: kept"


# --------------------------------------------------------- JPEG pixels: version 2 == version 3


def version2_image(path, min_side: int) -> Image.Image:
    """The decode of pixel pipeline version 2, as it was written: open, the reduced JPEG decode,
    load, EXIF orientation, ``convert("RGB")``."""
    image = Image.open(path)
    width, height = image.size
    if image.format == "JPEG" and min_side * 2 <= min(width, height):
        ratio = min_side / min(width, height)
        image.draft("RGB", (max(1, int(width * ratio + 0.999)), max(1, int(height * ratio + 0.999))))
    with image:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image.convert("RGB")


def _jpegs(folder):
    """JPEG files of every mode Pillow writes as JPEG, with and without an EXIF rotation."""
    folder.mkdir()
    base = photo(64, 40, 3)
    made = {}
    for mode in ("RGB", "L", "CMYK", "YCbCr", "1", "RGBX"):
        for rotation in (None, 6):
            image = base.convert(mode)
            extra = {}
            if rotation:
                exif = Image.Exif()
                exif[0x0112] = rotation
                extra["exif"] = exif.tobytes()
            path = folder / f"{mode}-{rotation}.jpg"
            image.save(path, "JPEG", quality=85, **extra)
            made[path] = mode
    progressive = folder / "progressive.jpg"
    base.save(progressive, "JPEG", progressive=True, subsampling=0)
    made[progressive] = "RGB"
    mpo = folder / "multi.jpg"  # a multi-picture file (two frames) starts like a JPEG too
    base.save(mpo, "MPO", save_all=True, append_images=[base.rotate(90)])
    made[mpo] = "RGB"
    return made


def test_jpeg_files_of_every_mode_decode_as_version_2_did(tmp_path):
    made = _jpegs(tmp_path / "jpegs")
    opened = {Image.open(path).mode for path in made}
    assert opened == {"RGB", "L", "CMYK"}  # what a JPEG decodes to: never alpha, never 16 bits
    for path in made:
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        for min_side in (8, 16, 40):  # reduced decodes (1/4, 1/2) and the full one
            ours = decode.load_image(path, min_side)
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(version2_image(path, min_side)),
                                          err_msg=f"{path.name} at {min_side}")


# ------------------------------------------------------------- ens infer keeps a version 2 store


@pytest.fixture
def v2(monkeypatch):
    """Run ``ens infer`` as the ens of pixel pipeline version 2 inside the ``with`` block."""

    class Version2:
        def __enter__(self):
            monkeypatch.setattr(run_module, "PIXELS", 2)

        def __exit__(self, *exc):
            monkeypatch.setattr(run_module, "PIXELS", decode.PIXELS)

    assert decode.PIXELS == 3
    return Version2()


def _notes(events):
    return [e.message for e in events if e.kind == "note"]


def test_a_version2_store_of_jpegs_is_kept_and_upgraded_then_blends(tmp_path, v2):
    data = make_inat(tmp_path / "inat", n_val=10, n_test=4)
    models = [tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "b.onnx", seed=1)]
    val = load_split(data / "val2019.json")
    options = InferOptions(workers=0, batch_size=4, out=tmp_path / "runs")
    with v2:
        infer(models, [val], options)
    stores = [tmp_path / "runs" / m / "val" for m in ("a", "b")]
    before = {s: store_bytes(s) for s in stores}
    assert all(json.loads((s / MANIFEST).read_text())["pixels"] == 2 for s in stores)

    events = []
    result = infer(models, [val], options, progress=events.append)
    assert [s.computed for s in result.stores] == [False, False] and result.decodes == 0
    assert [n for n in _notes(events) if "val" in n] == [f"{s}: {NOTE}" for s in stores]  # one line each
    for s in stores:
        manifest = read_store(s).manifest
        assert manifest.pixels == 3 and store_bytes(s) == before[s]
        assert not any(p.name.startswith(".") and p.name != ".lock" for p in s.iterdir())  # no temporary left
    # Kept as any complete store is from now on: no note, no decode.
    again = []
    assert not any(s.computed for s in infer(models, [val], options, progress=again.append).stores)
    assert not any(NOTE in n for n in _notes(again))
    # ... and a fresh version 3 store of the other split blends with it.
    infer(models, [load_split(data / "test2019.json")], options)
    out = tmp_path / "blend"
    ok(ens("blend", "--runs", tmp_path / "runs", "--optimize", "val", "--data", data, "--cv", 2, "--out", out))
    record = json.loads((out / "blend.json").read_text())
    assert {p["pixels"] for p in record["provenance"].values()} == {3}


def test_a_version2_store_with_a_png_is_computed_again(tmp_path, v2):
    folder = tmp_path / "test"
    write_images(folder, [(40, 30), (30, 40)])
    write_images(folder, [(36, 36)], ".png", seed=5)  # img000.png beside img000.jpg, img001.jpg
    split = load_split(folder)
    model = tiny_onnx(tmp_path / "m.onnx")
    options = InferOptions(workers=0, batch_size=2, out=tmp_path / "runs")
    with v2:
        infer([model], [split], options)
    events = []
    store = infer([model], [split], options, progress=events.append).stores[0]
    assert store.computed is True and read_store(store.path).manifest.pixels == 3
    assert not any(NOTE in n for n in _notes(events))


def test_a_file_that_only_looks_like_a_jpeg_by_name_is_no_jpeg(tmp_path, v2):
    # The bytes decide, not the name: a PNG saved as .jpg is recomputed.
    folder = tmp_path / "test"
    write_images(folder, [(40, 30)])
    photo(30, 30, 9).save(folder / "fake.jpg", "PNG")
    split = load_split(folder)
    model = tiny_onnx(tmp_path / "m.onnx")
    options = InferOptions(workers=0, batch_size=2, out=tmp_path / "runs")
    with v2:
        infer([model], [split], options)
    assert infer([model], [split], options).stores[0].computed is True


def test_a_version2_store_of_other_arguments_is_computed_again(tmp_path, v2):
    data = make_inat(tmp_path / "inat", n_val=4, n_test=2)
    model = tiny_onnx(tmp_path / "m.onnx")
    val = load_split(data / "val2019.json")
    with v2:
        infer([model], [val], InferOptions(workers=0, batch_size=2, out=tmp_path / "runs"))
    events = []
    result = infer([model], [val], InferOptions(workers=0, batch_size=2, out=tmp_path / "runs", tta=("flip",)),
                   progress=events.append)
    assert result.stores[0].computed is True and not any(NOTE in n for n in _notes(events))


def test_an_interrupted_version2_store_of_jpegs_resumes_from_its_chunks(tmp_path, v2):
    data = make_inat(tmp_path / "inat", n_val=8, n_test=2)
    model = tiny_onnx(tmp_path / "m.onnx")
    val = load_split(data / "val2019.json")
    options = InferOptions(workers=0, batch_size=2, chunk_size=2, out=tmp_path / "runs")
    whole = infer([model], [val], InferOptions(workers=0, batch_size=2, chunk_size=2, out=tmp_path / "whole"))
    seen = []

    def kill_after_two(event):
        if event.kind == "chunk":
            seen.append(event)
            if len(seen) == 2:
                raise Killed

    with v2, pytest.raises(Killed):
        infer([model], [val], options, progress=kill_after_two)
    store = tmp_path / "runs" / "m" / "val"
    assert json.loads((store / PARTIAL / "key.json").read_text())["pixels"] == 2
    events = []
    result = infer([model], [val], options, progress=events.append)
    assert result.decodes == 4  # the two chunks left, not all four
    assert f"{store}: {NOTE}" in _notes(events)
    assert read_store(store).manifest.pixels == 3 and store_bytes(store) == store_bytes(whole.stores[0].path)
