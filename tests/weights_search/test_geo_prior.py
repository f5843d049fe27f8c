"""The geo prior's estimator (weights_search.geo): golden values on hand-built observations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weights_search.geo import EARTH_RADIUS_KM, GeoPrior, GeoSettings, SparseGeo, points

NAN = float("nan")


def nearest(obs_lat, obs_lon, obs_col, q_lat, q_lon, obs_day=None, q_day=None, **settings):
    """The class columns of each query's row (k=1 unless given)."""
    settings.setdefault("k", 1)
    prior = GeoPrior.fit(obs_lat, obs_lon, obs_day, np.asarray(obs_col), max(obs_col) + 1, GeoSettings(**settings))
    sparse = prior.query(q_lat, q_lon, q_day)
    return [sparse.column[sparse.indptr[n]:sparse.indptr[n + 1]].tolist() for n in range(len(sparse))]


def test_antimeridian_is_no_seam():
    # class 0 at 179.9 E, class 1 at 170 E: from 179.9 W the first is 22 km away, the second 1,100 km
    # (raw degrees would say 359.8 against 349.9 and pick class 1)
    assert nearest([0, 0], [179.9, 170], [0, 1], [0], [-179.9], radius_km=math.inf) == [[0]]
    assert nearest([0, 0], [-179.9, -170], [0, 1], [0], [179.9], radius_km=math.inf) == [[0]]


def test_poles_are_no_seam():
    # near the north pole, 180 degrees of longitude away is 22 km across the pole; 5 degrees of latitude is 545 km
    assert nearest([89.9, 85], [180, 0], [0, 1], [89.9], [0], radius_km=math.inf) == [[0]]
    assert nearest([-89.9, -85], [-90, 90], [0, 1], [-90], [12], radius_km=math.inf) == [[0]]


def test_dates_are_a_circle():
    # one place; Dec 31 (day 365) is a day from Jan 1, day 180 half a year
    assert nearest([10, 10], [20, 20], [0, 1], [10], [20], obs_day=[365, 180], q_day=[1]) == [[0]]
    assert nearest([10, 10], [20, 20], [0, 1], [10], [20], obs_day=[365, 180], q_day=[183]) == [[1]]
    p = points(np.zeros(3), np.zeros(3), np.array([365.0, 1.0, NAN]), 100.0)
    # 364 days one way, 1.25 the other
    assert np.linalg.norm(p[0] - p[1]) == pytest.approx(200 * math.sin(math.pi * 1.25 / 365.25))
    assert np.linalg.norm(p[0] - p[2]) == pytest.approx(100)  # an unknown date: the circle's centre


def test_place_is_a_chord_in_km():
    p = points(np.array([0.0, 0.0]), np.array([0.0, 1.0]), None, 100.0)
    assert np.linalg.norm(p[0] - p[1]) == pytest.approx(2 * EARTH_RADIUS_KM * math.sin(math.radians(1) / 2))


def test_values_are_the_formula():
    # at (0, 0): 3 of class 0, 1 of class 1; far away: 1 of class 1, 4 of class 2. pi = 3/9, 2/9, 4/9.
    lat = [0, 0, 0, 0.001, 40, 40, 40, 40, 40]
    lon = [0, 0.001, 0.002, 0, 100, 100.1, 100.2, 100.3, 100.4]
    col = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    prior = GeoPrior.fit(lat, lon, None, col, 4, GeoSettings(k=4, alpha=1.0))
    sparse = prior.query([0.0005], [0.0005])
    assert sparse.indptr.tolist() == [0, 2]
    assert sparse.column.tolist() == [0, 1] and sparse.column.dtype == np.int32
    assert sparse.value.dtype == np.float32
    np.testing.assert_allclose(sparse.value, [math.log(1 + 3 / (1 * 3 / 9)), math.log(1 + 1 / (1 * 2 / 9))],
                               rtol=1e-6)
    # alpha scales the pseudo-counts
    prior = GeoPrior.fit(lat, lon, None, col, 4, GeoSettings(k=4, alpha=4.0))
    np.testing.assert_allclose(prior.query([0.0005], [0.0005]).value,
                               [math.log(1 + 3 / (4 * 3 / 9)), math.log(1 + 1 / (4 * 2 / 9))], rtol=1e-6)
    assert prior.class_counts.tolist() == [3, 2, 4, 0] and prior.n_used == 9


def test_a_place_with_few_observations_says_little():
    # class 0 seen 8 times at A, once at B (each alone within the radius); class 1 elsewhere
    lat = [0] * 8 + [30] + [-40] * 8
    lon = [0.001 * i for i in range(8)] + [60] + [0.001 * i for i in range(8)]
    col = np.array([0] * 9 + [1] * 8)
    prior = GeoPrior.fit(lat, lon, None, col, 2, GeoSettings(k=8, alpha=2.0, radius_km=500))
    sparse = prior.query([0, 30, -80], [0, 60, 0])  # at A, at B, 4,400 km from anything
    dense, sparse_place = sparse.rows(0, 1), sparse.rows(1, 2)
    assert dense.column.tolist() == sparse_place.column.tolist() == [0]
    assert dense.value[0] > sparse_place.value[0] > 0
    np.testing.assert_allclose(sparse_place.value, [math.log(1 + 1 / (2 * 9 / 17))], rtol=1e-6)
    # nothing within the radius: no correction, though the place is usable
    assert sparse.rows(2, 3).nnz == 0 and sparse.usable.tolist() == [True, True, True]


def test_rows_without_a_usable_place_are_empty():
    prior = GeoPrior.fit([0, 0], [0, 0.01], None, np.array([0, 1]), 2, GeoSettings(k=2, max_uncertainty_m=1000))
    sparse = prior.query([0, NAN, 200, 0, 0, 0], [0, 0, 0, 181, 0, 0], usable=np.array([1, 1, 1, 1, 1, 0], bool),
                         uncertainty=[NAN, NAN, NAN, NAN, 5000, NAN])
    assert sparse.usable.tolist() == [True, False, False, False, False, False]
    assert sparse.indptr.tolist() == [0, 2, 2, 2, 2, 2, 2]


def test_fit_drops_unusable_observations_and_other_classes():
    prior = GeoPrior.fit([0, NAN, 95, 0, 0, 1], [0, 0, 0, 0, 0, 1], [5, 5, 5, 5, NAN, NAN],
                         np.array([0, 0, 0, -1, 1, 1]), 2, GeoSettings(max_uncertainty_m=10),
                         uncertainty=[1, 1, 1, 1, 11, NAN])
    assert (prior.n_used, prior.n_unplaced, prior.n_other, prior.n_dated) == (2, 3, 1, 1)
    assert prior.class_counts.tolist() == [1, 1]
    with pytest.raises(ValueError, match="no usable observation"):
        GeoPrior.fit([NAN], [0], None, np.array([0]), 1)


def test_blocks_give_the_same_rows_and_match_a_brute_force():
    rng = np.random.default_rng(0)
    n, q, c = 400, 150, 12
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    day = np.where(rng.random(n) < 0.8, rng.integers(1, 366, n), NAN)
    col = rng.integers(0, c, n)
    settings = GeoSettings(k=7, alpha=3.0, time_scale=300.0, radius_km=2500.0)
    prior = GeoPrior.fit(lat, lon, day, col, c, settings)
    q_lat, q_lon = rng.uniform(-70, 70, q), rng.uniform(-180, 180, q)
    q_day = np.where(rng.random(q) < 0.7, rng.integers(1, 366, q), NAN)
    whole = prior.query(q_lat, q_lon, q_day)
    blocked = prior.query(q_lat, q_lon, q_day, block_rows=16)
    for name in ("indptr", "column", "value", "usable"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(blocked, name))
    # brute force: every distance, the k nearest within the radius, the formula
    distance = np.linalg.norm(points(q_lat, q_lon, q_day, 300.0)[:, None] - points(lat, lon, day, 300.0)[None],
                              axis=2)
    pi = np.bincount(col, minlength=c) / n
    dense = np.zeros((q, c))
    for row in range(q):
        near = np.argsort(distance[row])[:7]
        near = near[distance[row, near] <= 2500.0]
        counts = np.bincount(col[near], minlength=c)
        seen = counts > 0
        dense[row, seen] = np.log1p(counts[seen] / (3.0 * pi[seen]))
    got = np.zeros((q, c), np.float32)
    whole.apply(got, 0, 1.0)
    np.testing.assert_allclose(got, dense, rtol=1e-6)
    assert whole.nnz == int((dense > 0).sum()) and 0 < whole.nnz < q * 7
    for row in range(q):  # columns increase within a row
        assert (np.diff(whole.column[whole.indptr[row]:whole.indptr[row + 1]]) > 0).all()


def test_apply_adds_beta_times_g_at_the_rows_of_the_block():
    sparse = SparseGeo(np.array([0, 1, 1, 3]), np.array([2, 0, 3]), np.array([0.5, 1.0, 2.0]),
                       np.array([True, False, True]))
    block = np.zeros((2, 4), np.float32)
    sparse.apply(block, 1, 2.0)  # rows 1 and 2
    assert block.tolist() == [[0, 0, 0, 0], [2, 0, 0, 4]]
    block = np.ones((3, 4), np.float32)
    assert sparse.apply(block, 0, 0.0).tolist() == np.ones((3, 4)).tolist()
    with pytest.raises(ValueError, match="beta"):
        sparse.apply(block, 0, -1.0)
    with pytest.raises(ValueError, match="rows"):
        sparse.apply(np.zeros((3, 4), np.float32), 1, 1.0)
    part = sparse.rows(1, 3)
    assert part.indptr.tolist() == [0, 0, 2] and part.column.tolist() == [0, 3] and part.usable.tolist() == [False, True]


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=2.5), dict(k=True), dict(alpha=0), dict(alpha=NAN),
                                 dict(time_scale=-1), dict(radius_km=0), dict(max_uncertainty_m=-1),
                                 dict(alpha="1")])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GeoSettings(**bad)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="day"):
        GeoPrior.fit([0], [0], [400], np.array([0]), 1)
    with pytest.raises(ValueError, match="column"):
        GeoPrior.fit([0], [0], None, np.array([3]), 2)
    with pytest.raises(ValueError, match="column"):
        GeoPrior.fit([0], [0], None, np.array([0.5]), 2)
    with pytest.raises(ValueError, match="lon"):
        GeoPrior.fit([0, 1], [0], None, np.array([0, 0]), 2)
    prior = GeoPrior.fit([0], [0], None, np.array([0]), 1)
    with pytest.raises(ValueError, match="usable"):
        prior.query([0], [0], usable=np.array([1]))
    assert GeoSettings(radius_km=math.inf).as_dict()["radius_km"] == "inf"


def test_settings_round_trip_through_their_record():
    for settings in (GeoSettings(), GeoSettings(k=5, alpha=0.5, time_scale=0, radius_km=math.inf,
                                                max_uncertainty_m=math.inf)):
        assert GeoSettings.from_dict(json_round_trip(settings.as_dict())) == settings
    with pytest.raises(ValueError, match="'beta' is no setting"):
        GeoSettings.from_dict({"k": 3, "beta": 1})
    with pytest.raises(ValueError, match="radius_km"):
        GeoSettings.from_dict({"radius_km": "none"})


def json_round_trip(value):
    import json

    return json.loads(json.dumps(value))


@pytest.mark.parametrize("indptr, column, value, usable, message", [
    ([0, 1], [0], [1.0], [True, True], "indptr of shape"),
    ([0, 2], [0], [1.0], [True], "rise from 0 to nnz"),
    ([0, 1], [-1], [1.0], [True], "column must be >= 0"),
    ([0, 1], [0], [-0.5], [True], "value finite and >= 0"),
    ([0, 1], [0], [np.inf], [True], "value finite and >= 0"),
    ([0, 1], [0, 1], [1.0], [True], "column"),
])
def test_sparse_rows_check_their_arrays(indptr, column, value, usable, message):
    with pytest.raises(ValueError, match=message):
        SparseGeo(np.array(indptr), np.array(column), np.array(value), np.array(usable))
