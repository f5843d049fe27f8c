"""``ens blend --geo-prior TRAIN_JSON [--geo-weight auto|FLOAT]``: the geo prior of a blend.

The estimator (:mod:`weights_search.geo`) is fitted on the training json's observations
(:func:`ensemble.formats.places.read_observations`), mapped to the models' class columns; each
split's rows get their sparse ``g'`` from their places (:func:`ensemble.formats.places.read_places`,
in store row order: :func:`split_places`, read before any long work, then :func:`split_geo`).
The weight ``beta`` is fitted in the CV (:func:`weights_search.cross_validate_and_fit`) and the
applied split's fused blocks get ``beta g'`` before their top-k (:func:`apply_geo`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ensemble.errors import EnsError
from ensemble.formats.blend import BlendRecord, GeoCorrection, counted, shown_path
from ensemble.formats.common import auto_or_number
from ensemble.formats.dataset import check_regular_file, shown
from ensemble.formats.places import Observations, Places, fit_prior, read_observations, read_places
from ensemble.formats.places import among as _in  # noqa: F401 (the name the tests use)
from weights_search.geo import GeoPrior, GeoSettings, SparseGeo, usable_places
from weights_search.geo_fit import GEO_BOUNDS


def geo_weight(text: str | None) -> float | None:
    """``--geo-weight``: None to fit beta (``auto``, the default), else the number given."""
    low, high = GEO_BOUNDS
    return auto_or_number(text, GEO_BOUNDS, f"--geo-weight {text}: expected auto or a number from {low:g} (off) to "
                          f"{high:g} (1: the Bayes combination p(y | image) p(y | place) / p(y))")


@dataclass
class GeoSource:
    """The geo prior fitted on a training json: the estimator, where it came from (``path``:
    resolved, absolute), what it used and skipped."""

    prior: GeoPrior
    path: Path
    sha256: str
    skipped: dict[str, int]
    notes: list[str] = field(default_factory=list)
    left_out: tuple = ()  #: the image ids of the fitted split left out of the observations

    def record(self, weight: float | None, beta: float, no_place: dict[str, int],
               places: dict[str, dict[str, str]]) -> GeoCorrection:
        """blend.json's ``geo`` for this prior, ``weight`` (None: fitted) and ``beta``; ``places``:
        split -> the json its places were read from (``file``, ``sha256``)."""
        return GeoCorrection(file=str(self.path), sha256=self.sha256, used=self.prior.n_used, skipped=dict(self.skipped),
                             settings=self.prior.settings.as_dict(), weight="auto" if weight is None else float(weight),
                             beta=float(beta), no_place=dict(no_place), places=dict(places),
                             left_out=tuple(self.left_out) or None)


#: The reason ``skipped`` gives the training json's images that are rows of the fitted split.
FITTED_SPLIT = "of the fitted split"


def fit_geo_prior(path: Path, class_ids: Sequence[int | str], settings: GeoSettings = GeoSettings(),
                  option: str = "--geo-prior", observations: Observations | None = None, *,
                  fitted: Any = None, left_out: Sequence[int | str] = ()) -> GeoSource:
    """The estimator of the training json at ``path`` over the models' classes ``class_ids``
    (an observation of a category no model predicts is skipped and counted); ``observations``:
    the json already read. ``fitted``: the fitted split (a
    :class:`~ensemble.blend.stores.BlendSplit`), whose images in the training json (a merged
    train+val json, val saved again) are left out with a note: each would be its own nearest
    observation, and the CV would overstate the gain; ``left_out``: the image ids to leave out
    (a saved blend's record of them). An :class:`EnsError` naming ``option`` and the file when
    the json holds no usable observation, or when its category ids are not the models' (some of
    the models' categories have no observation while the json has categories no model predicts)."""
    if observations is None:
        observations = read_observations(path, option)
    label = f"{option} {shown_path(observations.source)}"
    if fitted is not None and observations.sha256 == fitted.stores[0].manifest.dataset.sha256:
        raise EnsError(_itself(observations.source, fitted.name))
    columns = observations.columns(class_ids)
    notes = _category_notes(observations, columns, class_ids, label)
    wanted = fitted.ids if fitted is not None else np.asarray(left_out, dtype=object)
    out = _in(observations.image_id, wanted)
    if fitted is not None and out.all():
        raise EnsError(f"{label}: each of its {out.size:,} observations is an image of the {fitted.name} split (its "
                       f"{fitted.name} json saved again?); the geo prior of the fitted images' own labels would make "
                       "the CV's estimate no estimate: give the training json")
    if out.any() and fitted is not None:
        first = shown(observations.image_id[out][:1].tolist()[0])
        notes.append(f"{int(out.sum()):,} images of the fitted split ({fitted.name}) are in the training json "
                     f"(first id {first}): left out of the geo prior so the CV stays honest")
    try:
        prior = fit_prior(observations, columns, len(class_ids), settings, out)
    except ValueError as exc:
        raise EnsError(f"{label}: {exc} (the models predict {counted(len(class_ids), 'category', 'categories')})"
                       ) from None
    counts = observations.counts
    n_out = int(out.sum())
    skipped = {"no place": counts.no_place, "bad value": counts.bad_value,
               "location uncertainty beyond the limit": prior.n_unplaced,
               "category no model predicts": prior.n_other}
    if n_out:
        skipped[FITTED_SPLIT] = n_out
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in skipped.items() if n)
    unlabelled = observations.unlabelled
    notes.insert(0, f"{label}: {counted(prior.n_used, 'observation')} of "
                    f"{counted(int((prior.class_counts > 0).sum()), 'category', 'categories')} used "
                    f"({prior.n_dated:,} with a date), {sum(skipped.values()):,} skipped"
                    + (f" ({reasons})" if reasons else "") + f"; of its {counts.summary()}"
                    + (f"; {unlabelled:,} more images without a single category (none, or several)" if unlabelled
                       else ""))
    return GeoSource(prior=prior, path=Path(os.path.abspath(observations.source)).resolve(), sha256=observations.sha256,
                     skipped=skipped, notes=notes, left_out=tuple(observations.image_id[out].tolist()))


def _category_notes(observations: Observations, columns: np.ndarray, class_ids: Sequence[int | str],
                    label: str) -> list[str]:
    """The training json's categories against the models' (``columns``: each observation's
    column, -1 for a category no model predicts), as :func:`ensemble.formats.blend.prior_counts`
    checks --prior's: an :class:`EnsError` when some of the models' categories have no
    observation AND the json has categories no model predicts (another id space); a note when
    only some have none."""
    seen = np.bincount(columns[columns >= 0], minlength=len(class_ids)) > 0
    n_missing = int((~seen).sum())
    if not n_missing:
        return []
    missing = _first([class_ids[j] for j in np.flatnonzero(~seen)[:5].tolist()], n_missing)
    of = f"{n_missing:,} of the {counted(len(class_ids), 'category', 'categories')} the models predict"
    other = columns < 0
    if other.any():
        extra = pd.unique(observations.category[other])
        raise EnsError(f"{label}: {of} have no observation ({missing}), and it has observations of "
                       f"{counted(extra.size, 'category', 'categories')} no model predicts "
                       f"({_first(extra[:5].tolist(), extra.size)}): its category ids are not the models' (were the "
                       "models exported with other --classes?)")
    return [f"{label}: {of} have no observation with a usable place ({missing}); the geo prior says nothing of "
            "them (no neighbour counts them)"]


def _first(values: Sequence[Any], total: int) -> str:
    """The ``values`` shown (the first few of ``total``), and how many more."""
    return ", ".join(map(str, values)) + (f" and {total - len(values):,} more" if total > len(values) else "")


def split_places(source: GeoSource, json_path: Path, split: Any) -> tuple[Places, list[str]]:
    """The places of ``split``'s rows (a :class:`~ensemble.blend.stores.BlendSplit`, in its store
    row order) in ``json_path``, and a note when that json is not the one the split's stores were
    made from (their manifests' ``dataset.sha256``), as :func:`ensemble.blend.checks.label_warnings`
    notes labels. Read before any long work: an :class:`EnsError` (``<split> json <path>: ...``)
    when the json is the training json itself, lacks a row's image, or places none of them."""
    places = read_places(json_path, split.ids, f"{split.name} json")
    if places.sha256 == source.sha256:
        raise EnsError(_itself(source.path, split.name))
    rows = len(places)
    if rows and not (places.usable & usable_places(places.lat, places.lon, places.uncertainty,
                                                   source.prior.settings)).any():
        raise EnsError(f"{split.name} json {shown_path(json_path)}: none of the {split.name} split's {rows:,} images has "
                       f"a usable place ({places.counts.summary()}" + _beyond(places, source) + "); the geo prior needs "
                       "jsons whose images carry latitude and longitude (iNat 2021's)")
    recorded = split.stores[0].manifest.dataset
    if not str(recorded.source or "").endswith(".json") or recorded.sha256 is None or recorded.sha256 == places.sha256:
        return places, []
    return places, [f"the places of the {split.name} images are read from {shown_path(json_path)} (sha256 "
                    f"{places.sha256[:12]}...), not from the json the {split.name} stores were made from, "
                    f"{shown_path(recorded.source)} (sha256 {str(recorded.sha256)[:12]}...); check that it places the "
                    "same images"]


def _itself(path: Path, split: str) -> str:
    return (f"--geo-prior {shown_path(path)}: is the {split} json itself; its images' own labels would be in the prior "
            "(each image its own nearest observation), and the CV's estimate would be no estimate: give the training "
            "json")


def _beyond(places: Places, source: GeoSource) -> str:
    """``; N with a location uncertainty beyond L m`` for the rows of ``places`` with a place
    that the estimator's limit leaves without one; empty when there are none."""
    limit = source.prior.settings.max_uncertainty_m
    with np.errstate(invalid="ignore"):
        beyond = int((places.usable & (places.uncertainty > limit)).sum())
    return f"; {beyond:,} with a location uncertainty beyond {limit:g} m" if beyond else ""


def split_geo(source: GeoSource, places: Places, split: Any) -> tuple[SparseGeo, int, list[str]]:
    """``g'`` of ``split``'s rows from their ``places`` (:func:`split_places`); the rows without a
    usable place and a note counting them (none when every row has one)."""
    sparse = source.prior.query(places.lat, places.lon, places.day, places.usable, uncertainty=places.uncertainty)
    rows = len(places)
    no_place = int((~sparse.usable).sum())
    notes = []
    if no_place:
        notes.append(f"{split.name}: {no_place:,} of {rows:,} images have no usable place and get no geo correction "
                     f"({places.counts.summary()}" + _beyond(places, source) + ")")
    return sparse, no_place, notes


def places_record(places: Places) -> dict[str, str]:
    """A split's entry of blend.json's ``geo.places``: the json its places were read from."""
    return {"file": str(Path(os.path.abspath(places.source)).resolve()), "sha256": places.sha256}


def saved_geo(saved: BlendRecord, weights: Path, given: Path | None, class_ids: Sequence[int | str]) -> GeoSource | None:
    """The geo prior of a saved blend, fitted again from its training json (``given``: where it
    is now, ``--geo-prior``; else the path recorded), which must have the recorded sha256 (read
    once: the sha256 of the bytes parsed); the recorded settings, and the recorded images of the
    fitted split left out. None for a blend without one (``given`` is then refused)."""
    geo = saved.geo
    if geo is None:
        if given is not None:
            raise EnsError(f"--weights {weights}: was fitted without the geo prior, so --geo-prior {given} has no "
                           "weight to apply; fit again with --optimize SPLIT --geo-prior TRAIN_JSON")
        return None
    path = Path(given) if given is not None else Path(geo.file)
    option = "--geo-prior" if given is not None else f"--weights {weights}: geo prior"
    fix = (f"pass --geo-prior with the training json it was fitted on (sha256 {geo.sha256[:12]}...), or fit again "
           "with --optimize")
    if given is None and not os.path.lexists(path):
        raise EnsError(f"--weights {weights}: its geo prior's training json {shown_path(path)} is not there; {fix}")
    check_regular_file(path, option)
    observations = read_observations(path, option)
    if observations.sha256 != geo.sha256:
        raise EnsError(f"--weights {weights}: its geo prior was fitted on another training json than "
                       f"{shown_path(path)} (its sha256 differs from the recorded one); {fix}")
    try:
        settings = geo.geo_settings()
    except ValueError as exc:  # the record's checks passed: not expected
        raise EnsError(f"--weights {weights}: field 'geo.settings': {exc}") from None
    source = fit_geo_prior(path, class_ids, settings, option, observations, left_out=geo.left_out or ())
    if source.prior.n_used != geo.used:
        raise EnsError(f"--weights {weights}: its geo prior used {geo.used:,} observations of {shown_path(path)}, now "
                       f"{source.prior.n_used:,} (other class ids?); {fix}")
    return source


def apply_geo(sparse: SparseGeo, log_q: np.ndarray, start: int, beta: float) -> np.ndarray | None:
    """Add ``beta g'`` in place to the fused block ``log_q`` ``(n, C)`` (rows ``start:start + n``
    of ``sparse``) for its top-k; returns the ``(n, 1)`` float32 factor ``1 / (1 + sum_S q (e^(beta
    g') - 1))`` that makes the exponentials of its values ``q'`` (see
    :mod:`weights_search.geo_fit`), or None when nothing changed."""
    n = log_q.shape[0]
    if not beta:
        return None
    part = sparse.rows(start, start + n)
    if not part.nnz:
        return None
    rows = part.row_index()
    q = np.exp(log_q[rows, part.column].astype(np.float64))
    excess = np.bincount(rows, weights=q * np.expm1(beta * part.value.astype(np.float64)), minlength=n)
    sparse.apply(log_q, start, beta)
    return (1.0 / (1.0 + excess)).astype(np.float32)[:, None]


def geo_cv_note(report: Any, method: str, given: bool = False) -> list[str]:
    """A note when the blend with the geo prior does not beat it without on CV (none when its
    weight was given: ``--geo-weight FLOAT`` is asked for as it is)."""
    if given:
        return []
    kind = "uniform" if method == "uniform" else "method"
    with_geo, plain = report.row(kind, report.prior, True), report.row(kind, report.prior, False)
    if with_geo is None or (with_geo.top1, -with_geo.nll) > (plain.top1, -plain.nll):
        return []
    return [f"{with_geo.name} does not beat {plain.name} on {report.n_folds}-fold CV (top-1 {with_geo.top1:.4f} vs "
            f"{plain.top1:.4f}); the geo prior is applied with beta {report.geo_beta:.3f} as --geo-prior asks: "
            "leave it out to blend without it"]
