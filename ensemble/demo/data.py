"""A small competition in the exact iNat 2019 layout, from real images shipped with scikit-learn.

scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 10 classes) are each
drawn at a random place and scale (their box 60-85% of the side), in a random colour, on a
larger textured colour canvas and saved as JPEG, so that localisation and scale matter as they do for iNat photos::

    DIR/train_val2019/Digits/<category id>/<md5>.jpg     train and validation images
    DIR/test2019/<md5>.jpg                              test images
    DIR/train2019.json, val2019.json, test2019.json     COCO-style annotation files
    DIR/kaggle_sample_submission.csv                    id,predicted for every test image
    DIR_answers.csv (beside DIR, not in it)             id,category_id of the test images

Splits are by original digit image (no digit appears in two splits; each training digit is
drawn ``train_copies`` times, on different canvases); test labels go only to
the answers file, which only the demo's scoring reads. Category ids are ``CATEGORY_OFFSET +
digit`` rather than the bare output index, so the class mapping is exercised end to end.

Validation and test hold the same number of images of every digit, as iNat 2019's do; the
training split is long-tailed like iNat's (``DemoSpec.long_tail``): the digits, in a random
order, keep ever fewer training images, so models trained on it over-predict the common ones,
which ``ens blend --prior data/train2019.json`` corrects.

Every image record of train, val and test also carries the place and date fields of iNat 2021's
jsons (``latitude``, ``longitude``, ``date`` as ``"2016-05-03 00:00:00+00:00"``,
``location_uncertainty`` in metres; each may be null), drawn by :func:`draw_places` from
:data:`RANGES`: each digit lives in its own regions of the globe, as a species does (overlapping
ranges, some digits in both hemispheres, one region across the antimeridian, some digits seen
only in a season), which ``ens blend --geo-prior data/train2019.json`` uses. The files keep
their 2019 names and layout (the demo's submission is an iNat 2019 one); the 2021 fields are
what the geo prior reads, under any name. The places come from a generator of their own, so the
images (and the networks trained on them) do not depend on them.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ensemble.fileio import atomic_path, write_json_atomic
from weights_search.geo import EARTH_RADIUS_KM

CATEGORY_OFFSET = 100
ICONIC = "Digits"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the generated competition; the defaults make the demo, tests shrink them."""

    canvas: int = 96  #: side of the square canvas, pixels (real iNat photos: up to 800)
    val_per_class: int = 25
    test_per_class: int = 50
    train_per_class: int | None = None  #: None: every remaining digit (~100 per class)
    #: Photos per training digit, each on its own canvas: with one, a network memorises the
    #: backgrounds instead of learning the digits (iNat too has several photos per individual).
    train_copies: int = 3
    #: Side of the digit's 8x8 box, as a fraction of the canvas side: drawn at a random scale in
    #: this range (the strokes fill about three quarters of the box).
    digit_scale: tuple[float, float] = (0.6, 0.85)
    #: The training split's long tail: the k-th digit of a random order keeps ``long_tail ** k``
    #: of its training digits (at least one); 0.7 gives about 100 down to 4. None: balanced.
    long_tail: float | None = 0.7
    #: Fractions of images, in every split, whose record has no place (latitude and longitude
    #: null) and no date (date null), drawn independently, as in iNat 2021's jsons.
    no_place: float = 0.05
    no_date: float = 0.1
    #: Fraction of placed images whose location uncertainty is coarse (100-2,000 km, a place
    #: known to a country), beyond the geo prior's limit: those rows get no correction.
    coarse: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class Competition:
    root: Path  #: the data folder (``--data DIR``)
    answers: Path  #: id,category_id of the test images
    counts: dict[str, int]  #: images per split


@dataclass(frozen=True)
class Region:
    """Where (and when) a digit is seen: places within ``3 * spread_km`` of the centre on the
    sphere, their distance from it a Rayleigh draw of scale ``spread_km`` cut there; dates on days
    of the year ``season`` (first, last; wraps past new year) or all year when None."""

    name: str
    latitude: float
    longitude: float
    spread_km: float
    season: tuple[int, int] | None = None

    def contains_day(self, day: int) -> bool:
        if self.season is None:
            return True
        first, last = self.season
        return first <= day <= last if first <= last else day >= first or day <= last


#: Regions of the globe the digits live in (overlapping: most regions hold two or three digits).
_R = {
    "western Europe": (48.0, 5.0, 500), "Scandinavia": (62.0, 15.0, 450),
    "eastern North America": (40.0, -78.0, 600), "California": (37.0, -120.0, 450),
    "the Andes": (-15.0, -72.0, 500), "south-east Brazil": (-23.0, -47.0, 500),
    "East Africa": (-2.0, 36.0, 500), "southern Africa": (-29.0, 25.0, 500), "India": (21.0, 78.0, 600),
    "Japan": (36.0, 138.0, 450), "eastern Australia": (-30.0, 151.0, 500),
    "Fiji": (-17.0, 180.0, 400),  # across the antimeridian: longitudes near +180 and -180
    "New Zealand": (-41.0, 174.0, 400),
}
_SUMMER, _WINTER, _SOUTHERN_SPRING = (152, 243), (335, 59), (244, 334)  # days of the year
#: Each digit's regions; the seasons make two digits of one region apart in time.
RANGES: dict[int, tuple[Region, ...]] = {
    digit: tuple(Region(name, *_R[name], season) for name, season in regions)
    for digit, regions in {
        0: (("western Europe", None), ("south-east Brazil", None)),
        1: (("western Europe", None), ("eastern North America", None), ("India", None)),
        2: (("eastern North America", None), ("California", None)),
        3: (("Japan", None), ("Fiji", None)),
        4: (("East Africa", None), ("India", None)),
        5: (("eastern Australia", _SOUTHERN_SPRING), ("New Zealand", _SOUTHERN_SPRING)),
        6: (("Scandinavia", _SUMMER), ("southern Africa", None)),
        7: (("California", None), ("the Andes", None)),
        8: (("Fiji", None), ("New Zealand", None), ("eastern Australia", None)),
        9: (("Scandinavia", _WINTER), ("western Europe", _WINTER), ("the Andes", None)),
    }.items()
}


def _destination(lat: np.ndarray, lon: np.ndarray, distance_km: np.ndarray, bearing: np.ndarray):
    """Latitude and longitude (degrees, longitude in [-180, 180)) ``distance_km`` from
    (``lat``, ``lon``) along the great circle of ``bearing`` (radians from north)."""
    phi, lam, delta = np.radians(lat), np.radians(lon), distance_km / EARTH_RADIUS_KM
    phi2 = np.arcsin(np.sin(phi) * np.cos(delta) + np.cos(phi) * np.sin(delta) * np.cos(bearing))
    lam2 = lam + np.arctan2(np.sin(bearing) * np.sin(delta) * np.cos(phi),
                            np.cos(delta) - np.sin(phi) * np.sin(phi2))
    return np.degrees(phi2), (np.degrees(lam2) + 180.0) % 360.0 - 180.0


def great_circle_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Distance on the sphere (haversine), km."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def draw_places(digits: np.ndarray, spec: DemoSpec, rng: np.random.Generator) -> list[dict]:
    """The iNat 2021 place and date fields of one image per digit of ``digits``: a region of the
    digit's :data:`RANGES` (uniformly), a place around its centre, a date in its season (a year
    of 2010-2020); ``spec.no_place`` of them without a place, ``spec.no_date`` without a date.
    ``location_uncertainty``: metres, log-uniform from 5 m to 20 km, null for a tenth of the
    placed images, and coarse (log-uniform from 100 to 2,000 km) for ``spec.coarse`` of them."""
    for name in ("no_place", "no_date", "coarse"):
        if not 0 <= getattr(spec, name) <= 1:
            raise ValueError(f"{name} {getattr(spec, name)}: want a fraction in [0, 1]")
    n = len(digits)
    region = [RANGES[int(d)][int(rng.integers(len(RANGES[int(d)])))] for d in digits]
    spread = np.array([r.spread_km for r in region])
    # Rayleigh distance, inverse CDF cut at 3 spreads (so every place is within its region).
    u = rng.uniform(0.0, 1.0 - np.exp(-4.5), n)
    lat, lon = _destination(np.array([r.latitude for r in region]), np.array([r.longitude for r in region]),
                            spread * np.sqrt(-2 * np.log1p(-u)), rng.uniform(0, 2 * np.pi, n))
    year = rng.integers(2010, 2021, n)
    position = rng.uniform(0, 1, n)
    uncertainty = np.exp(rng.uniform(np.log(5), np.log(20_000), n)).round()
    no_uncertainty = rng.uniform(0, 1, n) < 0.1
    coarse = rng.uniform(0, 1, n) < spec.coarse
    uncertainty = np.where(coarse, np.exp(rng.uniform(np.log(100_000), np.log(2_000_000), n)).round(), uncertainty)
    no_place = rng.uniform(0, 1, n) < spec.no_place
    no_date = rng.uniform(0, 1, n) < spec.no_date
    fields = []
    for i, r in enumerate(region):
        first, last = r.season or (1, 365)
        span = (last - first) % 365 + 1
        day = (first - 1 + int(position[i] * span)) % 365 + 1
        date = dt.date(int(year[i]), 1, 1) + dt.timedelta(days=day - 1)
        fields.append({
            "latitude": None if no_place[i] else round(float(lat[i]), 5),
            "longitude": None if no_place[i] else round(float(lon[i]), 5),
            "location_uncertainty": None if no_place[i] or no_uncertainty[i] else int(uncertainty[i]),
            "date": None if no_date[i] else f"{date.isoformat()} 00:00:00+00:00",
        })
    return fields


def _split(labels: np.ndarray, spec: DemoSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Indices of the original digits per split, disjoint; val and test stratified by class, train
    long-tailed when ``spec.long_tail`` says so."""
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    digits = np.unique(labels)
    if spec.long_tail is not None and not 0 < spec.long_tail <= 1:
        raise ValueError(f"long_tail {spec.long_tail}: want a fraction in (0, 1]")
    rank = dict(zip(rng.permutation(digits).tolist(), range(digits.size)))
    for digit in digits:
        idx = rng.permutation(np.flatnonzero(labels == digit))
        val, test = idx[:spec.val_per_class], idx[spec.val_per_class:spec.val_per_class + spec.test_per_class]
        train = idx[spec.val_per_class + spec.test_per_class:]
        if spec.train_per_class is not None:
            train = train[:spec.train_per_class]
        if len(train) == 0:
            raise ValueError(f"digit {digit}: no images left for training; lower val/test per class")
        if spec.long_tail is not None:
            train = train[:max(1, round(len(train) * spec.long_tail ** rank[int(digit)]))]
        parts["val"] += val.tolist()
        parts["test"] += test.tolist()
        parts["train"] += train.tolist()
    return {name: np.sort(np.asarray(idx)) for name, idx in parts.items()}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colourful, blotchy background with some fine grain: float32 (size, size, 3) in 0..255."""
    coarse = rng.uniform(50, 205, (2, 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    blobs = rng.normal(0, 5, (size // 14, size // 14, 3))
    blobs = np.asarray(Image.fromarray(np.clip(blobs + 128, 0, 255).astype(np.uint8))
                       .resize((size, size), Image.BILINEAR), np.float32) - 128
    grain = rng.normal(0, 4, (size, size, 3))
    return np.clip(base + blobs + grain, 0, 255).astype(np.float32)


def render(digit: np.ndarray, rng: np.random.Generator, canvas: int,
           scale: tuple[float, float] = DemoSpec.digit_scale) -> Image.Image:
    """Draw one 8x8 digit (values 0..16) at a random place and scale on a textured canvas.

    ``scale`` bounds the side of the digit's box as a fraction of the canvas side.
    """
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"digit scale {scale}: want 0 < low <= high <= 1")
    side = int(rng.integers(round(canvas * low), round(canvas * high) + 1))
    mask = Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    mask = np.asarray(mask.filter(ImageFilter.GaussianBlur(side / 40)), np.float32)[..., None] / 255.0
    background = _texture(rng, canvas)
    y, x = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    patch = background[y:y + side, x:x + side]
    # Dark ink on a light patch, light ink on a dark one, tinted: visible, as a photo's subject is.
    light = patch.mean() < 128
    ink = np.clip((rng.uniform(200, 255) if light else rng.uniform(0, 55)) + rng.normal(0, 30, 3), 0, 255)
    background[y:y + side, x:x + side] = patch * (1 - mask) + ink * mask
    return Image.fromarray(background.round().astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _categories() -> list[dict]:
    return [{"id": CATEGORY_OFFSET + d, "name": f"digit {d}", "kingdom": "Digits", "phylum": "Arabic",
             "class": "Numeral", "order": "Decimal", "family": "Handwritten", "genus": "Digit"}
            for d in range(10)]


def make_competition(root: str | Path, spec: DemoSpec = DemoSpec()) -> Competition:
    """Write the competition under ``root`` (and ``answers.csv`` beside it); return where."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(spec.seed)
    splits = _split(digits.target, spec, rng)
    # The places' own generator: the images stay those of a competition without places.
    places_rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(1,)))
    info = {"description": "ens demo: scikit-learn digits drawn on textured canvases, iNat 2019 layout "
                           "with iNat 2021's place and date fields", "year": 2019}
    next_id = 0
    files: dict[str, list[tuple[dict, int]]] = {}
    for split in ("train", "val", "test"):
        rows = []
        copies = spec.train_copies if split == "train" else 1
        for index in np.repeat(splits[split], copies):
            label = int(digits.target[index])
            data = _jpeg(render(digits.images[index], rng, spec.canvas, spec.digit_scale))
            name = hashlib.md5(data).hexdigest() + ".jpg"
            rel = (f"test2019/{name}" if split == "test"
                   else f"train_val2019/{ICONIC}/{CATEGORY_OFFSET + label}/{name}")
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            image = {"id": next_id, "width": spec.canvas, "height": spec.canvas, "file_name": rel,
                     "license": 0, "rights_holder": "scikit-learn digits (UCI ML hand-written digits)"}
            rows.append((image, CATEGORY_OFFSET + label))
            next_id += 1
        for (image, _), place in zip(rows, draw_places(
                np.array([cat - CATEGORY_OFFSET for _, cat in rows]), spec, places_rng)):
            image.update(place)
        files[split] = rows

    licenses = [{"id": 0, "name": "BSD-3-Clause (scikit-learn)", "url": ""}]
    for split in ("train", "val"):
        write_json_atomic(root / f"{split}2019.json", {
            "info": info, "licenses": licenses, "categories": _categories(),
            "images": [image for image, _ in files[split]],
            "annotations": [{"id": image["id"], "image_id": image["id"], "category_id": cat}
                            for image, cat in files[split]],
        })
    write_json_atomic(root / "test2019.json", {"info": info, "licenses": licenses,
                                         "images": [image for image, _ in files["test"]]})
    with atomic_path(root / "kaggle_sample_submission.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "predicted"])
            for image, _ in files["test"]:
                writer.writerow([image["id"], " ".join(str(CATEGORY_OFFSET + d) for d in range(5))])
    answers = root.parent / f"{root.name}_answers.csv"
    with atomic_path(answers) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "category_id"])
            for image, cat in files["test"]:
                writer.writerow([image["id"], cat])
    return Competition(root=root, answers=answers, counts={k: len(v) for k, v in files.items()})
