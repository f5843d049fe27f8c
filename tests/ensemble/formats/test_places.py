"""The place and date fields of iNat 2021 jsons (ensemble.formats.places): what is read, what is
counted and skipped, what is a one-line error naming the image."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.places import read_observations, read_places


def image(i, lat=10.0, lon=20.0, date="2010-04-27 00:00:00+00:00", unc=5, **extra):
    record = {"id": i, "file_name": f"{i}.jpg", "latitude": lat, "longitude": lon, "date": date,
              "location_uncertainty": unc, **extra}
    return {k: v for k, v in record.items() if v != "ABSENT"}


def write(path, images, labels=None):
    doc = {"images": images}
    if labels is not None:
        doc["annotations"] = [{"id": n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(labels)]
    path.write_text(json.dumps(doc))
    return path


def test_observations_of_a_training_json(tmp_path):
    images = [image(1), image(2, lat=-33.5, lon=-179.9, date="2016-05-03", unc=None),
              image(3, date=None), image(4, lat=None), image(5, lon="ABSENT"), image(6, lat=200),
              image(7, date="April 2010"), image(8), image(9, lon=180, date="2016/12/31")]
    labels = [(1, 10), (2, 11), (3, 10), (4, 10), (5, 10), (6, 10), (7, 12), (9, 10), (9, 10)]
    path = write(tmp_path / "train.json", images, labels)
    obs = read_observations(path)
    assert obs.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and obs.source == path
    assert len(obs) == 5 and obs.category.tolist() == [10, 11, 10, 12, 10] and obs.category.dtype == np.int64
    assert obs.lat.tolist() == [10, -33.5, 10, 10, 10] and obs.lon.tolist() == [20, -179.9, 20, 20, 180]
    np.testing.assert_array_equal(obs.day, np.array([117, 124, np.nan, np.nan, 366], np.float32))
    np.testing.assert_array_equal(obs.uncertainty, np.array([5, np.nan, 5, 5, 5], np.float32))
    assert obs.lat.dtype == np.float64 and obs.day.dtype == np.float32 and obs.uncertainty.dtype == np.float32
    counts = obs.counts
    assert (counts.images, counts.no_place, counts.bad_value, counts.no_date, counts.bad_date) == (8, 2, 1, 1, 1)
    assert obs.unlabelled == 1  # image 8
    assert counts.first_bad == "image 6: latitude 200" and counts.first_bad_date == 'image 7: "April 2010"'
    assert counts.summary() == ('8 images: 5 with a place (2 without one; 1 with a bad value, first image 6: '
                                'latitude 200), 3 of them with a date (1 without one; 1 unreadable, first '
                                'image 7: "April 2010")')
    assert obs.columns([12, 10]).tolist() == [1, -1, 1, 0, 1]
    assert obs.skipped == {"no place": 2, "bad value": 1}


@pytest.mark.parametrize("bad, field", [(dict(lat=-90.001), "latitude"), (dict(lon=180.5), "longitude"),
                                        (dict(lon=-1e400), "longitude"), (dict(unc=-1), "location_uncertainty"),
                                        (dict(lat=10 ** 400), "latitude"), (dict(unc=10 ** 400), "location_uncertainty"),
                                        (dict(unc=1e300), None)])
def test_a_bad_value_is_counted_and_skipped(tmp_path, bad, field):
    path = tmp_path / "train.json"
    images = [image(1), image(2, **bad)]
    path.write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "category_id": 0},
                                                                  {"image_id": 2, "category_id": 0}]}))
    obs = read_observations(path)
    if field is None:  # an uncertainty beyond float32 is a number: infinite, beyond the estimator's limit
        assert len(obs) == 2 and obs.uncertainty[1] == np.inf
        return
    assert len(obs) == 1 and obs.counts.bad_value == 1 and obs.counts.first_bad.startswith(f"image 2: {field} ")


def test_nan_in_the_file_is_a_bad_value_not_a_missing_one(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"images": [{"id": 1, "latitude": NaN, "longitude": 3}, {"id": 2, "latitude": 1, '
                    '"longitude": 3}], "annotations": [{"image_id": 1, "category_id": 0}, '
                    '{"image_id": 2, "category_id": 0}]}')
    counts = read_observations(path).counts
    assert (counts.no_place, counts.bad_value, counts.first_bad) == (0, 1, "image 1: latitude NaN")


@pytest.mark.parametrize("bad, message", [
    (dict(lat="12.5"), 'image "a7" has latitude "12.5"; expected a number or null'),
    (dict(lon=True), 'image "a7" has longitude true; expected a number or null'),
    (dict(unc=[5]), 'image "a7" has location_uncertainty \\[5\\]; expected a number or null'),
    (dict(date=20100427), 'image "a7" has date 20100427; expected text \\(YYYY-MM-DD...\\) or null'),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_image(tmp_path, bad, message):
    path = write(tmp_path / "train.json", [image("a1"), image("a7", **bad)], [("a1", 0), ("a7", 0)])
    with pytest.raises(EnsError, match=f"^--geo-prior \\S+train.json: {message}$"):
        read_observations(path)
    with pytest.raises(EnsError, match=f"^\\S+train.json: {message}$"):
        read_places(path, ["a7"])


def test_training_json_refusals(tmp_path):
    with pytest.raises(EnsError, match=r"train.json: no annotations \(a test split\?\)"):
        read_observations(write(tmp_path / "train.json", [image(1)]))
    with pytest.raises(EnsError, match=r"train.json: no annotated image has a usable latitude and longitude "
                                       r"\(1 images: 0 with a place \(1 without one\), 0 of them with a date\); "):
        read_observations(write(tmp_path / "train.json", [image(1, lat=None)], [(1, 0)]))
    with pytest.raises(EnsError, match=r"train.json: image 1 is labelled 1.5; expected an integer or a string "):
        read_observations(write(tmp_path / "train.json", [image(1)], [(1, 1.5)]))
    with pytest.raises(EnsError, match=r"^--geo-prior \S+nothing.json: no such file or folder$"):
        read_observations(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EnsError, match=r"^--geo-prior \S+broken.json: not a JSON file"):
        read_observations(tmp_path / "broken.json")
    with pytest.raises(EnsError, match=r'images\[1\] has no "id"'):
        read_observations(write(tmp_path / "train.json", [image(1), {"file_name": "x"}], [(1, 0)]))
    with pytest.raises(EnsError, match=r'images\[0\] has no "id"'):
        read_places(write(tmp_path / "val.json", [image(True), image(2)]), [2])


def test_string_category_ids(tmp_path):
    obs = read_observations(write(tmp_path / "t.json", [image(1), image(2)], [(1, "owl"), (2, "7")]))
    assert obs.category.tolist() == ["owl", 7] and obs.columns([7, "owl"]).tolist() == [1, 0]


def test_places_of_a_split_in_the_order_of_the_store(tmp_path):
    images = [image(1), image(2, lat=None), image(3, lat=91), image(4, lon=-179.99, date=None, unc=None),
              image(5, date="2021-02-29")]
    path = write(tmp_path / "public_test.json", images)
    places = read_places(path, np.array([4, 1, 3, 2, 5]))
    assert places.usable.tolist() == [True, True, False, False, True]
    np.testing.assert_array_equal(places.lat, [10, 10, np.nan, np.nan, 10])
    np.testing.assert_array_equal(places.lon, [-179.99, 20, np.nan, np.nan, 20])
    np.testing.assert_array_equal(places.day, np.array([np.nan, 117, np.nan, np.nan, np.nan], np.float32))
    np.testing.assert_array_equal(places.uncertainty, np.array([np.nan, 5, 5, 5, 5], np.float32))
    counts = places.counts
    assert (counts.images, counts.no_place, counts.bad_value, counts.no_date, counts.bad_date) == (5, 1, 1, 1, 1)
    assert counts.first_bad_date == 'image 5: "2021-02-29"'  # 2021 is no leap year
    assert places.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and len(places) == 5
    assert read_places(path, []).usable.size == 0


def test_split_refusals(tmp_path):
    path = write(tmp_path / "val.json", [image(1), image(2)])
    with pytest.raises(EnsError, match=r"^\S+val.json: no image of id 7, a row of the store \(2 such rows\); was "
                                       r"the store made from another split\?$"):
        read_places(path, [1, 7, 8])
    path = write(tmp_path / "val.json", [image(1), image(1)])
    with pytest.raises(EnsError, match=r"val.json: duplicate image id 1$"):
        read_places(path, [1])


def test_days_of_year(tmp_path):
    dates = ["2015-12-31", "2016-12-31 23:59:00+00:00", "2016-01-01", "2016-3-1", " 2016-03-01T10:00",
             "2016-02-30", "20160-01-01", "", "2016-13-01", "2016-01-011"]
    path = write(tmp_path / "val.json", [image(i, date=d) for i, d in enumerate(dates)])
    day = read_places(path, list(range(len(dates)))).day
    assert day[:5].tolist() == [365, 366, 1, 61, 61] and np.isnan(day[5:]).all()
    assert math.isnan(read_places(path, [5]).day[0])
    # leap years, the other spellings, and digits that are not ASCII
    dates = ["2016-02-29", "2000-02-29", "1900-02-29", "2015-02-29", "2016-03-01", "2016/3/1", "2015-12-31x",
             "\u0662\u0660\u0661\u0660-04-27", "2016-02-29\u0663"]
    path = write(tmp_path / "val.json", [image(i, date=d) for i, d in enumerate(dates)])
    places = read_places(path, list(range(len(dates))))
    np.testing.assert_array_equal(places.day, np.array([60, 60, np.nan, np.nan, 61, 61, 365, np.nan, 60], np.float32))
    assert places.counts.bad_date == 3


def test_an_image_of_two_categories_is_no_observation(tmp_path):
    path = write(tmp_path / "train.json", [image(1), image(2), image(3)],
                 [(1, 10), (2, 10), (2, 11), (3, 12), (3, 12), (99, 10)])
    obs = read_observations(path)
    assert obs.category.tolist() == [10, 12] and obs.unlabelled == 1 and obs.counts.images == 2
