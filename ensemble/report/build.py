"""What `ens report` shows, computed from a blend folder: no plotting, no HTML here.

Inputs, each checked before use:

- ``BLEND_DIR/blend.json`` (:meth:`ensemble.formats.blend.BlendRecord.read` and
  :meth:`~ensemble.formats.blend.BlendRecord.check_fitted`);
- the logit stores of the fitted split, found in ``--runs DIR`` when given, else in the folder
  blend.json records (``runs``: the
  ``--runs`` `ens blend` read), else under ``runs/`` beside the blend's ``blends/`` folder (the
  layout `ens blend` writes: ``<work>/blends/<name>`` and ``<work>/runs``), else under
  ``./runs``: the first folder whose stores have the images, classes and models blend.json
  records, used only when their sha256, taken from the report's one pass over them, is the one
  blend.json records (else the next folder is tried);
- the labels of the fitted split: ``--data DIR``'s split file, else the file blend.json names
  (relative to the work folder, then as given);
- the training class counts: blend.json's prior, else ``train2019.json`` (any iNat layout) under
  ``--data`` or beside the labels file;
- the submission ledger: ``<work>/submissions/ledger.sqlite``, else ``./submissions/ledger.sqlite``
  (one that cannot be read, damaged or not a file, is only its section's "ledger not readable").

The stores are read in one pass, in blocks of rows (:class:`~ensemble.formats.members.Members`:
plain reads, never the memory maps' pages) as large as ``--memory`` allows; what is kept of the
whole split is a few numbers per row and member (each one's top class and its probability), so
memory stays bounded whatever the split's size (the labels json, read whole, aside).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import weights_search as ws
from ensemble.errors import EnsError, printable
from ensemble.fileio import sha256_file
from ensemble.formats.blend import (BLEND_FILE, BlendRecord, prior_counts, runs_candidates, shown_path,
                                    store_digest, work_folder)
from ensemble.formats.common import read_json
from ensemble.formats.dataset import find_split, load_labels, read_class_counts
from ensemble.formats.members import Members, StoreDigests
from ensemble.formats.store import MANIFEST, LogitStore, read_store
from ensemble.memory import memory_budget, rows_per_block
from ensemble.report import geo as regions
from ensemble.report.geo import RegionLine
from weights_search import calibration as cal
from weights_search.metrics import rank_of_true

#: Thumbnails of the most confidently wrong images, at most.
HARDEST = 24


@dataclass(frozen=True)
class Predictions:
    """One predictor's top class on every row of the fitted split: ``(N,)`` float64 confidence
    and ``(N,)`` int64 column."""

    confidence: np.ndarray
    predicted: np.ndarray

    def correct(self, labels: np.ndarray) -> np.ndarray:
        return self.predicted == labels


@dataclass(frozen=True)
class HardImage:
    """One confidently wrong image of the blend."""

    id: int | str
    path: Path | None  #: None when the labels file names no image file for it
    true_name: str
    predicted_name: str
    confidence: float  #: the blend's probability of its (wrong) prediction
    true_probability: float  #: the blend's probability of the true class
    boxes: Mapping[str, tuple[float, float, float, float]]  #: model -> normalised x0, y0, x1, y1


@dataclass(frozen=True)
class LedgerPoint:
    """A ledger row with a CV estimate and a leaderboard score, as top-1 error."""

    id: int
    file: str
    cv_error: float
    cv_error_low: float
    cv_error_high: float
    public: float | None
    private: float | None
    this_blend: bool  #: the row's source is this blend folder
    unverified: bool = False  #: the ledger's test_check: not traced to the test json (`ens submit`)


@dataclass(frozen=True)
class GeoSection:
    """The geo section's numbers (:mod:`ensemble.report.geo`): the blend's geo prior (blend.json's
    record, and the training json found for it), the fitted split's top-1 and top-``k`` without
    and with it over all rows (``overall``) and by region (``lines``), the rows with a place and
    those with a usable one, and the map's points: ``(P,)`` longitude and latitude (rounded to
    0.01 degree, as drawn) and outcome (:data:`ensemble.report.geo.OUTCOMES`)."""

    file: str  #: the training json as blend.json records it
    source: Path  #: where the report found it (its sha256 the recorded one)
    sha256: str
    beta: float
    fitted: bool
    k: int
    overall: RegionLine
    lines: tuple[RegionLine, ...]
    placed: int
    usable: int
    map_lon: np.ndarray
    map_lat: np.ndarray
    map_outcome: np.ndarray


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows. ``models`` / ``members``: as in blend.json; ``labels``: ``(N,)``
    columns of the fitted split; ``missing``: section -> the one line saying what would enable it."""

    blend_dir: Path
    record: BlendRecord
    split: str
    labels_path: Path
    runs: Path
    labels: np.ndarray
    class_names: tuple[str, ...]
    models: tuple[str, ...]
    members: tuple[str, ...]
    model_predictions: Mapping[str, Predictions]
    #: per model, with its fitted temperature; empty when the blend has none (or blends views)
    tempered_predictions: Mapping[str, Predictions]
    member_predictions: np.ndarray  #: ``(M, N)`` int64 predicted columns per member
    member_correct: np.ndarray  #: ``(M, N)`` bool
    blend: Predictions
    counts: np.ndarray | None  #: ``(C,)`` training counts per column
    counts_source: str | None
    hardest: tuple[HardImage, ...]
    wrong: int  #: rows the blend gets wrong
    ledger: Path | None
    ledger_points: tuple[LedgerPoint, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    missing: Mapping[str, str] = field(default_factory=dict)
    geo: GeoSection | None = None  #: None: the blend has no geo prior (and the page no geo section)


def read_blend_record(blend_dir: Path) -> tuple[Path, BlendRecord]:
    """``BLEND_DIR/blend.json``, read and checked as the report needs it (a fitted split)."""
    if not blend_dir.is_dir():
        raise EnsError(f"{blend_dir}: no such blend folder")
    path = blend_dir / BLEND_FILE
    if not path.is_file():
        raise EnsError(f"{blend_dir}: no {BLEND_FILE}; give the folder `ens blend` wrote (blends/<name>)")
    record = BlendRecord.read(path)
    record.check_fitted(str(path))
    return path, record


def _candidates(blend_dir: Path, name: str) -> list[Path]:
    """``<work>/name`` (:func:`~ensemble.formats.blend.work_folder`: only for a blend folder
    under ``blends/``), then ``./name`` when it is another folder."""
    work = work_folder(blend_dir)
    found = [] if work is None else [work / name]
    if not found or Path(name).resolve() != found[0].resolve():
        found.append(Path(name))
    return found


@dataclass(frozen=True)
class FoundStores:
    """The fitted split's stores in ``runs``, picked by their shape and model (their sha256 is
    taken in the report's one pass over them and checked by :meth:`check_digests`)."""

    runs: Path
    stores: list[LogitStore]
    where: str  #: how ``runs`` was found, for messages (`` (--runs)``, ...)
    problems: tuple[str, ...]  #: why the folders looked in before ``runs`` were passed over
    index: int  #: ``runs``' place among the folders looked in

    def digest_problem(self, record: BlendRecord, digests: Mapping[str, str]) -> str | None:
        """Why these stores are not the ones blend.json records, by their sha256 (``digests``,
        taken in the pass), in :func:`open_stores`' words; None when they are."""
        for model in record.models:
            if digests[model] != record.optimize.stores.get(model):
                path = self.runs / model / record.optimize.split
                return f"{shown_path(path)}{self.where} is not the store the blend was fitted on (its sha256 differs)"
        return None


def _not_found(blend_json: Path, record: BlendRecord, problems: Sequence[str]) -> EnsError:
    return EnsError(f"{blend_json}: the {record.optimize.split} stores it was fitted on are not found "
                    f"({'; '.join(problems)}); give --runs DIR (the folder of the stores `ens blend` read)")


def _differs(store: LogitStore, record: BlendRecord, model: str) -> str | None:
    """How ``store`` is not the one ``record`` was fitted on, by what a glance shows (rows,
    classes, the model that made it); None where nothing does."""
    rows, classes = int(store.ids.shape[0]), int(store.logits.shape[1])
    if rows != record.optimize.rows or store.logits.shape[0] != rows:
        return f"it holds {rows} images, the blend was fitted on {record.optimize.rows}"
    if record.class_ids is not None and classes != len(record.class_ids):
        return f"it predicts {classes} classes, the blend {len(record.class_ids)}"
    want = record.provenance.get(model) if record.provenance else None
    if want is not None and want.model_sha256 != store.manifest.model.sha256:
        return "another model made it"
    if record.views and store.views is None:
        return "it keeps no per-view logits"
    return None


def open_stores(blend_json: Path, record: BlendRecord, blend_dir: Path,
                given: Path | None = None, after: FoundStores | None = None, problem: str | None = None) -> FoundStores:
    """The fitted split's store of every model, looked for in ``given`` (``--runs DIR``), where
    blend.json records them, then beside the blend's ``blends/`` folder and under ``./runs``:
    the first folder whose stores have the rows, classes and models blend.json records. Their
    sha256 is not taken here (that would read every store once more): the report's pass takes
    it (:class:`~ensemble.formats.members.StoreDigests`); where :meth:`FoundStores.digest_problem`
    says they are not the very ones the blend was fitted on, the search goes on ``after`` them
    (``problem``: why they were passed over), and ends in one EnsError naming every folder and
    why, before anything is written."""
    split = record.optimize.split
    problems = [] if after is None else [*after.problems, problem or ""]
    for index, runs in enumerate(runs_candidates(record.runs, blend_dir, given)):
        if after is not None and index <= after.index:
            continue
        if given is not None and runs == Path(given):
            where = " (--runs)"
        elif record.runs and runs == Path(record.runs):
            where = " (the folder recorded in blend.json)"
        else:
            where = ""
        stores = []
        for model in record.models:
            path = runs / model / split
            # os.path.isfile: a path the OS cannot take (too long) is no file, where Path.is_file raises
            if not os.path.isfile(path / MANIFEST):
                problems.append(f"no store at {shown_path(path)}{where}")
                break
            store = read_store(path)
            why = _differs(store, record, model)
            if why is not None:
                problems.append(f"{shown_path(path)}{where} is not the store the blend was fitted on ({why})")
                break
            stores.append(store)
        else:
            return FoundStores(runs, stores, where, tuple(problems), index)
    raise _not_found(blend_json, record, problems)


def find_labels(blend_json: Path, record: BlendRecord, blend_dir: Path, data: Path | None) -> Path:
    """The labels file of the fitted split: ``--data``'s, else the one blend.json names."""
    split = record.optimize.split
    if data is not None:
        return find_split(data, split, folders=False)
    named = record.labels
    if isinstance(named, str) and named:
        # A relative path is relative to where `ens blend` ran: most likely the work folder.
        work = work_folder(blend_dir)
        for path in ([] if work is None else [work / named]) + [Path(named)]:
            if path.is_file():
                return path
    where = "here" if work_folder(blend_dir) is None else f"here or from {work_folder(blend_dir)}"
    raise EnsError(f"{blend_json}: the labels file it names ({named}) is not found from {where}; "
                   f"give --data DIR (the folder holding the {split} json)")


def find_geo_source(blend_json: Path, record: BlendRecord, blend_dir: Path,
                    data: Path | None) -> tuple[Path, list[str]]:
    """The training json the blend's geo prior was estimated from: the file blend.json names
    (relative to the work folder, then as given), else ``--data``'s training json; only a file
    whose sha256 is the recorded one; and why the files looked at before it were passed over. One
    line naming what was looked at, when none is."""
    geo = record.geo
    work = work_folder(blend_dir)
    candidates = ([] if work is None else [work / geo.file]) + [Path(geo.file)]
    if data is not None:
        candidates.append(find_split(data, "train", folders=False, required=False))
    seen, problems = set(), []
    for path in candidates:
        if path is None or os.path.abspath(path) in seen:
            continue
        seen.add(os.path.abspath(path))
        if not os.path.isfile(path):  # os.path: a name the OS cannot take is no file, where Path raises
            problems.append(f"no file {shown_path(path)}")
        elif sha256_file(path) != geo.sha256:
            problems.append(f"{shown_path(path)} is another file (its sha256 differs)")
        else:
            return path, problems
    raise EnsError(f"{blend_json}: the training json of its geo prior ({shown_path(geo.file)}, sha256 "
                   f"{geo.sha256[:12]}...) is not found ({'; '.join(problems)}); give --data DIR holding it")


def geo_prior(record: BlendRecord, source: Path, class_ids: Sequence[Any]) -> Any:
    """The blend's geo prior (a :class:`weights_search.geo.GeoPrior`) estimated again from the
    observations of ``source``, with blend.json's settings and without the images it left out
    (``geo.left_out``: the fitted split's images in a merged train+val json), by the fit `ens
    blend` used (:func:`ensemble.formats.places.fit_prior`); one line when it does not use the
    number of observations blend.json records."""
    from ensemble.formats.places import among, fit_prior, read_observations

    observations = read_observations(source, option="the geo prior's training json")
    out = among(observations.image_id, np.asarray(record.geo.left_out or (), dtype=object))
    try:
        prior = fit_prior(observations, observations.columns(class_ids), len(class_ids), record.geo.geo_settings(),
                          out)
    except ValueError as exc:
        raise EnsError(f"{source}: cannot estimate the geo prior from it ({exc})") from None
    if prior.n_used != record.geo.used:
        raise EnsError(f"{source}: the blend's geo prior used {record.geo.used:,} of its observations, the report's "
                       f"estimate {prior.n_used:,} ({int(out.sum()):,} of the {len(record.geo.left_out or ()):,} "
                       "images blend.json left out found); the blend folder and the file do not go together")
    return prior


def geo_input(record: BlendRecord, prior: Any, labels_path: Path, ids: np.ndarray) -> GeoInput:
    """The :class:`GeoInput` of the fitted split: ``prior`` (:func:`geo_prior`), the places of its
    labels json in the stores' row order (:func:`ensemble.formats.places.read_places`) and the
    blend's ``beta``."""
    from ensemble.formats.places import read_places

    places = read_places(labels_path, ids)
    return GeoInput(prior, places.lat, places.lon, places.day, places.uncertainty, places.usable,
                    float(record.geo.beta))


def _category_names(labels_doc: Mapping[str, Any], class_ids: Sequence[Any]) -> tuple[str, ...]:
    names = {c.get("id"): c.get("name") for c in labels_doc.get("categories") or [] if isinstance(c, dict)}
    return tuple(f"{names[c]} ({c})" if names.get(c) not in (None, "") else str(c) for c in class_ids)


def _image_paths(labels_path: Path, labels_doc: Mapping[str, Any], wanted: set) -> dict[Any, Path]:
    """The image file of each id of ``wanted`` that the labels json names one for."""
    return {image["id"]: labels_path.parent / image["file_name"] for image in labels_doc.get("images") or []
            if isinstance(image, dict) and isinstance(image.get("file_name"), str) and image.get("id") in wanted}


def training_counts(record: BlendRecord, class_ids: Sequence[Any], data: Path | None,
                    labels_path: Path) -> tuple[np.ndarray | None, str | None]:
    """``(C,)`` training counts per column and where they came from, or ``(None, None)``."""
    prior = record.prior
    if prior is not None:
        return np.asarray(prior.counts, dtype=np.int64), f"the blend's --prior ({prior.file})"
    for folder in ([data] if data is not None else []) + [labels_path.parent]:
        path = find_split(folder, "train", folders=False, required=False)
        if path is not None:
            return prior_counts(read_class_counts(path), class_ids, path), str(path)
    return None, None


def _probability(log_probs: np.ndarray) -> np.ndarray:
    """float64 probabilities of float32 log-probabilities, at most 1 (a fused row's entry can
    round to a few 1e-7 above 0), as :func:`~weights_search.calibration.confidence_and_correct`
    takes the confidence."""
    return np.minimum(np.exp(log_probs.astype(np.float64)), 1.0)


def _top(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n,)`` confidence and top column of ``(n, C)`` log-probabilities: the confidence is the
    calibration maths' own (its clipping and its argmax), so the report's diagrams and hardest
    images rank rows by the number the reliability diagram bins."""
    confidence, _ = cal.confidence_and_correct(log_probs, labels)
    return confidence, np.argmax(log_probs, axis=1)  # np.argmax, as there: the first of tied classes


#: How many float32 copies of a block of every member's rows (models, and with views the views
#: too) the report's pass holds at once, counted generously: the block read, its log-softmax (one
#: per temperature), the fused block and the confidence's temporaries.
_COPIES = 4.0


@dataclass
class _Rows:
    """Top class and its probability of one predictor on every row, filled block by block."""

    confidence: np.ndarray
    predicted: np.ndarray

    @classmethod
    def empty(cls, n_rows: int) -> "_Rows":
        return cls(np.empty(n_rows), np.empty(n_rows, dtype=np.int64))

    def put(self, start: int, log_probs: np.ndarray, labels: np.ndarray) -> None:
        stop = start + log_probs.shape[0]
        self.confidence[start:stop], self.predicted[start:stop] = _top(log_probs, labels[start:stop])

    def done(self) -> Predictions:
        return Predictions(self.confidence, self.predicted)


@dataclass(frozen=True)
class _Pass:
    """What the report computes from the stores, in one pass over their rows."""

    model_predictions: dict[str, Predictions]
    tempered_predictions: dict[str, Predictions]
    member_predictions: list[Predictions]
    blend: Predictions
    true_probability: np.ndarray  #: ``(N,)`` the blend's probability of each row's label
    digests: dict[str, str]  #: each model's store's sha256, taken from the pass's reads
    #: ``(N,)`` int64 rank of each row's label (0: top-1) without and with the geo prior; None without one
    geo_ranks: tuple[np.ndarray, np.ndarray] | None = None


def block_rows(memory: int, sources: Sequence[Members]) -> int:
    """Rows per block of the report's pass within ``memory`` bytes (:data:`_COPIES`)."""
    width = sum(s.n_members for s in sources)
    return rows_per_block(memory, width, sources[0].n_classes, copies=_COPIES)


@dataclass(frozen=True)
class GeoInput:
    """The blend's geo prior as the report applies it: the estimator fitted on the training json's
    observations, the fitted split's places (``(N,)`` arrays in the stores' row order) and the
    weight ``beta``; queried one block of rows at a time, so no ``g'`` of the whole split is held."""

    prior: Any  #: a :class:`weights_search.geo.GeoPrior`
    lat: np.ndarray
    lon: np.ndarray
    day: np.ndarray
    uncertainty: np.ndarray
    usable: np.ndarray
    beta: float

    def block(self, start: int, stop: int) -> Any:
        """The :class:`weights_search.geo.SparseGeo` of rows ``start:stop``."""
        rows = slice(start, stop)
        return self.prior.query(self.lat[rows], self.lon[rows], self.day[rows], self.usable[rows],
                                uncertainty=self.uncertainty[rows])

    def usable_rows(self) -> np.ndarray:
        """``(N,)`` bool: the rows the prior corrects (a usable place within the uncertainty limit)."""
        from weights_search.geo import usable_places

        return self.usable & usable_places(self.lat, self.lon, self.uncertainty, self.prior.settings)


def _fuse(blend: ws.FittedBlend, block: np.ndarray) -> np.ndarray:
    """The blend's ``(n, C)`` log-probabilities of one block of member logits ``(M, n, C)``."""
    try:
        return blend.log_proba(block)
    except ValueError as exc:
        raise EnsError(f"cannot fuse the stores as blend.json says ({exc})") from None


def _scores(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The confidence, top class and probability of the label on each row of ``(n, C)``
    log-probabilities."""
    confidence, predicted = _top(log_probs, labels)
    return confidence, predicted, _probability(log_probs[np.arange(labels.size), labels])


def _blend_block(blend: ws.FittedBlend, block: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blend's confidence, top class and probability of the label on each row of one block
    of member logits ``(M, n, C)``."""
    return _scores(_fuse(blend, block), labels)


def _geo_block(log_probs: np.ndarray, labels: np.ndarray, sparse: Any,
               beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blend's ``(n, C)`` fused ``log_probs`` with the geo prior (``sparse``: the block's
    :class:`~weights_search.geo.SparseGeo`): ``log q + beta g'`` renormalised (q'), and the rank of
    each row's label (0: top-1) without and with it; ``log_probs`` is worked on in place."""
    without = rank_of_true(log_probs, labels)
    corrected = ws.log_softmax(sparse.apply(log_probs, 0, beta))
    return corrected, without, rank_of_true(corrected, labels)


def _read_stores(blend_json: Path, record: BlendRecord, stores: Sequence[LogitStore], labels: np.ndarray,
                 memory: int, geo: GeoInput | None = None) -> _Pass:
    """Each model's top class (raw, and at its fitted temperature when the blend has them and
    blends models), each member's and the blend's, in one pass over the stores in blocks of rows
    read by :class:`~ensemble.formats.members.Members` (never through their memory maps, whose
    touched pages would count in resident memory); blocks as large as ``memory`` bytes allow. With
    ``geo``, the blend is the blend as applied (its geo prior included) and the label's rank
    without and with the prior is kept per row."""
    models = Members(record.models, stores, views=False)
    members = Members(record.models, stores, views=True) if record.views else models
    digests = StoreDigests(record.models, stores, models, record.views)
    if tuple(members.names) != record.members:
        raise EnsError(f"{blend_json}: its members {', '.join(record.members)} are not those of its stores "
                       f"({', '.join(members.names)})")
    temps = record.temperatures
    temps = [float(temps[m]) for m in record.models] if temps is not None and not record.views else None
    n_rows = models.n_rows
    raw = [_Rows.empty(n_rows) for _ in record.models]
    tempered = [_Rows.empty(n_rows) for _ in record.models] if temps is not None else []
    per_member = [_Rows.empty(n_rows) for _ in record.members] if record.views else raw
    blend, true_p = _Rows.empty(n_rows), np.empty(n_rows)
    ranks = None if geo is None else (np.empty(n_rows, dtype=np.int64), np.empty(n_rows, dtype=np.int64))
    fitted = record.fitted()
    rows = block_rows(memory, [models, members] if record.views else [models])
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        block = models.block(start, stop)
        for m, out in enumerate(raw):
            out.put(start, ws.log_softmax(block[m]), labels)
        for m, out in enumerate(tempered):
            out.put(start, ws.log_softmax(block[m], temps[m]), labels)
        if record.views:
            del block
            block = members.block(start, stop)
            for m, out in enumerate(per_member):
                out.put(start, ws.log_softmax(block[m]), labels)
        log_probs = _fuse(fitted, block)
        if geo is not None:
            log_probs, ranks[0][start:stop], ranks[1][start:stop] = _geo_block(
                log_probs, labels[start:stop], geo.block(start, stop), geo.beta)
        confidence, predicted, true_p[start:stop] = _scores(log_probs, labels[start:stop])
        blend.confidence[start:stop], blend.predicted[start:stop] = confidence, predicted
        del log_probs
        del block
    return _Pass(model_predictions={m: r.done() for m, r in zip(record.models, raw)},
                 tempered_predictions={m: r.done() for m, r in zip(record.models, tempered)},
                 member_predictions=[r.done() for r in per_member], blend=blend.done(), true_probability=true_p,
                 digests=digests.result(), geo_ranks=ranks)


def hardest_rows(blend: Predictions, labels: np.ndarray, limit: int = HARDEST) -> np.ndarray:
    """The rows of the ``limit`` wrong predictions of the blend with the highest confidence, most
    confident first (ties: the earlier row)."""
    wrong = np.flatnonzero(blend.predicted != labels)
    return wrong[np.argsort(-blend.confidence[wrong], kind="stable")][:limit]


def hardest_images(blend: Predictions, true_p: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                   models: Sequence[str], stores: Sequence[LogitStore], names: Sequence[str],
                   paths: Mapping[Any, Path], limit: int = HARDEST) -> tuple[HardImage, ...]:
    """The ``limit`` wrong rows of the blend with the highest confidence, most confident first."""
    order = hardest_rows(blend, labels, limit)
    images = []
    for row in order.tolist():
        boxes = {}
        for model, store in zip(models, stores):
            if store.boxes is not None:  # CAM boxes, when the store has them
                box = np.asarray(store.boxes[row], dtype=np.float64)
                if np.isfinite(box).all():
                    boxes[model] = tuple(float(v) for v in box)
        image_id = ids[row].item()
        images.append(HardImage(id=image_id, path=paths.get(image_id), true_name=names[labels[row]],
                                predicted_name=names[blend.predicted[row]],
                                confidence=float(blend.confidence[row]), true_probability=float(true_p[row]),
                                boxes=boxes))
    return tuple(images)


def ledger_points(blend_dir: Path) -> tuple[Path | None, tuple[LedgerPoint, ...]]:
    """The ledger found for this blend and its rows with a CV estimate and a leaderboard score."""
    from ensemble.formats.ledger import LEDGER, Ledger

    for folder in _candidates(blend_dir, "submissions"):
        if os.path.lexists(folder / LEDGER):  # a FIFO there too: Ledger says what it is
            break
    else:
        return None, ()
    ledger = Ledger(folder)
    work = folder.resolve().parent  # `ens submit` ran here: sources are relative to it
    mine = blend_dir.resolve()
    points = []
    for e in ledger.entries():
        if e.cv_top1 is None or (e.public_score is None and e.private_score is None):
            continue
        source = (work / e.source).resolve()
        this = mine in (source, source.parent)  # the folder, or its predictions.csv
        points.append(LedgerPoint(e.id, e.file, 1 - e.cv_top1, 1 - e.cv_top1_high, 1 - e.cv_top1_low,
                                  e.public_score, e.private_score, this, e.test_check == "unverified"))
    return ledger.path, tuple(points)


def build_report(blend_dir: Path, data: Path | None = None, runs: Path | None = None,
                 memory: int | None = None) -> ReportData:
    """Read and check the blend folder's inputs and compute every section's numbers; ``runs``:
    the folder of the stores, looked in first (``ens report --runs``); ``memory``: bytes for the
    blocks of rows the stores are read in (``--memory``; None: :func:`ensemble.memory.memory_budget`'s
    default). Beside the blocks, memory holds a few numbers per row and member and the labels
    json while its names are read."""
    blend_dir = Path(blend_dir)
    blend_json, record = read_blend_record(blend_dir)
    given = None if runs is None else Path(runs)
    found = open_stores(blend_json, record, blend_dir, given)
    geo_source, geo_passed = (None, []) if record.geo is None else find_geo_source(blend_json, record, blend_dir,
                                                                                    data)
    prior, geo_in = None, None
    while True:  # the first folder whose stores the pass finds to be the blend's (its sha256)
        runs, stores = found.runs, found.stores
        class_ids = list(record.class_ids or range(stores[0].logits.shape[1]))
        if stores[0].logits.shape[1] != len(class_ids):
            raise EnsError(f"{blend_json}: names {len(class_ids)} class ids, its stores predict "
                           f"{stores[0].logits.shape[1]} classes")
        labels_path = find_labels(blend_json, record, blend_dir, data)
        ids = stores[0].ids
        try:
            labels = load_labels(labels_path, ids, class_ids)
            if geo_source is not None:
                prior = prior or geo_prior(record, geo_source, class_ids)
                geo_in = geo_input(record, prior, labels_path, ids)
            read = _read_stores(blend_json, record, stores, labels, memory_budget() if memory is None else memory,
                                geo_in)
        except EnsError:  # stores changed since the blend (ids, NaN) say so first: hash them from their files
            problem = found.digest_problem(record, {m: store_digest(s, record.views)
                                                    for m, s in zip(record.models, stores)})
            if problem is None:
                raise
        else:
            problem = found.digest_problem(record, read.digests)
            if problem is None:
                break
            del read
        found = open_stores(blend_json, record, blend_dir, given, after=found, problem=problem)
    models, members = record.models, record.members
    notes = []
    if given is not None and found.runs != given:
        # --runs asked for one folder; a report of other stores must say so where the user looks
        notes.append(f"--runs {shown_path(given)}: passed over ({'; '.join(p for p in found.problems if p)}); "
                     f"read the stores under {shown_path(found.runs)}")
    if geo_passed:  # the recorded training json is gone or changed: say which file the prior came from
        notes.append(f"the geo prior's training json: read {shown_path(geo_source)} ({'; '.join(geo_passed)})")
    recorded = stores[0].manifest.dataset
    if str(recorded.source or "").endswith(".json") and recorded.sha256 not in (None, sha256_file(labels_path)):
        notes.append(f"the labels in {labels_path} are not from the json the stores were made from "
                     f"({recorded.source}); check that they label the same images")

    model_preds, tempered, blend, true_p = (read.model_predictions, read.tempered_predictions, read.blend,
                                            read.true_probability)
    geo_section = None
    if geo_in is not None:
        geo_section = _geo_section(record, geo_source, geo_in, *read.geo_ranks, len(class_ids))
        del prior, geo_in
    member_predicted = np.stack([p.predicted for p in read.member_predictions])
    del read
    labels_doc = read_json(labels_path)  # load_labels has checked it, read the same way
    names = _category_names(labels_doc, class_ids)
    rows = hardest_rows(blend, labels)
    paths = _image_paths(labels_path, labels_doc, {ids[r].item() for r in rows.tolist()})
    del labels_doc

    missing: dict[str, str] = {}
    if record.cv is None or not record.cv.rows:
        missing["summary-cv"] = (f"{blend_json} holds no cross-validation table: fit the blend with "
                                 "`ens blend --optimize SPLIT` to compare it with uniform and each model")
    if len(members) < 2:
        missing["diversity"] = "a blend of one member has no pairs to compare: blend two models or more"
    counts, counts_source = training_counts(record, class_ids, data, labels_path)
    if counts is None:
        missing["longtail"] = ("no training class counts: blend with --prior TRAIN_JSON, or give --data DIR "
                               "holding the training json (train2019.json), to see accuracy by class frequency")
    elif len(class_ids) < len(cal.BUCKETS):
        counts = None
        missing["longtail"] = f"fewer than {len(cal.BUCKETS)} classes: no head, middle and tail to tell apart"
    hardest = hardest_images(blend, true_p, labels, ids, models, stores, names, paths)
    wrong = int((blend.predicted != labels).sum())
    if not hardest:
        missing["hardest"] = f"the blend gets every image of {record.optimize.split} right: no wrong image to show"
    try:
        ledger, points = ledger_points(blend_dir)
    except (EnsError, OSError) as exc:  # a damaged ledger costs its section only
        ledger, points = None, ()
        reason = str(exc) if isinstance(exc, EnsError) else f"{exc.filename}: {exc.strerror or exc}"
        missing["leaderboard"] = f"ledger not readable: {reason}"
    if not points and "leaderboard" not in missing:
        where = ledger or " or ".join(str(p / "ledger.sqlite") for p in _candidates(blend_dir, "submissions"))
        missing["leaderboard"] = (f"no ledger row with both a CV estimate and a leaderboard score (in {where}): "
                                  "`ens submit` a blend, then `ens submissions --refresh` fetches its scores")
    return ReportData(blend_dir=blend_dir, record=record, split=record.optimize.split, labels_path=labels_path,
                      runs=runs, labels=labels, class_names=names, models=models, members=members,
                      model_predictions=model_preds, tempered_predictions=tempered,
                      member_predictions=member_predicted,
                      member_correct=member_predicted == labels[None, :], blend=blend, counts=counts,
                      counts_source=counts_source, hardest=hardest, wrong=wrong, ledger=ledger,
                      ledger_points=points, notes=tuple(printable(n) for n in notes),
                      missing={k: printable(v) for k, v in missing.items()}, geo=geo_section)


def _geo_section(record: BlendRecord, source: Path, geo: GeoInput, rank_without: np.ndarray,
                 rank_with: np.ndarray, n_classes: int) -> GeoSection:
    """The geo section of the fitted split from each row's rank of its label without and with the
    geo prior (the report's pass) and its place; top-k as the CV table's (5 without one)."""
    k = min(record.cv.top_k if record.cv is not None else 5, n_classes)
    codes = regions.region_codes(geo.lat, geo.lon)
    has_place = regions.placed(geo.lat, geo.lon)
    outcome = regions.outcomes(rank_without == 0, rank_with == 0)
    shown = regions.map_rows(has_place, outcome)
    return GeoSection(file=record.geo.file, source=source, sha256=record.geo.sha256, beta=float(record.geo.beta),
                      fitted=record.geo.fitted, k=k, overall=regions.line("all", rank_without, rank_with, k),
                      lines=tuple(regions.by_region(codes, rank_without, rank_with, k)),
                      placed=int(has_place.sum()), usable=int(geo.usable_rows().sum()),
                      map_lon=np.round(geo.lon[shown], 2), map_lat=np.round(geo.lat[shown], 2),
                      map_outcome=outcome[shown])
