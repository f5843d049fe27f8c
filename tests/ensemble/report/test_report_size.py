"""The page of an iNat-sized blend stays small: 3,030 validation images of 1,010 classes, four
models, temperatures and the prior correction, thumbnails of 320x240 photos (issue 15: under 5 MB)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble.report import write_report

from tests.ensemble.conftest import ens, make_inat, ok, tiny_onnx

pytestmark = pytest.mark.slow

CLASSES, ROWS, MODELS = 1010, 3030, 4


def test_an_inat_sized_page_is_under_5_mb(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_inat(tmp_path / "data", n_val=ROWS, n_test=1, categories=CLASSES, sizes=((320, 240), (240, 320)))
    counts = np.maximum(1, (500 * 0.995 ** np.arange(CLASSES)).astype(int))  # iNat-like: 500 down to 3
    annotations = [{"id": i, "image_id": i, "category_id": int(c)}
                   for i, c in enumerate(np.repeat(np.arange(CLASSES), counts))]
    (data / "train2019.json").write_text(json.dumps({"annotations": annotations,
                                                     "categories": [{"id": c} for c in range(CLASSES)]}))
    models = [tiny_onnx(tmp_path / "models" / f"m{i}.onnx", classes=CLASSES, seed=i) for i in range(MODELS)]
    ok(ens("infer", *models, "--data", data, "--split", "val", "--workers", 0, "--out", tmp_path / "runs"))
    ok(ens("blend", "--runs", tmp_path / "runs", "--optimize", "val", "--data", data, "--temperature",
           "--prior", data / "train2019.json", "--cv", 2, "--out", tmp_path / "blends" / "b"))
    result = write_report(tmp_path / "blends" / "b")
    page = result.path.read_text()
    assert result.sections == {"summary": True, "calibration": True, "diversity": True, "longtail": True,
                               "hardest": True, "leaderboard": False}
    assert page.count('src="data:image/jpeg;base64,') == 24
    assert result.size == result.path.stat().st_size < 5_000_000
