"""`ens report` estimates a blend's geo prior as `ens blend` did: without the images of the fitted
split that blend.json's ``geo.left_out`` lists (a merged train+val json), so the report's gain of
the geo prior is the honest one, not each val image finding itself as its nearest observation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ensemble.report import write_report
from ensemble.report.build import build_report

from tests.ensemble.conftest import ens, ok, one_line_error
from tests.ensemble.report.test_geo_report import geo_work  # noqa: F401 (the fixture: data, stores, an honest blend)
from tests.ensemble.report.test_report import cells

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merged(geo_work):  # noqa: F811
    """The blend of ``geo_work.geo`` (--geo-weight 1.5) with its geo prior fitted on the training
    json merged with the val json (val's images, places and labels appended)."""
    train = json.loads((geo_work.data / "train2019.json").read_text())
    val = json.loads((geo_work.data / "val2019.json").read_text())
    annotations = train["annotations"] + [dict(a, id=100_000 + i) for i, a in enumerate(val["annotations"])]
    path = geo_work.root / "train_val.json"
    path.write_text(json.dumps({"images": train["images"] + val["images"], "annotations": annotations,
                                "categories": train["categories"]}))
    out = geo_work.root / "blends" / "merged"
    ok(ens("blend", "--runs", geo_work.runs, "--optimize", "val", "--cv", 3, "--data", geo_work.data,
           "--geo-prior", path, "--geo-weight", "1.5", "--out", out))
    return out


def _sections(page: str) -> dict:
    return {name: cells(page, name) for name in ("geo-overall", "geo-regions", "geo-cv")}


def test_a_merged_train_val_json_gives_the_honest_json_s_report(geo_work, merged, tmp_path):  # noqa: F811
    record = json.loads((merged / "blend.json").read_text())
    honest = json.loads((geo_work.geo / "blend.json").read_text())
    val = json.loads((geo_work.data / "val2019.json").read_text())
    placed = sorted(i["id"] for i in val["images"] if i["latitude"] is not None)
    assert sorted(record["geo"]["left_out"]) == placed and "left_out" not in honest["geo"]
    assert record["geo"]["used"] == honest["geo"]["used"] and record["geo"]["beta"] == honest["geo"]["beta"] == 1.5

    plain, mixed = build_report(geo_work.geo), build_report(merged)
    assert mixed.geo.overall == plain.geo.overall and mixed.geo.lines == plain.geo.lines
    assert plain.geo.overall.fixed > 0  # the prior changes something: the comparison is not vacuous
    np.testing.assert_array_equal(mixed.blend.predicted, plain.blend.predicted)
    np.testing.assert_array_equal(mixed.geo.map_outcome, plain.geo.map_outcome)
    pages = [write_report(folder, out=tmp_path / f"{folder.name}.html").path.read_text()
             for folder in (geo_work.geo, merged)]
    assert _sections(pages[1]) == _sections(pages[0])


def test_a_left_out_record_that_does_not_match_the_json_is_one_line(geo_work, merged, tmp_path):  # noqa: F811
    """blend.json's left-out ids edited away: the report's estimate would use other observations
    than the blend's (its recorded count), and says so instead of scoring another prior."""
    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    doc = json.loads((folder / "blend.json").read_text())
    doc["geo"]["left_out"] = doc["geo"]["left_out"][:-3]
    (folder / "blend.json").write_text(json.dumps(doc))
    one_line_error(ens("report", folder, "--runs", geo_work.runs, "--data", geo_work.data),
                   "train_val.json", f"used {doc['geo']['used']:,} of its observations", "report's estimate",
                   f"{doc['geo']['used'] + 3:,}")
    assert not (folder / "report.html").exists()
