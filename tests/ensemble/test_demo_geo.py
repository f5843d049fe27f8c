"""`ens demo`'s world has places (issue 26): each digit lives in its own regions of the globe,
in iNat 2021's place and date fields of train, val and test."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import numpy as np
import pytest

from ensemble.demo.data import CATEGORY_OFFSET, RANGES, DemoSpec, draw_places, great_circle_km, make_competition
from ensemble.demo.train import training_key
from ensemble.formats.places import read_observations, read_places

SMALL = DemoSpec(canvas=32, val_per_class=3, test_per_class=3, train_per_class=6, train_copies=1, long_tail=None)
FIELDS = {"latitude", "longitude", "date", "location_uncertainty"}


def _day(date: str) -> int:
    return dt.datetime.fromisoformat(date).timetuple().tm_yday


def _regions_of(digit: int, field: dict) -> list:
    """The digit's regions that hold this place (and date, when it has one)."""
    return [r for r in RANGES[digit]
            if great_circle_km(r.latitude, r.longitude, field["latitude"], field["longitude"]) <= 3 * r.spread_km + 1e-6
            and (field["date"] is None or r.contains_day(_day(field["date"])))]


def test_every_digit_is_seen_in_its_own_regions_and_seasons():
    digits = np.repeat(np.arange(10), 400)
    fields = draw_places(digits, DemoSpec(), np.random.default_rng(3))
    assert len(fields) == digits.size and all(set(f) == FIELDS for f in fields)
    placed = [(int(d), f) for d, f in zip(digits, fields) if f["latitude"] is not None]
    assert all(_regions_of(d, f) for d, f in placed)
    # Not everywhere: a place is within some other digit's regions only where ranges overlap.
    lat = np.array([f["latitude"] for _, f in placed])
    lon = np.array([f["longitude"] for _, f in placed])
    assert (np.abs(lat) <= 90).all() and (lon >= -180).all() and (lon < 180).all()
    of = np.array([d for d, _ in placed])
    # Some digits in both hemispheres, some in one only.
    both = {d for d in range(10) if (lat[of == d] > 0).any() and (lat[of == d] < 0).any()}
    assert {0, 3, 6, 9} <= both and not {2, 5, 8} & both
    # Fiji's region straddles the antimeridian: its digits are seen at longitudes near +180 and -180.
    for digit in (3, 8):
        assert (lon[of == digit] > 178).any() and (lon[of == digit] < -178).any()
    # Seasons: digit 5 only in the southern spring, digit 6 in Scandinavia only in summer.
    days5 = [_day(f["date"]) for d, f in placed if d == 5 and f["date"] is not None]
    assert days5 and all(244 <= day <= 334 for day in days5)
    nordic6 = [_day(f["date"]) for d, f in placed if d == 6 and f["date"] is not None and f["latitude"] > 45]
    assert nordic6 and all(152 <= day <= 243 for day in nordic6)
    # Overlapping ranges: regions shared by several digits.
    holders = Counter(r.name for regions in RANGES.values() for r in regions)
    assert sum(count > 1 for count in holders.values()) >= 5


def test_some_images_lack_a_place_or_a_date():
    fields = draw_places(np.repeat(np.arange(10), 200), DemoSpec(no_place=0.05, no_date=0.1), np.random.default_rng(0))
    no_place = np.mean([f["latitude"] is None for f in fields])
    no_date = np.mean([f["date"] is None for f in fields])
    assert 0.03 < no_place < 0.07 and 0.07 < no_date < 0.13
    # A record without a place has no longitude and no uncertainty either; some placed ones
    # carry no uncertainty; those given are metres, whole numbers.
    assert all(f["longitude"] is None and f["location_uncertainty"] is None for f in fields if f["latitude"] is None)
    given = [f["location_uncertainty"] for f in fields if f["latitude"] is not None]
    assert None in given and all(isinstance(u, int) and (5 <= u <= 20_000 or 100_000 <= u <= 2_000_000)
                                 for u in given if u is not None)
    coarse = np.mean([u is not None and u >= 100_000 for u in given])
    assert 0.005 < coarse < 0.04  # known to a country only: beyond the geo prior's limit
    dated = [f["date"] for f in fields if f["date"] is not None]
    assert all(len(d) == 25 and d.endswith(" 00:00:00+00:00") and 2010 <= int(d[:4]) <= 2020 for d in dated)
    none = draw_places(np.arange(100) % 10, DemoSpec(no_place=0, no_date=0, coarse=0), np.random.default_rng(0))
    assert all(f["latitude"] is not None and f["date"] is not None for f in none)
    assert all(f["location_uncertainty"] is None or f["location_uncertainty"] <= 20_000 for f in none)
    with pytest.raises(ValueError, match="no_place 1.5"):
        draw_places(np.arange(10), DemoSpec(no_place=1.5), np.random.default_rng(0))


def test_the_competition_jsons_carry_the_places_and_the_images_do_not_depend_on_them(tmp_path, monkeypatch):
    comp = make_competition(tmp_path / "a" / "data", SMALL)
    docs = {s: json.loads((comp.root / f"{s}2019.json").read_text()) for s in ("train", "val", "test")}
    for split, doc in docs.items():
        assert all(FIELDS <= set(im) for im in doc["images"]), split
        labels = {a["image_id"]: a["category_id"] - CATEGORY_OFFSET for a in doc.get("annotations", [])}
        if split != "test":
            assert all(_regions_of(labels[im["id"]], im) for im in doc["images"] if im["latitude"] is not None)
    with open(comp.answers) as fh:
        answers = {int(i): int(c) - CATEGORY_OFFSET for i, c in (line.strip().split(",") for line in list(fh)[1:])}
    assert all(_regions_of(answers[im["id"]], im) for im in docs["test"]["images"] if im["latitude"] is not None)
    # What ens blend --geo-prior reads of them: every placed training image an observation of its
    # digit, at its place and day; no bad value, no unreadable date; the nulls counted.
    train = docs["train"]
    observations = read_observations(comp.root / "train2019.json")
    placed = [im for im in train["images"] if im["latitude"] is not None]
    labels = {a["image_id"]: a["category_id"] for a in train["annotations"]}
    assert observations.counts.images == len(train["images"]) and observations.counts.bad_value == 0
    assert observations.counts.no_place == len(train["images"]) - len(placed) and observations.counts.bad_date == 0
    assert observations.category.tolist() == [labels[im["id"]] for im in placed]
    assert observations.lat.tolist() == [im["latitude"] for im in placed]
    assert np.array_equal(np.isnan(observations.day), [im["date"] is None for im in placed])
    for split in ("val", "test"):
        ids = [im["id"] for im in docs[split]["images"]]
        places = read_places(comp.root / f"{split}2019.json", ids[::-1])
        assert places.usable.tolist() == [im["latitude"] is not None for im in docs[split]["images"][::-1]]
        assert places.counts.bad_value == 0 and places.counts.bad_date == 0
    # Seeded: the same spec writes the same jsons; other fractions of nulls, the same images
    # (the places have their own generator), so the networks' cache key is the same too.
    again = make_competition(tmp_path / "b" / "data", SMALL)
    assert (again.root / "train2019.json").read_bytes() == (comp.root / "train2019.json").read_bytes()
    other = make_competition(tmp_path / "c" / "data", SMALL.__class__(**{**SMALL.__dict__, "no_place": 0.5}))
    other_train = json.loads((other.root / "train2019.json").read_text())
    assert [im["file_name"] for im in other_train["images"]] == [im["file_name"] for im in docs["train"]["images"]]
    assert [im["latitude"] for im in other_train["images"]] != [im["latitude"] for im in docs["train"]["images"]]
    assert training_key(other.root) == training_key(comp.root)
    # Without any places drawn, the very same images in every split.
    import ensemble.demo.data as data

    monkeypatch.setattr(data, "draw_places", lambda digits, spec, rng: [{} for _ in digits])
    bare = make_competition(tmp_path / "d" / "data", SMALL)
    for split in ("train", "val", "test"):
        names = [im["file_name"] for im in json.loads((bare.root / f"{split}2019.json").read_text())["images"]]
        assert names == [im["file_name"] for im in docs[split]["images"]], split
    relabelled = dict(docs["train"])
    relabelled["annotations"] = [{**a, "category_id": CATEGORY_OFFSET + (a["category_id"] + 1) % 10}
                                 for a in docs["train"]["annotations"]]
    (other.root / "train2019.json").write_text(json.dumps(relabelled))
    assert training_key(other.root) != training_key(comp.root)
