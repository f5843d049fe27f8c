"""The logit store: chunked writing, resuming, the complete flag, and the one reader."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.fileio import json_text
from ensemble.formats.store import (IDS, LOGITS, MANIFEST, PARTIAL, VIEWS, DatasetRecord, ModelRecord, RunFigures,
                                    StoreManifest, StoreWriter, TtaRecord, read_store, store_path, to_dtype)

KEY = {"model_sha256": "m", "dataset_sha256": "d", "dtype": "float32"}
#: What `ens infer` puts in a manifest beside the arrays' own fields.
BASE = StoreManifest(
    model=ModelRecord(file="m.onnx", sha256="m" * 64, architecture="resnet18", input_size=32, mean=(0.5,) * 3,
                      std=(0.25,) * 3, resize="center-crop", crop_pct=0.875, interpolation="bilinear",
                      precision="fp32", class_ids=None, foreign=False),
    dataset=DatasetRecord(split="val", source="val.json", sha256="d" * 64, images=5),
    tta=TtaRecord(views=("identity", "flip"), merge="mean-logits"),
    pixels=2, device="cpu", provider="CPUExecutionProvider", device_fallback=None, batch_size=2, chunk_size=2,
    ens_version="0.1.0", engine="local", cluster=None, command="ens infer m.onnx --index val.json")
IDS_ = (10, 11, 12, 13, 14)
PATHS = tuple(f"img{i}.jpg" for i in IDS_)


def _chunks(rows=5, classes=3, views=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, classes)), rng.normal(size=(views, rows, classes))


def _complete_store(folder):
    """A complete one-chunk store of 5 rows (no views) in ``folder``."""
    logits, _ = _chunks()
    writer = StoreWriter(folder, KEY, 5, 5)
    writer.open(BASE)
    _write_all(writer, logits)
    writer.finish(IDS_, PATHS, BASE)


def _write_all(writer, logits, views=None, bad=()):
    for c in range(writer.chunks):
        lo, hi = c * writer.chunk_size, min((c + 1) * writer.chunk_size, writer.rows)
        keep = np.ones(hi - lo, bool)
        chunk_bad = [(r - lo, why) for r, why in bad if lo <= r < hi]
        keep[[r for r, _ in chunk_bad]] = False
        writer.write_chunk(c, logits[lo:hi], keep, chunk_bad, None if views is None else views[:, lo:hi])


def test_store_path_is_out_stem_split(tmp_path):
    assert store_path(tmp_path, "models/resnet50.fp16.onnx", "val") == tmp_path / "resnet50.fp16" / "val"


def test_round_trip_with_views_and_skipped_rows(tmp_path):
    logits, views = _chunks()
    writer = StoreWriter(tmp_path / "s", KEY, rows=5, chunk_size=2)
    assert writer.chunks == 3
    assert writer.open(BASE) is False
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["complete"] is False
    _write_all(writer, logits, views, bad=[(3, "missing file")])
    manifest = writer.finish(IDS_, PATHS, BASE)
    assert manifest["complete"] and manifest["rows"] == 4
    assert not (tmp_path / "s" / PARTIAL).exists()

    store = read_store(tmp_path / "s")
    kept = [0, 1, 2, 4]
    np.testing.assert_array_equal(store.ids, [10, 11, 12, 14])
    assert store.ids.dtype == np.int64
    np.testing.assert_allclose(store.logits, logits[kept].astype(np.float32))
    np.testing.assert_allclose(store.views, views[:, kept].astype(np.float32))
    assert isinstance(store.logits, np.memmap)
    assert store.view_names == ("identity", "flip")
    assert store.skipped_ids == (13,)
    assert store.manifest["skipped"] == [{"id": 13, "path": "img13.jpg", "reason": "missing file"}]
    assert read_store(tmp_path / "s" / MANIFEST).path == tmp_path / "s"


def test_string_ids_and_float16(tmp_path):
    logits, _ = _chunks()
    writer = StoreWriter(tmp_path / "s", {**KEY, "dtype": "float16"}, rows=5, chunk_size=5)
    writer.open(BASE)
    _write_all(writer, logits * 1e6)
    writer.finish(tuple(f"dir/{i}.jpg" for i in range(5)), PATHS, BASE)
    store = read_store(tmp_path / "s")
    assert store.logits.dtype == np.float16 and np.isfinite(store.logits).all()
    assert store.ids.dtype.kind == "U" and store.ids[0] == "dir/0.jpg"
    assert store.views is None and not (tmp_path / "s" / VIEWS).exists()


def test_to_dtype_clips_instead_of_overflowing():
    out = to_dtype(np.array([1e6, -1e6, 1.5]), "float16")
    assert out.dtype == np.float16 and out.tolist() == [65504.0, -65504.0, 1.5]


def test_resume_keeps_finished_chunks_and_ends_byte_identical(tmp_path):
    logits, views = _chunks()
    whole = StoreWriter(tmp_path / "whole", KEY, 5, 2)
    whole.open(BASE)
    _write_all(whole, logits, views)
    whole.finish(IDS_, PATHS, BASE)

    first = StoreWriter(tmp_path / "resumed", KEY, 5, 2)
    first.open(BASE)
    first.write_chunk(0, logits[:2], np.ones(2, bool), views=views[:, :2])
    first.release()  # the first run dies here
    # A second run with the same key sees chunk 0 done and writes the rest.
    second = StoreWriter(tmp_path / "resumed", KEY, 5, 2)
    assert second.open(BASE) is False and second.done == {0}
    for c in (1, 2):
        lo, hi = 2 * c, min(2 * c + 2, 5)
        second.write_chunk(c, logits[lo:hi], np.ones(hi - lo, bool), views=views[:, lo:hi])
    second.finish(IDS_, PATHS, BASE)
    for name in (LOGITS, IDS, VIEWS):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()

    # Complete with the same key: nothing to do. Another key: start over, but the complete
    # store stays as it was, readable, until the other run finishes.
    assert StoreWriter(tmp_path / "resumed", KEY, 5, 2).open(BASE) is True
    before = json.loads((tmp_path / "resumed" / MANIFEST).read_text())
    other = StoreWriter(tmp_path / "resumed", {**KEY, "model_sha256": "other"}, 5, 2)
    assert other.open(BASE) is False and other.done == set()
    other.write_chunk(0, logits[:2] + 1, np.ones(2, bool), views=views[:, :2])
    other.release()
    assert json.loads((tmp_path / "resumed" / MANIFEST).read_text()) == before
    assert (tmp_path / "resumed" / LOGITS).read_bytes() == (tmp_path / "whole" / LOGITS).read_bytes()
    # Rerunning the first arguments keeps the store, and the other run's chunks for later.
    assert StoreWriter(tmp_path / "resumed", KEY, 5, 2).open(BASE) is True
    assert StoreWriter(tmp_path / "resumed", {**KEY, "model_sha256": "other"}, 5, 2).open(BASE) is False
    assert (tmp_path / "resumed" / PARTIAL / "chunk-000000.npz").is_file()


def test_a_changed_key_discards_partial_chunks(tmp_path):
    logits, _ = _chunks()
    writer = StoreWriter(tmp_path / "s", KEY, 5, 2)
    writer.open(BASE)
    writer.write_chunk(0, logits[:2], np.ones(2, bool))
    writer.release()
    changed = StoreWriter(tmp_path / "s", {**KEY, "dtype": "float16"}, 5, 2)
    changed.open(BASE)
    assert changed.done == set()
    with pytest.raises(RuntimeError, match="not written yet"):
        changed.finish(IDS_, PATHS, BASE)


def test_reader_errors_name_the_store(tmp_path):
    with pytest.raises(EnsError, match="not a logit store"):
        read_store(tmp_path)
    _complete_store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, "rows": 7}))
    with pytest.raises(EnsError, match=r"logits.npy: shape \(5, 3\), but the manifest says \(7, 3\)"):
        read_store(tmp_path / "s")
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(EnsError, match="newer than this ens"):
        read_store(tmp_path / "s")
    for bad in ("2", None, True, 1.5):  # a TypeError in the version comparison before
        (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, "format": bad}))
        with pytest.raises(EnsError, match=r"manifest.json: field 'format' is not an integer"):
            read_store(tmp_path / "s")


#: The manifest's keys in the file's order: while the store is computed (a new store; then
#: with the run's figures, while the arrays are assembled) and complete.
STARTED = ["format", "complete", "model", "dataset", "tta", "pixels", "device", "provider", "device_fallback",
           "batch_size", "chunk_size", "ens_version", "engine", "cluster", "command", "run_key"]
FIGURES = ["workers", "images_per_s", "seconds", "decode_wait_s", "model_images_per_s"]
COMPLETE = (["format", "complete", "rows", "classes", "dtype", "keep_views", "boxes"] + STARTED[2:-1] + FIGURES
            + ["skipped", "run_key"])


def test_the_manifest_keeps_its_key_order_and_values_from_start_to_finish(tmp_path):
    logits, views = _chunks()
    writer = StoreWriter(tmp_path / "s", KEY, rows=5, chunk_size=2)
    writer.open(BASE)
    started = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert list(started) == STARTED and started["complete"] is False and started["run_key"] == writer.digest
    assert list(started["model"]) == ["file", "sha256", "architecture", "input_size", "mean", "std", "resize",
                                      "crop_pct", "interpolation", "precision", "class_ids", "foreign"]
    assert started["model"]["mean"] == [0.5, 0.5, 0.5] and started["model"]["class_ids"] is None
    assert started["dataset"] == {"split": "val", "source": "val.json", "sha256": "d" * 64, "images": 5}
    assert started["tta"] == {"views": ["identity", "flip"], "merge": "mean-logits"}  # no cam: no key
    _write_all(writer, logits, views, bad=[(3, "missing file")])
    figures = RunFigures(workers=2, images_per_s=10.0, seconds=0.5, decode_wait_s=None, model_images_per_s=20.0)
    written = writer.finish(IDS_, PATHS, dataclasses.replace(BASE, figures=figures))
    text = (tmp_path / "s" / MANIFEST).read_text()
    assert text == json_text(written.to_json())
    complete = json.loads(text)
    assert list(complete) == COMPLETE
    assert [complete[k] for k in ("rows", "classes", "dtype", "keep_views", "boxes")] == [4, 3, "float32", True, False]
    assert [complete[k] for k in FIGURES] == [2, 10.0, 0.5, None, 20.0]
    assert {k: complete[k] for k in STARTED[2:-1]} == {k: started[k] for k in STARTED[2:-1]}

    read = read_store(tmp_path / "s").manifest
    assert read.to_json() == complete and list(read) == COMPLETE  # the record reads as the file's JSON
    assert read.arrays.rows == 4 and read.arrays.keep_views and read.skipped_ids == (13,)
    assert read.model == BASE.model and read.dataset == BASE.dataset and read.tta == BASE.tta
    assert read.figures == figures and read.run_key == writer.digest and read.complete


def test_a_cam_store_manifest_records_the_cam_settings(tmp_path):
    cam = {"threshold": 0.2, "pad": 0.1, "min": 0.25}
    manifest = dataclasses.replace(BASE, tta=TtaRecord(("identity", "cam"), "mean-logits", cam))
    assert manifest.to_json()["tta"] == {"views": ["identity", "cam"], "merge": "mean-logits", "cam": cam}
    assert manifest["tta"]["cam"] == cam and "run_key" in manifest and len(manifest) == len(STARTED)


def test_a_manifest_of_an_older_ens_reads_with_the_defaults_of_its_time(tmp_path):
    _complete_store(tmp_path / "s")
    path = tmp_path / "s" / MANIFEST
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("pixels", "engine", "cluster", "boxes", "device_fallback")}
    path.write_text(json.dumps(old))
    manifest = read_store(tmp_path / "s").manifest
    assert (manifest.pixels, manifest.engine, manifest.cluster, manifest.arrays.boxes) == (1, "local", None, False)
    assert manifest.get("pixels") is None and manifest.to_json() == old  # the file as it is


DAMAGED = [
    ({"rows": -1}, "rows", "an integer >= 0"),
    ({"rows": True}, "rows", "an integer >= 0"),
    ({"classes": 0}, "classes", "an integer >= 1"),
    ({"dtype": "int8"}, "dtype", "one of float16, float32"),
    ({"keep_views": 1}, "keep_views", "true or false"),
    ({"run_key": None}, "run_key", "a string"),
    ({"model": []}, "model", "an object"),
    ({"dataset": None}, "dataset", "an object"),
    ({"tta": "x"}, "tta", "an object"),
    ({"skipped": {}}, "skipped", "a list"),
    ({"boxes": "yes"}, "boxes", "true or false"),
    ({"model": {"sha256": 1}}, "model.sha256", "a string"),
    ({"model": {"input_size": 0}}, "model.input_size", "an integer >= 1"),
    ({"model": {"mean": [0.5, 0.5]}}, "model.mean", "three numbers"),
    ({"model": {"std": [0.5, True, 0.5]}}, "model.std", "three numbers"),
    ({"model": {"resize": None}}, "model.resize", "a string"),
    ({"model": {"crop_pct": "0.9"}}, "model.crop_pct", "a number"),
    ({"model": {"class_ids": [1, 2]}}, "model.class_ids", "null or a list of 3 category ids"),
    ({"tta": {"views": []}}, "tta.views", "a non-empty list of view names"),
    ({"tta": {"merge": 3}}, "tta.merge", "a string"),
    ({"tta": {"cam": {"threshold": 0.2}}}, "tta.cam", "absent, null or {threshold, pad, min} (numbers)"),
    ({"skipped": [{"path": "x"}]}, "skipped", "a list of {id, path, reason}"),
    ({"pixels": 0}, "pixels", "absent or an integer >= 1"),
    ({"engine": "spark"}, "engine", "local or ray"),
    ({"cluster": {"cpus": 2}}, "cluster", "null or {cpus, gpus, nodes} (integers)"),
]


@pytest.mark.parametrize("change, field, expected", DAMAGED, ids=[f"{d[1]}-{i}" for i, d in enumerate(DAMAGED)])
def test_a_damaged_manifest_names_its_first_bad_field(tmp_path, change, field, expected):
    _complete_store(tmp_path / "s")
    path = tmp_path / "s" / MANIFEST
    manifest = json.loads(path.read_text())
    for key, value in change.items():  # a nested change replaces one field of model or tta
        manifest[key] = {**manifest[key], **value} if isinstance(value, dict) and key in ("model", "tta") else value
    path.write_text(json.dumps(manifest))
    with pytest.raises(EnsError) as error:
        read_store(tmp_path / "s")
    assert str(error.value) == (f"{path}: field {field!r} is missing or not {expected}; the store is damaged "
                                "(delete it and rerun `ens infer`)")


def test_an_unreadable_manifest_is_named(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MANIFEST).write_text("{not json")
    with pytest.raises(EnsError, match=r"s/manifest\.json: unreadable \(Expecting property name"):
        read_store(tmp_path / "s")
    (tmp_path / "f").write_text("a file, not a store folder")
    with pytest.raises(EnsError, match=r"f/manifest\.json: unreadable \(\[Errno 20\] Not a directory"):
        read_store(tmp_path / "f")
    (tmp_path / "s" / MANIFEST).write_text("[1]")
    with pytest.raises(EnsError, match=r"s/manifest\.json: not a store manifest \(a JSON object is expected\)"):
        read_store(tmp_path / "s")
