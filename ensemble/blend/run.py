"""`ens blend`: fit (or load) the blend, report CV, fuse the applied split, write the blend folder."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import weights_search as ws
from ensemble import __version__
from ensemble.blend.checks import class_order_warnings, label_warnings
from ensemble.blend.geo import (GeoSource, apply_geo, fit_geo_prior, geo_cv_note, geo_weight, places_record, saved_geo,
                                split_geo, split_places)
from ensemble.blend.prior import prior_cv_note, prior_hint, prior_notes, prior_tau
from ensemble.blend.stores import BlendSplit, PassDigests, available_models, label_source, open_split
from ensemble.errors import EnsError
from ensemble.fileio import atomic_path, json_text, name_max, out_of_room, sha256_file
from ensemble.formats.blend import (BLEND_FILE, BLENDS, CHUNK_ROWS, BlendRecord, CvTable, ModelProvenance,
                                    PriorCorrection, SplitStores, prior_counts, record_format,
                                    shown_path)
from ensemble.formats.common import is_sha256, read_json
from ensemble.formats.dataset import find_split, load_labels, read_class_counts
from ensemble.formats.members import Members
from ensemble.formats.predictions import PREDICTIONS_FILE, write_predictions
from ensemble.formats.store import MANIFEST
from ensemble.memory import GIB, memory_budget, rows_per_block
from weights_search.cv import GEO_SUFFIX
from weights_search.parallel import default_workers, ordered_map
from weights_search.stats import TooManyPairs, max_pairs_within, pair_bytes

@dataclass(frozen=True)
class BlendOptions:
    """What `ens blend` does. ``None`` means "the library's default", stated here once.

    ``optimize``: the labelled split to fit on (None with ``weights``). ``apply``: the split to
    fuse; None: ``test`` when every model has a test store (fit only otherwise), and always
    ``test`` with ``weights``. ``weights``: a saved blend.json to re-apply instead of fitting;
    the fitting options (``method``: nll, ``cv``: 5 folds, ``temperature``, ``views``,
    ``fallback``, ``data``, ``prior``) are refused with it. ``fallback``: "uniform" to use equal
    weights when the fitted method does not beat them on CV. ``prior``: the training class counts
    (see :func:`ensemble.formats.dataset.read_class_counts`) to correct the blend for; ``prior_tau``: "auto" (fit ``tau``
    with the weights, the default with ``prior``) or a number in
    :data:`weights_search.TAU_BOUNDS`. ``out``: the blend folder; None: ``blends/<method>`` for
    a fit, ``<the fitted folder>-<apply split>`` beside the fitted folder for ``weights`` (a
    saved blend is never overwritten by applying it).

    ``runs``: the folder of logit stores; None: ``runs`` (relative to the working folder) for a
    fit; for ``weights``, ``runs`` when it holds every model's store of the applied split, else
    the folder the saved blend.json records (its ``runs``) when that holds them
    (:func:`_saved_runs`).

    ``geo_prior``: the training json whose observations' places and dates give the geo prior
    (:mod:`ensemble.blend.geo`); ``geo_weight``: "auto" (fit ``beta`` in the CV, the default with
    ``geo_prior``) or a number in :data:`weights_search.geo_fit.GEO_BOUNDS` (0: off). With
    ``weights``, ``geo_prior`` says where the saved blend's training json is now (it must have
    the recorded sha256; default: the recorded path) and ``geo_weight`` is refused.

    ``memory``: the bytes the row blocks of the fit and of the fusion may take
    (:mod:`ensemble.memory`); None: :func:`ensemble.memory.memory_budget`'s default.
    """

    runs: Path | None = None
    models: tuple[str, ...] | None = None
    optimize: str | None = None
    apply: str | None = None
    data: Path | None = None
    method: str | None = None
    temperature: bool = False
    views: bool = False
    cv: int | None = None
    fallback: str | None = None
    weights: Path | None = None
    top_k: int = 5
    out: Path | None = None
    prior: Path | None = None
    prior_tau: str | None = None
    memory: int | None = None
    geo_prior: Path | None = None
    geo_weight: str | None = None


@dataclass(frozen=True)
class BlendResult:
    out: Path  #: the blend folder
    record: BlendRecord  #: what blend.json holds
    predictions: Path | None  #: predictions.csv, None when no split was applied
    rows: int  #: rows of predictions.csv
    notes: tuple[str, ...] = field(default_factory=tuple)
    top_k: int = 0  #: categories per row of predictions.csv (--top-k, at most the classes); 0: none written


def run_blend(options: BlendOptions) -> BlendResult:
    """Fit (or load) the blend, report CV, fuse the applied split, write the blend folder.

    Every member's stores of the fitted and the applied split (or the saved blend and the
    applied split) must come from the same model file, preprocessing and TTA
    (:func:`ensemble.formats.blend.check_provenance`); nothing is written otherwise.
    """
    _check_options(options)
    saved = BlendRecord.read(options.weights, f"--weights {options.weights}") if options.weights is not None else None
    notes: list[str] = []
    if options.runs is None and saved is None:
        options = dataclasses.replace(options, runs=DEFAULT_RUNS)
    models = _models(options, saved)
    if options.runs is None:
        options = dataclasses.replace(options, runs=_saved_runs(options, saved, models, notes))
    runs = str(options.runs.resolve())

    apply = _apply_split(options, models, notes)
    out = _out_folder(options, apply)
    _check_not_stores(out)
    earlier = None if apply is not None else _earlier_predictions(out)

    budget = memory_budget() if options.memory is None else options.memory
    fitted = None
    if saved is not None:
        blend, record, views = _saved_blend(saved, options, models)
        models = record.models  # the blend's member order, whatever the order of --models
        reference, reference_name = saved.provenance, str(options.weights)
    else:
        views = options.views
        fitted = open_split(options.runs, models, options.optimize)
    # The applied split is opened before the fit so that a disk without room for what the run
    # writes is refused before any long work.
    split = open_split(options.runs, models, apply) if apply is not None else None
    _check_room(out, split, options.top_k, saved, fitted, views, options.geo_prior is not None)
    # The geo prior's estimator, fitted on the training json, and the applied split's places,
    # read before any long work (a bad json is found before the fit, not after it).
    geo = applied_places = None
    applied_notes: list[str] = []
    if saved is not None:
        geo = saved_geo(saved, options.weights, options.geo_prior, split.class_ids)
        if geo is not None:
            notes.extend(geo.notes)
            # the training json read: where it is now (--geo-prior), resolved
            record = record._with(geo=record.geo._with(file=str(geo.path)))
    elif options.geo_prior is not None:
        geo = fit_geo_prior(options.geo_prior, fitted.class_ids, fitted=fitted)
    if geo is not None and split is not None:
        applied_places, applied_notes = split_places(geo, _places_json(split, options.data, saved is not None), split)
    if fitted is not None:
        blend, record = _fit(options, fitted, views, notes, budget, geo)
        reference, reference_name = record.provenance, f"{options.optimize} store"

    members = None
    if split is not None:
        split.check_provenance(reference, reference_name)
        members = split.members(views)
        if tuple(members.names) != record.members:
            raise EnsError(f"{apply}: its members {', '.join(members.names)} differ from the blend's "
                           f"{', '.join(record.members)}")
        if saved is not None and saved.class_ids is not None and tuple(split.class_ids) != saved.class_ids:
            raise EnsError(f"{options.weights}: fitted on other category ids than the {apply} stores have")
        dataset_sha256 = _dataset_sha256(split)
        digests = PassDigests(split, members, views)
    # Both files appear together or not at all: each is written beside its final name and only
    # renamed into place (predictions first) once both are complete.
    # A full disk or a file-size limit names the file and leaves nothing (no folder this run made).
    predictions, rows = (out / PREDICTIONS_FILE if split is not None else None), 0
    with out_of_room("--out DIR"), contextlib.ExitStack() as stack:
        blend_tmp = stack.enter_context(atomic_path(out / BLEND_FILE))
        if split is not None:
            predictions_tmp = stack.enter_context(atomic_path(predictions))
            applied_geo = None
            if geo is not None:
                sparse, no_place, geo_notes = split_geo(geo, applied_places, split)
                notes.extend(applied_notes + geo_notes)
                applied_geo = (sparse, record.geo.beta)
                record = record._with(geo=record.geo.with_split(apply, no_place, places_record(applied_places)))
            rows = _write_predictions(predictions_tmp, split, members, blend, options.top_k, budget, applied_geo)
            stores = digests.result()
            members.close()  # its spare block arrays go now, not when a cycle (its digests' hook) is collected
            applied = SplitStores(split=apply, rows=int(split.ids.size), stores=stores,
                                  dataset_sha256=dataset_sha256, predictions_sha256=sha256_file(predictions_tmp))
            record = record.applied(None if saved is None else str(options.weights), applied, runs=runs)
        record.write(blend_tmp)
    if earlier is not None:
        # Predictions of an earlier blend beside the new blend.json would be submitted as its own.
        (out / PREDICTIONS_FILE).unlink(missing_ok=True)
        notes.append(f"removed {out / PREDICTIONS_FILE}: it held an earlier blend's predictions (of {earlier}), "
                     "and this run applied nothing")
    top_k = min(options.top_k, len(split.class_ids)) if split is not None else 0
    return BlendResult(out=out, record=record, predictions=predictions, rows=rows, notes=tuple(notes), top_k=top_k)


def _dataset_sha256(split: BlendSplit) -> str | None:
    """The sha256 of the applied split's source (json or folder) as its stores' manifests record
    it (``dataset.sha256``): every model's store must name the same, or the models saw different
    images under the same ids; None where the stores record none."""
    first_model, first = split.models[0], split.stores[0].manifest.dataset.sha256
    for model, store in zip(split.models[1:], split.stores[1:]):
        sha = store.manifest.dataset.sha256
        if sha != first:
            raise EnsError(f"{split.name}: the stores of {first_model} and {model} were made from different "
                           f"{split.name} sources (dataset sha256 {_short(first)} and {_short(sha)} in their "
                           f"{MANIFEST}); run `ens infer` on the same {split.name} split for both")
    return first if is_sha256(first) else None


def _short(sha: Any) -> str:
    if not isinstance(sha, str):
        return "none"
    return sha[:12] + ("..." if len(sha) > 12 else "")


def _check_not_stores(out: Path) -> None:
    """``out`` is neither a logit store (it holds manifest.json) nor a folder of them (a model's
    folder, ``runs/``): blend.json and predictions.csv there would sit among the stores, where
    `ens infer` and the next blend read. An :class:`EnsError` before anything is written."""
    hint = "a blend goes in a folder of its own; give another --out (blends/NAME)"
    if os.path.lexists(out / MANIFEST):
        raise EnsError(f"--out {out}: is a logit store (it holds {MANIFEST}); {hint}")
    found = _a_store_in(out)
    if found is not None:
        raise EnsError(f"--out {out}: holds logit stores ({found.as_posix()}/{MANIFEST}, ...); {hint}")


def _a_store_in(folder: Path) -> Path | None:
    """A store one or two folders below ``folder`` (``MODEL/SPLIT`` of a runs folder, ``SPLIT`` of
    a model's), relative to it; None when there is none or ``folder`` cannot be listed."""
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return None
    for child in children:
        if os.path.isfile(child / MANIFEST):
            return child.relative_to(folder)
    for child in children:
        try:
            grandchildren = sorted(p for p in child.iterdir() if p.is_dir())
        except OSError:
            continue
        for grandchild in grandchildren:
            if os.path.isfile(grandchild / MANIFEST):
                return grandchild.relative_to(folder)
    return None


def _earlier_predictions(out: Path) -> str | None:
    """For a run that applies nothing: the split of the earlier blend whose predictions.csv is
    in ``out``, to remove with the new blend.json; None when ``out`` holds no predictions.csv.
    Only the very file an earlier blend wrote goes: the blend.json there records an applied
    split and the sha256 of the predictions.csv it wrote (``apply.predictions_sha256``), and the
    file still has it. Any other predictions.csv (hand-made, edited since, or beside a blend.json
    of an older ens that recorded no sha256) is not a blend's to remove, nor can it stay beside
    the new blend.json (`ens submit` would send it as this blend's): an :class:`EnsError`, before
    anything is written."""
    predictions = out / PREDICTIONS_FILE
    if not os.path.lexists(predictions):
        return None
    try:
        doc = read_json(out / BLEND_FILE)
    except EnsError:
        doc = None
    applied = doc.get("apply") if isinstance(doc, dict) else None
    fix = ("this run applies nothing, so the new blend.json would sit beside predictions that are not its own; "
           "move it away or give another --out")
    if not (isinstance(applied, dict) and isinstance(applied.get("split"), str)):
        raise EnsError(f"--out {out}: holds a predictions.csv that no blend.json there names (no blend applied here "
                       f"wrote it), and {fix}")
    recorded = applied.get("predictions_sha256")
    if not is_sha256(recorded):
        raise EnsError(f"--out {out}: holds a predictions.csv that its blend.json (of an older ens) records no "
                       f"sha256 of, so it cannot tell the file is the one that blend wrote, and {fix}")
    if not predictions.is_file() or _sha256_or_none(predictions) != recorded:
        raise EnsError(f"--out {out}: holds a predictions.csv that is not the one its blend.json records (edited or "
                       f"replaced since that blend wrote it), and {fix}")
    return applied["split"]


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _check_options(options: BlendOptions) -> None:
    if options.weights is None and options.optimize is None:
        raise EnsError("give --optimize SPLIT to fit weights, or --weights blend.json to apply saved ones")
    if options.weights is not None:
        if options.optimize is not None:
            raise EnsError("--weights applies saved weights without fitting; drop --optimize")
        fitting = {"--method": options.method is not None, "--temperature": options.temperature,
                   "--views": options.views, "--cv": options.cv is not None,
                   "--fallback": options.fallback is not None, "--data": options.data is not None,
                   "--prior": options.prior is not None, "--prior-tau": options.prior_tau is not None,
                   "--geo-weight": options.geo_weight is not None}
        given = [name for name, used in fitting.items() if used]
        if given:
            raise EnsError(f"--weights applies saved weights (and their prior correction) as they are; "
                           f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when fitting with --optimize")
    if options.prior_tau is not None and options.prior is None:
        raise EnsError(f"--prior-tau {options.prior_tau}: give --prior FILE, the training class counts it weighs")
    prior_tau(options.prior_tau)
    if options.geo_weight is not None and options.geo_prior is None and options.weights is None:
        raise EnsError(f"--geo-weight {options.geo_weight}: give --geo-prior TRAIN_JSON, the training json whose "
                       "observations' places it weighs")
    geo_weight(options.geo_weight)
    if options.cv is not None and options.cv < 2:
        raise EnsError(f"--cv {options.cv}: cross-validation needs at least 2 folds")
    if options.top_k < 1:
        raise EnsError(f"--top-k {options.top_k}: must be at least 1")
    if options.fallback not in (None, "uniform"):
        raise EnsError(f"--fallback {options.fallback}: the only fallback is uniform")


def _models(options: BlendOptions, saved: BlendRecord | None) -> tuple[str, ...]:
    """The models to blend: ``--models``, the saved blend's, or every model with a fit store."""
    split = options.optimize or options.apply or "test"
    models = options.models or (saved.models if saved else available_models(options.runs, split))
    if not models:
        raise EnsError(f"--runs {options.runs}: no model has a {split} store; run `ens infer` first")
    if len(set(models)) != len(models):
        raise EnsError(f"--models names a model twice: {', '.join(models)}")
    return tuple(models)


#: The folder of logit stores when --runs is not given.
DEFAULT_RUNS = Path("runs")


def _saved_runs(options: BlendOptions, saved: BlendRecord, models: Sequence[str], notes: list[str]) -> Path:
    """Where a saved blend (``--weights``, no ``--runs``) finds the stores of the applied split:
    ``runs`` here when it holds every model's store (the default --runs, as for a fit), else the
    folder blend.json records when that does (a blend made with ``--runs DIR``, applied from
    elsewhere or from inside its own folder); a note says which was read when the two differ."""
    split = options.apply or "test"

    def lacking(folder: Path) -> str | None:
        # os.path.isfile: a path the OS cannot take (too long) is no file, where Path.is_file raises
        return next((m for m in models if not os.path.isfile(folder / m / split / MANIFEST)), None)

    recorded = saved.runs_folder()  # None too where the OS cannot use the recorded name
    if recorded is not None and DEFAULT_RUNS.resolve() == recorded.resolve():
        recorded = None
    missing = lacking(DEFAULT_RUNS)
    if missing is None:
        if recorded is not None:
            shown = shown_path(recorded)
            notes.append(f"read the {split} stores under {DEFAULT_RUNS} (the default --runs); {options.weights} was "
                         f"fitted on stores under {shown} (give --runs {shown} to apply it to those)")
        return DEFAULT_RUNS
    if recorded is None:
        return DEFAULT_RUNS  # open_split names the missing store
    if lacking(recorded) is None:
        notes.append(f"read the {split} stores under {shown_path(recorded)}, where {options.weights} records them "
                     f"({DEFAULT_RUNS} holds no {split} store of {missing})")
        return recorded
    raise EnsError(f"--weights {options.weights}: no {split} store of {missing} under {DEFAULT_RUNS} (the default "
                   f"--runs) nor under {shown_path(recorded)} (where it records its stores); give --runs DIR, or run "
                   f"`ens infer` on the {split} split")


def _apply_split(options: BlendOptions, models: Sequence[str], notes: list[str]) -> str | None:
    """``--apply``, else ``test``: always for saved weights, for a fit when every model has it."""
    if options.apply is not None or options.weights is not None:
        return options.apply or "test"
    lacking = [m for m in models if not (options.runs / m / "test" / MANIFEST).is_file()]
    if not lacking:
        return "test"
    if len(lacking) < len(models):
        notes.append(f"fitted only: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no test store "
                     f"under {options.runs} (run `ens infer` on test for {'it' if len(lacking) == 1 else 'them'}, "
                     "then apply the saved weights with --weights)")
    return None


def _out_folder(options: BlendOptions, apply: str | None) -> Path:
    if options.weights is None:
        return options.out or Path(BLENDS) / (options.method or ws.DEFAULT_METHOD)
    fitted = options.weights.parent
    if fitted.name in ("", "..") or ".." in fitted.parts:  # blend.json, ./blend.json, ../blend.json: name it
        fitted = fitted.resolve()
    if options.out is None and not fitted.name:
        raise EnsError(f"--weights {options.weights}: its folder has no name to put -{apply} after; give --out DIR")
    if options.out is None and len(os.fsencode(f"{fitted.name}-{apply}")) > name_max(fitted.parent):
        raise EnsError(f"--weights {options.weights}: its folder's name and -{apply} (the default --out) are longer "
                       f"than the file system allows in a name ({name_max(fitted.parent)} bytes); give --out DIR")
    out = options.out or fitted.with_name(f"{fitted.name}-{apply}")
    if out.resolve() == fitted.resolve():
        raise EnsError(f"--out {out}: holds the blend that --weights {options.weights} reads; applying it "
                       f"writes to another folder (leave out --out for {fitted.with_name(fitted.name + '-' + str(apply))})")
    return out


def _fit(options: BlendOptions, split: BlendSplit, views: bool, notes: list[str],
         budget: int, geo: GeoSource | None = None) -> tuple[Any, BlendRecord]:
    """Cross-validate and fit the blend on ``split`` in the same passes over its stores
    (:func:`weights_search.cross_validate_and_fit`), read in blocks of rows (``budget``: the
    bytes the blocks' work may take); with the geo prior ``geo``, its weight too (in one more
    pass)."""
    models = split.models
    method_asked = options.method or ws.DEFAULT_METHOD
    folds = 5 if options.cv is None else options.cv
    _check_folds(folds, options.cv is None, split)
    members = split.members(views)
    # Each block read while the one before is worked on (Reader.each_block), two held at once
    # within FIT_COPIES: their arrays reused, not a new one per block.
    members.reuse_arrays = True
    digests = PassDigests(split, members, views)
    names = members.names
    labels_path = label_source(split, options.data)
    labels = load_labels(labels_path, split.ids, split.class_ids)
    notes.extend(label_warnings(split, labels_path))
    class_order_at = len(notes)  # its notes come from the CV's single-member rows, in this place
    adjustment = counts = None
    if options.prior is not None:
        counts = prior_counts(read_class_counts(options.prior), split.class_ids, options.prior)
        notes.extend(prior_notes(counts, split.class_ids, options.prior))
        adjustment = ws.LogitAdjustment(ws.class_log_prior(counts), prior_tau(options.prior_tau))
    notes.extend(prior_hint(options.data, options.prior is not None))
    sparse, no_place, weight, places = None, 0, geo_weight(options.geo_weight), None
    if geo is not None:
        notes.extend(geo.notes)
        # the places' json is the labels': label_warnings notes it when it is not the stores' json
        places, _ = split_places(geo, labels_path, split)
        sparse, no_place, geo_notes = split_geo(geo, places, split)
        notes.extend(geo_notes)
    block_budget, max_pairs = _pairs_budget(method_asked, budget, members, labels.size, adjustment is not None)
    block_rows = _block_rows(block_budget, members, FIT_COPIES)
    try:
        # top-k of fewer classes than k is top-(classes): the table says so
        report, blend = ws.cross_validate_and_fit(
            members, labels, method_asked, n_folds=folds, temperature=options.temperature, member_names=names,
            top_k=min(options.top_k, len(split.class_ids)), prior=adjustment, block_rows=block_rows,
            fallback=options.fallback, max_pairs=max_pairs, geo=sparse, geo_weight=weight)
        method = method_asked
        fallback_used = False
        if method_asked != "uniform" and not report.beats_uniform:
            uniform = report.uniform_row.name if report.prior else "uniform weights"
            notes.append(f"{report.method_row.name} does not beat {uniform} on {folds}-fold CV "
                         f"(top-1 {report.method_row.top1:.4f} vs {report.uniform_row.top1:.4f})"
                         + (f"; --fallback uniform: using {uniform}" if options.fallback else
                            "; --fallback uniform would use equal weights"))
            if options.fallback == "uniform":
                method, fallback_used = "uniform", True
        if adjustment is not None:
            notes.extend(prior_cv_note(report, method))
        if geo is not None:
            notes.extend(geo_cv_note(report, method, given=weight is not None))
    except TooManyPairs as exc:
        raise EnsError(_too_many_pairs(exc, method_asked, split.name, budget, adjustment is not None)) from None
    except ValueError as exc:
        raise EnsError(f"blend: {exc}") from None
    notes[class_order_at:class_order_at] = class_order_warnings(split.name, len(split.class_ids),
                                                                _model_top1(report, members))
    stores = digests.result()
    members.close()  # its spare block arrays go now, before the fusion's (not at a cycle collection)
    record = BlendRecord(
        format=record_format(geo is not None), ens=__version__, method=method, requested_method=method_asked,
        fallback=fallback_used, fusion=blend.fusion, params=dict(blend.params), models=tuple(models),
        members=tuple(names), views=views, weights=dict(zip(names, blend.weights)),
        temperatures=None if blend.temperatures is None else dict(zip(names, blend.temperatures)),
        train_score=blend.train_score, class_ids=tuple(split.class_ids),
        optimize=SplitStores(split=options.optimize, rows=int(split.ids.size), stores=stores),
        labels=str(labels_path), stores=stores, runs=str(options.runs.resolve()),
        provenance={m: ModelProvenance.of_store(s) for m, s in zip(models, split.stores)},
        prior=None if adjustment is None else PriorCorrection(
            file=str(options.prior), sha256=sha256_file(options.prior), counts=tuple(counts.tolist()),
            zero_count=ws.ZERO_COUNT, tau=blend.tau, tau_fitted=adjustment.tau is None),
        geo=None if geo is None else geo.record(weight, report.geo_beta, {split.name: no_place},
                                                {split.name: places_record(places)}),
        cv=_cv_table(report, "uniform" if fallback_used or method == "uniform" else "method", geo is not None),
    )
    return blend, record


def _cv_table(report: Any, kind: str, geo: bool) -> CvTable:
    """blend.json's CV table of ``report``, the row in use that of ``kind`` (with the geo prior
    when the blend has it)."""
    used = report.row(kind, report.prior) or report.uniform_row
    if not geo:
        return CvTable.of(report, used.name)
    return CvTable.of(report, used.name + GEO_SUFFIX, report.fold_betas[used.kind])


def _places_json(split: BlendSplit, data: Path | None, applying: bool = False) -> Path:
    """The json of ``split``'s images, for their places: its file under ``--data``, else the json
    its stores were made from (``applying``: a saved blend's, which takes no ``--data``)."""
    if data is not None:
        return find_split(data, split.name, folders=False)
    source = split.stores[0].manifest.dataset.source
    if source and str(source).endswith(".json") and Path(source).is_file():
        return Path(source)
    made = (f"was made from {shown_path(source)}, which is not there" if source and str(source).endswith(".json")
            else "was not made from a json")
    raise EnsError(f"{split.stores[0].path}: the {split.name} store {made}, so its images' places are unknown to the "
                   + ("geo prior; give --data DIR (the folder of its json)" if data is None and not applying else
                      f"geo prior; put the {split.name} json the stores were made from back at that path"))


def _check_folds(folds: int, default: bool, split: BlendSplit) -> None:
    """``--cv`` against the fitted split's rows, in the options' words (the library's own check,
    :func:`weights_search.stratified_folds`, knows neither --cv nor the split)."""
    rows = int(split.ids.size)
    if folds <= rows:
        return
    cv = f"--cv {folds}" + (" (the default)" if default else "")
    if rows < 2:
        raise EnsError(f"{cv}: the {split.name} split has {rows} row{'' if rows == 1 else 's'}; fitting a blend "
                       "and its cross-validated estimate needs at least 2")
    raise EnsError(f"{cv}: the {split.name} split has {rows} rows, and cross-validation holds out at least one per "
                   f"fold; give --cv {rows} or fewer")


def _saved_blend(saved: BlendRecord, options: BlendOptions, models: Sequence[str]) -> tuple[Any, BlendRecord, bool]:
    unknown = [m for m in saved.models if m not in models]
    if unknown:
        raise EnsError(f"--weights {options.weights}: names models that are not given: {', '.join(unknown)}")
    extra = [m for m in models if m not in saved.models]
    if extra:
        raise EnsError(f"--weights {options.weights}: has no weight for {', '.join(extra)}")
    return saved.fitted(), saved, saved.views


def _write_predictions(path: Path, split: BlendSplit, members: Members, blend: Any, top_k: int, budget: int,
                       geo: tuple[Any, float] | None = None) -> int:
    """Fuse ``members`` block by block (``budget``: the bytes a block's work may take) into
    predictions.csv at ``path`` (a temporary file); ``geo``: the rows' sparse geo prior and its
    weight ``beta``, added to each fused block before its top-k (:func:`ensemble.blend.geo.apply_geo`:
    the probabilities written are those of the blend with it, renormalised). A member's NaN or infinite logits are an
    EnsError from the block that holds them (nothing is renamed into place then)."""
    k = min(top_k, len(split.class_ids))
    # Blocks are read as stored, in order, on this thread while the ones before are converted
    # to float32 and fused on others (the results in row order): three blocks held at once
    # with two workers, within FUSE_COPIES.
    workers = default_workers(2) if FUSE_WORKERS is None else FUSE_WORKERS
    rows = _block_rows(budget, members, FUSE_COPIES)
    members.reuse_arrays = True  # those blocks' arrays, not a new one per block

    def fused(raw: Any) -> tuple[int, np.ndarray, np.ndarray]:
        start, block = raw.start, members.convert(raw)
        del raw
        log_q = blend.log_proba(block)
        scale = None if geo is None else apply_geo(geo[0], log_q, start, geo[1])
        top, probs = ws.top_k(log_q, k)
        if scale is not None:
            probs *= scale
        return start, top, probs

    raws = (members.read_raw(start, start + rows) for start in range(0, members.n_rows, rows))
    try:
        return write_predictions(path, split.ids, split.class_ids, ordered_map(fused, raws, workers), k)
    except ValueError as exc:
        raise EnsError(f"{split.name}: cannot fuse its stores ({exc})") from None


#: Float32 copies of one block of every member that the work on a block holds at once, with
#: room to spare. The fusion: the block read (float16: half a copy), and on each of its two
#: workers a block converted to float32, the fusion's temporaries, the fused block and its
#: top-k (3.2 copies measured at the peak with one worker, 10,000 classes, 3 members, nll). The
#: fit: the block worked on, its log-probabilities (in its place) and what the methods'
#: collectors make of them (2.4 copies measured with nll, 3.1 with logit, its per-row summaries
#: included), the next block converted meanwhile on the other worker, and the one after, read
#: as stored (weights_search.fitted.Reader.each_block): FIT_COPIES.
FUSE_COPIES = 5
#: Threads converting and fusing the applied split's blocks beside the one reading them (0: it
#: does it all; None: :func:`weights_search.parallel.default_workers`, 2 on two cores or more).
#: Each holds a block: the fusion's own arrays are about 1.3 copies of a block with 4 members
#: (the block and the fused (n, C) array), 2.3 with one, and a block read as float16 is half a
#: copy (measured applying a blend, 4 members x 20,000 x 10,000, one worker: 0.27 GiB peak at
#: --memory 0.25 and 0.89 GiB at 3, the blocks' arrays kept for reuse; 0.25 and 0.91 GiB before,
#: one thread, the row-wide top-k's (n, C) cumulative sum).
FUSE_WORKERS: int | None = None
FIT_COPIES = 6


def _pairs_budget(method: str, budget: int, members: Members, rows: int, prior: bool) -> tuple[int, int | None]:
    """The bytes of ``budget`` the fit's row blocks may take, and the most rival pairs the fit
    may hold (None: the method keeps none). A method that counts rows right (``accuracy``)
    keeps rival pairs (:mod:`weights_search.stats`): half the budget goes to the blocks, the
    other half to the pairs, held during the pass beside a block and then with the margins
    fitted on them (:func:`weights_search.stats.max_pairs_within`; with a prior the blend
    without it keeps its own pairs too)."""
    try:
        counts_rows = getattr(ws.get_method(method), "counts_rows", False)
    except ValueError:  # an unknown method: cross_validate_and_fit says so
        return budget, None
    if not counts_rows:
        return budget, None
    half = budget // 2
    return half, max_pairs_within(budget - half, members.n_members, rows, sets=2 if prior else 1)


def _too_many_pairs(exc: TooManyPairs, method: str, split: str, budget: int, prior: bool) -> str:
    """The one line for a fit past its bound on rival pairs, in the CLI's words: how far the
    pass got, about the memory all the pairs would take at that rate, and what to change."""
    sets = 2 if prior else 1
    per_pair = pair_bytes(exc.n_members, exc.n_rows) + (sets - 1) * (8 + 4 * exc.n_members)
    projected = exc.n_pairs * exc.n_rows / max(exc.rows, 1)
    need = 2 * projected * per_pair / GIB  # the pairs get half the budget
    what = (f"--method {method}: the first {exc.rows:,} of {exc.n_rows:,} {split} images already have {exc.n_pairs:,} "
            f"rival pairs (classes some model scores at least as high as the true class), more than the "
            f"{exc.max_pairs:,} that --memory {budget / GIB:.3g} GiB holds ({per_pair} bytes each over the fit; "
            f"all of them would need about --memory {need:.3g})")
    if len(exc.ends) > 1:
        return (f"{what}; with --prior and a fitted tau the pairs span tau in [{min(exc.ends):g}, {max(exc.ends):g}]: "
                "--prior-tau T collects them at that tau only (far fewer), --memory GIB raises the bound, "
                "--method nll needs none")
    return f"{what}: --memory GIB raises the bound, --method nll needs none"


def _block_rows(budget: int, members: Members, copies: float) -> int:
    """Rows per block within ``budget`` bytes (:func:`ensemble.memory.rows_per_block`), at most
    :data:`CHUNK_ROWS` (larger blocks buy no speed)."""
    return min(CHUNK_ROWS, rows_per_block(budget, members.n_members, members.n_classes, copies))


def _model_top1(report: Any, members: Members) -> dict[str, float]:
    """Each model's top-1 on the fitted split, from the CV report's single-member rows (a single
    member's held-out predictions are its own, whatever the fold): with views, a model's best
    view's."""
    scores: dict[str, float] = {}
    single = [row for row in report.rows if row.kind == "member"]
    for member, row in zip(members.members, single):
        model = member.name.partition("/")[0] if "/" in member.name else member.name
        scores[model] = max(scores.get(model, 0.0), row.top1)
    return scores


def _check_room(out: Path, split: BlendSplit | None, top_k: int, saved: BlendRecord | None,
                fitted: BlendSplit | None, views: bool, geo: bool = False) -> None:
    """Refuse, before any long work, a run whose predictions.csv and blend.json the disk under
    ``out`` cannot hold (sizes from :func:`_predictions_bytes` and :func:`_record_bytes`): one
    line naming both. Both files are written beside their final names before an older pair
    there is replaced, so an older pair's room does not count."""
    predictions = 0 if split is None else _predictions_bytes(split, top_k)
    record = _record_bytes(saved, fitted or split, views, geo)
    folder = out
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # a file system that cannot say: the writes will, if it comes to that
        return
    need = predictions + record
    if need <= free:
        return
    what = (f"{PREDICTIONS_FILE} (about {_size(predictions)} for {split.ids.size} images of {split.name}) and "
            f"{BLEND_FILE} (about {_size(record)}) need" if split is not None
            else f"{BLEND_FILE} (about {_size(record)}) needs")
    raise EnsError(f"--out {out}: {what} {_size(need)} there, and its disk has {_size(free)} free; free space, "
                   "or give --out on another disk")


#: Characters of a probability in predictions.csv at most (``{:.6g}``: ``1.23457e-05``), and
#: of the rest of a blend.json for each model and member (names, weights, provenance, sha256s,
#: a CV row) and in all, generously.
_PROB_WIDTH = 11
_RECORD_PER_MEMBER = 4096
_RECORD_REST = 16384


def _predictions_bytes(split: BlendSplit, top_k: int) -> int:
    """predictions.csv's size for ``split`` at most: each row's id, its ``k`` widest category
    ids, ``k`` probabilities and the separators; the header."""
    k = min(top_k, len(split.class_ids))
    widths = sorted((len(str(c).encode("utf-8")) for c in split.class_ids), reverse=True)
    row = sum(widths[:k]) + k * _PROB_WIDTH + 2 * k + 1  # commas and the newline
    ids = np.char.str_len(np.char.encode(np.asarray(split.ids).astype(str), "utf-8")).sum() if split.ids.size else 0
    return int(ids) + split.ids.size * row + 32 * (2 * k + 1)


def _record_bytes(saved: BlendRecord | None, split: BlendSplit, views: bool, geo: bool = False) -> int:
    """blend.json's size, about: a saved blend's own text, else twice its class ids' (room for
    --prior's counts beside them), plus a few kB per model and member; ``geo``: a fit with the
    geo prior, whose record may list every row id of the fitted ``split`` (``geo.left_out``, its
    images found in the training json)."""
    members = sum(len(s.view_names) if views and s.view_names else 1 for s in split.stores)
    rest = _RECORD_PER_MEMBER * (len(split.models) + members) + _RECORD_REST
    if saved is not None:
        return len(saved.text().encode("utf-8")) + rest
    left_out = len(json_text({"left_out": split.ids.tolist()}).encode("utf-8")) if geo else 0
    return 2 * len(json_text({"class_ids": list(split.class_ids)}).encode("utf-8")) + left_out + rest


def _size(count: int) -> str:
    """A byte count as a message gives it: ``12.3 GB`` (decimal units, as ``df -H``; as `ens
    infer` gives its stores' sizes)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
