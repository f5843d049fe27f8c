"""`ens infer` end to end on a small generated dataset in the iNaturalist 2019 layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.formats.dataset import load_split
from ensemble.fileio import sha256_file
from ensemble.formats.store import read_store
from ensemble.inference.tta import plan_views

from tests.ensemble.conftest import CLASSES, make_inat, run_onnx, tiny_onnx

runner = CliRunner()


def ens(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    # Progress lines may come before it; the error itself is the one last line.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert pattern in errors[0], errors[0]


def test_infer_exported_and_tiny_models_on_val_and_test(exported_model, tmp_path):
    from tests.ensemble.inference.test_infer_tta import reference_view

    data = make_inat(tmp_path / "inat", n_val=6, n_test=5)
    tiny = tiny_onnx(tmp_path / "tiny.onnx", class_ids=[10, 11, 12, 13, 14])
    out = tmp_path / "runs"
    result = ens("infer", exported_model, tiny, "--data", data, "--split", "val,test", "--tta", "flip",
                 "--batch-size", 4, "--workers", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert "device cpu (--device auto): CPUExecutionProvider, 1 decoding process" in result.stderr
    assert "val: 6 images, 0 done before" in result.stderr and "test: 5/5 images" in result.stderr
    assert f"wrote {out / 'resnet18' / 'val'}: 6 x {CLASSES} float16" in result.stdout
    assert "4 stores (4 computed), 2 models, 2 splits, tta flip (mean-logits); decoded 11 images" in result.stdout

    for split, ids in (("val", range(6)), ("test", range(6, 11))):
        source = data / f"{split}2019.json"
        for model in (exported_model, tiny):
            store = read_store(out / model.stem / split)
            assert store.ids.tolist() == list(ids)
            assert store.logits.shape == (len(ids), CLASSES) and store.logits.dtype == np.float16
            m = store.manifest
            assert m["complete"] and m["tta"] == {"views": ["identity", "flip"], "merge": "mean-logits"}
            assert m["model"]["sha256"] == sha256_file(model)
            assert (m["dataset"]["split"], m["dataset"]["sha256"]) == (split, sha256_file(source))
            assert m["provider"] == "CPUExecutionProvider" and m["batch_size"] == 4 and m["skipped"] == []
            # The rate is this run's images over its seconds (one decode serves both models).
            assert m["images_per_s"] == pytest.approx(len(ids) / m["seconds"])
        assert read_store(out / "tiny" / split).class_ids == (10, 11, 12, 13, 14)

    # The exported network's stored logits are its outputs on the torchvision views, averaged.
    val = load_split(data / "val2019.json")
    views = plan_views(["flip"])
    want = np.mean([[run_onnx(exported_model, reference_view(p, 32, 0.875, "center-crop", v)[None])[0]
                     for p in val.paths] for v in views], axis=0)
    np.testing.assert_allclose(read_store(out / "resnet18" / "val").logits, want, rtol=2e-3, atol=2e-3)

    again = ens("infer", exported_model, tiny, "--data", data, "--tta", "flip", "--batch-size", 4,
                "--workers", 1, "--out", out)
    assert again.exit_code == 0 and "(0 computed)" in again.stdout
    assert "complete, with the same arguments; kept" in again.stderr


def test_index_json_and_image_folder(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=3, n_test=2)
    tiny = tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "runs"
    result = ens("infer", tiny, "--index", data / "test2019.json", "--out", out, "--workers", 0,
                 "--dtype", "float32", "--merge", "gmean", "--tta", "scale", "--scales", "0.9,1.1", "--keep-views")
    assert result.exit_code == 0, result.output
    store = read_store(out / "tiny" / "test")
    assert store.ids.tolist() == [3, 4] and store.logits.dtype == np.float32
    assert store.view_names == ("identity", "scale0.9", "scale1.1") and store.views.shape == (3, 2, CLASSES)
    result = ens("infer", tiny, "--index", data / "test2019", "--out", out, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert read_store(out / "tiny" / "test2019").ids.dtype.kind == "U"


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=3, n_test=2)
    tiny = tiny_onnx(tmp_path / "tiny.onnx")
    fixed = tiny_onnx(tmp_path / "fixed.onnx", dynamic=False)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": []}))
    doc = json.loads((data / "val2019.json").read_text())
    doc["images"][2]["id"] = doc["images"][0]["id"]
    (tmp_path / "dup.json").write_text(json.dumps(doc))
    out = ("--out", tmp_path / "runs", "--workers", 0)

    one_line_error(ens("infer", tiny, "--index", empty, *out), "empty.json: no images")
    one_line_error(ens("infer", tiny, "--index", tmp_path / "dup.json", *out), "dup.json: duplicate image id 0")
    one_line_error(ens("infer", fixed, "--data", data, "--tta", "scale", *out),
                   "fixed.onnx: takes only 32 px inputs, but the TTA views need 28, 32, 37 px")
    one_line_error(ens("infer", tiny, *out), "give the images with either --data DIR")
    one_line_error(ens("infer", tiny, "--data", data, "--index", empty, *out), "either --data DIR")
    one_line_error(ens("infer", tiny, "--index", empty, "--split", "val", *out), "--split names splits under --data")
    one_line_error(ens("infer", tiny, "--data", data, "--tta", "rotate", *out), "--tta rotate: choose from")
    one_line_error(ens("infer", tiny, "--data", data, "--scales", "a,b", *out), "--scales a,b: expected numbers")
    one_line_error(ens("infer", tmp_path / "nothing.onnx", "--data", data, *out), "nothing.onnx: no such file")
    (data / doc["images"][1]["file_name"]).write_bytes(b"")
    one_line_error(ens("infer", tiny, "--data", data, "--split", "val", *out),
                   f"image 1 ({data / doc['images'][1]['file_name']}): empty file; --on-bad-image skip")
    skipped = ens("infer", tiny, "--data", data, "--split", "val", "--on-bad-image", "skip", *out)
    assert skipped.exit_code == 0 and "2 x 5 float16, 1 skipped" in skipped.stdout
    assert "skipped image 1" in skipped.stderr


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_unavailable_device_is_a_clear_error(tmp_path, device):
    from ensemble.inference.runtime import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    data = make_inat(tmp_path / "inat", n_val=1, n_test=1)
    one_line_error(ens("infer", tiny_onnx(tmp_path / "tiny.onnx"), "--data", data, "--device", device,
                       "--out", tmp_path / "runs"), f"--device {device}: this onnxruntime offers only")


def test_help_shows_the_documented_surface():
    result = ens("infer", "--help")
    assert result.exit_code == 0
    for option in ("--data", "--split", "--index", "--tta", "--scales", "--merge", "--keep-views", "--device",
                   "--batch-size", "--workers", "--on-bad-image", "--out", "--input-size", "--mean", "--std"):
        assert option in result.output
    # Issue 16's surface: --engine local|ray [--ray-address auto|HOST:PORT].
    wide = CliRunner().invoke(app, ["infer", "--help"], terminal_width=200).stdout
    assert "--engine local|ray" in " ".join(wide.split())
    assert "--ray-address auto|HOST:PORT" in " ".join(wide.split())
