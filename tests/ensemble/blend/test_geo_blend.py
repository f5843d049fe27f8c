"""`ens blend --geo-prior TRAIN_JSON [--geo-weight auto|FLOAT]` end to end on small stores.

A synthetic world of CLASSES classes, each living around its own place on the globe (some
across the antimeridian, some near a pole) and season; training, val and test jsons in iNat
2021's fields (latitude, longitude, date, location_uncertainty; some null, one latitude 200).
Three weak members whose logits carry the true class faintly: the place carries much of the
class information, so the geo prior must show a CV gain and a fitted beta > 0; with places
that are noise, beta stays near 0.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ensemble.formats.blend import BlendRecord, GeoCorrection
from ensemble.formats.store import DatasetRecord, StoreWriter
from tests.ensemble.conftest import ens, ok, one_line_error
from tests.ensemble.inference.test_store import BASE, KEY

CLASSES = 12
MODELS = ("a", "b", "c")
#: Each class's home: (latitude, longitude, day of year).
HOMES = [(70.0 * np.sin(c * 1.7), -180.0 + 30.0 * c + 7.0, 1 + (c * 53) % 365) for c in range(CLASSES)]


def _places(rng, labels, informative: bool):
    """Latitude, longitude and day of each row: half near its class's home (informative), the
    rest anywhere."""
    n = labels.size
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    day = rng.integers(1, 366, n).astype(float)
    if informative:
        home = rng.random(n) < 0.5
        lat[home] = np.array([HOMES[c][0] for c in labels[home]]) + rng.normal(0, 4.0, home.sum())
        lon[home] = np.array([HOMES[c][1] for c in labels[home]]) + rng.normal(0, 4.0, home.sum())
        lon = (lon + 180) % 360 - 180
        day[home] = (np.array([HOMES[c][2] for c in labels[home]]) + rng.normal(0, 10, home.sum())).round() % 365 + 1
    return np.clip(lat, -89.9, 89.9), lon, day


def _images(ids, lat, lon, day, rng, holes: bool):
    images = []
    for i, (image_id, la, lo, d) in enumerate(zip(ids, lat, lon, day)):
        date = (np.datetime64("2019-01-01") + int(d) - 1).astype(str) + " 10:00:00+00:00"
        image = {"id": int(image_id), "file_name": f"{image_id}.jpg", "width": 8, "height": 8,
                 "latitude": float(la), "longitude": float(lo), "date": date,
                 "location_uncertainty": int(rng.integers(5, 500))}
        if holes and i % 17 == 3:
            image["latitude"] = image["longitude"] = None  # no place
        if holes and i % 23 == 5:
            image["date"] = None  # a place without a date
        images.append(image)
    return images


def _json(path: Path, images, labels=None) -> Path:
    doc = {"info": {"year": 2021}, "images": images,
           "categories": [{"id": c, "name": f"c{c}"} for c in range(CLASSES)]}
    if labels is not None:
        doc["annotations"] = [{"id": im["id"], "image_id": im["id"], "category_id": int(c)}
                              for im, c in zip(images, labels)]
    path.write_text(json.dumps(doc))
    return path


def _store(folder: Path, split: str, logits: np.ndarray, ids: np.ndarray, source: Path) -> None:
    rows = ids.size
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    manifest = dataclasses.replace(BASE, dataset=DatasetRecord(split, str(source), sha, rows),
                                   tta=dataclasses.replace(BASE.tta, views=("identity",)))
    writer = StoreWriter(folder, {**KEY, "dtype": "float32"}, rows=rows, chunk_size=rows)
    writer.open(manifest)
    writer.write_chunk(0, logits, np.ones(rows, bool))
    writer.finish(tuple(ids.tolist()), tuple(f"{i}.jpg" for i in ids.tolist()), manifest)


def _world(root: Path, informative: bool = True, seed: int = 0, n_val: int = 360, n_test: int = 240,
           far: bool = False) -> dict:
    """Training, val and test jsons and the models' stores; ``far``: val and test rows 8, 27, 46,
    ... have a location uncertainty of 150 km (beyond the limit: no usable place)."""
    rng = np.random.default_rng(seed)
    runs, data = root / "runs", root / "data"
    data.mkdir(parents=True)
    train_labels = np.repeat(np.arange(CLASSES), 40)
    lat, lon, day = _places(rng, train_labels, informative)
    train_images = _images(np.arange(100_000, 100_000 + train_labels.size), lat, lon, day, rng, holes=True)
    train_images[7]["latitude"] = 200  # a bad value: counted and skipped
    train = _json(data / "train2019.json", train_images, train_labels)
    for split, n, first in (("val", n_val, 1000), ("test", n_test, 5000)):
        labels = rng.integers(0, CLASSES, n)
        ids = np.arange(first, first + n)
        lat, lon, day = _places(rng, labels, informative)
        images = _images(ids, lat, lon, day, rng, holes=True)
        for i in range(8, n, 19) if far else ():
            images[i]["location_uncertainty"] = 150_000
        path = _json(data / f"{split}2019.json", images, labels if split == "val" else None)
        for m, model in enumerate(MODELS):
            logits = rng.normal(0, 1.0, (n, CLASSES)).astype(np.float32)
            logits[np.arange(n), labels] += 0.6 + 0.2 * m
            _store(runs / model / split, split, logits, ids, path)
        if split == "test":
            (data / "test_labels.npy").write_bytes(labels.astype(np.int64).tobytes())
    return {"runs": runs, "data": data, "train": train, "root": root}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("geo"))


def _blend(w, out, *args):
    return ens("blend", "--runs", w["runs"], "--optimize", "val", "--data", w["data"], "--out", out, *args)


def _predictions(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _test_top1(w, out: Path) -> float:
    labels = np.frombuffer((w["data"] / "test_labels.npy").read_bytes(), dtype=np.int64)
    rows = _predictions(out / "predictions.csv")[1:]
    return float(np.mean([int(r[1]) == c for r, c in zip(rows, labels)]))


@pytest.fixture(scope="module")
def fitted(world, tmp_path_factory):
    """The plain blend and the blend with the geo prior (auto), once for the module."""
    root = tmp_path_factory.mktemp("blends")
    plain = ok(_blend(world, root / "plain"))
    geo = ok(_blend(world, root / "geo", "--geo-prior", world["train"]))
    return {"plain": (plain, root / "plain"), "geo": (geo, root / "geo")}


def test_informative_places_fit_a_positive_beta_and_show_a_cv_gain(world, fitted):
    result, out = fitted["geo"]
    record = BlendRecord.read(out / "blend.json")
    geo = record.geo
    assert isinstance(geo, GeoCorrection) and geo.fitted and geo.weight == "auto"
    assert 0.3 < geo.beta <= 3
    assert record.format == 4
    rows = {r.name: r for r in record.cv.rows}
    assert {"uniform+geo", "nll+geo"} <= rows.keys()
    assert rows["nll+geo"].top1 > rows["nll"].top1 + 0.1
    assert rows["nll+geo"].nll < rows["nll"].nll
    assert record.cv.chosen == "nll+geo" and record.cv.geo and len(record.cv.fold_betas) == 5
    assert all(0 < b <= 3 for b in record.cv.fold_betas)
    # the test predictions gain too
    assert _test_top1(world, out) > _test_top1(world, fitted["plain"][1]) + 0.1
    # the record: the training json, its sha256, observations used and skipped, rows without a place
    assert geo.file == str(world["train"].resolve())
    assert geo.sha256 == hashlib.sha256(world["train"].read_bytes()).hexdigest()
    assert geo.skipped["no place"] == sum(1 for i in range(CLASSES * 40) if i % 17 == 3)
    assert geo.skipped["bad value"] == 1
    assert geo.used == CLASSES * 40 - geo.skipped_total
    assert geo.no_place == {"val": sum(1 for i in range(360) if i % 17 == 3),
                            "test": sum(1 for i in range(240) if i % 17 == 3)}
    assert geo.settings["k"] == 64
    # each split's places: the json read, resolved, and its sha256
    assert geo.places == {split: {"file": str((world["data"] / f"{split}2019.json").resolve()),
                                  "sha256": hashlib.sha256((world["data"] / f"{split}2019.json").read_bytes()).hexdigest()}
                          for split in ("val", "test")}
    assert geo.left_out is None and "of the fitted split" not in geo.skipped
    out_text = result.stdout
    assert "nll+geo" in out_text and "+geo: with --geo-prior, beta fitted per fold" in out_text
    assert f"geo prior: beta {geo.beta:.3f} (fitted on val in the CV" in out_text
    assert "observations of 12 categories used" in out_text
    assert "1 with a bad value, first image 100007: latitude 200" in out_text  # counts.summary()
    assert f"val: {geo.no_place['val']} of 360 images have no usable place" in out_text
    assert f"test: {geo.no_place['test']} of 240 images have no usable place" in out_text


def test_probabilities_written_are_those_of_the_blend_with_the_geo_prior(fitted):
    rows = _predictions(fitted["geo"][1] / "predictions.csv")[1:]
    probs = np.array([[float(p) for p in r[6:]] for r in rows])
    assert (np.diff(probs, axis=1) <= 1e-6).all()  # most probable first
    assert (probs.sum(axis=1) <= 1 + 1e-5).all() and probs[:, 0].max() <= 1


def test_noise_places_keep_beta_near_zero(tmp_path):
    w = _world(tmp_path / "w", informative=False, seed=3)
    ok(_blend(w, tmp_path / "b", "--geo-prior", w["train"]))
    record = BlendRecord.read(tmp_path / "b" / "blend.json")
    rows = {r.name: r for r in record.cv.rows}
    assert record.geo.beta < 0.3
    assert rows["nll+geo"].top1 <= rows["nll"].top1 + 0.03


def test_weight_zero_gives_the_predictions_without_it(world, fitted, tmp_path):
    ok(_blend(world, tmp_path / "zero", "--geo-prior", world["train"], "--geo-weight", "0"))
    assert (tmp_path / "zero" / "predictions.csv").read_bytes() == (fitted["plain"][1] / "predictions.csv").read_bytes()
    record = BlendRecord.read(tmp_path / "zero" / "blend.json")
    assert record.geo.weight == 0 and record.geo.beta == 0 and not record.geo.fitted
    rows = {r.name: r for r in record.cv.rows}
    for name in ("uniform", "nll"):
        same, plain = rows[name + "+geo"], rows[name]
        assert (same.top1, same.topk) == (plain.top1, plain.topk) and same.nll == pytest.approx(plain.nll, abs=1e-6)
    assert record.cv.fold_betas == (0.0,) * 5


def test_a_given_weight_is_used_in_every_fold(world, tmp_path):
    result = ok(_blend(world, tmp_path / "given", "--geo-prior", world["train"], "--geo-weight", "0.7"))
    record = BlendRecord.read(tmp_path / "given" / "blend.json")
    assert record.geo.weight == 0.7 and record.geo.beta == 0.7 and record.cv.fold_betas == (0.7,) * 5
    assert "geo prior: beta 0.700 (given)" in result.stdout


def test_weights_reuse_the_geo_prior(world, fitted, tmp_path):
    saved = fitted["geo"][1] / "blend.json"
    result = ok(ens("blend", "--runs", world["runs"], "--weights", saved, "--out", tmp_path / "again"))
    assert (tmp_path / "again" / "predictions.csv").read_bytes() == \
        (fitted["geo"][1] / "predictions.csv").read_bytes()
    again = BlendRecord.read(tmp_path / "again" / "blend.json")
    assert again.geo.beta == BlendRecord.read(saved).geo.beta
    assert "geo prior: beta" in result.stdout and f"from {saved}" in result.stdout


def test_weights_refuse_a_changed_or_missing_training_json(world, fitted, tmp_path):
    saved = fitted["geo"][1] / "blend.json"
    moved = tmp_path / "moved.json"
    moved.write_bytes(world["train"].read_bytes())
    doc = json.loads(saved.read_text())
    doc["geo"]["file"] = str(tmp_path / "gone.json")
    missing = tmp_path / "missing" / "blend.json"
    missing.parent.mkdir()
    missing.write_text(json.dumps(doc))
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", missing, "--out", tmp_path / "x"),
                   "gone.json is not there", "pass --geo-prior")
    # the file where it is now: accepted
    ok(ens("blend", "--runs", world["runs"], "--weights", missing, "--geo-prior", moved, "--out", tmp_path / "y"))
    assert (tmp_path / "y" / "predictions.csv").read_bytes() == (fitted["geo"][1] / "predictions.csv").read_bytes()
    changed = tmp_path / "changed.json"
    text = json.loads(world["train"].read_text())
    text["images"][0]["latitude"] = 1.5
    changed.write_text(json.dumps(text))
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", saved, "--geo-prior", changed,
                       "--out", tmp_path / "z"), "another training json", "sha256")
    assert not (tmp_path / "z").exists()


def test_bad_options_are_one_line(world, fitted, tmp_path):
    one_line_error(_blend(world, tmp_path / "a", "--geo-weight", "0.5"), "--geo-weight 0.5", "--geo-prior")
    for bad in ("-1", "3.5", "much", "nan"):
        one_line_error(_blend(world, tmp_path / "a", "--geo-prior", world["train"], "--geo-weight", bad),
                       f"--geo-weight {bad}", "auto or a number from 0")
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", fitted["geo"][1] / "blend.json",
                       "--geo-weight", "1", "--out", tmp_path / "b"), "--geo-weight")
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", fitted["plain"][1] / "blend.json",
                       "--geo-prior", world["train"], "--out", tmp_path / "c"), "without the geo prior")
    assert not (tmp_path / "a").exists()


def test_jsons_without_places_are_one_line(world, tmp_path):
    doc = json.loads(world["train"].read_text())
    for image in doc["images"]:
        image["latitude"] = image["longitude"] = None
    unplaced = tmp_path / "unplaced.json"
    unplaced.write_text(json.dumps(doc))
    one_line_error(_blend(world, tmp_path / "a", "--geo-prior", unplaced), "unplaced.json", "usable")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test2019.json").write_bytes((world["data"] / "test2019.json").read_bytes())
    val = json.loads((world["data"] / "val2019.json").read_text())
    for image in val["images"]:
        image["latitude"] = None
    (data / "val2019.json").write_text(json.dumps(val))
    one_line_error(ens("blend", "--runs", world["runs"], "--optimize", "val", "--data", data, "--out", tmp_path / "b",
                       "--geo-prior", world["train"]), "val json", "none of the val split's 360 images has a usable place")
    text = json.loads(world["train"].read_text())
    text["images"][3]["latitude"] = "12.5"
    (tmp_path / "text.json").write_text(json.dumps(text))
    one_line_error(_blend(world, tmp_path / "c", "--geo-prior", tmp_path / "text.json"), "text.json", "latitude")
    one_line_error(_blend(world, tmp_path / "d", "--geo-prior", world["data"] / "val2019.json"),
                   "is the val json itself", "give the training json")


def test_a_malformed_geo_record_names_its_key(fitted, tmp_path):
    doc = json.loads((fitted["geo"][1] / "blend.json").read_text())
    for key, value in (("sha256", "nope"), ("beta", 7), ("settings", {"k": -1}), ("weight", "often"),
                       ("no_place", {"val": -1})):
        bad = json.loads(json.dumps(doc))
        bad["geo"][key] = value
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(bad))
        one_line_error(ens("blend", "--weights", path, "--out", tmp_path / key), f"'geo.{key}'")
    doc["geo"]["weight"] = 0.5  # a given weight that is not the beta applied
    (tmp_path / "w.json").write_text(json.dumps(doc))
    one_line_error(ens("blend", "--weights", tmp_path / "w.json", "--out", tmp_path / "w"), "'geo.beta'")


def test_the_record_is_written_back_byte_for_byte(fitted):
    path = fitted["geo"][1] / "blend.json"
    assert BlendRecord.read(path).text() == path.read_text()


def test_with_the_long_tail_prior_temperatures_and_every_kind_of_blend(world, tmp_path):
    result = ok(_blend(world, tmp_path / "all", "--geo-prior", world["train"], "--prior", world["train"],
                       "--temperature"))
    record = BlendRecord.read(tmp_path / "all" / "blend.json")
    names = [r.name for r in record.cv.rows]
    assert names[3:] == ["uniform", "uniform+prior", "uniform+prior+geo", "nll", "nll+prior", "nll+prior+geo"]
    assert record.cv.chosen == "nll+prior+geo" and record.prior is not None and record.geo.beta > 0.3
    assert "+prior: corrected for --prior, tau fitted per fold, +geo: with --geo-prior, beta fitted per fold" \
        in result.stdout
    ok(_blend(world, tmp_path / "uniform", "--geo-prior", world["train"], "--method", "uniform"))
    uniform = BlendRecord.read(tmp_path / "uniform" / "blend.json")
    assert uniform.cv.chosen == "uniform+geo" and uniform.geo.beta > 0.3
    assert [r.name for r in uniform.cv.rows][3:] == ["uniform", "uniform+geo"]


def test_fallback_to_uniform_carries_the_geo_prior_of_uniform(world, tmp_path):
    result = ok(_blend(world, tmp_path / "fb", "--geo-prior", world["train"], "--fallback", "uniform"))
    record = BlendRecord.read(tmp_path / "fb" / "blend.json")
    assert "does not beat uniform weights" in result.stdout  # this world's nll loses to uniform on CV
    assert record.method == "uniform" and record.cv.chosen == "uniform+geo"
    assert record.geo.beta > 0.3 and len(record.cv.fold_betas) == 5


def test_apply_geo_gives_the_renormalised_blend_with_the_prior():
    from scipy.special import log_softmax

    from ensemble.blend.geo import apply_geo
    from weights_search import top_k
    from weights_search.geo import SparseGeo

    rng = np.random.default_rng(5)
    log_q = log_softmax(rng.normal(size=(6, 9)) * 2, axis=1).astype(np.float32)
    sparse = SparseGeo(np.array([0, 0, 2, 3, 3, 5, 5, 6, 8]), np.array([1, 4, 0, 2, 8, 3, 5, 6]),
                       np.array([0.5, 2.0, 1.0, 3.0, 0.1, 1.5, 2.5, 0.7], np.float32), np.ones(8, bool))
    g = np.zeros((8, 9), np.float32)
    for r in range(8):
        g[r, sparse.column[sparse.indptr[r]:sparse.indptr[r + 1]]] = sparse.value[sparse.indptr[r]:sparse.indptr[r + 1]]
    beta, start = 1.3, 2
    dense = log_softmax(log_q.astype(np.float64) + beta * g[start:start + 6], axis=1)
    block = log_q.copy()
    scale = apply_geo(sparse, block, start, beta)
    top, probs = top_k(block, 4)
    probs = probs * scale
    np.testing.assert_array_equal(top, np.argsort(-dense, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(probs, np.exp(np.take_along_axis(dense, top, axis=1)), rtol=1e-5)
    assert apply_geo(sparse, log_q.copy(), start, 0.0) is None


def test_weights_need_the_applied_split_json_for_its_places(tmp_path):
    w = _world(tmp_path / "w", n_val=120, n_test=60)
    ok(_blend(w, tmp_path / "b", "--geo-prior", w["train"]))
    (w["data"] / "test2019.json").rename(tmp_path / "elsewhere.json")
    one_line_error(ens("blend", "--runs", w["runs"], "--weights", tmp_path / "b" / "blend.json", "--out", tmp_path / "c"),
                   "test2019.json, which is not there", "put the test json")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------- the review's fixes

def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_fitted_splits_images_in_the_training_json_are_left_out(world, fitted, tmp_path):
    """A merged train+val json gives the CV of the training json alone (not 15-23 points more);
    the val json saved again (other bytes, the same images) is one line; so is val itself."""
    train, val = _doc(world["train"]), _doc(world["data"] / "val2019.json")
    merged = {**train, "images": train["images"] + val["images"],
              "annotations": train["annotations"] + [{**a, "id": 10 ** 6 + a["id"]} for a in val["annotations"]]}
    (tmp_path / "merged.json").write_text(json.dumps(merged, indent=1))
    result = ok(_blend(world, tmp_path / "m", "--geo-prior", tmp_path / "merged.json"))
    # (its images with a place: the 21 without one are no observation anyway)
    assert ("note: 339 images of the fitted split (val) are in the training json (first id 1000): left out of the "
            "geo prior so the CV stays honest") in result.stdout
    honest, record = BlendRecord.read(fitted["geo"][1] / "blend.json"), BlendRecord.read(tmp_path / "m" / "blend.json")
    assert record.cv.rows == honest.cv.rows and record.cv.fold_betas == honest.cv.fold_betas
    assert record.geo.beta == honest.geo.beta and record.geo.used == honest.geo.used
    assert record.geo.skipped["of the fitted split"] == 339
    assert record.geo.left_out == tuple(i for n, i in enumerate(range(1000, 1360)) if n % 17 != 3)
    assert (tmp_path / "m" / "predictions.csv").read_bytes() == (fitted["geo"][1] / "predictions.csv").read_bytes()
    # --weights leaves out the same images (recorded), so it applies the same prior
    again = ok(ens("blend", "--runs", world["runs"], "--weights", tmp_path / "m" / "blend.json", "--out", tmp_path / "a"))
    assert "left out" not in again.stdout
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (fitted["geo"][1] / "predictions.csv").read_bytes()
    # val saved again with another indent: nothing of the training json's own is left
    (tmp_path / "val.json").write_text(json.dumps(val, indent=3))
    one_line_error(_blend(world, tmp_path / "v", "--geo-prior", tmp_path / "val.json"),
                   "each of its 339 observations is an image of the val split", "give the training json")
    assert not (tmp_path / "v").exists()


def test_the_places_jsons_are_checked_against_the_stores_and_recorded(world, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}2019.json").write_bytes((world["data"] / f"{split}2019.json").read_bytes())
    test = _doc(world["data"] / "test2019.json")
    (data / "test2019.json").write_text(json.dumps(test, indent=2))  # the same images, other bytes
    result = ok(ens("blend", "--runs", world["runs"], "--optimize", "val", "--data", data, "--out", tmp_path / "b",
                    "--geo-prior", world["train"]))
    sha = hashlib.sha256((data / "test2019.json").read_bytes()).hexdigest()
    assert (f"note: the places of the test images are read from {data / 'test2019.json'} (sha256 {sha[:12]}...), "
            "not from the json the test stores were made from") in result.stdout
    assert "places of the val images" not in result.stdout  # the same file as its stores'
    places = BlendRecord.read(tmp_path / "b" / "blend.json").geo.places
    assert places["test"] == {"file": str((data / "test2019.json").resolve()), "sha256": sha}
    assert places["val"]["sha256"] == hashlib.sha256((world["data"] / "val2019.json").read_bytes()).hexdigest()
    # a record that names no file or sha256 there is refused
    doc = _doc(tmp_path / "b" / "blend.json")
    doc["geo"]["places"]["val"] = {"file": "x.json"}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    one_line_error(ens("blend", "--weights", tmp_path / "bad.json", "--out", tmp_path / "c"), "'geo.places'")


def test_categories_the_models_do_not_know_are_refused_or_noted(world, tmp_path):
    doc = _doc(world["train"])
    for a in doc["annotations"]:
        a["category_id"] += 100  # another id space
    (tmp_path / "shifted.json").write_text(json.dumps(doc))
    one_line_error(_blend(world, tmp_path / "a", "--geo-prior", tmp_path / "shifted.json"),
                   "shifted.json: 12 of the 12 categories the models predict have no observation (0, 1, 2, 3, 4 and "
                   "7 more), and it has observations of 12 categories no model predicts (100, 101, 102, 103, 104 and "
                   "7 more)", "other --classes")
    doc = _doc(world["train"])
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] not in (4, 9)]
    (tmp_path / "fewer.json").write_text(json.dumps(doc))
    result = ok(_blend(world, tmp_path / "b", "--geo-prior", tmp_path / "fewer.json"))
    assert "fewer.json: 2 of the 12 categories the models predict have no observation with a usable place (4, 9)" \
        in result.stdout


def test_the_test_fusion_in_many_blocks_gives_the_predictions_of_one(world, fitted, tmp_path, monkeypatch):
    from ensemble.blend import run as blend_run

    seen = []
    real = blend_run.apply_geo
    monkeypatch.setattr(blend_run, "_block_rows", lambda budget, members, copies: 7)
    monkeypatch.setattr(blend_run, "apply_geo", lambda sparse, log_q, start, beta: seen.append(start) or
                        real(sparse, log_q, start, beta))
    ok(_blend(world, tmp_path / "small", "--geo-prior", world["train"]))
    assert sorted(seen) == list(range(0, 240, 7))  # 35 blocks of the test split
    assert (tmp_path / "small" / "predictions.csv").read_bytes() == \
        (fitted["geo"][1] / "predictions.csv").read_bytes()


def test_rows_with_a_location_uncertainty_beyond_the_limit_get_no_correction(tmp_path):
    w = _world(tmp_path / "w", n_val=120, n_test=60, far=True)
    result = ok(_blend(w, tmp_path / "geo", "--geo-prior", w["train"]))
    ok(_blend(w, tmp_path / "plain"))
    far = {"val": [i for i in range(8, 120, 19) if i % 17 != 3], "test": [i for i in range(8, 60, 19) if i % 17 != 3]}
    null = {"val": sum(1 for i in range(120) if i % 17 == 3), "test": sum(1 for i in range(60) if i % 17 == 3)}
    record = BlendRecord.read(tmp_path / "geo" / "blend.json")
    assert record.geo.no_place == {split: null[split] + len(far[split]) for split in ("val", "test")}
    for split, n in (("val", 120), ("test", 60)):
        assert (f"{split}: {record.geo.no_place[split]} of {n} images have no usable place and get no geo correction "
                f"({n} images: ") in result.stdout
        assert f"; {len(far[split])} with a location uncertainty beyond 100000 m)" in result.stdout
    geo_rows, plain_rows = _predictions(tmp_path / "geo" / "predictions.csv"), _predictions(tmp_path / "plain" /
                                                                                            "predictions.csv")
    assert all(geo_rows[1 + i] == plain_rows[1 + i] for i in far["test"])  # no correction: the blend's own
    assert sum(geo_rows[1 + i] != plain_rows[1 + i] for i in range(60)) > 30  # the others have one


def test_bad_training_jsons_are_one_line_and_the_note_counts_every_image(world, tmp_path):
    doc = _doc(world["train"])
    doc["images"][5]["id"] = doc["images"][4]["id"]
    (tmp_path / "twice.json").write_text(json.dumps(doc))
    one_line_error(_blend(world, tmp_path / "a", "--geo-prior", tmp_path / "twice.json"),
                   "twice.json: duplicate image id 100004")
    doc = _doc(world["train"])
    doc["annotations"] += [{"id": 10 ** 6 + n, "image_id": im["id"], "category_id": (n // 40 + 1) % CLASSES}
                           for n, im in enumerate(doc["images"])]
    (tmp_path / "several.json").write_text(json.dumps(doc))
    one_line_error(_blend(world, tmp_path / "b", "--geo-prior", tmp_path / "several.json"),
                   "no image is annotated with exactly one category (480 have several)")
    doc = _doc(world["train"])
    doc["annotations"][0]["category_id"] = None  # no category
    doc["annotations"].append({"id": 10 ** 6, "image_id": doc["images"][1]["id"], "category_id": 5})  # two
    doc["images"][2]["date"] = "April 2019"
    (tmp_path / "odd.json").write_text(json.dumps(doc))
    result = ok(_blend(world, tmp_path / "c", "--geo-prior", tmp_path / "odd.json"))
    assert "; of its 478 images: " in result.stdout and "1 unreadable, first image 100002: \"April 2019\"" \
        in result.stdout
    assert "; 2 more images without a single category (none, or several)" in result.stdout


def test_a_bad_applied_split_json_is_found_before_the_fit(world, tmp_path, monkeypatch):
    import weights_search

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}2019.json").write_bytes((world["data"] / f"{split}2019.json").read_bytes())
    test = _doc(world["data"] / "test2019.json")
    test["images"][3]["latitude"] = "12.5"
    (data / "test2019.json").write_text(json.dumps(test))
    monkeypatch.setattr(weights_search, "cross_validate_and_fit", lambda *a, **k: pytest.fail("the fit ran"))
    one_line_error(ens("blend", "--runs", world["runs"], "--optimize", "val", "--data", data, "--out", tmp_path / "b",
                       "--geo-prior", world["train"]),
                   f"test json {data / 'test2019.json'}: image 5003 has latitude \"12.5\"")
    assert not (tmp_path / "b").exists()


def test_weights_record_the_training_json_read_once_where_it_is(world, fitted, tmp_path, monkeypatch):
    import ensemble.blend.geo as geo_module
    import ensemble.fileio
    import ensemble.formats.places

    saved = fitted["geo"][1] / "blend.json"
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "train.json"
    moved.write_bytes(world["train"].read_bytes())
    reads, hashed = [], []
    real_read, real_hash = ensemble.formats.places.read_observations, ensemble.fileio.sha256_file
    monkeypatch.setattr(geo_module, "read_observations", lambda *a: reads.append(a) or real_read(*a))
    for module in (ensemble.fileio, geo_module):
        monkeypatch.setattr(module, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real_hash(p, *a),
                            raising=False)
    monkeypatch.chdir(tmp_path)
    ok(ens("blend", "--runs", world["runs"], "--weights", saved, "--geo-prior", "moved/train.json",
           "--out", tmp_path / "again"))
    assert len(reads) == 1 and moved.resolve() not in [p.resolve() for p in hashed]
    again = BlendRecord.read(tmp_path / "again" / "blend.json")
    assert again.geo.file == str(moved.resolve())  # the file read, absolute
    assert again.geo.places["test"]["file"] == str((world["data"] / "test2019.json").resolve())
    # a folder: in check_regular_file's words
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", saved, "--geo-prior", tmp_path / "moved",
                       "--out", tmp_path / "x"), f"--geo-prior {tmp_path / 'moved'}: a folder, not a regular file")


def test_small_wording(world, fitted, tmp_path):
    result = ok(_blend(world, tmp_path / "zero", "--geo-prior", world["train"], "--geo-weight", "0"))
    assert "does not beat" not in result.stdout.replace("nll does not beat uniform weights", "")
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", fitted["geo"][1] / "blend.json",
                       "--geo-weight", "1", "--out", tmp_path / "b"), "--geo-weight only applies when fitting")
    one_line_error(ens("blend", "--runs", world["runs"], "--weights", fitted["geo"][1] / "blend.json",
                       "--geo-weight", "1", "--cv", "3", "--out", tmp_path / "b"), "--cv, --geo-weight only apply when")
    one_line_error(_blend(world, tmp_path / "c", "--geo-prior", ""), "--geo-prior: the path is empty")
    assert not (tmp_path / "c").exists()


def test_the_room_asked_for_holds_the_left_out_ids(world, fitted):
    from ensemble.blend import run as blend_run
    from ensemble.fileio import json_text

    val = blend_run.open_split(world["runs"], MODELS, "val")
    extra = blend_run._record_bytes(None, val, False, geo=True) - blend_run._record_bytes(None, val, False)
    assert extra >= len(json_text({"left_out": val.ids.tolist()}).encode("utf-8"))


def test_left_out_ids_match_as_the_jsons_hold_them():
    from ensemble.blend.geo import _in

    mixed = np.empty(3, dtype=object)
    mixed[:] = ["a", 5, "5"]
    assert _in(mixed, np.array(["5"])).tolist() == [False, False, True]
    assert _in(mixed, np.array([5, 7])).tolist() == [False, True, False]
    recorded = np.empty(3, dtype=object)
    recorded[:] = [2, "3", 2 ** 70]  # a saved record's ids
    assert _in(np.array([1, 2, 3], np.int64), recorded).tolist() == [False, True, False]
    assert _in(np.array([1, 2], np.int64), np.zeros(0)).tolist() == [False, False]
