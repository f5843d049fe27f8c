"""The geo prior: how much more (or less) likely each class is at a place and date than overall,
estimated from the training observations by their nearest neighbours on the globe.

iNat 2021's images carry a latitude, a longitude, a date and a location uncertainty. Species
live in places and seasons; the image models ignore that. Bayes' rule combines the two: for an
image ``x`` taken at place ``u`` on day ``d``, ``p(c | x, u, d) ∝ p(c | x) p(c | u, d) / p(c)``
(Mac Aodha, Cole and Perona, "Presence-Only Geographical Priors for Fine-Grained Image
Classification", ICCV 2019). This module estimates ``g(c) = log p(c | u, d) - log p(c)``.

**The estimator** (k nearest neighbours, smoothed toward the class frequencies). Each training
observation ``o`` is a point: its place as a 3-D vector on a sphere of the Earth's radius
(:data:`EARTH_RADIUS_KM`), so distances are chords in km (within 0.1% of the great-circle
distance up to 1,000 km) and the antimeridian and the poles are no seams; and its day of year
as a point on a circle of radius ``time_scale`` km (:func:`points`). For a query, its ``k``
nearest observations closer than ``radius_km`` (in that 5-D metric) are found with
:class:`scipy.spatial.cKDTree`; ``n_c`` of them are of class ``c``, ``n = sum_c n_c <= k``. With
``pi_c`` the frequency of class ``c`` among the observations used and ``alpha`` pseudo-counts
spread as ``pi`` (a Dirichlet prior centred on the class frequencies)::

    p(c | place) = (n_c + alpha pi_c) / (n + alpha)
    g(c) = log((n_c + alpha pi_c) / (pi_c (n + alpha))) = base + g'(c)
    base = log(alpha / (n + alpha))            (one constant per row: it cancels in any softmax)
    g'(c) = log(1 + n_c / (alpha pi_c))  >= 0  (0 for every class not among the neighbours)

so a row is sparse: only ``g'`` of the neighbours' classes is stored (:class:`SparseGeo`, CSR),
never an (images x classes) array. A class with no used observation is never a neighbour's, so
its ``pi_c`` (0) is never needed: no smoothing of zero counts is involved.

**Why these choices** (defaults in :class:`GeoSettings`):

* *k nearest neighbours* rather than a kernel density or a fitted model: no training, no
  bandwidth per class, exact sparsity (at most ``k`` classes per row), and a cKDTree over 2.7 M
  points answers 600 k queries in minutes on two cores (``python -m benchmarks.geo``).
  ``k = 64``: enough neighbours to count more than one of a common local species, few enough
  that they stay local in the dense regions (tens of km where iNat has most observations).
* *a radius* (``radius_km = 1000``): a place with few observations near it says little. Only
  neighbours within the radius count, so a query far from every observation (open sea, a
  desert without records) gets an empty row (no correction), and one with two observations
  nearby gets only their classes raised, by ``log(1 + 1/(alpha pi_c))`` each, against the
  ``log(1 + n_c/(alpha pi_c))`` of a class seen ``n_c`` times in a dense place. 1,000 km is the
  scale of a species' range; beyond it a neighbour says more about sampling than about the place.
* *alpha = 16* pseudo-counts (a quarter of ``k``): a class seen once among the neighbours is
  raised by ``log(1 + 1/(16 pi_c))`` — for an average class of iNat 2021 (``pi = 1e-4``) 6.4
  nats, seen 64 times 10.6 — so the ranking inside a row follows ``n_c / pi_c`` (how much more
  often the class is seen here than overall), and the gap to the unseen classes is bounded. The
  blend fits a weight ``beta`` on val (``--geo-weight auto``) that scales all of ``g'``, so
  alpha sets the shape, beta the strength.
* *the date as a circle* of radius ``time_scale = 100`` km: dates ``Δ`` days apart are
  ``2 time_scale sin(pi Δ / 365.25)`` km apart (Dec 31 and Jan 1 are neighbours): a week ≈ 12 km,
  a month ≈ 51 km, opposite seasons 200 km. Where observations are dense (neighbours within
  tens of km) the neighbours come from the same weeks; where they are sparse the place decides.
  Mac Aodha et al. found the date adds little beside the place, so it is weighed mildly.
  ``time_scale = 0`` ignores dates.
* *an unknown date* (an observation or a query without one) sits at the circle's centre: it is
  ``time_scale`` km from every date (as far as dates two months apart) and 0 from another
  unknown date. One tree serves every query, dated or not, and an undated query ranks the dated
  observations by place alone (the offset is the same for all; an undated observation is
  ``time_scale`` km nearer to it than a dated one at the same place).
* *a location uncertainty beyond* ``max_uncertainty_m = 100 km`` makes a place unusable, for an
  observation (not used) as for a query (no correction): it is a tenth of the radius, so such a
  place could sit in another neighbourhood. A missing uncertainty is no objection.
* the ``g'`` stored per row are sorted by class column; float32.

None of the settings is fitted on val (only the blend's ``beta`` is): they are the defaults above,
recorded with the blend (:meth:`GeoSettings.as_dict`). Times and memory at iNat 2021 size:
``python -m benchmarks.geo`` (docs/benchmarks.md, "The geo prior").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

#: The Earth's mean radius (IUGG), km: places are points on a sphere of this radius.
EARTH_RADIUS_KM = 6371.0088
#: The days of a year on the date circle: a day of year ``d`` (1 = Jan 1) is at angle
#: ``2 pi (d - 1) / DAYS_PER_YEAR``.
DAYS_PER_YEAR = 365.25
#: Query rows per block: the neighbour arrays of a block (``rows x k`` int64 and float64, and the
#: sorted class keys) stay near 100 MB at k = 64.
BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class GeoSettings:
    """The estimator's settings (see the module docstring for why these defaults).

    ``k``: neighbours per query; ``alpha``: pseudo-counts of the class frequencies;
    ``time_scale``: radius of the date circle, km (0: dates ignored); ``radius_km``: neighbours
    farther than this (in the place-and-date metric, km) do not count (``inf``: plain k nearest);
    ``max_uncertainty_m``: a place whose location uncertainty exceeds this many metres is unusable.
    """

    k: int = 64
    alpha: float = 16.0
    time_scale: float = 100.0
    radius_km: float = 1000.0
    max_uncertainty_m: float = 100_000.0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        object.__setattr__(self, "k", int(self.k))
        checks = (("alpha", lambda v: np.isfinite(v) and v > 0, "a positive number"),
                  ("time_scale", lambda v: np.isfinite(v) and v >= 0, "a non-negative number"),
                  ("radius_km", lambda v: v > 0, "a positive number (inf for no radius)"),
                  ("max_uncertainty_m", lambda v: v >= 0, "a non-negative number (inf for no limit)"))
        for name, fine, expected in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or np.isnan(value) or not fine(value):
                raise ValueError(f"{name} must be {expected}, got {value!r}")
            object.__setattr__(self, name, float(value))

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON values (``inf`` as the string ``"inf"``), for a record."""
        return {name: (value if np.isfinite(value) else "inf") if isinstance(value, float) else value
                for name, value in vars(self).items()}

    @classmethod
    def from_dict(cls, values: Any) -> GeoSettings:
        """The settings :meth:`as_dict` wrote (``"inf"`` read as infinity); ValueError naming a
        key that is no setting or a value that is none."""
        if not isinstance(values, dict):
            raise ValueError(f"settings must be an object, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__), key=str)
        if unknown:
            raise ValueError(f"{unknown[0]!r} is no setting (settings: {', '.join(cls.__dataclass_fields__)})")
        return cls(**{name: float("inf") if value == "inf" else value for name, value in values.items()})


def _array(value: Any, name: str, n: int | None = None) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or (n is not None and array.size != n):
        expected = f"({n},)" if n is not None else "(n,)"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    return array


def usable_places(lat: np.ndarray, lon: np.ndarray, uncertainty: np.ndarray | None,
                  settings: GeoSettings) -> np.ndarray:
    """``(n,)`` bool: a finite latitude in [-90, 90], a finite longitude in [-180, 180], and a
    location uncertainty (metres; NaN = not given) of at most ``settings.max_uncertainty_m``."""
    lat, lon = _array(lat, "lat"), _array(lon, "lon", np.size(lat))
    with np.errstate(invalid="ignore"):
        usable = (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
        if uncertainty is not None:
            uncertainty = _array(uncertainty, "uncertainty", lat.size)
            usable &= ~(uncertainty > settings.max_uncertainty_m)
    return usable


def points(lat: np.ndarray, lon: np.ndarray, day: np.ndarray | None, time_scale: float) -> np.ndarray:
    """``(n, 5)`` float64: each place on a sphere of :data:`EARTH_RADIUS_KM` (x, y, z in km) and
    its day of year (1..366, NaN = unknown) on a circle of radius ``time_scale`` km (an unknown
    day at its centre). Euclidean distances between rows are the metric of the estimator."""
    lat_r, lon_r = np.radians(lat), np.radians(lon)
    out = np.zeros((lat_r.size, 5))
    cos_lat = np.cos(lat_r)
    out[:, 0] = EARTH_RADIUS_KM * cos_lat * np.cos(lon_r)
    out[:, 1] = EARTH_RADIUS_KM * cos_lat * np.sin(lon_r)
    out[:, 2] = EARTH_RADIUS_KM * np.sin(lat_r)
    if day is not None and time_scale > 0:
        dated = np.isfinite(day)
        angle = 2 * np.pi * (day[dated] - 1) / DAYS_PER_YEAR
        out[dated, 3] = time_scale * np.cos(angle)
        out[dated, 4] = time_scale * np.sin(angle)
    return out


def _days(day: Any, n: int) -> np.ndarray | None:
    if day is None:
        return None
    day = _array(day, "day", n)
    with np.errstate(invalid="ignore"):
        bad = ~np.isnan(day) & ~((day >= 1) & (day < 367))
    if bad.any():
        raise ValueError(f"day must be a day of year in [1, 367) or NaN; row {int(np.flatnonzero(bad)[0])} "
                         f"is {day[bad][0]}")
    return day


def csr_rows(indptr: Any, column: Any, value: Any, n_rows: int,
             column_dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``g'`` of ``n_rows`` rows as checked CSR arrays: ``indptr`` ``(n_rows + 1,)`` int64, rising from
    0 to nnz; ``column`` ``(nnz,)`` of ``column_dtype``, >= 0 (class columns); ``value`` ``(nnz,)``
    float32, finite and >= 0. A ``ValueError`` saying what is wrong otherwise."""
    indptr = np.asarray(indptr, dtype=np.int64)
    column = np.asarray(column, dtype=column_dtype)
    value = np.asarray(value, dtype=np.float32)
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"indptr of shape {indptr.shape} does not fit {n_rows} rows")
    if column.shape != value.shape or column.ndim != 1:
        raise ValueError(f"column {column.shape} and value {value.shape} must be (nnz,) arrays of one size")
    if indptr[0] != 0 or indptr[-1] != column.size or (np.diff(indptr) < 0).any():
        raise ValueError("indptr, column and value are no CSR rows: indptr must rise from 0 to nnz")
    if column.size and (int(column.min()) < 0 or not (value >= 0).all() or not np.isfinite(value).all()):
        raise ValueError("column must be >= 0 and value finite and >= 0 (non-negative class columns and g')")
    return indptr, column, value


@dataclass(frozen=True)
class SparseGeo:
    """``g'`` of the query rows (see the module docstring), as CSR rows.

    ``indptr`` ``(N + 1,)`` int64; row ``n``'s entries are ``indptr[n]:indptr[n + 1]`` of
    ``column`` ``(nnz,)`` int32 (class columns, increasing within a row) and ``value`` ``(nnz,)``
    float32 (``g' >= 0``, > 0 but for an extreme alpha; every other class of the row has
    ``g' = 0``). ``usable`` ``(N,)`` bool: whether the row had a usable place (a row without one is empty; a usable row may be empty
    too, when no observation lies within the radius).
    """

    indptr: np.ndarray
    column: np.ndarray
    value: np.ndarray
    usable: np.ndarray

    def __post_init__(self) -> None:
        usable = np.asarray(self.usable, dtype=bool)
        if usable.ndim != 1:
            raise ValueError(f"usable of shape {usable.shape} must be (N,)")
        indptr, column, value = csr_rows(self.indptr, self.column, self.value, usable.size, np.int32)
        for name, array in (("indptr", indptr), ("column", column), ("value", value), ("usable", usable)):
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return self.usable.size

    @property
    def nnz(self) -> int:
        return int(self.column.size)

    def rows(self, start: int, stop: int) -> SparseGeo:
        """Rows ``start:stop`` (views of the arrays, ``indptr`` rebased to 0)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"rows {start}:{stop} of {len(self)}")
        low, high = int(self.indptr[start]), int(self.indptr[stop])
        return SparseGeo(self.indptr[start:stop + 1] - low, self.column[low:high], self.value[low:high],
                         self.usable[start:stop])

    def row_index(self) -> np.ndarray:
        """``(nnz,)`` int64: the row (counted from this object's first) of each entry."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))

    def apply(self, block: np.ndarray, start: int, beta: float) -> np.ndarray:
        """Add ``beta * g'`` in place to ``block`` ``(rows, C)``, the rows ``start:start + rows``;
        returns ``block``. Only the ranking of a row is kept (the row is not renormalised):
        what a top-k needs. ``beta`` must be finite and >= 0."""
        if block.ndim != 2:
            raise ValueError(f"block must be (rows, classes), got shape {block.shape}")
        if not (np.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        part = self.rows(start, start + block.shape[0])
        if part.nnz and int(part.column.max()) >= block.shape[1]:
            raise ValueError(f"a class column {int(part.column.max())} beyond the block's {block.shape[1]} classes")
        if beta and part.nnz:
            block[part.row_index(), part.column] += (beta * part.value).astype(block.dtype, copy=False)
        return block


class GeoPrior:
    """The fitted estimator: a cKDTree over the usable training observations (:meth:`fit`),
    queried for ``g'`` (:meth:`query`).

    Fitted state: ``settings``; ``n_classes``; ``class_counts`` ``(C,)`` int64, the used
    observations per class; ``n_used`` (observations in the tree), ``n_dated`` (of those, with a
    day), ``n_unplaced`` (no usable place: coordinates missing or out of range, or an
    uncertainty beyond the limit) and ``n_other`` (a class column < 0: a class the models do
    not predict), each dropped.
    """

    def __init__(self, tree: cKDTree, classes: np.ndarray, class_counts: np.ndarray, settings: GeoSettings, *,
                 n_dated: int, n_unplaced: int, n_other: int) -> None:
        self.tree = tree
        self.classes = classes  # (n_used + 1,) int32; the last entry, n_classes, is cKDTree's "no neighbour"
        self.class_counts = class_counts
        self.settings = settings
        self.n_classes = int(class_counts.size)
        self.n_used = int(class_counts.sum())
        self.n_dated = n_dated
        self.n_unplaced = n_unplaced
        self.n_other = n_other
        # g' = log1p(n_c / (alpha pi_c)) = log1p(n_c * scale_c), pi_c = count_c / n_used
        with np.errstate(divide="ignore"):
            self.scale = np.where(class_counts > 0, self.n_used / (settings.alpha * class_counts), 0.0)

    @classmethod
    def fit(cls, lat: Any, lon: Any, day: Any, column: Any, n_classes: int,
            settings: GeoSettings = GeoSettings(), *, uncertainty: Any = None) -> GeoPrior:
        """The estimator of the ``(n,)`` training observations: ``lat``, ``lon`` (degrees; NaN or
        out of range: no place), ``day`` (day of year 1..366, NaN: unknown; or None: no dates),
        ``column`` (int: the class column in ``[0, n_classes)``, or < 0: a class the models do
        not predict) and ``uncertainty`` (metres, NaN: not given; or None). Observations without
        a usable place (:func:`usable_places`) or with a column < 0 are dropped and counted.
        ValueError for bad arguments or when no observation is left."""
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
        if not isinstance(settings, GeoSettings):
            raise ValueError(f"settings must be a GeoSettings, got {type(settings).__name__}")
        lat = _array(lat, "lat")
        lon = _array(lon, "lon", lat.size)
        day = _days(day, lat.size)
        column = np.asarray(column)
        if column.shape != lat.shape or not (np.issubdtype(column.dtype, np.integer) or column.size == 0):
            raise ValueError(f"column must be ({lat.size},) integers, got {column.shape} {column.dtype}")
        column = column.astype(np.int64)
        if column.size and column.max() >= n_classes:
            raise ValueError(f"column {int(column.max())} beyond the {n_classes} classes")
        placed = usable_places(lat, lon, uncertainty, settings)
        other = column < 0
        keep = placed & ~other
        if not keep.any():
            raise ValueError(f"no usable observation among {lat.size} (without a usable place: {int((~placed).sum())}, "
                             f"of other classes: {int(other.sum())})")
        kept_day = day[keep] if day is not None else None
        tree = cKDTree(points(lat[keep], lon[keep], kept_day, settings.time_scale), balanced_tree=False)
        classes = np.append(column[keep], n_classes).astype(np.int32)
        counts = np.bincount(column[keep], minlength=n_classes).astype(np.int64)
        n_dated = int(np.isfinite(kept_day).sum()) if kept_day is not None else 0
        return cls(tree, classes, counts, settings, n_dated=n_dated,
                   n_unplaced=int((~placed).sum()), n_other=int((placed & other).sum()))

    def query(self, lat: Any, lon: Any, day: Any = None, usable: Any = None, *, uncertainty: Any = None,
              block_rows: int = BLOCK_ROWS, workers: int = 1) -> SparseGeo:
        """``g'`` of the ``(N,)`` query places (as :meth:`fit` reads them; ``usable`` ``(N,)`` bool
        or None: rows the caller already knows to be without a usable place). Worked in blocks of
        ``block_rows`` rows; ``workers``: cKDTree's threads (1: the machine is shared; -1: all)."""
        lat = _array(lat, "lat")
        n = lat.size
        lon = _array(lon, "lon", n)
        day = _days(day, n)
        ok = usable_places(lat, lon, uncertainty, self.settings)
        if usable is not None:
            given = np.asarray(usable)
            if given.shape != (n,) or given.dtype != bool:
                raise ValueError(f"usable must be a ({n},) bool array, got {given.shape} {given.dtype}")
            ok &= given
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
        indptr = np.zeros(n + 1, dtype=np.int64)
        columns, values = [], []
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            rows = np.flatnonzero(ok[start:stop])
            col, val, per_row = self._block(lat[start:stop][rows], lon[start:stop][rows],
                                            None if day is None else day[start:stop][rows], workers)
            lengths = np.zeros(stop - start, dtype=np.int64)
            lengths[rows] = per_row
            indptr[start + 1:stop + 1] = lengths
            columns.append(col)
            values.append(val)
        np.cumsum(indptr, out=indptr)
        column = np.concatenate(columns) if columns else np.zeros(0, np.int32)
        value = np.concatenate(values) if values else np.zeros(0, np.float32)
        return SparseGeo(indptr, column, value, ok)

    def _block(self, lat: np.ndarray, lon: np.ndarray, day: np.ndarray | None,
               workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Class columns, ``g'`` and entries per row of one block of usable rows."""
        rows = lat.size
        if rows == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        k = min(self.settings.k, self.n_used)
        radius = self.settings.radius_km
        bound = np.nextafter(radius, np.inf) if np.isfinite(radius) else np.inf
        query = points(lat, lon, day, self.settings.time_scale)
        distance, index = self.tree.query(query, k=np.arange(1, k + 1), distance_upper_bound=bound,
                                          workers=workers)
        index[distance > radius] = self.n_used  # cKDTree's "none" for the few at exactly the bound's ulp
        del distance, query
        n_classes = self.n_classes
        cls = self.classes[index]  # (rows, k) int32; n_classes where no neighbour
        del index
        cls.sort(axis=1)
        key = (np.arange(rows, dtype=np.int64) * (n_classes + 1))[:, None] + cls
        key = key.ravel()
        del cls
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        counts = np.diff(np.append(starts, key.size))
        key = key[starts]
        row, col = np.divmod(key, n_classes + 1)
        real = col < n_classes
        row, col, counts = row[real], col[real], counts[real]
        value = np.log1p(counts * self.scale[col]).astype(np.float32)
        return col.astype(np.int32), value, np.bincount(row, minlength=rows)
