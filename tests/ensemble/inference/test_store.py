"""The logit store: chunked writing, resuming, the complete flag, and the one reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.store import (IDS, LOGITS, MANIFEST, PARTIAL, VIEWS, StoreWriter, read_store,
                            store_path, to_dtype)

KEY = {"model_sha256": "m", "dataset_sha256": "d", "dtype": "float32"}
#: What `ens infer` puts in a manifest beside the arrays' own fields.
BASE = {"model": {"file": "m.onnx", "sha256": "m" * 64, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                  "resize": "center-crop", "crop_pct": 0.875, "interpolation": "bilinear", "class_ids": None},
        "dataset": {"split": "val"}, "tta": {"views": ["identity", "flip"], "merge": "mean-logits"}}
IDS_ = (10, 11, 12, 13, 14)
PATHS = tuple(f"img{i}.jpg" for i in IDS_)


def _chunks(rows=5, classes=3, views=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, classes)), rng.normal(size=(views, rows, classes))


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
    logits, _ = _chunks()
    writer = StoreWriter(tmp_path / "s", KEY, 5, 5)
    writer.open(BASE)
    _write_all(writer, logits)
    writer.finish(IDS_, PATHS, BASE)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, "rows": 7}))
    with pytest.raises(EnsError, match=r"logits.npy: shape \(5, 3\), but the manifest says \(7, 3\)"):
        read_store(tmp_path / "s")
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(EnsError, match="newer than this ens"):
        read_store(tmp_path / "s")
