"""The geo prior at iNat 2021 size: fitting and querying :class:`weights_search.geo.GeoPrior`.

    .venv/bin/python -m benchmarks.geo            # 2.7 M observations, 10,000 classes, 600,000 queries
    .venv/bin/python -m benchmarks.geo --quick    # a tenth of each

Prints figures; it is not a test. The data are generated (seeded): each class lives in a region
(a centre, most of them in a few dense areas as iNat's observations are, and a range of 50 to
2,000 km), 200-340 training observations each (iNat 2021: 152-300; 2.7 M in all), 90% of them
dated around the class's season (a third of the classes all year round), a location
uncertainty of metres to kilometres (30% none, 1% beyond the 100 km limit); the queries are
drawn the same way (3% without a place, 10% without a date), as val and test images are.

In one fresh process (its own peak memory, the generation's excluded by resetting the peak):

* fit: :meth:`GeoPrior.fit` (the cKDTree built over the usable observations);
* query: :meth:`GeoPrior.query` of every query (blocks of 65,536 rows, ``workers=1``), against
  the bare ``cKDTree.query`` of the same points (the neighbour search alone: the ratio is what
  the counting and CSR rows add);
* brute force on a sample of queries (every distance to every observation, the formula in
  numpy): the rows must be equal, and the ratio is how much faster the tree is per query;
* nnz, entries per usable row, the rows' size in memory, and how often the true class is among
  a row's classes (a sanity figure of the estimator on this generated world);
* peak RSS above the generated data (``VmHWM`` after ``/proc/self/clear_refs``), and the whole
  process's peak;
* reading (``--read-images N``, default 270,000, a tenth of iNat 2021's; ``--read-only`` skips
  the rest): a generated iNat 2021-style training json (records like those of
  :mod:`benchmarks.json_read`) read by :func:`ensemble.formats.places.read_observations` and
  :func:`ensemble.formats.dataset.read_class_counts` (streaming, ijson) and by their json.loads
  paths, and by ``json.loads`` alone: each in a fresh process, wall and CPU time and peak RSS.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.rss import measure, proc_status
from weights_search.geo import GeoPrior, GeoSettings, points

N_CLASSES = 10_000
N_QUERIES = 600_000
#: Dense areas (lat, lon, spread in degrees) where most classes live, as iNat's observations do.
HOTSPOTS = np.array([(37, -120, 6), (41, -75, 6), (52, 0, 5), (48, 10, 6), (-33, 20, 5), (-35, 148, 6),
                     (20, -100, 7), (-41, 174, 4), (35, 138, 5), (-23, -46, 7)], dtype=np.float64)


def world(rng: np.random.Generator, n_classes: int) -> dict[str, np.ndarray]:
    """Each class's centre, range (km), seasonal peak day, seasonal spread (days; inf all year)."""
    hot = rng.random(n_classes) < 0.7
    spot = HOTSPOTS[rng.integers(0, len(HOTSPOTS), n_classes)]
    lat = np.where(hot, spot[:, 0] + spot[:, 2] * rng.standard_normal(n_classes), rng.uniform(-55, 70, n_classes))
    lon = np.where(hot, spot[:, 1] + spot[:, 2] * rng.standard_normal(n_classes), rng.uniform(-180, 180, n_classes))
    range_km = np.exp(rng.uniform(np.log(50), np.log(2000), n_classes))
    spread = np.where(rng.random(n_classes) < 1 / 3, np.inf, rng.uniform(15, 60, n_classes))
    return {"lat": np.clip(lat, -89, 89), "lon": (lon + 180) % 360 - 180, "range_km": range_km,
            "peak": rng.uniform(1, 366, n_classes), "spread": spread}


def draw(rng: np.random.Generator, classes: np.ndarray, w: dict[str, np.ndarray], dated: float,
         unplaced: float) -> dict[str, np.ndarray]:
    """Observations (or queries) of the given classes in the world ``w``."""
    n = classes.size
    sigma = w["range_km"][classes] / 111.2  # degrees of latitude
    lat = w["lat"][classes] + sigma * rng.standard_normal(n)
    lon = w["lon"][classes] + sigma / np.maximum(np.cos(np.radians(np.clip(lat, -85, 85))), 0.1) \
        * rng.standard_normal(n)
    lat = np.clip(lat, -90, 90)
    lon = (lon + 180) % 360 - 180
    spread = w["spread"][classes]
    day = np.where(np.isinf(spread), rng.uniform(1, 366, n),
                   w["peak"][classes] + np.where(np.isinf(spread), 0, spread) * rng.standard_normal(n))
    day = np.floor((day - 1) % 365) + 1
    day[rng.random(n) >= dated] = np.nan
    uncertainty = np.exp(rng.uniform(np.log(3), np.log(20_000), n))
    uncertainty[rng.random(n) < 0.3] = np.nan
    uncertainty[rng.random(n) < 0.01] = 250_000
    lat[rng.random(n) < unplaced] = np.nan
    return {"lat": lat, "lon": lon, "day": day, "uncertainty": uncertainty, "column": classes}


def brute_force(prior: GeoPrior, train: dict[str, np.ndarray], keep: np.ndarray, query: dict[str, np.ndarray],
                rows: np.ndarray) -> list[dict[int, float]]:
    """Each sampled query row's ``g'`` by every distance and the formula: ``{column: value}``."""
    s = prior.settings
    obs = points(train["lat"][keep], train["lon"][keep], train["day"][keep], s.time_scale)
    column = train["column"][keep]
    pi = np.bincount(column, minlength=N_CLASSES) / column.size
    out = []
    for n in rows.tolist():
        q = points(query["lat"][n:n + 1], query["lon"][n:n + 1], query["day"][n:n + 1], s.time_scale)
        distance = np.sqrt(((obs - q) ** 2).sum(axis=1))
        near = np.argpartition(distance, s.k)[:s.k]
        near = near[distance[near] <= s.radius_km]
        counts = np.bincount(column[near], minlength=N_CLASSES)
        seen = np.flatnonzero(counts)
        out.append(dict(zip(seen.tolist(), np.log1p(counts[seen] / (s.alpha * pi[seen])).tolist())))
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the observations and queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=100, help="queries checked by brute force")
    parser.add_argument("--read-images", type=int, default=None,
                        help="images of the training json read (default 270,000; 27,000 with --quick; 0: none)")
    parser.add_argument("--read-only", action="store_true", help="only the reading of the training json")
    parser.add_argument("--read-repeat", type=int, default=3, help="runs of each reader (best taken)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    if args.read_only:
        reading(args.read_images if args.read_images is not None else int(270_000 * scale), args.read_repeat)
        return
    rng = np.random.default_rng(args.seed)
    w = world(rng, N_CLASSES)
    per_class = rng.integers(200, 341, N_CLASSES)
    per_class = np.maximum(1, np.round(per_class * scale)).astype(np.int64)
    train = draw(rng, rng.permutation(np.repeat(np.arange(N_CLASSES), per_class)), w, dated=0.9, unplaced=0.0)
    n_queries = int(N_QUERIES * scale)
    query = draw(rng, rng.choice(N_CLASSES, n_queries, p=per_class / per_class.sum()), w, dated=0.9, unplaced=0.03)
    settings = GeoSettings()
    data_rss = proc_status("VmRSS")
    reset = _reset_peak()

    start = time.perf_counter()
    prior = GeoPrior.fit(train["lat"], train["lon"], train["day"], train["column"], N_CLASSES, settings,
                         uncertainty=train["uncertainty"])
    fit_s = time.perf_counter() - start
    fit_peak = proc_status("VmHWM")

    start = time.perf_counter()
    sparse = prior.query(query["lat"], query["lon"], query["day"], uncertainty=query["uncertainty"])
    query_s = time.perf_counter() - start
    peak = proc_status("VmHWM")

    usable = sparse.usable
    q_points = points(query["lat"][usable], query["lon"][usable], query["day"][usable], settings.time_scale)
    start = time.perf_counter()
    for first in range(0, q_points.shape[0], 1 << 16):
        prior.tree.query(q_points[first:first + (1 << 16)], k=np.arange(1, settings.k + 1),
                         distance_upper_bound=settings.radius_km)
    bare_s = time.perf_counter() - start
    del q_points

    sample = rng.choice(np.flatnonzero(usable), min(args.sample, int(usable.sum())), replace=False)
    keep = np.abs(train["uncertainty"]) <= settings.max_uncertainty_m
    keep |= np.isnan(train["uncertainty"])
    start = time.perf_counter()
    expected = brute_force(prior, train, keep, query, sample)
    brute_s = (time.perf_counter() - start) / sample.size
    worst, equal = 0.0, True
    for n, want in zip(sample.tolist(), expected):
        part = sparse.rows(n, n + 1)
        got = dict(zip(part.column.tolist(), part.value.tolist()))
        equal &= got.keys() == want.keys()
        if got.keys() == want.keys():
            worst = max([worst] + [abs(got[c] / want[c] - 1) for c in want])

    row = sparse.row_index()
    true_in_row = np.zeros(len(sparse), bool)
    true_in_row[row[sparse.column == query["column"][row]]] = True
    n_usable = int(usable.sum())
    nonempty = int((np.diff(sparse.indptr) > 0).sum())
    size = sparse.indptr.nbytes + sparse.column.nbytes + sparse.value.nbytes + sparse.usable.nbytes
    per_query_s = query_s / max(n_usable, 1)
    print(f"geo prior at {prior.n_used + prior.n_unplaced:,} observations ({prior.n_used:,} used, {prior.n_dated:,} "
          f"dated; {prior.n_unplaced:,} beyond the uncertainty limit), {N_CLASSES:,} classes, {n_queries:,} queries "
          f"({n_usable:,} with a usable place); settings {settings.as_dict()}; workers=1")
    print(f"  fit (cKDTree build): {fit_s:.2f} s")
    print(f"  query: {query_s:.2f} s ({per_query_s * 1e6:.1f} us per usable row); bare cKDTree.query of the same "
          f"points: {bare_s:.2f} s -> query / bare = {query_s / bare_s:.2f}x")
    print(f"  brute force on {sample.size} rows: {brute_s * 1e3:.1f} ms per row -> the tree is "
          f"{brute_s / per_query_s:,.0f}x faster per row; rows {'equal' if equal else 'DIFFER'} "
          f"(largest relative difference {worst:.1e})")
    print(f"  nnz {sparse.nnz:,} ({sparse.nnz / max(n_usable, 1):.1f} per usable row; {nonempty:,} rows non-empty); "
          f"rows in memory {size / 2**20:.0f} MiB; true class among a row's classes: "
          f"{true_in_row[usable].mean():.1%} of usable rows")
    base = f" above the generated data ({data_rss / 2**30:.2f} GiB)" if reset else " (peak not reset: whole process)"
    print(f"  peak RSS{base}: fit {(fit_peak - data_rss * reset) / 2**30:.2f} GiB, fit + query "
          f"{(peak - data_rss * reset) / 2**30:.2f} GiB; whole process now {proc_status('VmRSS') / 2**30:.2f} GiB")

    n_images = args.read_images if args.read_images is not None else int(270_000 * scale)
    if n_images:
        reading(n_images, args.read_repeat)


#: The readers of the training json timed by ``--read-images``, each in a process of its own:
#: (name, statement run on ``path``, the baseline it is compared with).
READERS = [
    ("read + json.loads alone", "json.loads(path.read_bytes())", None),
    ("read_observations, json.loads path", "places._loaded_observations(path, '--geo-prior')", None),
    ("read_observations (streaming)", "places.read_observations(path)", "read_observations, json.loads path"),
    ("class counts, json.loads path", "dataset.coco_counts(dataset.read_json(path), 'x')", None),
    ("read_class_counts (streaming)", "dataset.read_class_counts(path)", "class counts, json.loads path"),
]
CHILD = """
import json, sys
from pathlib import Path
from ensemble.formats import dataset, places
path = Path(sys.argv[1])
{statement}
"""


def write_train_json(path: Path, n_images: int, seed: int = 0) -> None:
    """An iNat 2021-style training json of ``n_images`` images, one annotation each (the records
    of :func:`benchmarks.json_read.make_split`), written 100,000 records at a time."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        fh.write('{"info": {"year": 2021, "version": "2021"}, "images": [')
        for start in range(0, n_images, 100_000):
            n = min(100_000, n_images - start)
            lat, lon = rng.uniform(-60, 70, n).round(5), rng.uniform(-180, 180, n).round(5)
            day, unc, c = rng.integers(1, 28, n), rng.integers(5, 500, n), rng.integers(0, 10_000, n)
            fh.write(("," if start else "") + ",".join(
                f'{{"id": {start + i}, "width": 800, "height": 600, "file_name": "train/{c[i]:05d}_Plantae/'
                f'{start + i:032x}.jpg", "license": "http://creativecommons.org/licenses/by-nc/4.0/", '
                f'"rights_holder": "Ken-ichi Ueda", "date": "2018-05-{day[i]:02d} 12:03:00+00:00", '
                f'"latitude": {lat[i]}, "longitude": {lon[i]}, "location_uncertainty": {unc[i]}}}' for i in range(n)))
        rng = np.random.default_rng(seed)
        fh.write('], "categories": [' + ", ".join(
            f'{{"id": {k}, "name": "Species {k}", "supercategory": "Plants"}}' for k in range(10_000)))
        fh.write('], "annotations": [')
        for start in range(0, n_images, 100_000):
            n = min(100_000, n_images - start)
            c = rng.integers(0, 10_000, n)
            fh.write(("," if start else "") + ",".join(
                f'{{"id": {start + i}, "image_id": {start + i}, "category_id": {c[i]}}}' for i in range(n)))
        fh.write("]}")


def _child(statement: str, path: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of ``statement`` in a
    fresh interpreter (its own peak, as its parent sees it at its end: :func:`benchmarks.rss.measure`)."""
    import sys

    start = time.perf_counter()
    done = measure([sys.executable, "-c", CHILD.format(statement=statement), path])
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{statement}: exit {done.returncode}\n{done.stderr.strip()}")
    return wall, done.cpu_seconds, done.peak_kb * 1024


def reading(n_images: int, repeat: int = 3) -> None:
    """The readers of the training json (:data:`READERS`), each in a fresh process, in turns,
    best of ``repeat`` (wall and CPU apart); peak RSS above an interpreter that imports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        write_train_json(path, n_images)
        size = path.stat().st_size
        _, _, base = _child("pass", path)
        best = {name: (float("inf"), float("inf"), 0) for name, _, _ in READERS}
        for _ in range(repeat):
            for name, statement, _ in READERS:
                wall, cpu, peak = _child(statement, path)
                old = best[name]
                best[name] = (min(old[0], wall), min(old[1], cpu), max(old[2], peak))
    print(f"  reading a {size / 1e6:,.0f} MB training json ({n_images:,} images and annotations), each reader in a "
          f"fresh process, best of {repeat}; peak RSS above the interpreter and imports ({base / 2**20:.0f} MiB):")
    for name, _, baseline in READERS:
        wall, cpu, peak = best[name]
        versus = (f"; vs {baseline}: {wall / best[baseline][0]:.2f}x wall, {cpu / best[baseline][1]:.2f}x CPU, "
                  f"{(peak - base) / max(best[baseline][2] - base, 1):.2f}x memory") if baseline else ""
        print(f"    {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak {(peak - base) / 2**20:,.0f} MiB{versus}")


if __name__ == "__main__":
    main()
