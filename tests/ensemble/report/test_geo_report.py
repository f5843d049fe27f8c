"""The report's geo section (issue 26): regions, outcomes, the map's rows and figure on hand-made
arrays; the section of a blend with a geo prior end to end, and no section without one."""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ensemble.fileio import sha256_file
from ensemble.formats.blend import BlendRecord, GeoCorrection
from ensemble.report import geo, plots, write_report
from ensemble.report.build import build_report
from weights_search.geo import GeoPrior, GeoSettings

from tests.ensemble.conftest import ens, make_inat, ok, one_line_error, tiny_onnx
from tests.ensemble.report.test_report import cells
from tests.ensemble.report.test_report_scale import make_blend


# ----------------------------------------------------------------------------- regions by boxes

@pytest.mark.parametrize("lat, lon, region", [
    (48.85, 2.35, "Europe"),            # Paris
    (64.1, -21.9, "Europe"),            # Reykjavik
    (35.9, 14.5, "Europe"),             # Malta (the Mediterranean cut at 34 N east of 11.5 E)
    (36.7, 3.1, "Africa"),              # Algiers
    (35.8, -5.8, "Africa"),             # Tangier
    (36.0, -5.6, "Europe"),             # Tarifa, across the strait
    (30.0, 31.2, "Africa"),             # Cairo
    (-1.3, 36.8, "Africa"),             # Nairobi
    (-18.9, 47.5, "Africa"),            # Antananarivo
    (21.5, 39.2, "Asia"),               # Jeddah
    (31.8, 35.2, "Asia"),               # Jerusalem
    (39.9, 32.9, "Asia"),               # Ankara
    (55.75, 37.6, "Europe"),            # Moscow
    (35.7, 139.7, "Asia"),              # Tokyo
    (-6.2, 106.8, "Asia"),              # Jakarta
    (-33.9, 151.2, "Oceania"),          # Sydney
    (-41.3, 174.8, "Oceania"),          # Wellington
    (-9.4, 147.2, "Oceania"),           # Port Moresby
    (21.3, -157.9, "Oceania"),          # Honolulu
    (40.7, -74.0, "North America"),     # New York
    (61.2, -149.9, "North America"),    # Anchorage
    (9.0, -79.5, "North America"),      # Panama City
    (19.4, -99.1, "North America"),     # Mexico City
    (10.5, -66.9, "South America"),     # Caracas
    (-34.6, -58.4, "South America"),    # Buenos Aires
    (-77.8, 166.7, "Antarctica"),       # McMurdo
    (0.0, -140.0, "Oceania"),           # the Pacific box
    (-40.0, -10.0, "elsewhere"),        # the South Atlantic
    (-30.0, 80.0, "elsewhere"),         # the Indian Ocean
    (90.0, 180.0, "Asia"),              # bounds included
])
def test_a_place_falls_in_its_region(lat, lon, region):
    assert geo.LINES[geo.region_codes(np.array([lat]), np.array([lon]))[0]] == region


def test_rows_without_a_place_are_their_own_line():
    lat = np.array([np.nan, 91.0, 10.0, np.inf, -90.0])
    lon = np.array([0.0, 0.0, np.nan, 0.0, -180.0])
    codes = geo.region_codes(lat, lon)
    assert [geo.LINES[c] for c in codes] == ["no place"] * 4 + ["Antarctica"]
    assert geo.placed(lat, lon).tolist() == [False, False, False, False, True]


def test_every_region_has_a_line_and_the_order_is_fixed():
    assert geo.LINES == ("Antarctica", "Oceania", "North America", "South America", "Asia", "Africa", "Europe",
                         "elsewhere", "no place")


def test_outcomes_and_lines_count_what_the_prior_changed():
    without = np.array([0, 0, 3, 1, 0, 7])  # rank of the true class: 0 is a top-1 hit
    with_geo = np.array([0, 2, 0, 1, 4, 0])
    assert geo.outcomes(without == 0, with_geo == 0).tolist() == [geo.SAME_RIGHT, geo.BROKEN, geo.FIXED,
                                                                 geo.SAME_WRONG, geo.BROKEN, geo.FIXED]
    codes = np.array([6, 6, 6, 8, 2, 2])  # Europe x3, no place, North America x2
    lines = geo.by_region(codes, without, with_geo, k=3)
    assert [x.name for x in lines] == ["North America", "Europe", "no place"]
    na, eu, none = lines
    assert (eu.rows, eu.top1_without, eu.top1_with, eu.topk_without, eu.topk_with, eu.fixed, eu.broken) == \
        (3, 2 / 3, 2 / 3, 2 / 3, 1.0, 1, 1)
    assert (na.rows, na.top1_without, na.top1_with, na.topk_without, na.topk_with, na.fixed, na.broken) == \
        (2, 0.5, 0.5, 0.5, 0.5, 1, 1)
    assert (none.rows, none.top1_without, none.top1_with, none.fixed, none.broken) == (1, 0.0, 0.0, 0, 0)
    everything = geo.line("all", without, with_geo, 3)
    assert (everything.rows, everything.fixed, everything.broken) == (6, 2, 2)
    assert np.isnan(geo.line("none", without[:0], with_geo[:0], 3).top1_with)


def test_the_map_draws_every_placed_row_up_to_its_limit():
    has = np.array([True, False, True, True])
    assert geo.map_rows(has, np.zeros(4), limit=3).tolist() == [0, 2, 3]


def test_a_large_map_keeps_the_changed_rows_first_and_the_same_sample():
    rng = np.random.default_rng(3)
    n = 100_000
    outcome = rng.choice([0, 1, 2, 3], n, p=[0.6, 0.38, 0.01, 0.01]).astype(np.int8)
    has = rng.random(n) < 0.9
    rows = geo.map_rows(has, outcome, limit=5000)
    assert rows.size == 5000 and np.all(np.diff(rows) > 0) and has[rows].all()
    changed = np.flatnonzero(has & np.isin(outcome, (2, 3)))
    assert np.isin(changed, rows).all()
    assert np.array_equal(rows, geo.map_rows(has, outcome, limit=5000))
    only = geo.map_rows(has, np.full(n, geo.FIXED), limit=10)
    assert only.size == 10 and has[only].all()


def _values(svg: str):
    return json.loads(html.unescape(re.search(r'data-values="([^"]*)"', svg).group(1)))


def test_the_map_holds_the_points_it_draws_and_stays_small():
    rng = np.random.default_rng(0)
    n = 500_000
    lat, lon = rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)
    outcome = geo.outcomes(rng.random(n) < 0.7, rng.random(n) < 0.72)
    rows = geo.map_rows(geo.placed(lat, lon), outcome)
    svg = plots.geo_map(np.round(lon[rows], 2), np.round(lat[rows], 2), outcome[rows], geo.OUTCOMES, n)
    assert svg.startswith('<svg class="figure"') and len(svg) < 1_000_000
    values = _values(svg)
    assert values["shown_of"] == n and len(values["lon"]) == geo.MAP_POINTS
    assert values["lon"] == np.round(lon[rows], 2).tolist() and values["outcome"] == outcome[rows].tolist()
    assert svg.count("<use") >= geo.MAP_POINTS  # each drawn, as vector points


def test_region_names_are_text_in_the_chart():
    svg = plots.region_chart(["a_$x^2$ <b>", "Europe"], [0.5, np.nan], [0.6, 0.7])
    assert "<b>" not in svg and _values(svg)["without"] == [0.5, None]


# ------------------------------------------------------------------ end to end: a blend with the prior

CLASSES = 5
#: Where each category lives (its training observations and most of its val images).
CENTRES = {0: (48.0, 2.0), 1: (40.0, -100.0), 2: (-25.0, 135.0), 3: (0.0, 20.0), 4: (35.0, 139.0)}
N_VAL = 40


@dataclass(frozen=True)
class GeoWork:
    root: Path
    data: Path
    runs: Path
    geo: Path  #: the blend folder with the geo prior
    plain: Path  #: the same blend without it


def _place(rng, c: int) -> tuple[float, float]:
    lat, lon = CENTRES[c]
    return float(lat + rng.normal(0, 3)), float(lon + rng.normal(0, 3))


@pytest.fixture(scope="module")
def geo_work(tmp_path_factory) -> GeoWork:
    root = tmp_path_factory.mktemp("geo_report")
    data = make_inat(root / "data", n_val=N_VAL, n_test=4, categories=CLASSES)
    rng = np.random.default_rng(0)
    doc = json.loads((data / "val2019.json").read_text())
    category = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    for i, image in enumerate(doc["images"]):
        if i % 10 == 9:  # no place: its own line, no correction
            image["latitude"] = image["longitude"] = None
            continue
        # every 7th image where another category lives: the prior can break it
        c = category[image["id"]] if i % 7 else (category[image["id"]] + 1) % CLASSES
        image["latitude"], image["longitude"] = _place(rng, c)
        image["date"], image["location_uncertainty"] = "2020-05-01", 10
    (data / "val2019.json").write_text(json.dumps(doc))
    images, annotations = [], []
    for i in range(200):
        lat, lon = _place(rng, i % CLASSES)
        images.append({"id": 1000 + i, "file_name": f"x{i}.jpg", "latitude": lat, "longitude": lon,
                       "date": "2019-06-01", "location_uncertainty": 5})
        annotations.append({"id": i, "image_id": 1000 + i, "category_id": i % CLASSES})
    (data / "train2019.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": [{"id": c} for c in range(CLASSES)]}))
    onnx = [tiny_onnx(root / "models" / f"m{i}.onnx", seed=i, classes=CLASSES) for i in range(2)]
    runs = root / "runs"
    ok(ens("infer", *onnx, "--data", data, "--split", "val", "--workers", 0, "--out", runs))
    fit = ("blend", "--runs", runs, "--optimize", "val", "--cv", 3, "--data", data)
    ok(ens(*fit, "--out", root / "blends" / "plain"))
    ok(ens(*fit, "--geo-prior", data / "train2019.json", "--geo-weight", "1.5", "--out", root / "blends" / "geo"))
    return GeoWork(root, data, runs, root / "blends" / "geo", root / "blends" / "plain")


def _fused(work: GeoWork, record: dict) -> np.ndarray:
    """The blend's ``(N, C)`` log-probabilities without the geo prior, from the stores' files and
    blend.json alone (an nll blend: a mixture of the members' softmaxes)."""
    assert record["fusion"] == "mixture" and not record["temperatures"] and not record["prior"]
    total = 0.0
    for name, w in record["weights"].items():
        x = np.load(work.runs / name / "val" / "logits.npy").astype(np.float64)
        p = np.exp(x - x.max(axis=1, keepdims=True))
        total = total + w * p / p.sum(axis=1, keepdims=True)
    return np.log(total / sum(record["weights"].values()))


def _truth(work: GeoWork) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels (columns), latitudes and longitudes (NaN without) of the store's rows, read from the
    val json here, and the rows' ids."""
    doc = json.loads((work.data / "val2019.json").read_text())
    ids = np.load(work.runs / "m0" / "val" / "ids.npy")
    by_id = {image["id"]: image for image in doc["images"]}
    truth = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    lat = np.array([np.nan if by_id[i]["latitude"] is None else by_id[i]["latitude"] for i in ids.tolist()])
    lon = np.array([np.nan if by_id[i]["longitude"] is None else by_id[i]["longitude"] for i in ids.tolist()])
    return np.array([truth[i] for i in ids.tolist()]), lat, lon, ids


def _corrected(work: GeoWork, record: dict, log_q: np.ndarray, lat, lon) -> np.ndarray:
    """``log q + beta g'`` with ``g'`` of the estimator (weights_search.geo) fitted on the training
    json's observations as blend.json's settings say; rows without a place unchanged."""
    train = json.loads((work.data / "train2019.json").read_text())
    cat = {a["image_id"]: a["category_id"] for a in train["annotations"]}
    settings = GeoSettings(**{k: float("inf") if v == "inf" else v for k, v in record["geo"]["settings"].items()})
    prior = GeoPrior.fit([i["latitude"] for i in train["images"]], [i["longitude"] for i in train["images"]],
                         [152.0] * len(train["images"]), [cat[i["id"]] for i in train["images"]], CLASSES, settings)
    has = np.isfinite(lat)
    sparse = prior.query(np.where(has, lat, 0), np.where(has, lon, 0), np.where(has, 122.0, np.nan), has)
    out = log_q.copy()
    for n in range(out.shape[0]):
        lo, hi = sparse.indptr[n], sparse.indptr[n + 1]
        out[n, sparse.column[lo:hi]] += record["geo"]["beta"] * sparse.value[lo:hi].astype(np.float64)
    return out


def test_the_geo_section_recomputes_with_and_without_from_the_files(geo_work):
    record = json.loads((geo_work.geo / "blend.json").read_text())
    assert record["geo"]["beta"] == 1.5
    labels, lat, lon, _ = _truth(geo_work)
    log_q = _fused(geo_work, record)
    corrected = _corrected(geo_work, record, log_q, lat, lon)
    right_without, right_with = log_q.argmax(axis=1) == labels, corrected.argmax(axis=1) == labels
    assert (right_with & ~right_without).any() and (right_without != right_with).sum() >= 2  # the prior did something
    result = write_report(geo_work.geo)
    assert result.sections["geo"] is True
    page = result.path.read_text()
    overall = cells(page, "geo-overall")
    assert overall["without"]["top1"] == pytest.approx(right_without.mean(), abs=1e-12)
    assert overall["with"]["top1"] == pytest.approx(right_with.mean(), abs=1e-12)
    assert overall["with"]["fixed"] == int((right_with & ~right_without).sum())
    assert overall["with"]["broken"] == int((right_without & ~right_with).sum())
    codes = geo.region_codes(lat, lon)
    table = cells(page, "geo-regions")
    assert list(table) == [name for c, name in enumerate(geo.LINES) if (codes == c).any()]
    assert table["no place"]["rows"] == int(np.isnan(lat).sum()) == N_VAL // 10
    for c, name in enumerate(geo.LINES):
        if (codes == c).any():
            mine = codes == c
            assert table[name]["rows"] == mine.sum()
            assert table[name]["top1_without"] == pytest.approx(right_without[mine].mean(), abs=1e-12)
            assert table[name]["top1_with"] == pytest.approx(right_with[mine].mean(), abs=1e-12)
    # the rest of the page is the blend as applied: with the geo prior
    data = build_report(geo_work.geo)
    np.testing.assert_array_equal(data.blend.predicted, corrected.argmax(axis=1))
    # the map: every image with a place, coloured by what the prior did
    svg = re.search(r'<svg[^>]*aria-label="where the images are".*?</svg>', page, re.S).group(0)
    drawn = _values(svg)
    placed = np.flatnonzero(np.isfinite(lat))
    assert drawn["shown_of"] == placed.size and drawn["lon"] == np.round(lon[placed], 2).tolist()
    assert drawn["outcome"] == geo.outcomes(right_without, right_with)[placed].tolist()
    assert 'data-key="beta" data-value="1.5"' in page


def test_a_blend_without_the_geo_prior_has_no_geo_section(geo_work):
    result = write_report(geo_work.plain)
    page = result.path.read_text()
    assert "geo" not in result.sections and 'id="geo"' not in page and "where the images are" not in page


def _work_copy(geo_work, tmp_path, monkeypatch, *, data: bool = True):
    """A work folder of its own in ``tmp_path`` (the current folder from now on): the runs, the geo
    blend in ``blends/geo`` and (``data``) the data folder; the blend's folder and the data's."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(geo_work.runs, tmp_path / "runs")
    folder = tmp_path / "blends" / "geo"
    shutil.copytree(geo_work.geo, folder)
    if data:
        shutil.copytree(geo_work.data, tmp_path / "data")
    return folder, tmp_path / "data"


def test_the_training_json_is_found_by_its_sha256_or_one_line(geo_work, tmp_path, monkeypatch):
    folder, data = _work_copy(geo_work, tmp_path, monkeypatch)
    doc = json.loads((folder / "blend.json").read_text())
    doc["geo"]["file"] = "data/train2019.json"  # relative to the work folder, as `ens blend` ran there
    (folder / "blend.json").write_text(json.dumps(doc))
    assert write_report(folder).sections["geo"]
    (folder / "report.html").unlink()
    moved = tmp_path / "moved.json"
    (data / "train2019.json").rename(moved)
    one_line_error(ens("report", folder), "the training json of its geo prior (data/train2019.json, sha256",
                   "not found", "no file", "give --data DIR")
    (data / "train2019.json").write_text(moved.read_text().replace("2019-06-01", "2019-06-02"))
    one_line_error(ens("report", folder, "--data", data), "is another file (its sha256 differs)")
    assert not (folder / "report.html").exists()
    other = tmp_path / "other"
    shutil.copytree(data, other)
    shutil.copy(moved, other / "train2019.json")  # the recorded file is not the one; --data's training json is
    result = ok(ens("report", folder, "--data", other, "-o", tmp_path / "r.html"))
    assert "6 of 7 sections" in result.stdout and 'id="geo"' in (tmp_path / "r.html").read_text()
    assert (f"note: the geo prior's training json: read {other / 'train2019.json'} ({data / 'train2019.json'} is "
            "another file (its sha256 differs))") in result.stdout


def test_the_geo_prior_file_name_is_text_on_the_page(geo_work, tmp_path, monkeypatch):
    folder, _ = _work_copy(geo_work, tmp_path, monkeypatch, data=False)
    odd = tmp_path / "<b>tr&ain<i>.json"
    shutil.copy(geo_work.data / "train2019.json", odd)
    doc = json.loads((folder / "blend.json").read_text())
    doc["geo"]["file"] = str(odd)
    (folder / "blend.json").write_text(json.dumps(doc))
    page = write_report(folder, data=geo_work.data).path.read_text()
    assert "<b>tr&ain" not in page and "&lt;b&gt;tr&amp;ain&lt;i&gt;.json" in page


def test_the_geo_page_does_not_depend_on_the_block_size(geo_work, tmp_path):
    """The prior queried block by block: blocks of 7 rows or the whole split give the same page."""
    from ensemble.memory import GIB

    one = write_report(geo_work.geo, out=tmp_path / "one.html", memory=4 * GIB)
    few = write_report(geo_work.geo, out=tmp_path / "few.html", memory=2 * CLASSES * 4 * 4 * 7)
    assert one.path.read_bytes() == few.path.read_bytes()


def test_the_cv_rows_without_and_with_the_geo_prior_stand_side_by_side(geo_work):
    record = json.loads((geo_work.geo / "blend.json").read_text())
    rows = {r["name"]: r for r in record["cv"]["rows"]}
    page = write_report(geo_work.geo).path.read_text()
    table = cells(page, "geo-cv")
    assert list(table) == ["uniform", "nll"]
    for name, shown in table.items():
        assert shown["top1_without"] == rows[name]["top1"] and shown["top1_with"] == rows[name + "+geo"]["top1"]
        assert shown["top1_change"] == rows[name + "+geo"]["top1"] - rows[name]["top1"]
    assert re.search(r'<tr data-row="nll" class="used">', page)  # the blend in use: nll+geo


def test_bad_places_in_the_val_json_are_no_place_or_one_line(geo_work, tmp_path, monkeypatch):
    """A latitude of 200 is no place (its own line, no correction); text where a number belongs is
    one line naming the file, the image and the field, and nothing is written."""
    folder, data = _work_copy(geo_work, tmp_path, monkeypatch)
    doc = json.loads((data / "val2019.json").read_text())
    doc["images"][0]["latitude"] = 200
    (data / "val2019.json").write_text(json.dumps(doc))
    before = cells(write_report(geo_work.geo).path.read_text(), "geo-regions")["no place"]["rows"]
    page = write_report(folder, data=data).path.read_text()
    assert cells(page, "geo-regions")["no place"]["rows"] == before + 1
    (folder / "report.html").unlink()
    doc["images"][0]["latitude"] = "north"
    (data / "val2019.json").write_text(json.dumps(doc))
    one_line_error(ens("report", folder, "--data", data), "val2019.json", f"image {doc['images'][0]['id']}",
                   "latitude")
    assert not (folder / "report.html").exists()


@pytest.mark.slow
def test_a_geo_page_of_500000_images_stays_small(tmp_path):
    """The geo section at iNat 2021's test size: its tables are per region and its map draws at
    most MAP_POINTS points, so the page stays far under test_report_size's 5 MB (0.68 MB measured; 33 s,
    0.8 GB peak with the test's own json)."""
    rows, classes = 500_000, 8
    blend = make_blend(tmp_path, models=2, rows=rows, classes=classes, temperatures=False, prior=False)
    rng = np.random.default_rng(0)
    val = tmp_path / "data" / "val2019.json"
    doc = json.loads(val.read_text())
    lat, lon = rng.uniform(-60, 70, rows), rng.uniform(-180, 180, rows)
    for image, a, b in zip(doc["images"], lat.tolist(), lon.tolist()):
        image["latitude"], image["longitude"] = a, b
    val.write_text(json.dumps(doc))
    del doc
    train = tmp_path / "data" / "train.json"
    n = 2000
    tl, to = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    train.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"t{i}.jpg", "latitude": a, "longitude": b}
                   for i, (a, b) in enumerate(zip(tl.tolist(), to.tolist()))],
        "annotations": [{"id": i, "image_id": i, "category_id": i % classes} for i in range(n)],
        "categories": [{"id": c} for c in range(classes)]}))
    record = BlendRecord.read(blend / "blend.json")
    record._with(format=4, geo=GeoCorrection(
        file=str(train), sha256=sha256_file(train), used=n, skipped={}, settings=GeoSettings(k=16).as_dict(),
        weight="auto", beta=1.0, no_place={"val": 0})).write(blend / "blend.json")
    result = write_report(blend)
    assert result.sections["geo"] and result.size < 2_000_000, result.size
    page = result.path.read_text()
    drawn = _values(re.search(r'<svg[^>]*aria-label="where the images are".*?</svg>', page, re.S).group(0))
    assert len(drawn["lon"]) == geo.MAP_POINTS and drawn["shown_of"] == rows
    assert sum(v["rows"] for v in cells(page, "geo-regions").values()) == rows
