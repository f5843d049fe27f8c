"""``ens blend --geo-prior TRAIN_JSON [--geo-weight auto|FLOAT]``: the geo prior of a blend.

The estimator (:mod:`weights_search.geo`) is fitted on the training json's observations
(:func:`ensemble.formats.places.read_observations`), mapped to the models' class columns; each
split's rows get their sparse ``g'`` from their places (:func:`ensemble.formats.places.read_places`,
in store row order). The weight ``beta`` is fitted in the CV (:func:`weights_search.cross_validate_and_fit`)
and the applied split's fused blocks get ``beta g'`` before their top-k (:func:`apply_geo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.blend import BlendRecord, GeoCorrection, counted, shown_path
from ensemble.formats.places import read_observations, read_places
from weights_search.geo import GeoPrior, GeoSettings, SparseGeo
from weights_search.geo_fit import GEO_BOUNDS


def geo_weight(text: str | None) -> float | None:
    """``--geo-weight``: None to fit beta (``auto``, the default), else the number given."""
    if text is None or text == "auto":
        return None
    low, high = GEO_BOUNDS
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not low <= weight <= high:
        raise EnsError(f"--geo-weight {text}: expected auto or a number from {low:g} (off) to {high:g} "
                       "(1: the Bayes combination p(y | image) p(y | place) / p(y))")
    return weight


@dataclass
class GeoSource:
    """The geo prior fitted on a training json: the estimator, where it came from, what it used."""

    prior: GeoPrior
    path: Path
    sha256: str
    skipped: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def record(self, weight: float | None, beta: float, no_place: dict[str, int]) -> GeoCorrection:
        """blend.json's ``geo`` for this prior, ``weight`` (None: fitted) and ``beta``."""
        return GeoCorrection(file=str(self.path), sha256=self.sha256, used=self.prior.n_used, skipped=dict(self.skipped),
                             settings=self.prior.settings.as_dict(), weight="auto" if weight is None else float(weight),
                             beta=float(beta), no_place=dict(no_place))


def fit_geo_prior(path: Path, class_ids: Sequence[int | str], settings: GeoSettings = GeoSettings(),
                  option: str = "--geo-prior") -> GeoSource:
    """The estimator of the training json at ``path`` over the models' classes ``class_ids``
    (an observation of a category no model predicts is skipped and counted); an
    :class:`EnsError` naming ``option`` and the file when the json holds no usable observation."""
    observations = read_observations(path, option)
    try:
        prior = GeoPrior.fit(observations.lat, observations.lon, observations.day, observations.columns(class_ids),
                             len(class_ids), settings, uncertainty=observations.uncertainty)
    except ValueError as exc:
        raise EnsError(f"{option} {path}: {exc} (the models predict {counted(len(class_ids), 'category', 'categories')})"
                       ) from None
    counts = observations.counts
    skipped = {"no place": counts.no_place, "bad value": counts.bad_value,
               "location uncertainty beyond the limit": prior.n_unplaced, "category no model predicts": prior.n_other}
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in skipped.items() if n)
    note = (f"{option} {shown_path(observations.source)}: {counted(prior.n_used, 'observation')} of "
            f"{counted(int((prior.class_counts > 0).sum()), 'category', 'categories')} used "
            f"({prior.n_dated:,} with a date), {sum(skipped.values()):,} skipped" + (f" ({reasons})" if reasons else "")
            + (f"; first bad value: {counts.first_bad}" if counts.first_bad else ""))
    return GeoSource(prior=prior, path=Path(path), sha256=observations.sha256, skipped=skipped, notes=[note])


def split_geo(source: GeoSource, json_path: Path, split: Any) -> tuple[SparseGeo, int, list[str]]:
    """``g'`` of ``split``'s rows (a :class:`~ensemble.blend.stores.BlendSplit`, in its store row
    order) from the places in ``json_path``; the rows without a usable place and a note counting
    them (none when every row has one). An :class:`EnsError` when no row has one."""
    places = read_places(json_path, split.ids, "--geo-prior:")
    if places.sha256 == source.sha256:
        raise EnsError(f"--geo-prior {shown_path(source.path)}: is the {split.name} json itself; its images' own labels "
                       "would be in the prior (each image its own nearest observation), and the CV's estimate would "
                       "be no estimate: give the training json")
    sparse = source.prior.query(places.lat, places.lon, places.day, places.usable, uncertainty=places.uncertainty)
    rows = len(places)
    no_place = int((~sparse.usable).sum())
    if rows and no_place == rows:
        raise EnsError(f"{shown_path(json_path)}: none of the {split.name} split's {rows:,} images has a usable place "
                       f"({places.counts.summary()}); the geo prior needs jsons whose images carry latitude and "
                       "longitude (iNat 2021's)")
    notes = []
    if no_place:
        beyond = no_place - (places.counts.no_place + places.counts.bad_value)
        notes.append(f"{split.name}: {no_place:,} of {rows:,} images have no usable place and get no geo correction "
                     f"({places.counts.summary()}" + (f"; {beyond:,} with a location uncertainty beyond "
                                                      f"{source.prior.settings.max_uncertainty_m:g} m" if beyond else "")
                     + ")")
    return sparse, no_place, notes


def saved_geo(saved: BlendRecord, weights: Path, given: Path | None, class_ids: Sequence[int | str]) -> GeoSource | None:
    """The geo prior of a saved blend, fitted again from its training json (``given``: where it
    is now, ``--geo-prior``; else the path recorded), which must have the recorded sha256; the
    recorded settings. None for a blend without one (``given`` is then refused)."""
    geo = saved.geo
    if geo is None:
        if given is not None:
            raise EnsError(f"--weights {weights}: was fitted without the geo prior, so --geo-prior {given} has no "
                           "weight to apply; fit again with --optimize SPLIT --geo-prior TRAIN_JSON")
        return None
    path = Path(given) if given is not None else Path(geo.file)
    fix = (f"pass --geo-prior with the training json it was fitted on (sha256 {geo.sha256[:12]}...), or fit again "
           "with --optimize")
    if not path.is_file():
        raise EnsError(f"--weights {weights}: its geo prior's training json {shown_path(path)} is not there; {fix}")
    if sha256_file(path) != geo.sha256:
        raise EnsError(f"--weights {weights}: its geo prior was fitted on another training json than "
                       f"{shown_path(path)} (its sha256 differs from the recorded one); {fix}")
    try:
        settings = geo.geo_settings()
    except ValueError as exc:  # the record's checks passed: not expected
        raise EnsError(f"--weights {weights}: field 'geo.settings': {exc}") from None
    source = fit_geo_prior(path, class_ids, settings, "--geo-prior" if given is not None else f"--weights {weights}: geo prior")
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


def geo_cv_note(report: Any, method: str) -> list[str]:
    """A note when the blend with the geo prior does not beat it without on CV."""
    kind = "uniform" if method == "uniform" else "method"
    with_geo, plain = report.row(kind, report.prior, True), report.row(kind, report.prior, False)
    if with_geo is None or (with_geo.top1, -with_geo.nll) > (plain.top1, -plain.nll):
        return []
    return [f"{with_geo.name} does not beat {plain.name} on {report.n_folds}-fold CV (top-1 {with_geo.top1:.4f} vs "
            f"{plain.top1:.4f}); the geo prior is applied with beta {report.geo_beta:.3f} as --geo-prior asks: "
            "leave it out to blend without it"]
