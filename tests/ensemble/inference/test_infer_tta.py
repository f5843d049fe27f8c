"""TTA through the whole inference path: pixels, logits, batching and decode counts.

References are computed independently of ens: torchvision's own transforms (Resize, FiveCrop,
hflip) on PIL images, and onnxruntime run on those explicit views one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from ensemble.inference import decode
from ensemble.formats import store as store_module
from ensemble.formats.dataset import load_split
from ensemble.inference.decode import decode_image
from ensemble.inference.run import InferOptions, infer
from ensemble.formats.model import INTERPOLATIONS, ModelMetadata
from ensemble.inference.runtime import Runner, load_model
from ensemble.formats.store import read_store
from ensemble.inference.tta import Preprocess, geometries, geometry, plan_views, view_size

from tests.ensemble.conftest import run_onnx, tiny_onnx, write_images

F = pytest.importorskip("torchvision.transforms.functional")

SIZES = [(60, 45), (45, 70), (50, 50), (97, 40)]
SCALES = (0.875, 1.143)
CORNERS = {"top-left": 0, "top-right": 1, "bottom-left": 2, "bottom-right": 3, "center": 4}


def reference_view(path, size, crop_pct, resize, view, interpolation="bilinear"):
    """One view of an image by torchvision's transforms, as uint8 (s, s, 3)."""
    image = Image.open(path).convert("RGB")
    s = round(size * view.scale)
    side = math.floor(s / crop_pct + 1e-6)
    mode = F.InterpolationMode(interpolation)
    if resize == "squash":
        image = F.resize(image, [s, s] if view.position == "center" else [side, side], interpolation=mode)
    else:
        image = F.resize(image, side, interpolation=mode)
    out = F.five_crop(image, [s, s])[CORNERS[view.position]]
    return np.asarray(F.hflip(out) if view.flip else out)


@pytest.fixture
def pngs(tmp_path):
    """A folder split of PNGs (lossless, and no reduced JPEG decoding, so pixels are exact)."""
    write_images(tmp_path / "images", SIZES, ".png")
    return load_split(tmp_path / "images")


@pytest.mark.parametrize("resize", ["center-crop", "squash"])
def test_decoded_views_equal_torchvision_pixels(pngs, resize):
    pre = Preprocess(32, resize, 0.875)
    views = [v for v in plan_views(["crop5", "scale"], SCALES) if not v.flip]
    geometries = [geometry(pre, v) for v in views]
    for path in pngs.paths:
        arrays = decode_image(path, geometries)
        for view, geo in zip(views, geometries):
            np.testing.assert_array_equal(arrays[geo], reference_view(path, 32, 0.875, resize, view),
                                          err_msg=f"{path.name} {view.name}")


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_centre_views_resize_only_their_region_within_rounding_of_torchvision(tmp_path, monkeypatch, interpolation):
    """Views that cut a canvas's centre (identity, flip, scale) resize only that square of it:
    no resize makes anything wider than the crop. Their pixels are torchvision's
    Resize + CenterCrop up to the rounding of the region's own filter weights: at most 2 levels,
    on under 5% of the pixels (a crop half a pixel off, on these textured photos, misses that by
    far); ``nearest`` resizes the whole canvas, so it stays exact."""
    paths = write_images(tmp_path / "images", [(333, 250), (250, 333), (97, 40), (45, 70), (300, 300)], ".png")
    pre = Preprocess(48, "center-crop", 0.875, interpolation)
    views = plan_views(["scale"], SCALES)
    want = {(p, v): reference_view(p, 48, 0.875, "center-crop", v, interpolation) for p in paths for v in views}
    made = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: made.append(tuple(size)) or resize(self, size, *a, **k))
    geos = [geometry(pre, v) for v in views]
    for path in paths:
        arrays = decode_image(path, geos)
        for view, geo in zip(views, geos):
            diff = np.abs(arrays[geo].astype(np.int16) - want[path, view])
            assert diff.max() <= (0 if interpolation == "nearest" else 2), (path.name, view.name)
            assert (diff > 0).mean() < 0.05, (path.name, view.name)
    widest = max(geo.size for geo in geos)
    # (The horizontal pass keeps the source's rows; its width is already the crop's.)
    assert made and (interpolation == "nearest") == any(width > widest for width, _ in made)


def test_a_canvas_region_is_the_whole_canvas_resize_on_noise(tmp_path):
    """Random noise shows a clipped filter at once: the region (centre, top and bottom strips,
    rows beyond the filter's reach cut off before the horizontal pass) is the whole canvas's
    resize within 1 level for every filter, upsampling and downsampling; an image taller than
    2:1, whose vertical pass Pillow runs first, gets the whole canvas: exact."""
    rng = np.random.default_rng(3)
    for width, height, canvas in [(640, 480, (341, 256)), (800, 600, (853, 640)), (300, 500, (224, 373))]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for interpolation in INTERPOLATIONS:
            whole = np.asarray(image.resize(canvas, decode.RESAMPLE[interpolation])).astype(np.int16)
            w, h = canvas
            for region in [((w - 200) // 2, (h - 200) // 2, (w + 200) // 2, (h + 200) // 2),
                           (10, 0, w - 10, 40), (0, h - 40, w, h)]:
                left, top, right, bottom = region
                got = decode.resize_region(image, canvas, region, interpolation)
                diff = np.abs(got - whole[top:bottom, left:right])
                assert diff.max() <= (0 if interpolation == "nearest" else 1), (width, interpolation, region)
    tall = Image.fromarray(rng.integers(0, 256, (430, 200, 3), dtype=np.uint8))
    for interpolation in INTERPOLATIONS:
        whole = np.asarray(tall.resize((128, 275), decode.RESAMPLE[interpolation]))
        np.testing.assert_array_equal(decode.resize_region(tall, (128, 275), (10, 70, 118, 205), interpolation),
                                      whole[70:205, 10:118])


def test_a_models_pixels_do_not_depend_on_another_model_on_the_same_canvas(pngs):
    """A 28 px model (crop_pct 0.875) and a 32 px one (crop_pct 1) share the 32 px canvas; the
    first one's views are the same alone and beside the other (whose larger crop would widen a
    shared region and move the first one's pixels by rounding)."""
    views = plan_views(["crop5"])
    small = [geometry(Preprocess(28, "center-crop", 0.875, "bicubic"), v) for v in views[:1]]
    large = [geometry(Preprocess(32, "center-crop", 1.0, "bicubic"), v) for v in views]
    assert small[0].canvas_size == large[0].canvas_size == 32
    for path in pngs.paths:
        alone = decode_image(path, small)
        beside = decode_image(path, small + large)
        np.testing.assert_array_equal(beside[small[0]], alone[small[0]], err_msg=path.name)


def test_a_store_of_another_pixel_pipeline_is_made_again(pngs, tmp_path, monkeypatch):
    """A complete store whose key lacks this ens's pixel version (one made before the region
    resize) is not kept: its arrays came from other pixels."""
    keys = []
    init = store_module.StoreWriter.__init__
    monkeypatch.setattr(store_module.StoreWriter, "__init__",
                        lambda self, path, key, *a: keys.append(dict(key)) or init(self, path, key, *a))
    model = tiny_onnx(tmp_path / "tiny.onnx", size=32)
    options = InferOptions(workers=0, batch_size=2, out=tmp_path / "runs")
    store = infer([model], [pngs], options).stores[0].path
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["pixels"] == keys[0]["pixels"] == decode.PIXELS == 3
    assert infer([model], [pngs], options).stores[0].computed is False  # the same pipeline: kept
    # As an ens before the field wrote it: no "pixels", and the run key of a key without it.
    del manifest["pixels"]
    manifest["run_key"] = store_module.run_key({k: v for k, v in keys[0].items() if k != "pixels"})
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert read_store(store).manifest.get("pixels") is None  # readable, as old stores are
    again = infer([model], [pngs], options).stores[0]
    assert again.computed is True and read_store(store).manifest["pixels"] == 3


def pixel_model(path, size=32):
    """An ens model whose logits are its input pixels: (batch, size * size * 3)."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Reshape", ["f", "shape"], ["logits"])],
        "pixels", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", size * size * 3])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, size * size * 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata("pixels", size * size * 3, size, (0, 0, 0), (1, 1, 1), dynamic_size=False)
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_stored_views_are_exactly_the_torchvision_crops(pngs, tmp_path):
    model = pixel_model(tmp_path / "pixels.onnx")
    options = InferOptions(tta=("crop10",), keep_views=True, dtype="float32", workers=0, batch_size=3,
                           out=tmp_path / "runs")
    infer([model], [pngs], options)
    store = read_store(tmp_path / "runs" / "pixels" / "images")
    views = plan_views(["crop10"])
    assert store.view_names == tuple(v.name for v in views) and len(views) == 10
    for i, path in enumerate(pngs.paths):
        for v, view in enumerate(views):
            want = reference_view(path, 32, 0.875, "center-crop", view).reshape(-1)
            np.testing.assert_array_equal(store.views[v, i], want, err_msg=f"{path.name} {view.name}")
        np.testing.assert_allclose(store.logits[i], store.views[:, i].mean(0), rtol=1e-6)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("merge", ["mean-logits", "mean-probs", "gmean"])
def test_tta_logits_equal_the_model_on_explicit_views(pngs, tmp_path, merge):
    model = tiny_onnx(tmp_path / "tiny.onnx", size=32)
    options = InferOptions(tta=("flip", "scale", "crop5"), scales=SCALES, merge=merge, keep_views=True,
                           dtype="float32", workers=0, batch_size=3, out=tmp_path / "runs")
    infer([model], [pngs], options)
    store = read_store(tmp_path / "runs" / "tiny" / "images")
    views = plan_views(["flip", "scale", "crop5"], SCALES)
    assert len(views) == 30
    want = np.stack([
        np.stack([run_onnx(model, reference_view(path, 32, 0.875, "center-crop", v)[None])[0]
                  for path in pngs.paths])
        for v in views]).astype(np.float64)  # (views, images, classes)
    np.testing.assert_allclose(store.views, want, rtol=1e-4, atol=1e-4)
    merged = {
        "mean-logits": want.mean(0),
        "mean-probs": np.log(np.exp(_log_softmax(want)).mean(0)),
        "gmean": _log_softmax(want).mean(0),
    }[merge]
    np.testing.assert_allclose(store.logits, merged, rtol=1e-4, atol=1e-4)


def test_batch_size_bounds_every_forward_pass_and_the_logits_do_not_change(pngs, tmp_path, monkeypatch):
    model = tiny_onnx(tmp_path / "tiny.onnx", size=32)
    shapes = []
    original = Runner.__call__

    def spy(self, batch):
        shapes.append(batch.shape)
        return original(self, batch)

    monkeypatch.setattr(Runner, "__call__", spy)
    options = InferOptions(tta=("flip", "scale"), scales=SCALES, workers=0, batch_size=3, dtype="float32",
                           keep_views=True, out=tmp_path / "runs")
    infer([model], [pngs], options)
    # 4 images in batches of 3 (the last padded), six views: no pass holds more than 3 images.
    assert shapes == [(3, 32, 32, 3), (3, 32, 32, 3), (3, 28, 28, 3), (3, 28, 28, 3),
                      (3, 37, 37, 3), (3, 37, 37, 3)] * 2
    # The same bytes as all views of one size in one pass (what ens did before): on the CPU
    # provider an image's logits do not depend on the other images of its pass.
    monkeypatch.setattr(Runner, "__call__", original)
    store = read_store(tmp_path / "runs" / "tiny" / "images")
    runner = Runner(load_model(model), "cpu")
    views = plan_views(["flip", "scale"], SCALES)
    geos = geometries(Preprocess(32), views)
    for size in (32, 28, 37):
        rows = [i for i, v in enumerate(views) if view_size(Preprocess(32), v) == size]
        for lo in (0, 3):
            passes = []
            for i in rows:
                batch = np.zeros((3, size, size, 3), np.uint8)  # padded as ens pads
                for r, path in enumerate(pngs.paths[lo:lo + 3]):
                    batch[r] = decode_image(path, [geos[i]])[geos[i]]
                passes.append(batch[:, :, ::-1] if views[i].flip else batch)
            count = len(pngs.paths[lo:lo + 3])
            logits = runner(np.concatenate(passes)).reshape(len(rows), 3, -1)[:, :count]
            np.testing.assert_array_equal(store.views[rows, lo:lo + count], logits)


def test_one_decode_per_image_whatever_the_models_and_views(pngs, tmp_path, monkeypatch):
    models = [tiny_onnx(tmp_path / "a.onnx", size=32),
              tiny_onnx(tmp_path / "b.onnx", size=40, crop_pct=0.95, seed=1),
              tiny_onnx(tmp_path / "c.onnx", size=24, resize="squash", seed=2)]
    opened = []
    original = decode._finish

    def counting(image):
        opened.append(image.filename)
        return original(image)

    monkeypatch.setattr(decode, "_finish", counting)
    options = InferOptions(tta=("flip", "scale", "crop5"), workers=0, batch_size=3, out=tmp_path / "runs")
    result = infer(models, [pngs], options)
    assert sorted(opened) == sorted(map(str, pngs.paths))
    assert result.decodes == len(pngs)
    assert {s.path.parent.name for s in result.stores} == {"a", "b", "c"}


def test_a_models_pixels_do_not_depend_on_the_other_models_of_the_run(tmp_path):
    """Large JPEGs: the 24 px model alone is decoded at 1/8; beside a 150 px model it still is
    (a second, reduced decode), so its store is the same whichever models share the run."""
    paths = write_images(tmp_path / "big", [(800, 600), (640, 960)], suffix=".jpg")
    split = load_split(tmp_path / "big")
    small = tiny_onnx(tmp_path / "small.onnx", size=24)
    large = tiny_onnx(tmp_path / "large.onnx", size=150, seed=1)
    options = dict(tta=("flip",), workers=0, batch_size=2)
    alone = infer([small], [split], InferOptions(**options, out=tmp_path / "alone"))
    both = infer([small, large], [split], InferOptions(**options, out=tmp_path / "both"))
    assert alone.decodes == len(paths) and both.decodes == 2 * len(paths)
    np.testing.assert_array_equal(read_store(tmp_path / "both" / "small" / "big").logits,
                                  read_store(tmp_path / "alone" / "small" / "big").logits)
    # ... whereas the 24 px views cut from the full decode are other pixels.
    geo = geometry(Preprocess(24), plan_views([])[0])
    reduced = decode.decode_image(paths[0], [geo])[geo]
    full = decode.decode_image(paths[0], [dataclasses.replace(geo, decode_side=600)])
    assert not np.array_equal(reduced, next(iter(full.values())))


def test_one_decode_per_image_in_worker_processes(pngs, tmp_path):
    models = [tiny_onnx(tmp_path / "a.onnx", size=32), tiny_onnx(tmp_path / "b.onnx", size=40, seed=1)]
    options = InferOptions(tta=("flip", "crop5"), workers=2, batch_size=1, out=tmp_path / "runs")
    result = infer(models, [pngs], options)
    assert result.decodes == len(pngs) and result.workers == 2
    # The same arrays decoded in workers or inline give the same stores.
    inline = infer(models, [pngs], InferOptions(tta=("flip", "crop5"), workers=0, batch_size=1,
                                                out=tmp_path / "inline"))
    for a, b in zip(result.stores, inline.stores):
        np.testing.assert_array_equal(read_store(a.path).logits, read_store(b.path).logits)


def test_reduced_jpeg_decode_orientation_and_colour_modes(tmp_path):
    big = tmp_path / "big.jpg"
    write_images(tmp_path / "w", [(800, 600)])[0].rename(big)
    # draft: a 48 px canvas needs at most a 1/8 decode of 600 px (75 px), never the full image.
    assert min(decode.load_image(big, 48).size) == 75
    assert min(decode.load_image(big, 300).size) == 300
    assert min(decode.load_image(big, 301).size) == 600

    image = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode.load_image(tmp_path / "rotated.jpg", 40).size == (40, 60)
    assert decode.load_image(tmp_path / "rotated.jpg", 10).size == (10, 15)  # 1/4 decode, then rotated

    Image.new("L", (40, 30), 77).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (1, 2, 3, 0)).save(tmp_path / "rgba.png")
    Image.new("P", (40, 30), 5).save(tmp_path / "palette.gif")
    Image.new("I;16", (40, 30), 300).save(tmp_path / "deep.png")
    geo = geometry(Preprocess(16), plan_views([])[0])
    for name in ("gray.jpg", "cmyk.jpg", "rgba.png", "palette.gif", "deep.png"):
        array = decode_image(tmp_path / name, [geo])[geo]
        assert array.shape == (16, 16, 3) and array.dtype == np.uint8, name
    gray = decode_image(tmp_path / "gray.jpg", [geo])[geo]
    assert (gray == gray[..., :1]).all() and abs(int(gray[0, 0, 0]) - 77) <= 2
    assert decode_image(tmp_path / "cmyk.jpg", [geo])[geo][8, 8, 0] > 200  # red stays red


def test_view_sizes_follow_the_scales():
    pre = Preprocess(32)
    assert sorted({view_size(pre, v) for v in plan_views(["scale"], SCALES)}) == [28, 32, 37]
