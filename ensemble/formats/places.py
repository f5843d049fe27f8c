"""Where and when each image was taken: the place and date fields of iNat 2021 jsons, the one
reader of them (``ens blend --geo-prior``).

From iNat 2021 on, every image record of ``train.json``, ``val.json`` and ``public_test.json``
carries ``latitude`` and ``longitude`` (degrees), ``date`` (text, e.g.
``"2010-04-27 00:00:00+00:00"`` or ``"2016-05-03"``) and ``location_uncertainty`` (metres); any
of them may be ``null`` (or absent, as in older jsons). Two readers:

* :func:`read_observations`: the training json's annotated images, each with its category id:
  the observations the geo prior is estimated from (:class:`Observations`); read streaming
  (:mod:`ensemble.formats.stream_json`), about 170 bytes an image (0.46 GiB at iNat 2021's
  2.7 M) where json.loads of the whole file took 1.8 KB (docs/benchmarks.md);
* :func:`read_places`: a split json's images in the row order of a store (:class:`Places`).

The one fit of the geo prior from the observations, `ens blend`'s and `ens report`'s alike
(:func:`fit_prior`), with the images of the split it scores left out (:func:`among`: blend.json's
``geo.left_out``).

What a value may be, the one rule of both (:func:`_fields`):

* ``latitude``, ``longitude``, ``location_uncertainty``: a JSON number or ``null``. A value of
  another type (text such as ``"12.5"``, ``true``, a list) means the file is not what its fields
  say: an :class:`EnsError` naming the file, the image id, the field and the value, whatever
  the split. A number that cannot be a place (a latitude beyond [-90, 90], a longitude beyond
  [-180, 180], ``NaN`` or ``Infinity``, a negative uncertainty) is a *bad value*: the image
  has no usable place, is counted (with the first such image named, for the notes) and is
  skipped: dropped from the observations of the training json, given no correction in a split.
  One broken record among 2.7 M should not stop a run, and the count keeps it from being silent.
  A ``null`` latitude or longitude (either) is *no place*, counted apart.
* ``date``: text or ``null``; another type is an :class:`EnsError` as above. The day of year
  is read from a calendar date at the start of the text, ``YYYY-MM-DD`` (``/`` also taken as
  the separator); what follows it (a time, a UTC offset) is ignored, so the day is the one
  written, not shifted to UTC (a day's shift changes nothing at a season's scale). Text
  that does not start with a calendar date (``"2010-02-30"``, ``"April 2010"``, ``""``) is an
  *unreadable date*: the image keeps its place, its day is unknown (NaN), and it is counted.
  Dates are optional: an unknown day is no reason to drop a place.

Arrays: ``lat``, ``lon`` float64 (NaN where there is no usable place), ``day`` float32 (day of
year 1..366, NaN unknown), ``uncertainty`` float32 (metres, NaN not given). The limit on the
uncertainty is the estimator's setting (:class:`weights_search.geo.GeoSettings`), applied there.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ensemble.errors import EnsError
from ensemble.formats.common import is_id, read_json_bytes
from ensemble.formats.dataset import INT64_MAX, INT64_MIN, _labels, category_id, check_regular_file, shown
from ensemble.formats.stream_json import NeedsLoads, grown, records, trusted
from weights_search.geo import GeoPrior, GeoSettings

#: The fields of an iNat 2021 image record that hold its place and date.
LATITUDE, LONGITUDE, DATE, UNCERTAINTY = "latitude", "longitude", "date", "location_uncertainty"
#: A calendar date at the start of a date's text (what follows it is not read).
_DATE = r"(?a)^\s*(\d{4})[-/](\d{1,2})[-/](\d{1,2})(?!\d)"


@dataclass(frozen=True)
class PlaceCounts:
    """How many images of a json had what, for the notes.

    ``images``: the images read (the annotated ones of a training json, the rows of a split);
    ``no_place``: a null or absent latitude or longitude; ``bad_value``: a coordinate out of
    range or not finite, or a negative or non-finite uncertainty (``first_bad``: the first such,
    ``image <id>: <field> <value>``); ``no_date``: a null or absent date; ``bad_date``: a date
    whose text is not a calendar date (``first_bad_date`` names the first). An image without a
    usable place is counted once, under ``no_place`` or ``bad_value``; the date counts are of the
    images with a usable place.
    """

    images: int
    no_place: int
    bad_value: int
    no_date: int
    bad_date: int
    first_bad: str | None = None
    first_bad_date: str | None = None

    @property
    def placed(self) -> int:
        """Images with a usable place."""
        return self.images - self.no_place - self.bad_value

    def summary(self) -> str:
        """One line for the notes, e.g. ``100 images: 97 with a place (2 without one; 1 with a bad
        value, first image 7: latitude 200), 90 with a date (5 without one; 2 unreadable, first
        image 9: "May 2010")``."""
        unplaced = [f"{self.no_place:,} without one"] if self.no_place else []
        if self.bad_value:
            unplaced.append(f"{self.bad_value:,} with a bad value, first {self.first_bad}")
        undated = [f"{self.no_date:,} without one"] if self.no_date else []
        if self.bad_date:
            undated.append(f"{self.bad_date:,} unreadable, first {self.first_bad_date}")
        dated = self.placed - self.no_date - self.bad_date
        return (f"{self.images:,} images: {self.placed:,} with a place"
                + (f" ({'; '.join(unplaced)})" if unplaced else "")
                + f", {dated:,} of them with a date" + (f" ({'; '.join(undated)})" if undated else ""))


@dataclass(frozen=True)
class Observations:
    """The training json's annotated images with a usable place, in the json's image order.

    ``lat``, ``lon`` ``(n,)`` float64; ``day`` ``(n,)`` float32 (1..366, NaN unknown);
    ``uncertainty`` ``(n,)`` float32 (metres, NaN not given); ``category`` ``(n,)`` the category
    ids (:func:`ensemble.formats.dataset.category_id`; int64 when all are integers, else object).
    ``image_id`` ``(n,)`` each observation's image id (int64 when all are integers, else
    object): a caller leaves out the images of a split it scores (`ens blend` the fitted
    split's). ``counts``: of the annotated images (one category each; an image with none, or
    with annotations of two categories, is no observation: ``unlabelled``). ``sha256``: the
    file's bytes. An image id twice in the json is an :class:`EnsError` naming it (a place
    would get another image's label).
    """

    source: Path
    sha256: str
    lat: np.ndarray
    lon: np.ndarray
    day: np.ndarray
    uncertainty: np.ndarray
    category: np.ndarray
    counts: PlaceCounts
    unlabelled: int
    image_id: np.ndarray

    def __len__(self) -> int:
        return self.lat.size

    @property
    def skipped(self) -> dict[str, int]:
        """The annotated images not among the observations, by reason (for a record's notes)."""
        return {"no place": self.counts.no_place, "bad value": self.counts.bad_value}

    def columns(self, class_ids: Sequence[int | str]) -> np.ndarray:
        """``(n,)`` int64: each observation's column among ``class_ids`` (the models' classes, read
        by the one rule), -1 for a category the models do not predict."""
        column = {c: j for j, c in enumerate(class_ids)}
        return np.fromiter((column.get(c, -1) for c in self.category.tolist()), dtype=np.int64,
                           count=self.category.size)


def among(ids: np.ndarray, wanted: Any) -> np.ndarray:
    """``(n,)`` bool: which of the image ``ids`` (:attr:`Observations.image_id`) are among
    ``wanted`` (ids as the jsons hold them: an integer 5 is not the text "5")."""
    wanted = np.asarray(wanted)
    if not ids.size or not wanted.size:
        return np.zeros(ids.size, bool)
    if ids.dtype == np.int64:  # only integers can match, in bulk
        if wanted.dtype.kind not in "iu":
            wanted = np.array([i for i in wanted.tolist() if type(i) is int and -2 ** 63 <= i < 2 ** 63], np.int64)
        return np.isin(ids, wanted)
    keys = {(type(i) is str, i) for i in wanted.tolist()}
    return np.fromiter(((type(i) is str, i) in keys for i in ids.tolist()), bool, count=ids.size)


def fit_prior(observations: Observations, columns: np.ndarray, n_classes: int, settings: GeoSettings,
              out: np.ndarray | None = None) -> GeoPrior:
    """The geo prior's estimator (:meth:`weights_search.geo.GeoPrior.fit`) of ``observations``
    (``columns``: each one's class column, :meth:`Observations.columns`) but those ``out``
    (``(n,)`` bool, :func:`among`: the images of the split the prior is scored on, each its own
    nearest observation otherwise). The one fit: `ens blend` fits with it, and `ens report`
    fits the blend's again with blend.json's ``geo.left_out``. ValueError as ``GeoPrior.fit``."""
    keep = slice(None) if out is None or not out.any() else ~out
    return GeoPrior.fit(observations.lat[keep], observations.lon[keep], observations.day[keep], columns[keep],
                        n_classes, settings, uncertainty=observations.uncertainty[keep])


@dataclass(frozen=True)
class Places:
    """A split json's images in the order of the ids asked for (a store's rows).

    ``lat``, ``lon`` ``(N,)`` float64 (NaN where unusable), ``day`` ``(N,)`` float32,
    ``uncertainty`` ``(N,)`` float32, ``usable`` ``(N,)`` bool (a place to correct by; the
    uncertainty's limit is the estimator's to apply); ``counts`` over the N rows.
    """

    source: Path
    sha256: str
    lat: np.ndarray
    lon: np.ndarray
    day: np.ndarray
    uncertainty: np.ndarray
    usable: np.ndarray
    counts: PlaceCounts

    def __len__(self) -> int:
        return self.lat.size


def _read(path: str | os.PathLike, option: str) -> tuple[Path, list, dict, str]:
    path = check_regular_file(path, option)
    label = f"{option} {path}" if option else str(path)
    doc, data = read_json_bytes(path, label)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise EnsError(f"{label}: no \"images\" list (expected an iNat 2021 json)")
    ids = [image.get("id") if type(image) is dict else None for image in images]
    if not set(map(type, ids)) <= {int, str}:  # is_id's rule, for all at once (a bool is no id)
        for i, image_id in enumerate(ids):
            if not is_id(image_id):
                raise EnsError(f"{label}: images[{i}] has no \"id\" (an integer or a string)")
    return path, images, doc, hashlib.sha256(data).hexdigest()


def read_observations(path: str | os.PathLike, option: str = "--geo-prior") -> Observations:
    """The observations of the training json at ``path`` (see the module docstring for what each
    value may be). An :class:`EnsError` (starting ``<option> <path>``) when the file is no json
    of images, has no annotations, or no annotated image has a usable place.

    Read streaming (:mod:`ensemble.formats.stream_json`: the annotations, then the images, in
    bounded memory), or whole by json.loads where the streaming parser could read the file
    otherwise; both give the same observations and the same messages."""
    path = check_regular_file(path, option)
    label = f"{option} {path}" if option else str(path)
    try:
        return _streamed_observations(path, label)
    except NeedsLoads:
        return _loaded_observations(path, option)


def _loaded_observations(path: Path, option: str) -> Observations:
    """:func:`read_observations` of the whole document, parsed by json.loads."""
    path, images, doc, sha256 = _read(path, option)
    label = f"{option} {path}" if option else str(path)
    ids = [image["id"] for image in images]
    labels = _labels(doc, ids, path, single=False)
    if labels is None:
        raise EnsError(f"{label}: no annotations (a test split?); give the training json, whose annotated images "
                       "are the observations")
    keep = [i for i, category in enumerate(labels) if category is not None]
    for i in keep if not set(map(type, (labels[i] for i in keep))) <= {int, str} else ():
        if not is_id(labels[i]):
            raise EnsError(f"{label}: image {shown(ids[i])} is labelled {shown(labels[i])}; expected an integer or "
                           "a string category id")
    fields, counts = _fields([images[i] for i in keep], label)
    image_ids = _id_array(ids)
    _check_unique(image_ids, label)
    if not keep:
        categories: dict = {}
        for a in doc["annotations"]:
            if isinstance(a, dict) and is_id(a.get("image_id")):
                raw = a.get("category_id")
                categories.setdefault(a["image_id"], set()).add(category_id(raw) or shown(raw))
        _no_single_category(sum(len(categories.get(i, ())) > 1 for i in ids), label)
    return _observations(path, sha256, fields, counts, [labels[i] for i in keep], len(images) - len(keep), label,
                         image_ids[np.array(keep, dtype=np.int64)])


def _id_array(ids: list) -> np.ndarray:
    """``(n,)`` image ids: int64 when all are integers that fit, else an object array of them."""
    if set(map(type, ids)) <= {int} and (not ids or (INT64_MIN <= min(ids) and max(ids) <= INT64_MAX)):
        return np.array(ids, dtype=np.int64)
    array = np.empty(len(ids), dtype=object)
    array[:] = ids
    return array


def _check_unique(ids: np.ndarray, label: str) -> None:
    """An :class:`EnsError` naming the first image id (in file order) that an image before it
    already has: its place would get another image's label."""
    if ids.dtype == np.int64:
        order = np.argsort(ids, kind="stable")
        again = order[1:][ids[order[1:]] == ids[order[:-1]]]
        if again.size:
            raise EnsError(f"{label}: duplicate image id {shown(int(ids[again.min()]))}")
        return
    seen: set = set()
    for image_id in ids.tolist():
        if image_id in seen:
            raise EnsError(f"{label}: duplicate image id {shown(image_id)}")
        seen.add(image_id)


def _no_single_category(several: int, label: str) -> None:
    """The one line for a training json none of whose images has exactly one category."""
    raise EnsError(f"{label}: no image is annotated with exactly one category ("
                   + (f"{several:,} have several" if several else "its annotations name none of its images")
                   + "); the geo prior's observations are images with one category each")


def _observations(path: Path, sha256: str, fields: dict[str, np.ndarray], counts: PlaceCounts,
                  labels: Sequence[Any] | np.ndarray, unlabelled: int, label: str,
                  ids: np.ndarray) -> Observations:
    """The :class:`Observations` of the annotated images' ``fields``, ``labels`` and ``ids``."""
    placed = np.flatnonzero(fields["usable"])
    if placed.size == 0:
        raise EnsError(f"{label}: no annotated image has a usable latitude and longitude ({counts.summary()}); "
                       "the geo prior needs iNat 2021's training json, whose images carry them")
    if isinstance(labels, np.ndarray):
        category = labels[placed]
    else:
        categories = [labels[i] for i in placed.tolist()]
        try:
            category = np.array(categories, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):  # string ids, or integers beyond int64
            category = np.array(categories, dtype=object)
    image_id = ids[placed]
    return Observations(source=path, sha256=sha256, lat=fields["lat"][placed], lon=fields["lon"][placed],
                        day=fields["day"][placed], uncertainty=fields["uncertainty"][placed], category=category,
                        counts=counts, unlabelled=unlabelled, image_id=image_id)


class _Labels:
    """Each image's category from the annotations streamed by, as
    :func:`ensemble.formats.dataset._labels` gives them (``single=False``): integer image and
    category ids in int64 arrays grown by doubling; from the first annotation with another id
    (a string, an integer beyond int64, a value that is no id) on, in dicts as ``_labels`` keeps
    them. ``problem``: the message of the first annotation that lacks a field."""

    def __init__(self, path: Path):
        self.path = path
        self.n = 0
        self.image = np.empty(0, np.int64)
        self.category = np.empty(0, np.int64)
        self.by_image: dict | None = None  # the dicts, once an id is no int64
        self.several: set = set()
        self.problem: str | None = None

    def add(self, annotations: list) -> None:
        start, self.n = self.n, self.n + len(annotations)
        if self.problem is not None:
            return
        try:
            images = [a["image_id"] for a in annotations]
            categories = [a["category_id"] for a in annotations]
            whole = all(a.__class__ is dict for a in annotations)
        except (KeyError, TypeError, IndexError):
            whole = False
        if not whole:
            for i, a in enumerate(annotations, start):
                if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
                    self.problem = f"{self.path}: annotations[{i}] lacks \"image_id\" or \"category_id\""
                    return
        if self.by_image is None and set(map(type, images)) | set(map(type, categories)) <= {int}:
            try:
                image, category = np.array(images, np.int64), np.array(categories, np.int64)
            except OverflowError:
                pass
            else:
                used = start
                self.image, self.category = grown(self.image, used, image.size), grown(self.category, used, image.size)
                self.image[used:used + image.size], self.category[used:used + image.size] = image, category
                return
        if self.by_image is None:
            self._to_dicts(start)
        by_image, several = self.by_image, self.several
        for image, raw in zip(images, categories):
            category = category_id(raw)
            category = raw if category is None else category
            if not is_id(image):
                continue
            if image in by_image and by_image[image] != category:
                several.add(image)
            by_image.setdefault(image, category)

    def _to_dicts(self, used: int) -> None:
        self.by_image = {}
        for image, category in zip(self.image[:used].tolist(), self.category[:used].tolist()):
            if image in self.by_image and self.by_image[image] != category:
                self.several.add(image)
            self.by_image.setdefault(image, category)
        self.image = self.category = np.empty(0, np.int64)

    def finish(self) -> None:
        """Group the int64 annotations by image: each image's first category, and whether another follows."""
        if self.by_image is not None:
            return
        image, category = self.image[:self.n], self.category[:self.n]
        order = np.argsort(image, kind="stable")  # file order within an image
        image, category = image[order], category[order]
        starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]]) if image.size else np.zeros(0, np.int64)
        self.ids, self.first = image[starts], category[starts]
        other = category != np.repeat(self.first, np.diff(np.r_[starts, image.size]))
        self.mixed = np.logical_or.reduceat(other, starts) if starts.size else np.zeros(0, bool)
        self.image = self.category = np.empty(0, np.int64)

    def of(self, ids: list) -> tuple[np.ndarray, list | np.ndarray]:
        """``(n,)`` bool: the images ``ids`` with one category, and their categories (int64 or a list)."""
        if self.by_image is not None:
            labels = [None if i in self.several else self.by_image.get(i) for i in ids]
            keep = np.fromiter((label is not None for label in labels), bool, count=len(labels))
            return keep, [label for label in labels if label is not None]
        if set(map(type, ids)) <= {int}:
            try:
                wanted = np.array(ids, np.int64)
            except OverflowError:
                wanted = None
        else:
            wanted = None
        if wanted is None:  # strings or integers beyond int64: no int64 annotation names them
            wanted = np.array([i if type(i) is int and INT64_MIN <= i <= INT64_MAX else 0 for i in ids], np.int64)
            named = np.array([type(i) is int and INT64_MIN <= i <= INT64_MAX for i in ids], bool)
        else:
            named = np.ones(wanted.size, bool)
        at = np.minimum(np.searchsorted(self.ids, wanted), max(self.ids.size - 1, 0))
        keep = named & (self.ids.size > 0)
        if self.ids.size:
            keep &= (self.ids[at] == wanted) & ~self.mixed[at]
        return keep, self.first[at[keep]] if self.ids.size else np.zeros(0, np.int64)


def _streamed_observations(path: Path, label: str) -> Observations:
    """:func:`read_observations` streaming: the annotations (the file checked on the way, its
    sha256), then the images, :data:`~ensemble.formats.stream_json.RECORDS` at a time. The
    messages are raised in the order the json.loads path raises them."""
    labels = _Labels(path)
    annotations = records(path, "annotations.item", label, scan=True)
    scan = next(annotations)
    for batch in annotations:
        labels.add(batch)
    if not trusted(scan, "annotations", "images") or labels.n == 0:
        raise NeedsLoads  # no annotations, or not a list: json.loads's path words it
    labels.finish()
    parts: list[tuple[dict[str, np.ndarray], PlaceCounts]] = []
    kept: list = []
    kept_ids: list[np.ndarray] = []  # the kept images' ids, a part per batch
    all_ids: list[np.ndarray] = []  # every image's id, a part per batch (:func:`_id_array`), for the duplicate check
    problem: str | None = None  # the first image labelled with no id, or with a value of the wrong type
    field_problems: list[str | None] = [None] * 4
    n_images = n_kept = 0
    for images in records(path, "images.item", label):
        ids = [image.get("id") if type(image) is dict else None for image in images]
        if not set(map(type, ids)) <= {int, str}:
            for i, image_id in enumerate(ids, n_images):
                if not is_id(image_id):
                    raise EnsError(f"{label}: images[{i}] has no \"id\" (an integer or a string)")
        n_images += len(images)
        all_ids.append(_id_array(ids))
        if labels.problem is not None or problem is not None:
            continue  # only the ids are checked now: a message of theirs comes first
        keep, categories = labels.of(ids)
        if not isinstance(categories, np.ndarray) and not set(map(type, categories)) <= {int, str}:
            which = np.flatnonzero(keep)
            for i, category in zip(which.tolist(), categories):
                if not is_id(category):
                    problem = (f"{label}: image {shown(ids[i])} is labelled {shown(category)}; expected an integer "
                               "or a string category id")
                    break
        fields, counts, problems = _part([images[i] for i in np.flatnonzero(keep).tolist()], label)
        field_problems = [old if old is not None else new for old, new in zip(field_problems, problems)]
        if any(p is not None for p in problems):
            parts.clear()
            kept.clear()
            kept_ids.clear()
        elif not any(p is not None for p in field_problems):
            parts.append((fields, counts))
            kept.append(categories)
            kept_ids.append(all_ids[-1][keep])
        n_kept += int(keep.sum())
    if n_images == 0:
        raise NeedsLoads  # no images, or "images" no list: json.loads's path words it
    for message in [labels.problem, problem, *field_problems]:
        if message is not None:
            raise EnsError(message)
    _check_unique(_joined(all_ids), label)
    del all_ids
    if n_kept == 0:
        _no_single_category(len(labels.several) if labels.by_image is not None else int(labels.mixed.sum()), label)
    if not parts:
        parts.append(_part([], label)[:2])
    fields = {key: np.concatenate([part[key] for part, _ in parts]) for key in ("lat", "lon", "day", "uncertainty",
                                                                               "usable")}
    counts = _merged([c for _, c in parts])
    categories = (np.concatenate(kept) if all(isinstance(c, np.ndarray) for c in kept)
                  else [c for part in kept for c in (part.tolist() if isinstance(part, np.ndarray) else part)])
    return _observations(path, scan.sha256.hexdigest(), fields, counts, categories, n_images - n_kept, label,
                         _joined(kept_ids))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The id arrays of :func:`_id_array` end to end: int64 when every part is, else objects (an
    int64 part's integers as Python integers, as the json holds them)."""
    if all(part.dtype == np.int64 for part in parts):
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    array = np.empty(sum(part.size for part in parts), dtype=object)
    at = 0
    for part in parts:
        array[at:at + part.size] = part.tolist()
        at += part.size
    return array


def _merged(counts: list[PlaceCounts]) -> PlaceCounts:
    """The counts of the parts of one json, in order."""
    first = lambda name: next((getattr(c, name) for c in counts if getattr(c, name) is not None), None)
    return PlaceCounts(images=sum(c.images for c in counts), no_place=sum(c.no_place for c in counts),
                       bad_value=sum(c.bad_value for c in counts), no_date=sum(c.no_date for c in counts),
                       bad_date=sum(c.bad_date for c in counts), first_bad=first("first_bad"),
                       first_bad_date=first("first_bad_date"))


def read_places(path: str | os.PathLike, ids: Sequence[int | str] | np.ndarray, option: str = "") -> Places:
    """The places of the images ``ids`` (a store's row ids, in row order) in the split json at
    ``path``. An :class:`EnsError` when the file is no json of images, repeats an image id, or
    lacks one of ``ids`` (the store was made from another split)."""
    path, images, _, sha256 = _read(path, option)
    label = f"{option} {path}" if option else str(path)
    where: dict = {}
    for i, image in enumerate(images):
        if where.setdefault(image["id"], i) != i:
            raise EnsError(f"{label}: duplicate image id {shown(image['id'])}")
    wanted = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    missing = [i for i in wanted if i not in where]
    if missing:
        raise EnsError(f"{label}: no image of id {shown(missing[0])}, a row of the store"
                       + (f" ({len(missing):,} such rows)" if len(missing) > 1 else "")
                       + "; was the store made from another split?")
    fields, counts = _fields([images[where[i]] for i in wanted], label)
    return Places(source=path, sha256=sha256, lat=fields["lat"], lon=fields["lon"], day=fields["day"],
                  uncertainty=fields["uncertainty"], usable=fields["usable"], counts=counts)


def _numbers(images: list, field: str, label: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """``(n,)`` float64 of a numeric field (NaN for null or absent), ``(n,)`` bool: null or
    absent (a ``NaN`` spelled in the file is a value, and a bad one), and the message naming the
    first image whose value is of another type (``None`` when there is none)."""
    values = [image.get(field) for image in images]
    if not set(map(type, values)) <= {int, float, type(None)}:  # a bool is no number
        for image, value in zip(images, values):
            if type(value) not in (int, float, type(None)):
                return (np.zeros(0), np.zeros(0, bool),
                        f"{label}: image {shown(image['id'])} has {field} {shown(value)}; expected a number or null")
    null = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    try:
        return np.array(values, dtype=np.float64), null, None  # None -> NaN
    except OverflowError:  # an integer beyond float64: not a place, a bad value
        return np.array([np.inf if isinstance(v, int) and abs(v) > 1e308 else v for v in values],
                        dtype=np.float64), null, None


def _day_of_year(images: list, label: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """``(n,)`` float32 day of year (NaN unknown), ``(n,)`` bool: a date given but unreadable,
    and the message naming the first image whose date is neither text nor null (or ``None``).

    iNat's own ``YYYY-MM-DD...`` is read from the text's first 11 characters as a numpy array
    of code points (about 20 times faster than a regular expression per date); the rest (another
    separator, one-digit months, leading blanks) by :data:`_DATE` through pandas. Both give the
    year, month and day to one calendar check (:func:`_calendar_day`)."""
    values = [image.get(DATE) for image in images]
    if not set(map(type, values)) <= {str, type(None)}:
        for image, value in zip(images, values):
            if not isinstance(value, (str, type(None))):
                return (np.zeros(0, np.float32), np.zeros(0, bool),
                        f"{label}: image {shown(image['id'])} has {DATE} {shown(value)}; expected text "
                        "(YYYY-MM-DD...) or null")
    given = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    head = np.array([v or "" for v in values], dtype="U11").view(np.uint32).reshape(len(values), 11)
    digit = (head >= ord("0")) & (head <= ord("9"))
    fast = (digit[:, [0, 1, 2, 3, 5, 6, 8, 9]].all(axis=1) & (head[:, 4] == ord("-")) & (head[:, 7] == ord("-"))
            & ~digit[:, 10])
    number = head.astype(np.int64) - ord("0")
    year = number[:, 0] * 1000 + number[:, 1] * 100 + number[:, 2] * 10 + number[:, 3]
    month = number[:, 5] * 10 + number[:, 6]
    day_of_month = number[:, 8] * 10 + number[:, 9]
    other = np.flatnonzero(given & ~fast)
    if other.size:
        parts = pd.Series([values[i] for i in other.tolist()], dtype=object).str.extract(_DATE)
        parts = parts.fillna("0").to_numpy(dtype=np.int64)
        year[other], month[other], day_of_month[other] = parts[:, 0], parts[:, 1], parts[:, 2]
    day = _calendar_day(year, month, day_of_month)
    day[~given] = np.nan
    return day, given & np.isnan(day), None


#: Days before each month's first in a year of 365 days.
_MONTH_START = np.array([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334])


def _calendar_day(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """``(n,)`` float32 day of year (1..366) of each (year, month, day) of the Gregorian calendar;
    NaN where it is no date (month 13, Feb 30, Feb 29 of a common year, day 0)."""
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    last = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month - 1, 0, 11)] + (leap & (month == 2))
    valid = (month >= 1) & (month <= 12) & (day >= 1) & (day <= last)
    number = _MONTH_START[np.clip(month - 1, 0, 11)] + day + (leap & (month > 2))
    return np.where(valid, number, np.nan).astype(np.float32)


def _fields(images: list, label: str) -> tuple[dict[str, np.ndarray], PlaceCounts]:
    """The place and date arrays of ``images`` (dicts with an ``id``) and their counts: the one
    rule of the module docstring."""
    fields, counts, problems = _part(images, label)
    for problem in problems:
        if problem is not None:
            raise EnsError(problem)
    return fields, counts


def _part(images: list, label: str) -> tuple[dict[str, np.ndarray], PlaceCounts, list[str | None]]:
    """:func:`_fields` of ``images``, a part of a json's: the arrays and counts, and the messages
    of a value of the wrong type, first image of each field (latitude, longitude, uncertainty,
    date: the order :func:`_fields` raises them in); the arrays are of no use when one is given."""
    lat, null_lat, bad_lat_type = _numbers(images, LATITUDE, label)
    lon, null_lon, bad_lon_type = _numbers(images, LONGITUDE, label)
    uncertainty, null_unc, bad_unc_type = _numbers(images, UNCERTAINTY, label)
    day, bad_date, bad_date_type = _day_of_year(images, label)
    problems = [bad_lat_type, bad_lon_type, bad_unc_type, bad_date_type]
    if any(problem is not None for problem in problems):
        return {}, PlaceCounts(0, 0, 0, 0, 0), problems
    no_place = null_lat | null_lon
    with np.errstate(invalid="ignore"):
        bad_lat = ~(np.abs(lat) <= 90)  # NaN too
        bad_lon = ~(np.abs(lon) <= 180)
        bad_unc = ~null_unc & ~((uncertainty >= 0) & np.isfinite(uncertainty))
    bad = (bad_lat | bad_lon | bad_unc) & ~no_place
    usable = ~no_place & ~bad
    first_bad = None
    if bad.any():
        n = int(np.flatnonzero(bad)[0])
        field = LATITUDE if bad_lat[n] else LONGITUDE if bad_lon[n] else UNCERTAINTY
        first_bad = f"image {shown(images[n]['id'])}: {field} {shown(images[n].get(field))}"
    bad_date &= usable
    first_bad_date = None
    if bad_date.any():
        n = int(np.flatnonzero(bad_date)[0])
        first_bad_date = f"image {shown(images[n]['id'])}: {shown(images[n].get(DATE))}"
    undated = usable & np.isnan(day) & ~bad_date
    counts = PlaceCounts(images=len(images), no_place=int(no_place.sum()), bad_value=int(bad.sum()),
                         no_date=int(undated.sum()), bad_date=int(bad_date.sum()), first_bad=first_bad,
                         first_bad_date=first_bad_date)
    lat, lon = np.where(usable, lat, np.nan), np.where(usable, lon, np.nan)
    day = np.where(usable, day, np.float32(np.nan)).astype(np.float32)
    with np.errstate(over="ignore"):  # an uncertainty beyond float32 is inf: beyond any limit
        uncertainty = uncertainty.astype(np.float32)
    return {"lat": lat, "lon": lon, "day": day, "uncertainty": uncertainty,
            "usable": usable}, counts, problems
