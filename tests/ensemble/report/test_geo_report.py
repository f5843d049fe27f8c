"""The report's geo section (issue 26): regions, outcomes, the map's rows and figure on hand-made
arrays; the section of a blend with a geo prior end to end, and no section without one."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest

from ensemble.report import geo, plots


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
