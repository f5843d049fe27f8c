"""The blend record, ``blend.json``: what `ens blend` fitted, and everything needed to apply it
again and to check what it is applied to. This module is its one reader, checker and writer.

Keys, in the order `ens blend` writes them::

    format              3 (absent in the oldest records: 1)
    ens                 the version that wrote it
    method              the method used; requested_method: the one asked for (they differ when
                        fallback, --fallback uniform, replaced it)
    fusion              mixture or geometric; params: the method's parameters
    models, members     the models, and the members weighted (models, or model/view with views)
    weights             member -> weight, in member order; temperatures: member -> T, or null
    train_score         the method's objective on the fitted rows
    class_ids           the category id of each output column
    optimize            the fitted split: split, rows, stores (model -> sha256 of its arrays)
    labels              the label file of the fitted split; stores: as optimize's
    runs                the absolute, resolved path of the --runs folder `ens blend` read the
                        stores from (for a re-applied blend: the applied split's); absent in
                        older records, and not an absolute path free of control characters
                        (a hand edit): None
    provenance          model -> what made its stores (:data:`PROVENANCE_FIELDS`)
    prior               the long-tail prior correction: file, sha256, counts (one per class id),
                        zero_count, tau, tau_fitted; or null
    geo                 the geo prior (`ens blend --geo-prior`, :class:`GeoCorrection`): file,
                        sha256, used, skipped, settings, weight, beta, no_place, places,
                        left_out; absent without one (and then the record is format 3, which an
                        older ens applies alike)
    cv                  the cross-validated table: folds, top_k, temperature, prior, fold_taus,
                        (with the geo prior: geo, fold_betas), chosen, beats_uniform, rows ({name,
                        kind, top1, top1_low, top1_high, topk, nll, prior, and geo in its rows})
    applied_from        the blend.json a re-applied blend came from (`ens blend --weights`)
    apply               the applied split, as optimize, and two keys more (absent in older
                        records: None): dataset_sha256, the sha256 of the split's source (the
                        applied stores' manifest dataset.sha256, the same in every model's
                        store), and predictions_sha256, the sha256 of the predictions.csv this
                        blend wrote beside it

:class:`BlendRecord` is the record, read with every check of an applicable blend
(:meth:`BlendRecord.read`) and written back to the same bytes; :meth:`BlendRecord.check_fitted`
adds what `ens report` needs. :class:`BlendSummary` is the part a submission records in the
ledger; `ens submit` reads it from any blend.json that holds a method, members and weights
(a hand-made one too). The helpers at the end read the stores as a blend does (member arrays,
digests, provenance): the blend stage, the report and the demo share them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

import weights_search as ws
from ensemble.errors import EnsError, printable
from ensemble.fileio import json_text
from ensemble.formats.common import is_count, is_finite, is_id, is_int, is_names, is_number, is_sha256, read_json
from ensemble.formats.store import IDS, LOGITS, VIEWS, LogitStore
from weights_search import geo as ws_geo
from weights_search.geo_fit import GEO_BOUNDS

BLEND_FILE = "blend.json"


#: 2: per-model provenance, checked against every applied store; 3: the prior correction (an older
#: ens would apply a blend.json without it, silently); 4: the geo prior (written only by a blend
#: with one: :func:`record_format`, so that a blend without it stays readable by an ens of 3).
FORMAT_VERSION = 4


def record_format(geo: bool) -> int:
    """The format a blend.json is written in: 4 with the geo prior (an ens of format 3 would apply
    it without its correction, silently: it refuses a newer format), 3 without."""
    return FORMAT_VERSION if geo else 3


#: The fields two stores of one member must share (``manifest.json`` keys), as the error names
#: them. The stored dtype may differ: float16 and float32 stores of one run blend alike.
PROVENANCE_FIELDS = {
    "model_sha256": "model file sha256",
    "input_size": "input size",
    "resize": "resize policy",
    "crop_pct": "crop fraction",
    "mean": "mean",
    "std": "std",
    "interpolation": "interpolation",
    "views": "TTA views",
    "merge": "TTA merge",
    "cam": "cam view settings",
    "pixels": "pixel pipeline version",
}


#: Fields a record of an older ens may lack, and what they read as then (older stores had no
#: cam view, and their pixels were version 1).
_LATER_FIELDS = {"cam": None, "pixels": 1}


#: Rows per block a blend fits and fuses at most, whatever --memory allows (larger blocks buy no speed).
CHUNK_ROWS = 2048


# -------------------------------------------------------------------------------- JSON objects
# Every record below is one JSON object. Besides its typed fields it keeps ``json_keys``, the keys
# the object holds in their order (None: the writer's order, for a record made by this ens), and
# ``kept``, the values of keys this ens does not know or cannot read (a hand edit), as they were:
# a blend.json read and written back (`ens blend --weights` does) keeps its bytes.

_META = ("json_keys", "kept")


def _freeze(value: Any) -> Any:
    """A JSON value with its lists made tuples (a frozen record holds no list)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _thaw(value: Any) -> Any:
    """The JSON value of a field: records as objects, tuples as lists."""
    if isinstance(value, _Json):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


class _Json:
    """A record of one JSON object (see above); subclasses are frozen dataclasses whose fields
    are named as the keys, in the writer's order, followed by ``json_keys`` and ``kept``."""

    json_keys: tuple[str, ...] | None
    kept: Mapping[str, Any]
    #: Keys the writer leaves out while their field is None.
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _META)

    def to_json(self) -> dict[str, Any]:
        keys = self.json_keys
        if keys is None:
            keys = tuple(k for k in self._names() if not (k in self._OPTIONAL and getattr(self, k) is None))
        return {k: self.kept[k] if k in self.kept else _thaw(getattr(self, k)) for k in keys}

    def _with(self, **changes: Any):
        """A copy with ``changes``; a key the object did not hold is added after the others."""
        keys = self.json_keys
        if keys is not None:
            keys = keys + tuple(k for k in changes if k not in keys)
        kept = {k: v for k, v in self.kept.items() if k not in changes}
        return dataclasses.replace(self, **changes, json_keys=keys, kept=kept)


def _split(doc: Mapping[str, Any], readers: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The typed values of ``doc``'s keys that ``readers`` (key -> value -> typed value or
    :data:`_UNREAD`) can read, and the other keys' values as they are."""
    typed, kept = {}, {}
    for key, value in doc.items():
        read = readers.get(key)
        out = _UNREAD if read is None else read(value)
        if out is _UNREAD:
            kept[key] = value
        else:
            typed[key] = out
    return typed, kept


_UNREAD = object()


def _when(test, convert=_freeze):
    return lambda value: convert(value) if test(value) else _UNREAD


def _nullable(test, convert=_freeze):
    return lambda value: None if value is None else (convert(value) if test(value) else _UNREAD)


def _any(value: Any) -> Any:
    return _freeze(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_folder(value: Any) -> bool:
    """An absolute path without control characters, as `ens blend` writes ``runs``: anything
    else (a hand edit, a hostile file) is never used, nor echoed to a terminal."""
    return (isinstance(value, str) and os.path.isabs(value)
            and not any(unicodedata.category(c) == "Cc" for c in value))


# ------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class ModelProvenance(_Json):
    """What made a model's stores (:data:`PROVENANCE_FIELDS`): two stores blend together only
    when these agree. Lists are tuples; ``cam`` and ``pixels`` read as None and 1 in a record
    of an ens that did not write them."""

    model_sha256: str
    input_size: Any
    resize: str
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    views: tuple[str, ...]
    merge: str
    cam: Mapping[str, float] | None = None
    pixels: int = 1
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of_store(cls, store: LogitStore) -> "ModelProvenance":
        """What made ``store``'s logits: the model file's sha256, its preprocessing, the version
        of the pixel pipeline, and the TTA views (their names carry the scales) and merge."""
        manifest = store.manifest
        model, tta = manifest.model, manifest.tta
        # Stores of an older ens lack the interpolation (bilinear then) and the cam view.
        return cls(model_sha256=model.sha256, input_size=model.input_size, resize=model.resize,
                   crop_pct=model.crop_pct, mean=tuple(model.mean), std=tuple(model.std),
                   interpolation=model.interpolation or "bilinear", views=tuple(tta.views),
                   merge=tta.merge, cam=_freeze(None if tta.cam is None else dict(tta.cam)), pixels=manifest.pixels)

    @classmethod
    def _from_json(cls, doc: Any) -> "ModelProvenance | None":
        """None when ``doc`` lacks a field an ens of format 2 always wrote."""
        if not isinstance(doc, dict) or any(k not in doc for k in PROVENANCE_FIELDS if k not in _LATER_FIELDS):
            return None
        typed, kept = _split(doc, {k: _any for k in PROVENANCE_FIELDS})
        return cls(**typed, json_keys=tuple(doc), kept=kept)


@dataclass(frozen=True)
class SplitStores(_Json):
    """A split the blend was fitted on (``optimize``) or applied to (``apply``): its name, its
    rows and the sha256 of each model's store arrays (:func:`store_digest`). An applied split
    also records ``dataset_sha256``, the sha256 of the split's source that its stores' manifests
    record (``dataset.sha256``), and ``predictions_sha256``, the sha256 of the predictions.csv
    written from it; None in older records, and where the value is not a sha256 (a hand edit,
    kept as it was)."""

    split: str
    rows: int
    stores: Mapping[str, str]
    dataset_sha256: str | None = None
    predictions_sha256: str | None = None
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"dataset_sha256", "predictions_sha256"})

    @classmethod
    def _from_json(cls, doc: Any) -> "SplitStores | None":
        if not (isinstance(doc, dict) and isinstance(doc.get("split"), str) and is_int(doc.get("rows"))
                and isinstance(doc.get("stores"), dict)):
            return None
        typed, kept = _split(doc, {"split": _any, "rows": _any, "stores": _any,
                                   "dataset_sha256": _when(is_sha256), "predictions_sha256": _when(is_sha256)})
        return cls(**typed, json_keys=tuple(doc), kept=kept)


@dataclass(frozen=True)
class PriorCorrection(_Json):
    """The long-tail prior correction: the training ``counts`` of each class id (``zero_count``
    standing for a count of 0), ``tau`` (fitted with the weights when ``tau_fitted``), and the
    prior file with its sha256."""

    file: str | None
    sha256: str | None
    counts: tuple[int, ...]
    zero_count: float
    tau: float
    tau_fitted: bool | None
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def log_prior(self) -> np.ndarray:
        """``(C,)`` float64 log-prior of the counts (:func:`weights_search.class_log_prior`)."""
        return ws.class_log_prior(list(self.counts), self.zero_count)

    @classmethod
    def _from_json(cls, doc: Any, class_ids: Any) -> "PriorCorrection | None":
        if not isinstance(doc, dict) or not isinstance(class_ids, list):
            return None
        counts = doc.get("counts")
        low, high = ws.TAU_BOUNDS
        if not (isinstance(counts, list) and len(counts) == len(class_ids) and all(map(is_count, counts))
                and is_finite(doc.get("zero_count")) and doc["zero_count"] > 0
                and is_finite(doc.get("tau")) and low <= doc["tau"] <= high):
            return None
        typed, kept = _split(doc, {k: _any for k in ("file", "sha256", "counts", "zero_count", "tau", "tau_fitted")})
        values = dict.fromkeys(("file", "sha256", "tau_fitted")) | typed
        return cls(**values, json_keys=tuple(doc), kept=kept)


@dataclass(frozen=True)
class GeoCorrection(_Json):
    """The geo prior (`ens blend --geo-prior`, :mod:`weights_search.geo`): the training json it
    was estimated from (``file``, as given, and its ``sha256``), the observations ``used`` and
    those ``skipped`` (reason -> count, as :func:`ensemble.formats.places.read_observations`
    counts them), the estimator's ``settings`` (:class:`weights_search.geo.GeoSettings` as JSON,
    ``inf`` as ``"inf"``), ``weight``: ``"auto"`` (``beta`` fitted on the fitted split, in the
    CV) or the number given, ``beta``: the weight applied (in
    :data:`weights_search.geo_fit.GEO_BOUNDS`), ``no_place``: split -> its rows without a
    usable place (no correction), and ``places``: split -> the json its rows' places were read
    from (``file``, resolved and absolute, and ``sha256``; absent in the records of an older ens:
    None). ``file`` is the resolved, absolute path of the training json `ens blend` read.
    ``left_out``: the image ids of the fitted split that are in the training json too, left out
    of the observations (absent when there are none)."""

    file: str
    sha256: str
    used: int
    skipped: Mapping[str, int]
    settings: Mapping[str, Any]
    weight: str | float
    beta: float
    no_place: Mapping[str, int]
    places: Mapping[str, Mapping[str, str]] | None = None
    left_out: tuple[int | str, ...] | None = None
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def fitted(self) -> bool:
        """Whether ``beta`` was fitted (``--geo-weight auto``)."""
        return self.weight == "auto"

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def geo_settings(self) -> ws_geo.GeoSettings:
        """The estimator's settings as :mod:`weights_search.geo` takes them."""
        return ws_geo.GeoSettings.from_dict(dict(self.settings))

    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"places", "left_out"})

    def with_split(self, split: str, rows: int, places: Mapping[str, str]) -> "GeoCorrection":
        """This record with ``split``'s rows without a usable place and the json its places were
        read from (each added after the others)."""
        return self._with(no_place={**self.no_place, split: int(rows)}, places={**(self.places or {}), split: places})

    @classmethod
    def problem(cls, doc: Any) -> str | None:
        """None when ``doc`` is a geo record as `ens blend` writes it; else ``"KEY: expected
        WHAT"`` for its first key at fault (``""`` when it is no JSON object)."""
        if not isinstance(doc, dict):
            return ""
        low, high = GEO_BOUNDS
        in_range = f"a number from {low:g} to {high:g}"

        def counts(value: Any) -> bool:
            return isinstance(value, dict) and all(isinstance(k, str) and is_count(v) for k, v in value.items())

        def settings(value: Any) -> bool:
            if not (isinstance(value, dict) and all(is_number(v) or v == "inf" for v in value.values())):
                return False
            try:
                ws_geo.GeoSettings.from_dict(value)
            except (TypeError, ValueError):
                return False
            return True

        def sources(value: Any) -> bool:
            return isinstance(value, dict) and all(
                isinstance(v, dict) and set(v) == {"file", "sha256"} and isinstance(v["file"], str)
                and is_sha256(v["sha256"]) for v in value.values())

        weight = doc.get("weight")
        checks = (
            ("file", isinstance(doc.get("file"), str), "the training json's path"),
            ("sha256", is_sha256(doc.get("sha256")), "the training json's sha256"),
            ("used", is_count(doc.get("used")), "a count of observations"),
            ("skipped", counts(doc.get("skipped")), "an object reason -> count"),
            ("settings", settings(doc.get("settings")), "the settings of weights_search.geo.GeoSettings"),
            ("weight", weight == "auto" or (is_finite(weight) and low <= weight <= high), f"auto or {in_range}"),
            ("beta", is_finite(doc.get("beta")) and low <= doc["beta"] <= high
             and (weight == "auto" or weight == doc["beta"]), f"{in_range}, the weight when a number was given"),
            ("no_place", counts(doc.get("no_place")), "an object split -> count"),
            ("places", "places" not in doc or sources(doc["places"]), "an object split -> {file, sha256}"),
            ("left_out", "left_out" not in doc or (isinstance(doc["left_out"], list) and all(
                is_id(i) for i in doc["left_out"])), "a list of image ids"),
        )
        return next((f"{key}: expected {expected}" for key, valid, expected in checks if not valid), None)

    @classmethod
    def _from_json(cls, doc: Any) -> "GeoCorrection | None":
        if doc is None or cls.problem(doc) is not None:
            return None
        typed, kept = _split(doc, {k: _any for k in ("file", "sha256", "used", "skipped", "settings", "weight",
                                                      "beta", "no_place", "places", "left_out")})
        return cls(**typed, json_keys=tuple(doc), kept=kept)


@dataclass(frozen=True)
class CvRow(_Json):
    """One row of the cross-validated table (:class:`weights_search.CvRow`); ``geo``: with the
    geo prior (None, and not written, in a table without it)."""

    name: str
    kind: str
    top1: float
    top1_low: float
    top1_high: float
    topk: float
    nll: float
    prior: bool = False
    geo: bool | None = None
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    _NUMBERS: ClassVar[tuple[str, ...]] = ("top1", "top1_low", "top1_high", "topk", "nll")
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"geo"})

    @classmethod
    def of(cls, row: ws.CvRow, geo: bool = False) -> "CvRow":
        """The row of ``row``; ``geo``: its table has rows with the geo prior (each row says then
        whether it is one)."""
        values = dataclasses.asdict(row)
        values["geo"] = bool(values.get("geo")) if geo else None
        return cls(**values)

    @classmethod
    def _from_json(cls, doc: Any) -> "CvRow | None":
        if not (isinstance(doc, dict) and isinstance(doc.get("name"), str) and isinstance(doc.get("kind"), str)
                and all(is_number(doc.get(k)) for k in cls._NUMBERS)):
            return None
        typed, kept = _split(doc, {"name": _any, "kind": _any, **{k: _any for k in cls._NUMBERS},
                                   "prior": _when(_is_bool), "geo": _when(_is_bool)})
        return cls(**typed, json_keys=tuple(doc), kept=kept)


@dataclass(frozen=True)
class CvTable(_Json):
    """The cross-validated table `ens blend` prints: ``folds``, top-``top_k``, whether
    temperatures and the prior were fitted per fold (``fold_taus``: the method's tau in each),
    the row in use (``chosen``) and whether the method beat uniform weights. With the geo prior:
    ``geo`` true and ``fold_betas``, the ``beta`` of the chosen blend's geo row in each fold
    (both None, and not written, without it)."""

    folds: int
    top_k: int
    temperature: bool
    prior: bool
    fold_taus: tuple[float, ...]
    chosen: str
    beats_uniform: bool
    rows: tuple[CvRow, ...]
    geo: bool | None = None
    fold_betas: tuple[float, ...] | None = None
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"geo", "fold_betas"})

    @classmethod
    def of(cls, report: ws.CvReport, chosen: str, fold_betas: Sequence[float] | None = None) -> "CvTable":
        """The table of ``report``; ``fold_betas``: with the geo prior, the chosen blend's beta in
        each fold (None without it)."""
        geo = fold_betas is not None
        return cls(folds=report.n_folds, top_k=report.top_k, temperature=report.temperature, prior=report.prior,
                   fold_taus=tuple(report.fold_taus), chosen=chosen, beats_uniform=report.beats_uniform,
                   rows=tuple(CvRow.of(r, geo) for r in report.rows), geo=True if geo else None,
                   fold_betas=tuple(float(b) for b in fold_betas) if geo else None)

    def row(self, name: str) -> CvRow | None:
        return next((r for r in self.rows if r.name == name), None)

    @classmethod
    def _from_json(cls, doc: Any) -> "CvTable | None":
        """None unless ``doc`` holds what the summary of `ens blend` and `ens report` shows."""
        if not (isinstance(doc, dict) and is_int(doc.get("folds")) and is_int(doc.get("top_k"))
                and isinstance(doc.get("temperature"), bool) and isinstance(doc.get("chosen"), str)
                and isinstance(doc.get("rows"), list)):
            return None
        rows = [CvRow._from_json(r) for r in doc["rows"]]
        if None in rows:
            return None
        typed, kept = _split(doc, {"folds": _any, "top_k": _any, "temperature": _any, "chosen": _any,
                                   "prior": _when(_is_bool),
                                   "fold_taus": _when(lambda v: isinstance(v, list) and all(map(is_number, v))),
                                   "beats_uniform": _when(_is_bool), "rows": lambda _: tuple(rows),
                                   "geo": _when(_is_bool),
                                   "fold_betas": _when(lambda v: isinstance(v, list) and all(map(is_number, v)))})
        if kept.keys() & {"prior", "fold_taus", "beats_uniform", "geo", "fold_betas"}:
            return None
        values = {"prior": False, "fold_taus": (), "beats_uniform": True} | typed
        return cls(**values, json_keys=tuple(doc), kept=kept)


@dataclass(frozen=True)
class BlendRecord(_Json):
    """A blend.json (see the module docstring for the keys). Read it with :meth:`read`, write
    it with :meth:`write`; :meth:`fitted` is the blend as :mod:`weights_search` applies it.

    ``optimize``, ``runs``, ``cv``, ``prior``, ``applied_from`` and ``apply`` are None when the
    record has none; a value this ens cannot read (a hand edit) is None too, and kept as it was.
    """

    format: int
    ens: str | None
    method: str
    requested_method: str | None
    fallback: bool | None
    fusion: str
    params: Mapping[str, Any]
    models: tuple[str, ...]
    members: tuple[str, ...]
    views: bool
    weights: Mapping[str, float]
    temperatures: Mapping[str, float] | None
    train_score: float | None
    class_ids: tuple[int | str, ...] | None
    optimize: SplitStores | None
    labels: str | None
    stores: Mapping[str, str] | None
    #: Keyword-only so that it can sit here, where the writer puts it, and still default to None.
    runs: str | None = field(default=None, kw_only=True)
    provenance: Mapping[str, ModelProvenance]
    prior: PriorCorrection | None
    #: Keyword-only, as ``runs``: absent in a record without the geo prior.
    geo: GeoCorrection | None = field(default=None, kw_only=True)
    cv: CvTable | None
    apply: SplitStores | None = None
    applied_from: str | None = None
    json_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"runs", "geo", "apply", "applied_from"})

    # ----------------------------------------------------------------------------- reading

    @classmethod
    def read(cls, path: str | os.PathLike, source: str | None = None) -> "BlendRecord":
        """The blend.json at ``path``, with every check applying it needs; an :class:`EnsError`
        naming ``source`` (default: the path; ``--weights PATH`` for `ens blend`) and the first
        field that is missing or malformed."""
        source = str(path) if source is None else source
        doc = read_json(path, source, problem="not a blend.json", missing="no such file")
        return cls.from_json(doc, source)

    @classmethod
    def from_json(cls, doc: Any, source: str) -> "BlendRecord":
        """The record of a parsed blend.json (see :meth:`read`)."""
        _check(doc, source)
        readers = {
            "format": _any, "ens": _when(_is_str), "method": _any, "requested_method": _when(_is_str),
            "fallback": _when(_is_bool), "fusion": _any, "params": _any, "models": _any, "members": _any,
            "views": _any, "weights": _any, "temperatures": _any,
            "train_score": _nullable(is_number), "class_ids": _nullable(lambda v: True),
            "optimize": _nullable(lambda v: True, SplitStores._from_json), "labels": _when(_is_str),
            "stores": _when(_is_dict), "runs": _when(_is_folder), "provenance": lambda v: {m: ModelProvenance._from_json(p) for m, p in v.items()},
            "prior": lambda v: None if v is None else PriorCorrection._from_json(v, doc.get("class_ids")),
            "geo": GeoCorrection._from_json,
            "cv": _nullable(lambda v: True, CvTable._from_json), "apply": _nullable(lambda v: True, SplitStores._from_json),
            "applied_from": _when(_is_str),
        }
        typed, kept = _split(doc, readers)
        for key in ("optimize", "cv", "apply"):  # a part this ens cannot read is kept as it was
            if key in typed and typed[key] is None and doc[key] is not None:
                kept[key] = doc[key]
                del typed[key]
        defaults = dict(format=1, ens=None, requested_method=None, fallback=None, params={}, views=False,
                        temperatures=None, train_score=None, class_ids=None, optimize=None, labels=None,
                        stores=None, prior=None, cv=None)
        return cls(**(defaults | typed), json_keys=tuple(doc), kept=kept)

    def runs_folder(self) -> Path | None:
        """The folder ``runs`` records, when the OS can look into it: a name it cannot take
        (longer than the file system allows, in a part or in all) or a folder it may not search
        reads as None, as a record without ``runs`` does (:func:`usable_folder`)."""
        return usable_folder(self.runs)

    def check_fitted(self, source: str) -> SplitStores:
        """The fitted split, checked as `ens report` needs it with the CV table (when the record
        has one); an :class:`EnsError` naming ``source`` otherwise."""
        if self.optimize is None:
            raise EnsError(f"{source}: records no fitted split ('optimize'), so there is nothing to report on")
        if "cv" in self.kept:
            raise EnsError(f"{source}: field 'cv' is malformed; expected folds, top_k, temperature, chosen and rows "
                           "of {name, kind, top1, top1_low, top1_high, topk, nll}, as `ens blend` writes them")
        return self.optimize

    # ----------------------------------------------------------------------------- using

    def fitted(self) -> ws.FittedBlend:
        """The blend this record holds, as :mod:`weights_search` applies it: `ens blend
        --weights`, `ens report` and the demo all fuse with this."""
        temps = self.temperatures
        prior = self.prior
        return ws.FittedBlend(method=self.method, fusion=self.fusion,
                              weights=tuple(float(self.weights[m]) for m in self.members),
                              temperatures=None if temps is None else tuple(float(temps[m]) for m in self.members),
                              params=self.params, log_prior=None if prior is None else tuple(prior.log_prior().tolist()),
                              tau=None if prior is None else float(prior.tau))

    def applied(self, applied_from: str | None, apply: SplitStores, runs: str | None = None) -> "BlendRecord":
        """This record with the split it was applied to (and, for a saved blend re-applied, the
        file it came from, and ``runs``, the folder of the applied stores, when given); keys it
        did not hold are added after its own."""
        changes: dict[str, Any] = {} if applied_from is None else {"applied_from": applied_from}
        if runs is not None:
            changes["runs"] = runs
        return self._with(**changes, apply=apply)

    # ----------------------------------------------------------------------------- writing

    def text(self) -> str:
        """The file's text (:func:`ensemble.fileio.json_text`)."""
        return json_text(self.to_json())

    def write(self, path: str | os.PathLike) -> None:
        """Write the record to ``path`` (a temporary file: the caller renames it into place); an
        OSError names ``path`` (``write`` on a full disk names no file)."""
        try:
            Path(path).write_text(self.text(), encoding="utf-8")
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise


def usable_folder(path: str | os.PathLike | None) -> Path | None:
    """``path`` as a folder to look for stores in, or None where the OS cannot take it: a name
    longer than the file system allows (``ENAMETOOLONG``), a loop of links, a folder it may not
    search, a NUL. A folder that does not exist is usable (it holds no store, and a message may
    name it): only what would fail every look-up inside it is not."""
    if path is None:
        return None
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError):
        return None
    return Path(path)


def shown_path(path: str | os.PathLike, width: int = 160) -> str:
    """``path`` as a message or note shows a folder read from a file: printable (control
    characters escaped, :func:`ensemble.errors.printable`) and cut in the middle past ``width``
    characters."""
    text = printable(os.fsdecode(path))
    if len(text) <= width:
        return text
    half = (width - 3) // 2
    return text[:half] + "..." + text[-half:]


def _check(record: Any, source: str) -> None:
    """Every field of a ``blend.json`` that applying it reads, with its type; :class:`EnsError`
    naming ``source`` and the first field that is missing or malformed."""
    if not isinstance(record, dict):
        raise EnsError(f"{source}: not a blend.json (a JSON object is expected)")
    for key in ("method", "fusion", "models", "members", "weights"):
        if key not in record:
            raise EnsError(f"{source}: not a blend.json (no {key!r})")
    fmt = record.get("format", 1)
    if not is_int(fmt):
        raise EnsError(f"{source}: field 'format' is not an integer")
    if fmt > FORMAT_VERSION:
        raise EnsError(f"{source}: blend format {fmt} is newer than this ens understands")
    if not isinstance(record.get("provenance"), dict):
        raise EnsError(f"{source}: records no provenance of its models (an older ens wrote it), so its "
                       "stores cannot be checked against the applied ones; fit it again with --optimize")

    def names(value: Any) -> bool:
        return is_names(value, 1)

    members = record["members"] if names(record["members"]) else []
    temps = record.get("temperatures")
    checks = {
        "method": (isinstance(record["method"], str), "a string"),
        "fusion": (record["fusion"] in ws.FUSIONS, f"one of {', '.join(ws.FUSIONS)}"),
        "models": (names(record["models"]) and len(set(record["models"])) == len(record["models"]),
                   "a list of distinct model names"),
        "members": (bool(members) and len(set(members)) == len(members), "a list of distinct member names"),
        "weights": (isinstance(record["weights"], dict) and list(record["weights"]) == members
                    and all(is_finite(w) and w >= 0 for w in record["weights"].values()),
                    "an object member -> weight >= 0, one per member in member order"),
        "temperatures": (temps is None or (isinstance(temps, dict) and list(temps) == members
                                           and all(is_finite(t) and t > 0 for t in temps.values())),
                         "null or an object member -> temperature > 0"),
        "views": (isinstance(record.get("views", False), bool), "true or false"),
        "params": (isinstance(record.get("params", {}), dict), "an object"),
        "class_ids": (record.get("class_ids") is None or isinstance(record["class_ids"], list), "a list"),
        "prior": (record.get("prior") is None
                  or PriorCorrection._from_json(record["prior"], record.get("class_ids")) is not None,
                  f"null or an object with counts (one non-negative integer per class id), zero_count > 0 "
                  f"and tau from {ws.TAU_BOUNDS[0]:g} to {ws.TAU_BOUNDS[1]:g}"),
    }
    for key, (valid, expected) in checks.items():
        if not valid:
            raise EnsError(f"{source}: field {key!r} is malformed; expected {expected}")
    geo = None if record.get("geo") is None else GeoCorrection.problem(record["geo"])
    if geo == "":
        raise EnsError(f"{source}: field 'geo' is malformed; expected an object (file, sha256, used, skipped, "
                       "settings, weight, beta, no_place)")
    if geo is not None:
        key, _, expected = geo.partition(": expected ")
        raise EnsError(f"{source}: field 'geo.{key}' is malformed; expected {expected}")
    provenance = record["provenance"]
    for model in [*record["models"], *(m for m in provenance if m not in record["models"])]:
        if ModelProvenance._from_json(provenance.get(model)) is None:
            raise EnsError(f"{source}: field 'provenance.{model}' lacks some of {', '.join(PROVENANCE_FIELDS)}")


# ----------------------------------------------------------------------- what a submission records

@dataclass(frozen=True)
class BlendSummary:
    """What the ledger records of the blend.json beside a submission's predictions.

    ``cv_top1*`` are the cross-validated top-1 accuracy of the blend that was used and its
    interval; ``None`` when the blend ran without cross-validation. ``prior_tau``: ``tau`` of
    its prior correction, ``None`` without one. ``geo_weight``, ``geo_file``, ``geo_sha256``: of
    its geo prior (:class:`GeoCorrection`), ``beta`` and the training json (as recorded, and its
    sha256), ``None`` without one.
    """

    method: str
    members: tuple[str, ...]
    weights: Mapping[str, float]
    cv_top1: float | None
    cv_top1_low: float | None
    cv_top1_high: float | None
    prior_tau: float | None = None
    geo_weight: float | None = None
    geo_file: str | None = None
    geo_sha256: str | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> "BlendSummary":
        """The summary of the blend.json at ``path``: only method, members and weights are
        required (a hand-made blend.json will do); a CV table, a prior and a geo prior, when
        present, must hold the chosen row's top-1, tau, and beta, file and sha256."""
        path = Path(path)
        doc = read_json(path, problem="not a readable JSON file")

        def field(container, key, test, kind, where):
            value = container.get(key) if isinstance(container, dict) else None
            if not test(value):
                raise EnsError(f"{path}: {where}{key!r} missing or not {kind}")
            return value

        method = field(doc, "method", _is_str, "a string", "")
        members = field(doc, "members", lambda v: isinstance(v, list), "a list", "")
        weights = field(doc, "weights", _is_dict, "an object", "")
        if not is_names(members):
            raise EnsError(f"{path}: 'members' must be a list of names")
        if not all(map(is_number, weights.values())):
            raise EnsError(f"{path}: 'weights' must map member names to numbers")
        cv = doc.get("cv")
        top1 = low = high = None
        if cv is not None:
            rows = field(cv, "rows", lambda v: isinstance(v, list), "a list", "cv.")
            chosen = field(cv, "chosen", _is_str, "a string", "cv.")
            row = next((r for r in rows if isinstance(r, dict) and r.get("name") == chosen), None)
            if row is None:
                raise EnsError(f"{path}: cv.chosen {chosen!r} names none of cv.rows")
            top1, low, high = (float(field(row, key, is_number, "a number", f"cv.rows[{chosen!r}]."))
                               for key in ("top1", "top1_low", "top1_high"))
        prior = doc.get("prior")
        tau = None if prior is None else float(field(prior, "tau", is_number, "a number", "prior."))
        geo = doc.get("geo")
        beta = geo_file = geo_sha = None
        if geo is not None:
            beta = float(field(geo, "beta", lambda v: is_finite(v) and v >= 0, "a number >= 0", "geo."))
            geo_file = field(geo, "file", _is_str, "a string", "geo.")
            geo_sha = field(geo, "sha256", is_sha256, "a sha256 (64 hex digits)", "geo.")
        return cls(method=method, members=tuple(members), weights={k: float(v) for k, v in weights.items()},
                   cv_top1=top1, cv_top1_low=low, cv_top1_high=high, prior_tau=tau, geo_weight=beta,
                   geo_file=geo_file, geo_sha256=geo_sha)



# ----------------------------------------------------------------------- where a blend folder sits

#: The folder `ens blend` writes its blend folders into, under the folder it runs in.
BLENDS = "blends"


def work_folder(blend_dir: str | os.PathLike) -> Path | None:
    """The folder `ens blend` ran in, ``<work>`` of ``<work>/blends/<name>``: the one that holds
    ``runs/`` and ``submissions/``. ``None`` for a blend folder whose parent is not named
    ``blends`` (written with ``--out`` elsewhere): its grandparent is no folder of the project.
    The path is made absolute without resolving links, so a ``blends/`` linked to another disk
    still names the project's own folder."""
    folder = Path(os.path.abspath(blend_dir))
    return folder.parent.parent if folder.parent.name == BLENDS else None


def runs_candidates(recorded: str | None, blend_dir: str | os.PathLike,
                    given: str | os.PathLike | None = None) -> list[Path]:
    """The folders a blend's stores may be under, in order, each once: ``given`` (a ``--runs
    DIR``), the folder blend.json records (``recorded``, its ``runs``: used only when it is what
    `ens blend` writes there and the OS can look into it, see :func:`usable_folder`), then
    ``<work>/runs`` (:func:`work_folder`) and ``./runs``. `ens report` and `ens submit` look
    here; the first folder holding the very stores wins."""
    work = work_folder(blend_dir)
    folders = ([Path(given)] if given is not None else []) + [
        folder for folder in (usable_folder(recorded) if _is_folder(recorded) else None,
                              None if work is None else work / "runs", Path("runs")) if folder is not None]
    found: dict[Any, Path] = {}
    for folder in folders:
        try:
            key: Any = folder.resolve()
        except (OSError, ValueError, RuntimeError):  # a name the OS cannot take
            key = str(folder)
        found.setdefault(key, folder)
    return list(found.values())


# ------------------------------------------------------------------- the stores a blend reads

def store_digest(store: LogitStore, views: bool) -> str:
    """sha256 over the store's arrays (ids, logits, and views when they are blended): what
    ``optimize.stores`` and ``apply.stores`` record."""
    digest = hashlib.sha256()
    names = [IDS, LOGITS] + ([VIEWS] if views and store.views is not None else [])
    for name in names:
        with open(store.path / name, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."  # a sha256
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def check_provenance(reference: Mapping[str, ModelProvenance], reference_name: str, split: str,
                     models: Sequence[str], stores: Sequence[LogitStore]) -> None:
    """Each model's store of ``split`` must have been made as ``reference[model]`` says;
    otherwise one :class:`EnsError` naming the model and the first field that differs."""
    for model, store in zip(models, stores):
        want, got = reference.get(model), ModelProvenance.of_store(store)
        if want is None:
            raise EnsError(f"{reference_name}: records nothing of how {model} was made")
        for key, label in PROVENANCE_FIELDS.items():
            wanted, actual = getattr(want, key), getattr(got, key)
            if wanted != actual:
                raise EnsError(f"{model}: its {split} store was made with {label} {_shown(actual)}, the "
                               f"{reference_name} with {_shown(wanted)}; blend stores of one model file, "
                               "preprocessing and TTA (rerun `ens infer` on both splits alike)")


def prior_counts(counts: Mapping[int | str, int], class_ids: Sequence[int | str], path: Path) -> np.ndarray:
    """``(C,)`` int64: the count of each output column's category (``class_ids``, the stores'
    mapping, the same for every model), as ``prior.counts`` records them. A category the models
    predict that ``counts`` lacks, or one in ``counts`` that no model predicts, is an
    :class:`EnsError` naming them."""
    columns = list(class_ids)
    missing = [c for c in columns if c not in counts]
    if missing:
        raise EnsError(f"--prior {path}: no count for {len(missing)} of the {counted(len(columns), 'category', 'categories')} "
                       f"the models predict: {shown_ids(missing)}")
    known = set(columns)
    extra = [c for c in counts if c not in known]
    if extra:
        raise EnsError(f"--prior {path}: counts {counted(len(extra), 'category', 'categories')} that no model predicts: "
                       f"{shown_ids(extra)} "
                       "(were the models exported with other --classes?)")
    return np.array([counts[c] for c in columns], dtype=np.int64)


def counted(n: int, one: str, many: str | None = None) -> str:
    """``n`` and the noun in its number: ``1 category``, ``3 categories`` (``many``: the plural
    when it is not ``one`` + s)."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def shown_ids(values: Sequence[Any], shown: int = 5) -> str:
    """The first ``shown`` of ``values``, and how many more."""
    return ", ".join(map(str, values[:shown])) + (f" and {len(values) - shown} more" if len(values) > shown else "")
