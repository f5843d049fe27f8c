"""Stage 3, `ens blend`: logit stores in, blend weights and fused top-k predictions out.

The maths lives in :mod:`weights_search` (pure arrays); this module reads the stores, checks
that they line up, finds the validation labels, runs the cross-validated report and the final
fit, streams the applied split through the fitted blend, and writes the two output files of a
blend folder (``blends/<name>/``)::

    blend.json        method, members, weights, temperatures, the CV table, the sha256 of every
                      input store, the label source, each model's provenance (model file
                      sha256, preprocessing, TTA views and merge) and the long-tail prior
                      correction (the prior file's sha256, the class counts, tau); `ens blend
                      --weights` re-applies it, to stores made the same way only
    predictions.csv   id,category_1..category_K,prob_1..prob_K: one row per image of the
                      applied split, real dataset category ids, most probable first

A *member* is a model (``resnet50``) or, with ``--views``, one TTA view of a model
(``resnet50/flip``).

``--prior FILE`` gives the training class counts (:func:`read_class_counts`: a COCO/iNat json's
annotations, a JSON object ``{"category_id": count}`` or a CSV ``category_id,count``), mapped to
the output columns through the stores' class ids; the blend's prediction is then corrected for
that prior after fusion (:mod:`weights_search.prior`), ``tau`` fitted with the weights.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ensemble import __version__
from ensemble.datasets import check_regular_file, find_split
from ensemble.errors import EnsError
from ensemble.fileio import atomic_path, json_text, sha256_file
import weights_search as ws
from ensemble.inference.store import IDS, LOGITS, MANIFEST, VIEWS, LogitStore, read_store

BLEND_FILE = "blend.json"
PREDICTIONS_FILE = "predictions.csv"
#: 2: per-model provenance, checked against every applied store; 3: the prior correction (an older
#: ens would apply a blend.json without it, silently).
FORMAT_VERSION = 3
#: Rows checked for NaN / inf, and fused, per step: bounded memory whatever the split size.
CHUNK_ROWS = 2048


@dataclass(frozen=True)
class BlendOptions:
    """What `ens blend` does. ``None`` means "the library's default", stated here once.

    ``optimize``: the labelled split to fit on (None with ``weights``). ``apply``: the split to
    fuse; None: ``test`` when every model has a test store (fit only otherwise), and always
    ``test`` with ``weights``. ``weights``: a saved blend.json to re-apply instead of fitting;
    the fitting options (``method``: nll, ``cv``: 5 folds, ``temperature``, ``views``,
    ``fallback``, ``data``, ``prior``) are refused with it. ``fallback``: "uniform" to use equal
    weights when the fitted method does not beat them on CV. ``prior``: the training class counts
    (see :func:`read_class_counts`) to correct the blend for; ``prior_tau``: "auto" (fit ``tau``
    with the weights, the default with ``prior``) or a number in
    :data:`weights_search.TAU_BOUNDS`. ``out``: the blend folder; None: ``blends/<method>`` for
    a fit, ``<the fitted folder>-<apply split>`` beside the fitted folder for ``weights`` (a
    saved blend is never overwritten by applying it).
    """

    runs: Path = Path("runs")
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


@dataclass(frozen=True)
class BlendResult:
    out: Path  #: the blend folder
    record: Mapping[str, Any]  #: what blend.json holds
    predictions: Path | None  #: predictions.csv, None when no split was applied
    rows: int  #: rows of predictions.csv
    notes: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------
# Reading and checking the stores


@dataclass(frozen=True)
class _Split:
    """The stores of one split, one per model, checked to line up."""

    name: str
    stores: tuple[LogitStore, ...]
    models: tuple[str, ...]

    @property
    def ids(self) -> np.ndarray:
        return self.stores[0].ids

    @property
    def class_ids(self) -> tuple[int | str, ...]:
        return _class_ids(self.stores[0])

    def members(self, views: bool) -> tuple[list[str], list[np.ndarray]]:
        return member_arrays(self.models, self.stores, views)


def member_arrays(models: Sequence[str], stores: Sequence[LogitStore],
                  views: bool) -> tuple[list[str], list[np.ndarray]]:
    """The blend members of ``models``' ``stores``: each model, or with ``views`` each
    ``model/view``; their names and ``(rows, classes)`` arrays (memory-mapped, not copied), each
    checked to hold only finite values."""
    names, arrays = [], []
    for model, store in zip(models, stores):
        if not views:
            names.append(model)
            arrays.append(_check_finite(store, model, store.logits))
            continue
        if store.views is None:
            raise EnsError(f"{store.path}: no per-view logits; rerun `ens infer` with --keep-views "
                           "to blend views")
        for v, view in enumerate(store.view_names):
            names.append(f"{model}/{view}")
            arrays.append(_check_finite(store, f"{model}/{view}", store.views[v]))
    return names, arrays


def available_models(runs: Path, split: str) -> tuple[str, ...]:
    """Model folders under ``runs`` that hold a store for ``split``, sorted by name."""
    if not runs.is_dir():
        raise EnsError(f"--runs {runs}: no such folder")
    return tuple(sorted(p.name for p in runs.iterdir() if (p / split / MANIFEST).is_file()))


def _open_split(runs: Path, models: Sequence[str], split: str) -> _Split:
    stores = []
    for model in models:
        path = runs / model / split
        if not (path / MANIFEST).is_file():
            raise EnsError(f"{path}: no logit store; run `ens infer` on the {split} split for {model}")
        stores.append(read_store(path))
    _check_aligned(split, models, stores)
    return _Split(split, tuple(stores), tuple(models))


def _check_aligned(split: str, models: Sequence[str], stores: Sequence[LogitStore]) -> None:
    first, ref = models[0], stores[0]
    for model, store in zip(models[1:], stores[1:]):
        if store.logits.shape[1] != ref.logits.shape[1]:
            raise EnsError(f"{split}: {model} predicts {store.logits.shape[1]} classes, {first} "
                           f"{ref.logits.shape[1]}")
        if _class_ids(store) != _class_ids(ref):
            raise EnsError(f"{split}: {model} and {first} map their outputs to different category ids "
                           "(export them with the same --classes)")
        if store.ids.shape != ref.ids.shape or not np.array_equal(store.ids, ref.ids):
            raise EnsError(f"{split}: the image ids of {model} and {first} differ: "
                           f"{_id_difference(first, ref.ids, model, store.ids)}")


def _class_ids(store: LogitStore) -> tuple[int | str, ...]:
    """Column j's category id; a store without a mapping (``null``) predicts category j."""
    ids = store.class_ids
    return tuple(range(store.logits.shape[1])) if ids is None else ids


def _check_finite(store: LogitStore, member: str, array: np.ndarray) -> np.ndarray:
    """``array`` (``(rows, classes)``, from ``store``) unchanged once it is checked, chunk by chunk,
    to hold no NaN or infinity; otherwise an EnsError naming the store, the member and the ids."""
    for start in range(0, array.shape[0], CHUNK_ROWS):
        finite = np.isfinite(array[start:start + CHUNK_ROWS]).all(axis=1)
        if not finite.all():
            bad = store.ids[start + np.flatnonzero(~finite)[:3]]
            raise EnsError(f"{store.path}: {member} has NaN or infinite logits, first at image ids "
                           f"{', '.join(map(str, bad))}")
    return array


def _id_difference(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> str:
    if a.shape != b.shape:
        only_a = np.setdiff1d(a, b)[:3]
        only_b = np.setdiff1d(b, a)[:3]
        return (f"{a.size} against {b.size} images; only in {name_a}: {', '.join(map(str, only_a)) or '-'}; "
                f"only in {name_b}: {', '.join(map(str, only_b)) or '-'}")
    rows = np.flatnonzero(a != b)
    first = ", ".join(f"{a[r]} in {name_a} and {b[r]} in {name_b} at row {r}" for r in rows[:3])
    return f"{rows.size} rows differ, first: {first}"


def store_digest(store: LogitStore, views: bool) -> str:
    """sha256 over the store's arrays (ids, logits, and views when they are blended)."""
    digest = hashlib.sha256()
    names = [IDS, LOGITS] + ([VIEWS] if views and store.views is not None else [])
    for name in names:
        with open(store.path / name, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Labels


def label_source(split: _Split, data: Path | None) -> Path:
    """The json holding the split's labels: the split's file under ``--data`` (found by the rule
    every command uses, :func:`ensemble.datasets.find_split`), else the json the stores were
    made from."""
    if data is not None:
        return find_split(data, split.name, folders=False)
    source = split.stores[0].manifest.get("dataset", {}).get("source")
    if source and str(source).endswith(".json") and Path(source).is_file():
        return Path(source)
    raise EnsError(f"{split.stores[0].path}: the {split.name} split did not come from a json with labels; "
                   "give --data DIR")


def load_labels(path: Path, ids: np.ndarray, class_ids: Sequence[int | str]) -> np.ndarray:
    """Column index of each image's true category, ``(rows,)`` int64, in the order of ``ids``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsError(f"{path}: unreadable label file ({exc})") from None
    truth: dict[Any, Any] = {}
    for ann in data.get("annotations") or []:
        truth[ann.get("image_id")] = ann.get("category_id")
    if not truth:
        raise EnsError(f"{path}: no annotations, so no labels to fit blend weights on")
    column = {c: j for j, c in enumerate(class_ids)}
    missing = [i for i in ids.tolist() if i not in truth]
    if missing:
        raise EnsError(f"{path}: {len(missing)} images have no label, first ids {', '.join(map(str, missing[:5]))}")
    unknown = [(i, truth[i]) for i in ids.tolist() if truth[i] not in column]
    if unknown:
        image, category = unknown[0]
        raise EnsError(f"{path}: image {image} is labelled {category!r}, a category the models do not predict "
                       f"({len(unknown)} such images)")
    return np.fromiter((column[truth[i]] for i in ids.tolist()), dtype=np.int64, count=ids.size)


# --------------------------------------------------------------------------------------------
# The training prior (--prior)


def read_class_counts(path: Path) -> dict[int | str, int]:
    """The training images per category id in ``path``, in any of three forms:

    - a COCO/iNat json (``train2019.json``): the number of ``annotations`` of each
      ``category_id``; the categories listed under ``categories`` that no annotation names count 0;
    - a JSON object ``{"category_id": count, ...}``;
    - a CSV of lines ``category_id,count`` (``.csv``; a header line ``category_id,count`` is allowed).

    Ids that spell integers become integers, as the models' class ids do. A count must be a
    non-negative integer; an id may appear once. Anything else is an :class:`EnsError` naming
    the file and the entry.
    """
    check_regular_file(path, "--prior")
    label = f"--prior {path}"
    if path.suffix.lower() == ".csv":
        return _csv_counts(path, label)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsError(f"{label}: not a JSON file ({exc}); give a COCO/iNat json, a JSON object "
                       "{\"category_id\": count} or a CSV category_id,count") from None
    if not isinstance(doc, dict):
        raise EnsError(f"{label}: expected a JSON object (a COCO/iNat json or {{\"category_id\": count}})")
    if "annotations" in doc or "images" in doc or "categories" in doc:
        return coco_counts(doc, label)
    counts: dict[int | str, int] = {}
    for key, value in doc.items():
        category = _category(key)
        if category in counts:
            raise EnsError(f"{label}: counts category {category} twice")
        counts[category] = _count(value, f"{label}: the count of category {key!r}")
    if not counts:
        raise EnsError(f"{label}: no categories")
    return counts


def coco_counts(doc: dict, label: str) -> dict[int | str, int]:
    """The annotations of each ``category_id`` of a COCO/iNat json ``doc`` (its ``categories``
    that no annotation names count 0); :class:`EnsError` starting with ``label`` when it has no
    annotations or one lacks its category. The one counter of training images: ``ens blend
    --prior`` and ``ens submit --missing prior`` both count with it."""
    annotations = doc.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise EnsError(f"{label}: a COCO json without annotations (a test split?); give the training json, "
                       "whose annotations are counted")
    counts: dict[int | str, int] = {}
    for category in doc.get("categories") or []:
        if isinstance(category, dict) and isinstance(category.get("id"), (int, str)):
            counts.setdefault(_category(category["id"]), 0)
    for i, annotation in enumerate(annotations):
        category = annotation.get("category_id") if isinstance(annotation, dict) else None
        if not isinstance(category, (int, str)) or isinstance(category, bool):
            raise EnsError(f"{label}: annotations[{i}] has no category_id")
        category = _category(category)
        counts[category] = counts.get(category, 0) + 1
    return counts


def _csv_counts(path: Path, label: str) -> dict[int | str, int]:
    counts: dict[int | str, int] = {}
    lines: dict[int | str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EnsError(f"{label}: not a readable CSV ({exc})") from None
    for number, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if number == 1 and [cell.strip() for cell in row] == ["category_id", "count"]:
            continue
        if len(row) != 2:
            raise EnsError(f"{label}: line {number} has {len(row)} fields; expected category_id,count")
        category = _category(row[0].strip())
        if category in lines:
            raise EnsError(f"{label}: line {number} counts category {row[0].strip()} again (first on line "
                           f"{lines[category]})")
        text = row[1].strip()
        counts[category] = _count(int(text) if re.fullmatch(r"[+-]?\d+", text) else text,
                                  f"{label}: line {number}: the count {text!r}")
        lines[category] = number
    if not counts:
        raise EnsError(f"{label}: no lines category_id,count")
    return counts


def _category(value: int | str) -> int | str:
    """A category id as the models' class ids hold it: a string that spells an integer is one."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EnsError(f"{what} is not a non-negative integer")
    return value


def prior_counts(counts: Mapping[int | str, int], class_ids: Sequence[int | str], path: Path) -> np.ndarray:
    """``(C,)`` int64: the count of each output column's category (``class_ids``, the stores'
    mapping, the same for every model). A category the models predict that ``counts`` lacks, or
    one in ``counts`` that no model predicts, is an :class:`EnsError` naming them."""
    columns = list(class_ids)
    missing = [c for c in columns if c not in counts]
    if missing:
        raise EnsError(f"--prior {path}: no count for {len(missing)} of the {len(columns)} categories the models "
                       f"predict: {_ids(missing)}")
    known = set(columns)
    extra = [c for c in counts if c not in known]
    if extra:
        raise EnsError(f"--prior {path}: counts {len(extra)} categories that no model predicts: {_ids(extra)} "
                       "(were the models exported with other --classes?)")
    return np.array([counts[c] for c in columns], dtype=np.int64)


def _ids(values: Sequence[Any], shown: int = 5) -> str:
    return ", ".join(map(str, values[:shown])) + (f" and {len(values) - shown} more" if len(values) > shown else "")


def prior_notes(counts: np.ndarray, class_ids: Sequence[int | str], path: Path) -> list[str]:
    """A note naming the categories without a training image, and how they are counted."""
    zero = [c for c, n in zip(class_ids, counts) if n == 0]
    if not zero:
        return []
    return [f"--prior {path}: {len(zero)} of the {len(counts)} categories have no training image ({_ids(zero)}); "
            f"each is counted as {ws.ZERO_COUNT:g} images (half the rarest possible count), so that its "
            "log-prior stays finite"]


def prior_hint(data: Path | None, given: bool) -> list[str]:
    """When ``--data`` holds a training json and no ``--prior`` was given, the flag to try."""
    if data is None or given:
        return []
    train = find_split(data, "train", folders=False, required=False)
    if train is None:
        return []
    return [f"{train} holds the training labels: add --prior {train} to correct the blend for the models' "
            "long-tailed training prior (logit adjustment, tau fitted on validation)"]


# --------------------------------------------------------------------------------------------
# The command


def run_blend(options: BlendOptions) -> BlendResult:
    """Fit (or load) the blend, report CV, fuse the applied split, write the blend folder.

    Every member's stores of the fitted and the applied split (or the saved blend and the
    applied split) must come from the same model file, preprocessing and TTA
    (:func:`check_provenance`); nothing is written otherwise.
    """
    _check_options(options)
    saved = _read_blend_json(options.weights) if options.weights is not None else None
    models = _models(options, saved)
    notes: list[str] = []

    if saved is not None:
        blend, record, views = _saved_blend(saved, options, models)
        models = tuple(record["models"])  # the blend's member order, whatever the order of --models
        reference, reference_name = saved["provenance"], str(options.weights)
    else:
        views = options.views
        fitted = _open_split(options.runs, models, options.optimize)
        blend, record = _fit(options, fitted, views, notes)
        reference, reference_name = record["provenance"], f"{options.optimize} store"
    apply = _apply_split(options, models, notes)
    out = _out_folder(options, apply)

    split = arrays = None
    if apply is not None:
        split = _open_split(options.runs, models, apply)
        check_provenance(reference, reference_name, split)
        names, arrays = split.members(views)
        if names != record["members"]:
            raise EnsError(f"{apply}: its members {', '.join(names)} differ from the blend's "
                           f"{', '.join(record['members'])}")
        if saved is not None and saved.get("class_ids") is not None and list(split.class_ids) != saved["class_ids"]:
            raise EnsError(f"{options.weights}: fitted on other category ids than the {apply} stores have")
        record["apply"] = {"split": apply, "rows": int(split.ids.size),
                           "stores": {m: store_digest(s, views) for m, s in zip(models, split.stores)}}
    # Both files appear together or not at all: each is written beside its final name and only
    # renamed into place (predictions first) once both are complete.
    predictions, rows = (out / PREDICTIONS_FILE if split is not None else None), 0
    with contextlib.ExitStack() as stack:
        blend_tmp = stack.enter_context(atomic_path(out / BLEND_FILE))
        if split is not None:
            rows = _write_predictions(stack.enter_context(atomic_path(predictions)), split, arrays, blend,
                                      options.top_k)
        blend_tmp.write_text(json_text(record), encoding="utf-8")
    if split is None and (out / PREDICTIONS_FILE).exists():
        # Predictions of an earlier blend beside the new blend.json would be submitted as its own.
        (out / PREDICTIONS_FILE).unlink()
        notes.append(f"removed {out / PREDICTIONS_FILE}: it held an earlier blend's predictions, and this "
                     "run applied nothing")
    return BlendResult(out=out, record=record, predictions=predictions, rows=rows, notes=tuple(notes))


def _check_options(options: BlendOptions) -> None:
    if options.weights is None and options.optimize is None:
        raise EnsError("give --optimize SPLIT to fit weights, or --weights blend.json to apply saved ones")
    if options.weights is not None:
        if options.optimize is not None:
            raise EnsError("--weights applies saved weights without fitting; drop --optimize")
        fitting = {"--method": options.method is not None, "--temperature": options.temperature,
                   "--views": options.views, "--cv": options.cv is not None,
                   "--fallback": options.fallback is not None, "--data": options.data is not None,
                   "--prior": options.prior is not None, "--prior-tau": options.prior_tau is not None}
        given = [name for name, used in fitting.items() if used]
        if given:
            raise EnsError(f"--weights applies saved weights (and their prior correction) as they are; "
                           f"{', '.join(given)} only apply when fitting with --optimize")
    if options.prior_tau is not None and options.prior is None:
        raise EnsError(f"--prior-tau {options.prior_tau}: give --prior FILE, the training class counts it weighs")
    prior_tau(options)
    if options.cv is not None and options.cv < 2:
        raise EnsError(f"--cv {options.cv}: cross-validation needs at least 2 folds")
    if options.top_k < 1:
        raise EnsError(f"--top-k {options.top_k}: must be at least 1")
    if options.fallback not in (None, "uniform"):
        raise EnsError(f"--fallback {options.fallback}: the only fallback is uniform")


def prior_tau(options: BlendOptions) -> float | None:
    """``--prior-tau``: None to fit tau (``auto``, the default), else the number given."""
    text = options.prior_tau
    if text is None or text == "auto":
        return None
    low, high = ws.TAU_BOUNDS
    try:
        tau = float(text)
    except ValueError:
        tau = math.nan
    if not low <= tau <= high:
        raise EnsError(f"--prior-tau {text}: expected auto or a number from {low:g} to {high:g} "
                       "(0: no correction, 1: divide by the prior once)")
    return tau


def _models(options: BlendOptions, saved: dict | None) -> tuple[str, ...]:
    """The models to blend: ``--models``, the saved blend's, or every model with a fit store."""
    split = options.optimize or options.apply or "test"
    models = options.models or (tuple(saved["models"]) if saved else available_models(options.runs, split))
    if not models:
        raise EnsError(f"--runs {options.runs}: no model has a {split} store; run `ens infer` first")
    if len(set(models)) != len(models):
        raise EnsError(f"--models names a model twice: {', '.join(models)}")
    return tuple(models)


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
        return options.out or Path("blends") / (options.method or ws.DEFAULT_METHOD)
    fitted = options.weights.parent
    out = options.out or fitted.with_name(f"{fitted.name}-{apply}")
    if out.resolve() == fitted.resolve():
        raise EnsError(f"--out {out}: holds the blend that --weights {options.weights} reads; applying it "
                       f"writes to another folder (leave out --out for {fitted.with_name(fitted.name + '-' + str(apply))})")
    return out


# --------------------------------------------------------------------------------------------
# Provenance: what made a member's stores

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


def provenance(store: LogitStore) -> dict[str, Any]:
    """What made ``store``'s logits: the model file's sha256, its preprocessing, the version of the
    pixel pipeline, and the TTA views (their names carry the scales) and merge. Two stores blend
    together only when these agree."""
    model, tta = store.manifest["model"], store.manifest["tta"]
    return {"model_sha256": model["sha256"], "input_size": model["input_size"], "resize": model["resize"],
            "crop_pct": model["crop_pct"], "mean": list(model["mean"]), "std": list(model["std"]),
            "interpolation": model.get("interpolation", "bilinear"), "views": list(tta["views"]),
            "merge": tta["merge"], "cam": tta.get("cam"), "pixels": store.manifest.get("pixels", 1)}


def check_provenance(reference: Mapping[str, Mapping[str, Any]], reference_name: str, split: "_Split") -> None:
    """Each model's store of ``split`` must have been made as ``reference[model]`` says;
    otherwise one :class:`EnsError` naming the model and the first field that differs."""
    for model, store in zip(split.models, split.stores):
        want, got = reference.get(model), provenance(store)
        if want is None:
            raise EnsError(f"{reference_name}: records nothing of how {model} was made")
        for key, label in PROVENANCE_FIELDS.items():
            wanted = want.get(key, _LATER_FIELDS.get(key))
            if wanted != got[key]:
                raise EnsError(f"{model}: its {split.name} store was made with {label} {_shown(got[key])}, the "
                               f"{reference_name} with {_shown(wanted)}; blend stores of one model file, "
                               "preprocessing and TTA (rerun `ens infer` on both splits alike)")


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."  # a sha256
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _fit(options: BlendOptions, split: _Split, views: bool, notes: list[str]) -> tuple[Any, dict]:
    models = split.models
    method_asked = options.method or ws.DEFAULT_METHOD
    folds = 5 if options.cv is None else options.cv
    names, arrays = split.members(views)
    labels_path = label_source(split, options.data)
    labels = load_labels(labels_path, split.ids, split.class_ids)
    notes.extend(label_warnings(split, labels_path))
    notes.extend(class_order_warnings(split, labels))
    adjustment = counts = None
    if options.prior is not None:
        counts = prior_counts(read_class_counts(options.prior), split.class_ids, options.prior)
        notes.extend(prior_notes(counts, split.class_ids, options.prior))
        adjustment = ws.LogitAdjustment(ws.class_log_prior(counts), prior_tau(options))
    notes.extend(prior_hint(options.data, options.prior is not None))
    logits = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
    try:
        report = ws.cross_validate(logits, labels, method_asked, n_folds=folds, temperature=options.temperature,
                                   member_names=names, top_k=options.top_k, prior=adjustment)
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
            notes.extend(_prior_cv_note(report, method))
        blend = ws.fit_blend(logits, labels, method, temperature=options.temperature, prior=adjustment)
    except ValueError as exc:
        raise EnsError(f"blend: {exc}") from None
    del logits
    stores = {m: store_digest(s, views) for m, s in zip(models, split.stores)}
    record = {
        "format": FORMAT_VERSION,
        "ens": __version__,
        "method": method,
        "requested_method": method_asked,
        "fallback": fallback_used,
        "fusion": blend.fusion,
        "params": dict(blend.params),
        "models": list(models),
        "members": names,
        "views": views,
        "weights": dict(zip(names, blend.weights)),
        "temperatures": None if blend.temperatures is None else dict(zip(names, blend.temperatures)),
        "train_score": blend.train_score,
        "class_ids": list(split.class_ids),
        "optimize": {"split": options.optimize, "rows": int(split.ids.size), "stores": stores},
        "labels": str(labels_path),
        "stores": stores,
        "provenance": {m: provenance(s) for m, s in zip(models, split.stores)},
        "prior": None if adjustment is None else {
            "file": str(options.prior), "sha256": sha256_file(options.prior),
            "counts": counts.tolist(), "zero_count": ws.ZERO_COUNT,
            "tau": blend.tau, "tau_fitted": adjustment.tau is None},
        "cv": {"folds": report.n_folds, "top_k": report.top_k, "temperature": report.temperature,
               "prior": report.prior, "fold_taus": list(report.fold_taus),
               "chosen": report.uniform_row.name if fallback_used or method == "uniform" else report.method_row.name,
               "beats_uniform": report.beats_uniform,
               "rows": [asdict(r) for r in report.rows]},
    }
    return blend, record


def _prior_cv_note(report: Any, method: str) -> list[str]:
    """A note when the blend corrected for the prior does not beat it uncorrected on CV."""
    kind = "uniform" if method == "uniform" else "method"
    corrected, plain = report.row(kind, True), report.row(kind, False)
    if (corrected.top1, -corrected.nll) > (plain.top1, -plain.nll):
        return []
    return [f"{corrected.name} does not beat {plain.name} on {report.n_folds}-fold CV (top-1 {corrected.top1:.4f} "
            f"vs {plain.top1:.4f}); the correction is applied as --prior asks: leave --prior out to blend without it"]


def label_warnings(split: _Split, labels_path: Path) -> list[str]:
    """A note when the label file is not the json the stores were made from (its sha256 differs
    from the one the stores record): the same ids may then carry other labels."""
    recorded = split.stores[0].manifest.get("dataset", {})
    if not str(recorded.get("source", "")).endswith(".json") or recorded.get("sha256") is None:
        return []  # the stores came from an image folder: there is no json to compare with
    actual = sha256_file(labels_path)
    if actual == recorded["sha256"]:
        return []
    return [f"the labels in {labels_path} (sha256 {actual[:12]}...) are not from the json the {split.name} stores "
            f"were made from, {recorded['source']} (sha256 {recorded['sha256'][:12]}...); check that they "
            "label the same images"]


#: A model below this many times chance top-1 ...
CHANCE_FACTOR = 3
#: ... while the best model reaches this top-1 (and twice the first bound) is likely mis-mapped.
STRONG_TOP1 = 0.5


def class_order_warnings(split: _Split, labels: np.ndarray) -> list[str]:
    """Notes for models that score near chance on the fitted split while the best is far above.

    The usual cause is a class order trap: a model trained on torchvision's ``ImageFolder``
    (folders sorted as strings: "10" before "2") exported with ``--classes train2019.json``
    (categories sorted as numbers) predicts the right thing in the wrong columns.
    """
    classes = len(split.class_ids)
    scores = {}
    for model, store in zip(split.models, split.stores):
        predicted = np.concatenate([np.argmax(store.logits[i:i + CHUNK_ROWS], axis=1)
                                    for i in range(0, store.logits.shape[0], CHUNK_ROWS)])
        scores[model] = float((predicted == labels).mean())
    best = max(scores, key=scores.get)
    bound = CHANCE_FACTOR / classes
    if scores[best] < max(STRONG_TOP1, 2 * bound):
        return []
    return [f"{model} scores top-1 {score:.3f} on {split.name}, under {CHANCE_FACTOR}x chance (1/{classes}), while "
            f"{best} scores {scores[best]:.3f}: its output columns are likely in another order than its "
            "--classes says; if it was trained on a torchvision ImageFolder, re-export it with "
            "`ens export --classes TRAIN_FOLDER` (ImageFolder's order)"
            for model, score in scores.items() if score < bound]


def _read_blend_json(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EnsError(f"--weights {path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsError(f"--weights {path}: not a blend.json ({exc})") from None
    check_blend_record(record, f"--weights {path}")
    return record


def check_blend_record(record: Any, source: str) -> None:
    """Every field of a ``blend.json`` that applying it reads, with its type; :class:`EnsError`
    naming ``source`` and the first field that is missing or malformed."""
    if not isinstance(record, dict):
        raise EnsError(f"{source}: not a blend.json (a JSON object is expected)")
    for key in ("method", "fusion", "models", "members", "weights"):
        if key not in record:
            raise EnsError(f"{source}: not a blend.json (no {key!r})")
    fmt = record.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise EnsError(f"{source}: field 'format' is not an integer")
    if fmt > FORMAT_VERSION:
        raise EnsError(f"{source}: blend format {fmt} is newer than this ens understands")
    if not isinstance(record.get("provenance"), dict):
        raise EnsError(f"{source}: records no provenance of its models (an older ens wrote it), so its "
                       "stores cannot be checked against the applied ones; fit it again with --optimize")

    def names(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    members = record["members"] if names(record["members"]) else []
    temps = record.get("temperatures")
    checks = {
        "method": (isinstance(record["method"], str), "a string"),
        "fusion": (record["fusion"] in ws.FUSIONS, f"one of {', '.join(ws.FUSIONS)}"),
        "models": (names(record["models"]) and len(set(record["models"])) == len(record["models"]),
                   "a list of distinct model names"),
        "members": (bool(members) and len(set(members)) == len(members), "a list of distinct member names"),
        "weights": (isinstance(record["weights"], dict) and list(record["weights"]) == members
                    and all(number(w) and w >= 0 for w in record["weights"].values()),
                    "an object member -> weight >= 0, one per member in member order"),
        "temperatures": (temps is None or (isinstance(temps, dict) and list(temps) == members
                                           and all(number(t) and t > 0 for t in temps.values())),
                         "null or an object member -> temperature > 0"),
        "views": (isinstance(record.get("views", False), bool), "true or false"),
        "params": (isinstance(record.get("params", {}), dict), "an object"),
        "class_ids": (record.get("class_ids") is None or isinstance(record["class_ids"], list), "a list"),
        "prior": (_prior_record_ok(record.get("prior"), record.get("class_ids"), number),
                  f"null or an object with counts (one non-negative integer per class id), zero_count > 0 "
                  f"and tau from {ws.TAU_BOUNDS[0]:g} to {ws.TAU_BOUNDS[1]:g}"),
    }
    for key, (valid, expected) in checks.items():
        if not valid:
            raise EnsError(f"{source}: field {key!r} is malformed; expected {expected}")
    for model in record["models"]:
        given = record["provenance"].get(model)
        if not isinstance(given, dict) or any(k not in given for k in PROVENANCE_FIELDS if k not in _LATER_FIELDS):
            raise EnsError(f"{source}: field 'provenance.{model}' lacks some of {', '.join(PROVENANCE_FIELDS)}")


def _prior_record_ok(prior: Any, class_ids: Any, number) -> bool:
    if prior is None:
        return True
    if not isinstance(prior, dict) or not isinstance(class_ids, list):
        return False
    counts = prior.get("counts")
    low, high = ws.TAU_BOUNDS
    return (isinstance(counts, list) and len(counts) == len(class_ids)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            and number(prior.get("zero_count")) and prior["zero_count"] > 0
            and number(prior.get("tau")) and low <= prior["tau"] <= high)


def fitted_from_record(record: Mapping[str, Any]) -> ws.FittedBlend:
    """The blend a checked blend.json records (:func:`check_blend_record`), as
    :mod:`weights_search` applies it: `ens blend --weights` and `ens report` both fuse with this."""
    members = record["members"]
    temps = record.get("temperatures")
    prior = record.get("prior")
    log_prior = None if prior is None else tuple(ws.class_log_prior(prior["counts"], prior["zero_count"]).tolist())
    return ws.FittedBlend(method=record["method"], fusion=record["fusion"],
                          weights=tuple(float(record["weights"][m]) for m in members),
                          temperatures=None if temps is None else tuple(float(temps[m]) for m in members),
                          params=record.get("params", {}), log_prior=log_prior,
                          tau=None if prior is None else float(prior["tau"]))


def _saved_blend(saved: dict, options: BlendOptions, models: Sequence[str]) -> tuple[Any, dict, bool]:
    unknown = [m for m in saved["models"] if m not in models]
    if unknown:
        raise EnsError(f"--weights {options.weights}: names models that are not given: {', '.join(unknown)}")
    extra = [m for m in models if m not in saved["models"]]
    if extra:
        raise EnsError(f"--weights {options.weights}: has no weight for {', '.join(extra)}")
    blend = fitted_from_record(saved)
    record = dict(saved)
    record["models"] = list(saved["models"])
    record["applied_from"] = str(options.weights)
    return blend, record, bool(saved.get("views", False))


def _write_predictions(path: Path, split: _Split, arrays: Sequence[np.ndarray], blend: Any, top_k: int) -> int:
    """Write predictions.csv to ``path`` (a temporary file: the caller renames it into place)."""
    class_ids = np.asarray(split.class_ids, dtype=object)
    k = min(top_k, len(class_ids))
    ids = split.ids
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id"] + [f"category_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)])
        try:
            for start, log_probs in ws.blend_chunks(arrays, blend, CHUNK_ROWS):
                top, probs = ws.top_k(log_probs, k)
                cats = class_ids[top]
                for row in range(top.shape[0]):
                    writer.writerow([ids[start + row], *cats[row], *(f"{p:.6g}" for p in probs[row])])
        except ValueError as exc:
            raise EnsError(f"{split.name}: cannot fuse its stores ({exc})") from None
    return int(ids.size)
