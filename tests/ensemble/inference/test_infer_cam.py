"""`ens infer --tta cam`: the crop where the model looks, end to end.

The models here are built with onnx.helper so that their class activation map is known: edge
detectors (the absolute horizontal and vertical differences of the image, edge-padded so a
blank canvas gives no response anywhere), averaged over 4 x 4 px cells, then global average
pooling and a linear head. Their CAM is high where the image has texture and zero where it is
blank, so a photo pasted small on a blank canvas is where they look.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from ensemble.formats.dataset import load_split
from ensemble.errors import EnsError
from ensemble.inference.decode import decode_batch
from ensemble.inference.run import InferOptions, infer
from ensemble.formats.store import MANIFEST, read_store
from ensemble.formats.model import CAM_OUTPUT, ModelMetadata

from tests.ensemble.conftest import (CLASSES, MEAN, STD, ens, make_inat, ok, one_line_error, replace_metadata, run_onnx,
                                     save_model, store_bytes, tiny_onnx)

CELL = 4


def cam_onnx(path: Path, *, size: int = 64, classes: int = CLASSES, resize: str = "center-crop",
             crop_pct: float = 0.875, seed: int = 0, positive: bool = False, cam: bool = True,
             cam_equation: str = "bc,bchw->bhw") -> Path:
    """A texture classifier with a ``cam`` output (the ens contract: uint8 NHWC in).

    ``positive``: every head weight above 0, so the top-1 class's map is high exactly where the
    image has edges. ``cam=False``: the same network without the output (and metadata saying so).
    ``cam_equation``: how the map is made from the head's row and the features (a broken one
    for the error tests).
    """
    rng = np.random.default_rng(seed)
    kernel = np.zeros((8, 3, 3, 3), np.float32)
    for i, (dy, dx) in enumerate([(0, 1), (1, 0), (1, 1), (1, -1)]):
        for sign, out in ((1, 2 * i), (-1, 2 * i + 1)):  # both signs through ReLU: the absolute difference
            kernel[out, :, 1, 1] = sign
            kernel[out, :, 1 + dy, 1 + dx] = -sign
    head = (rng.uniform(0.5, 1.5, (8, classes)) if positive else rng.normal(0, 1, (8, classes))).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    mean = np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, np.float32).reshape(1, 3, 1, 1)
    inits = [numpy_helper.from_array(kernel, "kernel"), numpy_helper.from_array(head, "head"),
             numpy_helper.from_array(np.ascontiguousarray(head.T), "head_t"),
             numpy_helper.from_array(bias, "bias"), numpy_helper.from_array(1 / (255 * std), "scale"),
             numpy_helper.from_array(-mean / std, "shift"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Cast", ["nchw"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "scale"], ["fs"]),
             helper.make_node("Add", ["fs", "shift"], ["normalised"]),
             helper.make_node("Pad", ["normalised", "pads"], ["padded"], mode="edge"),
             helper.make_node("Conv", ["padded", "kernel"], ["conv"]),
             helper.make_node("Relu", ["conv"], ["edges"]),
             helper.make_node("AveragePool", ["edges"], ["features"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]),
             helper.make_node("GlobalAveragePool", ["features"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "head", "bias"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])]
    if cam:
        nodes += [helper.make_node("ArgMax", ["logits"], ["top1"], axis=1, keepdims=0),
                  helper.make_node("Gather", ["head_t", "top1"], ["row"], axis=0),
                  helper.make_node("Einsum", ["row", "features"], [CAM_OUTPUT], equation=cam_equation)]
        outputs.append(helper.make_tensor_value_info(CAM_OUTPUT, TensorProto.FLOAT,
                                                     ["batch", "h", "w"][:len(cam_equation.split("->")[1])]))
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])
    graph = helper.make_graph(nodes, "texture", [image], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(architecture="texture", num_classes=classes, input_size=size, mean=MEAN, std=STD,
                         resize=resize, crop_pct=crop_pct, dynamic_size=True,
                         cam=CAM_OUTPUT if cam else None, cam_feature="features" if cam else None)
    return save_model(model, path, meta)


def photo_patch(side: int) -> Image.Image:
    """A real photo (scikit-learn's china.jpg, its textured middle), ``side`` px square."""
    from sklearn.datasets import load_sample_image

    china = load_sample_image("china.jpg")
    return Image.fromarray(china[100:400, 170:470]).resize((side, side), Image.Resampling.BILINEAR)


def pasted(folder: Path, places: list[tuple[int, int]], canvas=(360, 240), side: int = 48) -> Path:
    """PNGs of the photo pasted at each ``(x, y)`` on a blank grey canvas, and their folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(places):
        image = Image.new("RGB", canvas, (128, 128, 128))
        image.paste(photo_patch(side), (x, y))
        image.save(folder / f"img{i}.png")
    return folder


def _options(out, **kw):
    return InferOptions(**{"tta": ("cam",), "workers": 0, "batch_size": 2, "out": out, "dtype": "float32", **kw})


def test_a_photo_pasted_small_is_where_the_box_goes(tmp_path):
    # Two places well inside what a center-crop model's full view sees (the middle 211 px square
    # of a 360 x 240 canvas: x 73..284, y 13..224), the photo 48 px.
    places = [(110, 50), (200, 150)]
    folder = pasted(tmp_path / "images", places)
    model = cam_onnx(tmp_path / "texture.onnx", positive=True)
    infer([model], [load_split(folder)], _options(tmp_path / "runs", keep_views=True))
    store = read_store(tmp_path / "runs" / "texture" / "images")
    assert store.view_names == ("identity", "cam")
    boxes = np.asarray(store.boxes) * [360, 240, 360, 240]
    side = 48
    for (x, y), box in zip(places, boxes):
        # The box holds the photo and is little more than it (padded, on an 8 px cell grid).
        assert box[0] <= x and box[1] <= y and box[2] >= x + side and box[3] >= y + side, (box, x, y)
        assert (box[2] - box[0]) * (box[3] - box[1]) <= (1.7 * side) ** 2
    # Metamorphic: moving the photo moves the box by as much.
    np.testing.assert_allclose(boxes[1] - boxes[0], [90, 100, 90, 100], atol=3)


def test_the_box_is_on_the_image_as_displayed_exif_orientation_applied(tmp_path):
    """A photo stored sideways with an EXIF orientation tag gets the box and the cam view of the
    same photo stored upright: the box is in the displayed image's frame."""
    folder = pasted(tmp_path / "images", [(110, 50)])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.open(folder / "img0.png").transpose(Image.Transpose.ROTATE_90).save(folder / "img1.png", exif=exif)
    model = cam_onnx(tmp_path / "texture.onnx", positive=True)
    infer([model], [load_split(folder)], _options(tmp_path / "runs", keep_views=True))
    store = read_store(tmp_path / "runs" / "texture" / "images")
    rows = {str(name): row for row, name in enumerate(store.ids)}
    upright, sideways = rows["img0.png"], rows["img1.png"]
    assert store.boxes[upright][2] - store.boxes[upright][0] < 0.5  # a box around the photo, not the frame
    np.testing.assert_array_equal(store.boxes[sideways], store.boxes[upright])
    np.testing.assert_array_equal(store.views[:, sideways], store.views[:, upright])


def test_the_cam_view_classifies_the_crop_of_the_full_resolution_image(tmp_path):
    """Its logits are the model's on the box cut from the image file itself, resized to the input."""
    folder = pasted(tmp_path / "images", [(100, 40), (150, 120), (210, 60)])
    model = cam_onnx(tmp_path / "texture.onnx", positive=True)
    infer([model], [load_split(folder)], _options(tmp_path / "runs", keep_views=True, tta=("cam", "flip")))
    store = read_store(tmp_path / "runs" / "texture" / "images")
    assert store.view_names == ("identity", "flip", "cam", "cam+flip")
    for row, name in enumerate(store.ids):
        image = Image.open(folder / name).convert("RGB")
        box = np.asarray(store.boxes[row]) * [image.width, image.height, image.width, image.height]
        pixels = np.round(box).astype(int)
        np.testing.assert_allclose(box, pixels, atol=1e-3)  # whole pixels of the file: no shrink at this size
        crop = np.asarray(image.crop(tuple(pixels)).resize((64, 64), Image.Resampling.BILINEAR))
        expected = run_onnx(model, np.stack([crop, crop[:, ::-1]]))
        np.testing.assert_allclose(store.views[2, row], expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(store.views[3, row], expected[1], rtol=1e-5, atol=1e-5)
    merged = np.asarray(store.views, np.float64).mean(axis=0)
    np.testing.assert_allclose(store.logits, merged, rtol=1e-6, atol=1e-6)


def test_a_model_without_a_cam_output_is_refused_by_name_before_any_work(tmp_path, inat):
    good = cam_onnx(tmp_path / "good.onnx")
    plain = cam_onnx(tmp_path / "plain.onnx", cam=False)
    with pytest.raises(EnsError, match=r"plain\.onnx: has no cam output"):
        infer([good, plain], [load_split(inat / "val2019.json")], _options(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
    line = one_line_error(ens("infer", tiny_onnx(tmp_path / "tiny.onnx"), "--index", inat / "val2019.json",
                              "--tta", "cam", "--out", tmp_path / "runs"), "tiny.onnx: has no cam output")
    assert "drop cam from --tta" in line


def test_metadata_naming_a_cam_output_the_graph_lacks_is_one_line(tmp_path, inat):
    # The network without its cam output, its metadata still saying it has one (an edited file).
    path = replace_metadata(cam_onnx(tmp_path / "lying.onnx", cam=False), ModelMetadata(
        architecture="texture", num_classes=CLASSES, input_size=64, mean=MEAN, std=STD, dynamic_size=True,
        cam=CAM_OUTPUT, cam_feature="features"))
    one_line_error(ens("infer", path, "--index", inat / "val2019.json", "--tta", "cam", "--out", tmp_path / "runs"),
                   "lying.onnx: its metadata names a 'cam' output, but the graph's outputs are logits;")
    assert not (tmp_path / "runs").exists()


def test_a_cam_output_that_is_no_map_per_image_is_one_line(tmp_path, inat):
    model = cam_onnx(tmp_path / "flat.onnx", cam_equation="bc,bchw->bh")  # (batch, h): no map
    one_line_error(ens("infer", model, "--index", inat / "val2019.json", "--tta", "cam", "--workers", 0,
                       "--out", tmp_path / "runs"),
                   "flat.onnx: its 'cam' output has shape (32, 16), not a class activation map per image (32, h, w)")


def test_cam_options_are_checked_and_need_the_cam_view(tmp_path, inat):
    model = cam_onnx(tmp_path / "m.onnx")
    split = ("--index", inat / "val2019.json", "--out", tmp_path / "runs")
    one_line_error(ens("infer", model, *split, "--tta", "cam", "--cam-threshold", "1.5"), "--cam-threshold 1.5: must lie in [0, 1]")
    one_line_error(ens("infer", model, *split, "--tta", "cam", "--cam-pad", "-1"), "--cam-pad -1")
    one_line_error(ens("infer", model, *split, "--tta", "cam", "--cam-min", "0"), "--cam-min 0")
    one_line_error(ens("infer", model, *split, "--tta", "flip", "--cam-min", "0.5"), "--cam-min is for the cam view")
    # Without the cam view, a value out of range is first of all a flag that does not apply.
    one_line_error(ens("infer", model, *split, "--tta", "flip", "--cam-min", "0"), "--cam-min is for the cam view")


def test_cam_settings_are_in_the_store_key_manifest_and_command(tmp_path, inat):
    model = cam_onnx(tmp_path / "m.onnx")
    split = load_split(inat / "val2019.json")
    out = tmp_path / "runs"
    infer([model], [split], _options(out))
    manifest = json.loads((out / "m" / "val" / MANIFEST).read_text())
    assert manifest["tta"]["cam"] == {"threshold": 0.2, "pad": 0.1, "min": 0.25}
    assert manifest["boxes"] is True
    first = store_bytes(out / "m" / "val")
    # Other settings: the store is computed again, with other boxes; the command names them.
    result = infer([model], [split], _options(out, cam_threshold=0.6, cam_min=0.5))
    assert result.stores[0].computed
    manifest = json.loads((out / "m" / "val" / MANIFEST).read_text())
    assert manifest["tta"]["cam"] == {"threshold": 0.6, "pad": 0.1, "min": 0.5}
    assert "--cam-threshold 0.6 --cam-min 0.5" in manifest["command"]
    assert store_bytes(out / "m" / "val")["boxes.npy"] != first["boxes.npy"]
    # The same settings again: kept.
    assert not infer([model], [split], _options(out, cam_threshold=0.6, cam_min=0.5)).stores[0].computed


def test_a_damaged_cam_record_in_a_store_manifest_is_one_line(tmp_path, inat):
    model = cam_onnx(tmp_path / "m.onnx")
    infer([model], [load_split(inat / "val2019.json")], _options(tmp_path / "runs"))
    path = tmp_path / "runs" / "m" / "val" / MANIFEST
    manifest = json.loads(path.read_text())
    for damaged in ({"threshold": 0.2, "pad": 0.1}, "0.2,0.1,0.25", {"threshold": "0.2", "pad": 0.1, "min": 0.25}):
        path.write_text(json.dumps({**manifest, "tta": {**manifest["tta"], "cam": damaged}}))
        with pytest.raises(EnsError, match=r"manifest\.json: field 'tta\.cam' is missing or not absent, null or "
                                           r"\{threshold, pad, min\} \(numbers\); the store is damaged"):
            read_store(path.parent)


def test_a_store_without_cam_has_no_boxes(tmp_path, inat):
    model = cam_onnx(tmp_path / "m.onnx")
    infer([model], [load_split(inat / "val2019.json")], _options(tmp_path / "runs", tta=("flip",)))
    store = read_store(tmp_path / "runs" / "m" / "val")
    assert store.boxes is None and "cam" not in store.manifest["tta"]
    assert not (store.path / "boxes.npy").exists()


def test_each_image_is_decoded_once_with_the_cam_view(tmp_path):
    """Two models sharing preprocessing, cam and flip: one decode per image, the crops'
    sources cut from it. JPEGs, so that a decode reduced for the full view alone (360 x 240 px
    at 1/2 keeps its 73 px canvas) would differ from the one the crops need: a second decode."""
    folder = pasted(tmp_path / "png", [(100, 40), (150, 120), (210, 60)])
    (tmp_path / "images").mkdir()
    for png in sorted(folder.iterdir()):
        Image.open(png).save(tmp_path / "images" / f"{png.stem}.jpg", quality=95)
    folder = tmp_path / "images"
    models = [cam_onnx(tmp_path / "a.onnx", positive=True), cam_onnx(tmp_path / "b.onnx", seed=1)]
    result = infer(models, [load_split(folder)], _options(tmp_path / "runs", tta=("cam", "flip")))
    assert result.decodes == 3


def test_bad_images_are_skipped_with_the_cam_view(tmp_path, inat):
    split = load_split(inat / "val2019.json")
    model = cam_onnx(tmp_path / "m.onnx")
    infer([model], [split], _options(tmp_path / "whole", keep_views=True))
    whole = read_store(tmp_path / "whole" / "m" / "val")
    broken = Path(split.paths[3])
    broken.write_bytes(b"not an image")
    with pytest.raises(EnsError, match="--on-bad-image skip"):
        infer([model], [split], _options(tmp_path / "failed"))
    infer([model], [split], _options(tmp_path / "skipped", keep_views=True, on_bad_image="skip"))
    skipped = read_store(tmp_path / "skipped" / "m" / "val")
    keep = np.arange(len(split)) != 3
    assert skipped.boxes.shape == (len(split) - 1, 4)
    np.testing.assert_array_equal(skipped.boxes, np.asarray(whole.boxes)[keep])
    np.testing.assert_array_equal(skipped.views, np.asarray(whole.views)[:, keep])
    assert skipped.skipped_ids == (split.ids[3],)


def test_decode_batch_cuts_the_region_the_full_view_sees(tmp_path):
    """The cam source of a center-crop model is the middle crop_pct square of the image, at the
    file's resolution; of a squash model the whole image, shrunk to fit ``side``."""
    from ensemble.inference.tta import Preprocess, View, cam_source

    folder = pasted(tmp_path / "images", [(100, 40)])
    path = str(folder / "img0.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    views = (View(), View(cam=True))
    crop_source = cam_source(Preprocess(64, "center-crop", 0.875), views)
    squash_source = cam_source(Preprocess(32, "squash", 0.875), views, cam_min=0.5)
    assert (crop_source.side, squash_source.side) == (256, 64)
    decoded = decode_batch(0, [path], 2, [crop_source.geometry], sources=[crop_source, squash_source])
    # 240 px shorter side -> a 109 x 73 canvas (64 / 0.875), the crop's corner at (22, 4) (22.5 and
    # 4.5 rounded as torchvision does), mapped back by 360 / 109 and 240 / 73: x 73..284, y 13..224.
    crop = decoded.sources[crop_source]
    assert tuple(crop.shapes[0]) == (211, 211)
    np.testing.assert_array_equal(crop.pixels[0, :211, :211], image[13:224, 73:284])
    np.testing.assert_allclose(crop.regions[0], [73 / 360, 13 / 240, 284 / 360, 224 / 240], atol=1e-6)
    squash = decoded.sources[squash_source]
    assert tuple(squash.shapes[0]) == (43, 64)  # 360 x 240 fitted into 64 px
    np.testing.assert_allclose(squash.regions[0], [0, 0, 1, 1])
    assert tuple(crop.shapes[1]) == (0, 0)  # the padding row


class Killed(Exception):
    pass


def test_resume_after_a_kill_and_worker_processes_give_the_same_bytes(tmp_path):
    """Killed after its first chunk and run again, in decoding processes (the sources travel in
    shared memory), the run ends with the arrays of one uninterrupted run in this process."""
    inat = make_inat(tmp_path / "inat", n_val=7, n_test=1, sizes=((300, 200), (180, 260), (640, 480)))
    split = load_split(inat / "val2019.json")
    models = [cam_onnx(tmp_path / "a.onnx", positive=True), cam_onnx(tmp_path / "b.onnx", seed=1, resize="squash")]
    options = dict(tta=("cam", "flip"), keep_views=True, chunk_size=2)
    infer(models, [split], _options(tmp_path / "whole", **options))

    def kill_after_first_chunk(event):
        if event.kind == "chunk":
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        infer(models, [split], _options(out, **options, workers=1), progress=kill_after_first_chunk)
    result = infer(models, [split], _options(out, **options, workers=1))
    assert result.decodes == 7 - 2
    for name in ("a", "b"):
        assert store_bytes(out / name / "val") == store_bytes(tmp_path / "whole" / name / "val")
        assert "boxes.npy" in store_bytes(out / name / "val")


def test_blend_refuses_stores_made_with_other_cam_settings(tmp_path, inat):
    models = [cam_onnx(tmp_path / "m0.onnx"), cam_onnx(tmp_path / "m1.onnx", seed=1)]
    runs = tmp_path / "runs"
    common = ("--data", inat, "--tta", "cam", "--keep-views", "--workers", 0, "--out", runs)
    ok(ens("infer", *models, *common))
    fit = ("blend", "--optimize", "val", "--data", inat, "--runs", runs)
    ok(ens(*fit, "--views", "--out", tmp_path / "blend"))
    record = json.loads((tmp_path / "blend" / "blend.json").read_text())
    assert "m1/cam" in record["members"]
    ok(ens("infer", models[1], *common[:2], "--split", "test", *common[2:], "--cam-threshold", "0.5"))
    one_line_error(ens(*fit, "--out", tmp_path / "other"),
                   "m1: its test store was made with cam view settings {'threshold': 0.5", "the val store with")


def test_a_model_made_by_ens_export_runs_the_cam_view(exported_model, tmp_path, inat):
    """resnet18 at 32 px: its last feature map is 1 x 1, a flat map, so each box is the whole
    region that the full view sees (the centred 0.875 square of the image)."""
    from ensemble.inference.runtime import load_model

    assert load_model(exported_model).metadata.cam == CAM_OUTPUT
    split = load_split(inat / "val2019.json")
    ok(ens("infer", exported_model, "--index", inat / "val2019.json", "--tta", "cam,flip", "--keep-views",
           "--workers", 0, "--out", tmp_path / "runs"))
    store = read_store(tmp_path / "runs" / exported_model.stem / "val")
    assert store.view_names == ("identity", "flip", "cam", "cam+flip")
    for row, path in enumerate(split.paths):
        width, height = Image.open(path).size
        side = min(width, height) * 32 / 36  # canvas 36 (32 / 0.875), crop 32
        x0, y0, x1, y1 = np.asarray(store.boxes[row]) * [width, height, width, height]
        assert abs((x1 - x0) - side) <= 1.5 and abs((y1 - y0) - side) <= 1.5
        assert abs((x0 + x1) / 2 - width / 2) <= 1 and abs((y0 + y1) / 2 - height / 2) <= 1
    # Not the identity view again: the crop is cut from the decoded image, not from the canvas.
    assert not np.array_equal(store.views[0], store.views[2])


def test_the_cam_sources_count_in_the_decoding_memory_bound():
    """A 560 px model's crops need up to 1024 px across (560 / 0.25, capped): 100 MB a batch of
    32 beside its 30 MB view, so fewer batches are decoded ahead, within the 1 GiB bound."""
    from ensemble.inference.decode import PREFETCH_BYTES, Decoder
    from ensemble.inference.tta import CAM_SOURCE_MAX, Preprocess, View, cam_source, geometries

    pre, views = Preprocess(560, "center-crop", 0.875), (View(), View(cam=True))
    source = cam_source(pre, views)
    assert source.side == CAM_SOURCE_MAX == 1024
    plain = Decoder(geometries(pre, views[:1]), 32, workers=4)
    with_cam = Decoder(geometries(pre, views)[:1], 32, workers=4, sources=(source,))
    assert with_cam.batch_bytes >= plain.batch_bytes + 32 * 1024 * 1024 * 3
    assert plain.prefetch == 10 and with_cam.prefetch < 10
    assert with_cam.prefetch * with_cam.batch_bytes <= PREFETCH_BYTES


@pytest.mark.ray
def test_the_ray_engine_writes_the_same_cam_stores(tmp_path):
    """The cam view lives in the shared pieces (decode_batch's sources, Forward, _SplitRun), so
    the Ray engine gets it as is: byte-identical stores, boxes included."""
    ray = pytest.importorskip("ray")
    folder = pasted(tmp_path / "images", [(100, 40), (150, 120), (210, 60), (120, 100), (90, 30)])
    models = [cam_onnx(tmp_path / "a.onnx", positive=True), cam_onnx(tmp_path / "b.onnx", seed=1, resize="squash")]
    split = load_split(folder)
    options = dict(tta=("cam", "flip"), keep_views=True, chunk_size=2)
    infer(models, [split], _options(tmp_path / "local", **options))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        infer(models, [split], _options(tmp_path / "ray", **options, engine="ray", workers=None))
    finally:
        ray.shutdown()
    for name in ("a", "b"):
        assert "boxes.npy" in store_bytes(tmp_path / "ray" / name / "images")
        assert store_bytes(tmp_path / "ray" / name / "images") == store_bytes(tmp_path / "local" / name / "images")
