"""The report's geo section, as numbers: regions of the globe, what the geo prior changed on each
row, and which rows the map draws. Arrays in, arrays out: no files, no plotting, no HTML here.

**Regions.** Continents as simple latitude/longitude boxes (:data:`REGIONS`), tried in order, the
first box holding a place giving its region; a place in none of them (open ocean) is
``elsewhere``, and a row without a place (no coordinates, or coordinates out of range) is ``no
place``. The boxes are coarse on purpose: they follow coasts only where a box edge does (the
Mediterranean is cut at 34-37.4 N, so Malta, Crete and Cyprus are Europe; the Red Sea at 39 E
north of 16 N; Hawaii is Oceania, Greenland west of 32 W North America). They are there to
tell an iNat reader "the prior helps in Europe, not in Africa", not to be a gazetteer.

**Outcomes.** Each row of the fitted split is, for the blend without and with the geo prior:
right both times, wrong both times, *fixed* (wrong without, right with) or *broken* (right
without, wrong with), by its top-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Continents as boxes ``(lat_min, lat_max, lon_min, lon_max)`` in degrees (bounds included),
#: tried in this order; a place takes the region of the first box holding it.
REGIONS: tuple[tuple[str, tuple[tuple[float, float, float, float], ...]], ...] = (
    ("Antarctica", ((-90, -60, -180, 180),)),
    ("Oceania", ((-60, -11, 110, 180), (-11, 0, 141, 180), (0, 30, 130, 180), (-60, 30, -180, -120))),
    ("North America", ((15, 90, -180, -32), (7, 15, -93, -77))),
    ("South America", ((-60, 15, -93, -30),)),
    # Arabia, the Levant and Anatolia before Africa and Europe, whose boxes reach over them
    ("Asia", ((16, 36, 39, 60), (12, 16, 43, 60), (29, 36, 34, 39), (36, 41, 26.5, 45))),
    ("Africa", ((0, 35.95, -26, -1), (0, 37.4, -1, 11.5), (0, 34, 11.5, 55), (-36, 0, 8, 55))),
    ("Europe", ((34, 90, -32, 40),)),
    ("Asia", ((-11, 90, 40, 180),)),
)
#: The regions' names in table order (each once), then the two lines for the rest.
REGION_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for name, _ in REGIONS))
ELSEWHERE, NO_PLACE = "elsewhere", "no place"
LINES: tuple[str, ...] = REGION_NAMES + (ELSEWHERE, NO_PLACE)

#: Row outcomes, by top-1 without and with the geo prior (:func:`outcomes`).
SAME_RIGHT, SAME_WRONG, FIXED, BROKEN = 0, 1, 2, 3
OUTCOMES = ("right with and without", "wrong with and without", "fixed by the geo prior", "broken by the geo prior")

#: Points the map draws at most: every placed row up to this many, else a fixed random sample of
#: them (the rows fixed and broken first), so the page stays small at any split size.
MAP_POINTS = 5000


def placed(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the row has a place on the globe (finite, latitude within +-90, longitude
    within +-180)."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)


def region_codes(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """``(N,)`` int64 index into :data:`LINES` of each row: its region (:data:`REGIONS`, first
    box first), ``elsewhere``, or ``no place`` (:func:`placed` false)."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    if lat.shape != lon.shape or lat.ndim != 1:
        raise ValueError(f"expected (N,) latitudes and longitudes, got {lat.shape} and {lon.shape}")
    has = placed(lat, lon)
    codes = np.where(has, LINES.index(ELSEWHERE), LINES.index(NO_PLACE)).astype(np.int64)
    free = has.copy()
    for name, boxes in REGIONS:
        for lat0, lat1, lon0, lon1 in boxes:
            inside = free & (lat >= lat0) & (lat <= lat1) & (lon >= lon0) & (lon <= lon1)
            codes[inside] = REGION_NAMES.index(name)
            free &= ~inside
    return codes


def outcomes(right_without: np.ndarray, right_with: np.ndarray) -> np.ndarray:
    """``(N,)`` int8 outcome of each row (:data:`OUTCOMES`) from its top-1 hits without and with
    the geo prior."""
    a, b = np.asarray(right_without, dtype=bool), np.asarray(right_with, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"expected two (N,) hit arrays, got {a.shape} and {b.shape}")
    out = np.where(a, SAME_RIGHT, SAME_WRONG).astype(np.int8)
    out[~a & b] = FIXED
    out[a & ~b] = BROKEN
    return out


@dataclass(frozen=True)
class RegionLine:
    """One line of the by-region table: its ``rows``, top-1 and top-k without and with the
    geo prior (NaN for a line without rows), and how many rows it fixed and broke (top-1)."""

    name: str
    rows: int
    top1_without: float
    top1_with: float
    topk_without: float
    topk_with: float
    fixed: int
    broken: int


def _mean(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def line(name: str, rank_without: np.ndarray, rank_with: np.ndarray, k: int) -> RegionLine:
    """The :class:`RegionLine` of the rows given by their true class's rank (0: top-1) without
    and with the geo prior; ``k``: the top-k shown."""
    a, b = np.asarray(rank_without), np.asarray(rank_with)
    return RegionLine(name, int(a.size), _mean(a == 0), _mean(b == 0), _mean(a < k), _mean(b < k),
                      int(np.count_nonzero((a != 0) & (b == 0))), int(np.count_nonzero((a == 0) & (b != 0))))


def by_region(codes: np.ndarray, rank_without: np.ndarray, rank_with: np.ndarray, k: int) -> list[RegionLine]:
    """One :class:`RegionLine` per line of :data:`LINES` that has rows, in that order, for rows
    coded by :func:`region_codes`."""
    codes = np.asarray(codes)
    rank_without, rank_with = np.asarray(rank_without), np.asarray(rank_with)
    if not codes.shape == rank_without.shape == rank_with.shape:
        raise ValueError(f"expected (N,) codes and ranks, got {codes.shape}, {rank_without.shape}, {rank_with.shape}")
    return [line(name, rank_without[codes == c], rank_with[codes == c], k)
            for c, name in enumerate(LINES) if np.any(codes == c)]


def map_rows(has_place: np.ndarray, outcome: np.ndarray, limit: int = MAP_POINTS, seed: int = 0) -> np.ndarray:
    """The rows the map draws, ascending: every row with a place when there are at most
    ``limit``; else ``limit`` of them, the fixed and broken rows first (a fixed random sample of
    them when they alone are more), the rest a fixed random sample of the others. The same
    rows for the same inputs."""
    rows = np.flatnonzero(np.asarray(has_place, dtype=bool))
    if rows.size <= limit:
        return rows
    rng = np.random.default_rng(seed)
    changed = np.isin(np.asarray(outcome)[rows], (FIXED, BROKEN))
    first, rest = rows[changed], rows[~changed]
    if first.size >= limit:
        return np.sort(rng.choice(first, limit, replace=False))
    return np.sort(np.concatenate([first, rng.choice(rest, limit - first.size, replace=False)]))
