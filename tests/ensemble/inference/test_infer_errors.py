"""Bad input (images, splits, models), device selection and models from elsewhere."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ensemble.formats.dataset import load_split
from ensemble.errors import EnsError
from ensemble.inference.run import InferOptions, infer
from ensemble.inference.foreign import ForeignPreprocess
from ensemble.inference.runtime import Runner, available_providers, load_model
from ensemble.formats.store import MANIFEST, read_store
from ensemble.formats.model import ModelMetadata

from tests.ensemble.conftest import CLASSES, MEAN, STD, replace_metadata, run_onnx, tiny_onnx, write_images

BAD = ("missing", "empty", "truncated", "text")


@pytest.fixture
def bad_split(tmp_path):
    """A json split of 8 images where images 2, 3, 5 and 6 are missing, empty, truncated, text."""
    folder = tmp_path / "data"
    paths = write_images(folder / "images", [(40, 30)] * 8)
    paths[2].unlink()
    paths[3].write_bytes(b"")
    paths[5].write_bytes(paths[5].read_bytes()[:300])
    paths[6].write_text("this is not an image")
    images = [{"id": 100 + i, "file_name": str(p.relative_to(folder))} for i, p in enumerate(paths)]
    (folder / "val2019.json").write_text(json.dumps({"images": images}))
    return load_split(folder / "val2019.json")


def _options(tmp_path, **kw):
    return InferOptions(**{"workers": 0, "batch_size": 2, "chunk_size": 2, "out": tmp_path / "runs", **kw})


def _subset(split, rows):
    return dataclasses.replace(split, ids=tuple(split.ids[i] for i in rows),
                               paths=tuple(split.paths[i] for i in rows))


@pytest.mark.parametrize("index", [2, 3, 5, 6], ids=BAD)
def test_each_bad_image_stops_the_run_naming_it(tiny, tmp_path, bad_split, index):
    split = _subset(bad_split, [0, 1, index, 4])
    with pytest.raises(EnsError, match=rf"image {100 + index} \(.*img{index:03d}.jpg\): .*--on-bad-image skip"):
        infer([tiny], [split], _options(tmp_path))
    manifest = json.loads((tmp_path / "runs" / "tiny" / "val" / MANIFEST).read_text())
    assert manifest["complete"] is False
    with pytest.raises(EnsError, match="incomplete"):
        read_store(tmp_path / "runs" / "tiny" / "val")


def test_skip_leaves_bad_images_out_and_lists_them(tiny, tmp_path, bad_split):
    result = infer([tiny], [bad_split], _options(tmp_path, on_bad_image="skip"))
    store = read_store(result.stores[0].path)
    assert store.ids.tolist() == [100, 101, 104, 107]
    assert store.logits.shape == (4, 5)
    skipped = {s["id"]: s["reason"] for s in store.manifest["skipped"]}
    assert list(skipped) == [102, 103, 105, 106]
    assert skipped[102] == "missing file"
    assert (skipped[103], skipped[106]) == ("empty file", "not an image Pillow can read")
    assert "truncated" in skipped[105].lower()
    # The rows kept are the rows a clean run of those images gives.
    clean = dataclasses.replace(_subset(bad_split, [0, 1, 4, 7]), name="clean")
    result = infer([tiny], [clean], _options(tmp_path, dtype="float32"))
    np.testing.assert_allclose(read_store(result.stores[0].path).logits, store.logits, rtol=1e-3, atol=1e-3)


def test_a_failed_run_resumes_with_skip(tiny, tmp_path, bad_split):
    with pytest.raises(EnsError, match="image 102"):
        infer([tiny], [bad_split], _options(tmp_path))
    # Chunk 0 (ids 100, 101) was saved; the rerun with skip starts after it.
    result = infer([tiny], [bad_split], _options(tmp_path, on_bad_image="skip"))
    assert result.decodes == 6
    assert read_store(result.stores[0].path).ids.tolist() == [100, 101, 104, 107]


def test_fixed_size_model_refuses_scale_views(tmp_path, bad_split):
    fixed = tiny_onnx(tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(EnsError, match=r"fixed.onnx: takes only 32 px inputs, but the TTA views need 28, 32, 37 px"):
        infer([fixed], [bad_split], _options(tmp_path, tta=("scale",)))
    folder = load_split(tmp_path / "data" / "images")  # crops and flips keep the size: fine
    infer([fixed], [folder], _options(tmp_path, tta=("crop10",), on_bad_image="skip"))


def test_models_sharing_a_store_folder_are_refused(tmp_path, bad_split):
    a = tiny_onnx(tmp_path / "x" / "tiny.onnx")
    b = tiny_onnx(tmp_path / "y" / "tiny.onnx")
    with pytest.raises(EnsError, match="would share the store folder 'tiny'"):
        infer([a, b], [bad_split], _options(tmp_path))


def test_non_finite_logits_name_the_model_and_image(tmp_path):
    path = tiny_onnx(tmp_path / "nan.onnx")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "bias":
            init.CopyFrom(numpy_helper.from_array(np.full(5, np.nan, np.float32), "bias"))
    onnx.save(model, str(path))
    write_images(tmp_path / "imgs", [(40, 30)])
    with pytest.raises(EnsError, match=r"nan.onnx: non-finite logits for image 'img000.jpg'"):
        infer([path], [load_split(tmp_path / "imgs")], _options(tmp_path))


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="this machine has CUDA")
def test_auto_runs_on_cpu_and_cuda_is_refused_here(tiny, tmp_path):
    write_images(tmp_path / "imgs", [(40, 30)])
    split = load_split(tmp_path / "imgs")
    events = []
    result = infer([tiny], [split], _options(tmp_path), progress=events.append)
    assert (result.device, result.provider) == ("cpu", "CPUExecutionProvider")
    assert events[0].kind == "note" and "device cpu (--device auto): CPUExecutionProvider" in events[0].message
    assert read_store(result.stores[0].path).manifest["provider"] == "CPUExecutionProvider"
    with pytest.raises(EnsError, match="--device cuda: .*install onnxruntime-gpu"):
        infer([tiny], [split], _options(tmp_path, device="cuda"))


def test_foreign_float_model_normalised_by_the_options_equals_the_ens_model(tmp_path):
    ens_model = tiny_onnx(tmp_path / "ens.onnx", seed=3)
    foreign = tiny_onnx(tmp_path / "foreign.onnx", seed=3, float_nchw=True)
    write_images(tmp_path / "imgs", [(40, 30), (30, 50)])
    split = load_split(tmp_path / "imgs")
    given = ForeignPreprocess(input_size=32, mean=MEAN, std=STD)
    result = infer([ens_model, foreign], [split], _options(tmp_path, tta=("flip",), dtype="float32", foreign=given))
    ens_store, foreign_store = (read_store(s.path) for s in result.stores)
    np.testing.assert_allclose(foreign_store.logits, ens_store.logits, rtol=1e-5, atol=1e-5)
    assert foreign_store.manifest["model"]["foreign"] is True
    assert foreign_store.manifest["model"]["mean"] == list(MEAN)


def test_foreign_models_need_their_options(tmp_path):
    foreign = tiny_onnx(tmp_path / "foreign.onnx", float_nchw=True)
    fixed = tiny_onnx(tmp_path / "fixed.onnx", float_nchw=True, dynamic=False, size=48)
    nhwc = tiny_onnx(tmp_path / "nhwc.onnx", metadata=False)
    with pytest.raises(EnsError, match="foreign.onnx: has no ens metadata and takes any size; give --input-size"):
        load_model(foreign, ForeignPreprocess(mean=MEAN, std=STD))
    with pytest.raises(EnsError, match="foreign.onnx: has no ens metadata and takes float NCHW input; give --mean"):
        load_model(foreign, ForeignPreprocess(input_size=32))
    with pytest.raises(EnsError, match="fixed.onnx: takes 48x48 inputs, not --input-size 32"):
        load_model(fixed, ForeignPreprocess(input_size=32, mean=MEAN, std=STD))
    assert load_model(fixed, ForeignPreprocess(mean=MEAN, std=STD)).metadata.input_size == 48
    with pytest.raises(EnsError, match="nhwc.onnx: takes uint8 NHWC images and normalises them itself"):
        load_model(nhwc, ForeignPreprocess(input_size=32, mean=MEAN, std=STD))
    model = load_model(nhwc, ForeignPreprocess(input_size=32))
    images = np.zeros((1, 32, 32, 3), np.uint8)
    np.testing.assert_array_equal(Runner(model, "cpu")(images), run_onnx(nhwc, images))
    write_images(tmp_path / "imgs", [(40, 30)])
    with pytest.raises(EnsError, match="--input-size, --mean, --std, --resize and --crop-pct are for ONNX files"):
        infer([tiny_onnx(tmp_path / "ens.onnx")], [load_split(tmp_path / "imgs")],
              _options(tmp_path, foreign=ForeignPreprocess(input_size=32)))


def _fails_on_bright_pixels(path):
    """A model that onnxruntime cannot run on a batch holding a pixel of 200 or more: the
    batch's brightest value indexes a table of 200 entries (Gather fails out of bounds)."""
    model = onnx.load(str(tiny_onnx(path, size=32)))
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.zeros(200, np.float32), "table"))
    graph.output[0].name = "logits"
    for node in graph.node:
        if node.output[0] == "logits":
            node.output[0] = "raw_logits"
    graph.node.extend([
        onnx.helper.make_node("ReduceMax", ["image"], ["brightest"], keepdims=0),
        onnx.helper.make_node("Cast", ["brightest"], ["index"], to=onnx.TensorProto.INT64),
        onnx.helper.make_node("Gather", ["table", "index"], ["looked_up"]),
        onnx.helper.make_node("Add", ["raw_logits", "looked_up"], ["logits"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_an_onnxruntime_failure_is_one_line_and_keeps_finished_chunks(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from ensemble.cli import app

    model = _fails_on_bright_pixels(tmp_path / "picky.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):  # image 4 (the third chunk of two) holds a bright pixel
        pixels = np.full((40, 40, 3), 90, np.uint8)
        pixels[10:30, 10:30] = 250 if i == 4 else 150
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    result = CliRunner().invoke(app, ["infer", str(model), "--index", str(folder), "--batch-size", "2",
                                      "--chunk-size", "2", "--workers", "0", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"error: {model}: onnxruntime failed on a (2, 32, 32, 3) uint8 batch (")
    assert "the graph refuses 32x32 inputs or this batch" in lines[-1]
    assert "Traceback" not in result.output
    partial = tmp_path / "runs" / "picky" / "images" / ".partial"
    assert sorted(p.name for p in partial.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]


def test_out_of_memory_points_at_the_batch_size():
    from ensemble.inference.runtime import run_failure

    error = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                         "buffer of size 9437184000")
    line = run_failure("m.onnx", (320, 560, 560, 3), error)
    assert line.startswith("m.onnx: onnxruntime failed on a (320, 560, 560, 3) uint8 batch (RuntimeError: ")
    assert "out of memory: a smaller --batch-size" in line and "\n" not in line


@pytest.mark.parametrize("how", ["--split ../../x", "--split /abs/path", "--index .."])
def test_store_paths_never_escape_the_out_folder(tmp_path, how):
    from typer.testing import CliRunner

    from ensemble.cli import app

    data = tmp_path / "data"
    write_images(data / "x", [(40, 30)] * 2)
    (data / "x.json").write_text("{}")
    model = tiny_onnx(tmp_path / "tiny.onnx")
    option, value = how.split()
    args = ["--data", str(data), "--split", value] if option == "--split" else ["--index", str(data / "x" / value)]
    before = {p for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(app, ["infer", str(model), *args, "--workers", "0", "--out", str(tmp_path / "runs")])
    if option == "--index":
        # data/x/.. is the folder data: its store is runs/tiny/data, like any folder's.
        assert result.exit_code == 0, result.output
        assert read_store(tmp_path / "runs" / "tiny" / "data").ids.tolist() == ["x/img000.jpg", "x/img001.jpg"]
        written = {p for p in tmp_path.rglob("*")} - before
        assert all(p.is_relative_to(tmp_path / "runs") for p in written), written
        return
    assert result.exit_code == 2, result.output
    assert f"--split {value!r}: a store is named after it, so it must be one plain folder name" in result.output
    assert {p for p in tmp_path.rglob("*")} == before


def test_a_second_run_on_a_store_in_use_is_refused(tmp_path, tiny):
    """An advisory lock per store: another run on the same store stops at once, naming the pid;
    other stores in the same --out stay usable meanwhile."""
    import os

    from typer.testing import CliRunner

    from ensemble.cli import app
    from ensemble.formats.store import StoreWriter

    folder = tmp_path / "images"
    write_images(folder, [(40, 30)] * 3)
    holder = StoreWriter(tmp_path / "runs" / "tiny" / "images", {"held": True}, 3, 3)
    holder.lock()
    args = ["infer", str(tiny), "--index", str(folder), "--workers", "0", "--out", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert (f"error: {tmp_path / 'runs' / 'tiny' / 'images'}: in use by another ens infer (pid {os.getpid()})"
            in result.output)
    assert not (tmp_path / "runs" / "tiny" / "images" / MANIFEST).exists()
    other = tiny_onnx(tmp_path / "other.onnx", seed=3)
    assert CliRunner().invoke(app, ["infer", str(other), *args[2:]]).exit_code == 0
    holder.release()
    assert CliRunner().invoke(app, args).exit_code == 0
    read_store(tmp_path / "runs" / "tiny" / "images")


def test_a_complete_store_that_fails_its_own_check_is_computed_again(tmp_path, tiny):
    from typer.testing import CliRunner

    from ensemble.cli import app

    folder = tmp_path / "images"
    write_images(folder, [(40, 30)] * 4)
    args = ["infer", str(tiny), "--index", str(folder), "--workers", "0", "--out", str(tmp_path / "runs")]
    assert CliRunner().invoke(app, args).exit_code == 0
    store = tmp_path / "runs" / "tiny" / "images"
    whole = (store / "logits.npy").read_bytes()
    (store / "logits.npy").write_bytes(whole[:-20])  # truncated by hand
    with pytest.raises(EnsError, match="logits.npy: cut short"):
        read_store(store)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "computing it again" in result.output and "1 stores (1 computed)" in result.output
    assert (store / "logits.npy").read_bytes() == whole

    manifest = json.loads((store / MANIFEST).read_text())
    manifest["tta"]["views"] = "identity"
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EnsError, match=r"manifest.json: field 'tta.views' is missing or not a non-empty list"):
        read_store(store)


def test_onnxruntime_telemetry_is_off_before_a_session_opens(tiny, monkeypatch):
    import onnxruntime as ort

    from ensemble.inference.runtime import Runner

    calls = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"))
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: calls.append("session") or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    with pytest.raises(EnsError):
        Runner(load_model(tiny), "cpu")
    assert calls[:2] == ["off", "session"]


def test_metadata_whose_class_count_differs_from_the_logits_width_is_refused(tmp_path):
    # An edited file: metadata for CLASSES + 1 classes on a graph whose logits have CLASSES columns.
    path = replace_metadata(tiny_onnx(tmp_path / "wide.onnx"), ModelMetadata(
        architecture="tiny", num_classes=CLASSES + 1, input_size=32, mean=MEAN, std=STD, dynamic_size=True))
    with pytest.raises(EnsError, match=rf"wide.onnx: its metadata says {CLASSES + 1} classes, but its 'logits' "
                                       rf"output has {CLASSES} columns"):
        load_model(path)
    load_model(tiny_onnx(tmp_path / "fine.onnx"))  # the unedited file loads
