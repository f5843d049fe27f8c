"""`ens demo`: its data generator, and a shortened run of the whole pipeline."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.demo.data import CATEGORY_OFFSET, DemoSpec, _split, make_competition, render
from ensemble.demo.run import DemoSettings, format_table, run_demo
from ensemble.formats.places import read_observations, read_places
from ensemble.formats.store import read_store
from weights_search import FittedBlend, class_log_prior
from weights_search.geo import GeoPrior, GeoSettings

SMALL = DemoSpec(canvas=48, val_per_class=3, test_per_class=2, train_per_class=3, train_copies=2, long_tail=None)


def test_splits_are_disjoint_and_stratified():
    labels = np.repeat(np.arange(10), 30)
    parts = _split(labels, DemoSpec(val_per_class=20, test_per_class=5, long_tail=None), np.random.default_rng(0))
    sets = {name: set(idx.tolist()) for name, idx in parts.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sum(map(len, sets.values())) == labels.size
    assert (np.bincount(labels[parts["val"]]) == 20).all() and (np.bincount(labels[parts["test"]]) == 5).all()
    with pytest.raises(ValueError, match="no images left for training"):
        _split(labels, DemoSpec(val_per_class=20, test_per_class=10), np.random.default_rng(0))


def test_the_training_split_is_long_tailed_and_val_and_test_are_balanced():
    labels = np.repeat(np.arange(10), 130)
    parts = _split(labels, DemoSpec(val_per_class=20, test_per_class=10), np.random.default_rng(0))
    assert (np.bincount(labels[parts["val"]]) == 20).all() and (np.bincount(labels[parts["test"]]) == 10).all()
    train = np.bincount(labels[parts["train"]], minlength=10)
    # The k-th digit of a random order keeps 0.7 ** k of its 100 training digits.
    assert sorted(train, reverse=True) == [max(1, round(100 * 0.7 ** k)) for k in range(10)]
    assert train.argmax() != 0 or train.argmin() != 9  # the order is shuffled, not the digits' own
    with pytest.raises(ValueError, match="long_tail 1.5"):
        _split(labels, DemoSpec(long_tail=1.5), np.random.default_rng(0))


def test_render_places_the_digit_at_the_asked_scale():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16  # a bar
    blank = np.asarray(render(np.zeros((8, 8)), np.random.default_rng(1), 64, (0.5, 0.5)), np.float32)
    drawn = np.asarray(render(digit, np.random.default_rng(1), 64, (0.5, 0.5)), np.float32)
    changed = np.abs(drawn - blank).sum(axis=2) > 30  # same background, so only the ink differs
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    assert 16 <= rows[-1] - rows[0] + 1 <= 32 and cols[-1] - cols[0] + 1 < rows[-1] - rows[0] + 1
    with pytest.raises(ValueError, match="digit scale"):
        render(digit, np.random.default_rng(0), 64, (0.9, 0.5))


def test_competition_layout(tmp_path):
    comp = make_competition(tmp_path / "data", SMALL)
    root = comp.root
    assert comp.counts == {"train": 60, "val": 30, "test": 20}
    train, val, test = (json.loads((root / f"{s}2019.json").read_text()) for s in ("train", "val", "test"))
    assert "annotations" not in test and "categories" not in test  # test labels are not in the data
    assert [c["id"] for c in val["categories"]] == [CATEGORY_OFFSET + d for d in range(10)]
    for doc in (train, val):
        by_image = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
        for image in doc["images"]:
            # train_val2019/{iconic category}/{category id}/{md5}.jpg, as downloaded
            parts = image["file_name"].split("/")
            assert parts[0] == "train_val2019" and int(parts[2]) == by_image[image["id"]]
            assert (root / image["file_name"]).is_file()
    assert all(im["file_name"].startswith("test2019/") for im in test["images"])
    ids = [im["id"] for doc in (train, val, test) for im in doc["images"]]
    assert len(set(ids)) == len(ids)
    assert min(im["id"] for im in test["images"]) > max(im["id"] for im in val["images"])  # as on Kaggle
    with open(comp.answers, newline="") as fh:
        answers = {int(r["id"]): int(r["category_id"]) for r in csv.DictReader(fh)}
    assert comp.answers.parent != root and set(answers) == {im["id"] for im in test["images"]}
    with open(root / "kaggle_sample_submission.csv", newline="") as fh:
        sample = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in sample] == [im["id"] for im in test["images"]]
    from PIL import Image

    with Image.open(root / test["images"][0]["file_name"]) as image:
        assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path):
    lines: list[str] = []
    work = tmp_path / "demo"
    result = run_demo(work, DemoSettings.quick(), log=lines.append)
    steps = [line for line in lines if line.startswith("[")]
    assert [s[:5] for s in steps] == [f"[{i}/6]" for i in range(1, 7)]
    assert any(line.startswith("  $ ens infer") and "--tta flip,scale" in line for line in lines)
    assert result.submission.is_file() and result.submission.parent == work / "submissions"
    # The report of the demo's blend is written and its path printed (issue 15).
    assert result.report == work / "blends" / "geo" / "report.html"
    assert result.report.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert any(line.startswith("  the blend explained") and line.endswith(str(result.report)) for line in lines)

    check = CliRunner().invoke(app, ["submit", "--check", str(result.submission), "--data", str(work / "data")])
    assert check.exit_code == 0, check.output

    names = [row.name for row in result.rows]
    assert names == ["resnet18", "mobilenet_v3_small", "densenet121", "uniform", "uniform+prior", "nll", "nll+prior",
                     "nll+prior+geo"]
    assert result.method == "nll+prior+geo"
    # The blends with the long-tail prior, and with the geo prior too, each ran as a user runs them.
    assert any(line.startswith("  $ ens blend") and "--prior data/train2019.json --out blends/demo" in line
               for line in lines)
    assert any(line.startswith("  $ ens blend") and "--geo-prior data/train2019.json --out blends/geo" in line
               for line in lines)
    assert all(row.cv_low <= row.cv_top1 <= row.cv_high for row in result.rows)
    # The plain blend notes the flag that corrects for the training prior; the demo then uses it.
    assert any(line.startswith("    note: data/train2019.json holds the training labels: add --prior "
                               "data/train2019.json") for line in lines)
    # At toy sizes the models are near chance, so no accuracy is asserted; the stages must agree
    # exactly instead: the submitted top-1 of every test image is the stores fused with
    # blend.json's weights, corrected with its prior and raised by beta g' of the geo prior
    # estimated from the training json's places (columns mapped to category ids), and the
    # table's blend row is that submission scored against the answers only the demo holds.
    blend = json.loads((work / "blends" / "geo" / "blend.json").read_text())
    stores = [read_store(work / "runs" / member / "test") for member in blend["members"]]
    prior = blend["prior"]
    fitted = FittedBlend(blend["method"], blend["fusion"], tuple(blend["weights"][m] for m in blend["members"]),
                         log_prior=tuple(class_log_prior(prior["counts"], prior["zero_count"])), tau=prior["tau"])
    fused = fitted.log_proba(np.stack([np.asarray(s.logits, np.float32) for s in stores]))
    geo = blend["geo"]
    class_ids = np.asarray(stores[0].class_ids)
    observations = read_observations(work / "data" / "train2019.json")
    estimator = GeoPrior.fit(observations.lat, observations.lon, observations.day,
                             observations.columns(class_ids.tolist()), class_ids.size,
                             GeoSettings.from_dict(geo["settings"]), uncertainty=observations.uncertainty)
    places = read_places(work / "data" / "test2019.json", stores[0].ids)
    sparse = estimator.query(places.lat, places.lon, places.day, places.usable, uncertainty=places.uncertainty)
    assert geo["used"] == estimator.n_used and geo["no_place"]["test"] == int((~sparse.usable).sum()) > 0
    assert geo["weight"] == "auto" and 0 <= geo["beta"] <= 3
    sparse.apply(fused, 0, geo["beta"])
    blended = dict(zip(map(int, stores[0].ids), np.asarray(stores[0].class_ids)[fused.argmax(1)].tolist()))
    with open(result.submission, newline="") as fh:
        submitted = {int(r["id"]): int(r["predicted"].split()[0]) for r in csv.DictReader(fh)}
    with open(work / "data_answers.csv", newline="") as fh:
        answers = {int(r["id"]): int(r["category_id"]) for r in csv.DictReader(fh)}
    assert submitted == blended and set(submitted) == set(answers)
    test_error = {row.name: row.test_error for row in result.rows}
    assert test_error[result.method] == sum(submitted[i] != answers[i] for i in answers) / len(answers)
    table = format_table(result, 2)
    assert table[0].split() [:3] == ["CV", "top-1", "on"] and table[-1] == f"submission: {result.submission}"
    assert len(table) == len(result.rows) + 2

    # A rerun through the CLI reuses the data and the checkpoints, blends only this run's
    # models (not a store an earlier demo left in runs/) and prints the table.
    import shutil

    shutil.copytree(work / "runs" / "resnet18", work / "runs" / "old_model")
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(work)])
    assert again.exit_code == 0, again.output
    lines = again.stdout.splitlines()
    assert any(line.startswith("  reused") and "data" in line for line in lines)
    assert sum(line.startswith("  reused") and ".pt" in line for line in lines) == 3
    blend = json.loads((work / "blends" / "geo" / "blend.json").read_text())
    assert blend["members"] == ["resnet18", "mobilenet_v3_small", "densenet121"]
    assert any(line.startswith("nll+prior+geo (blend)") for line in lines) and lines[-2].startswith("submission: ")
