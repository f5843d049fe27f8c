"""The logit store: what `ens infer` writes for one (model, split) and `ens blend` reads.

Layout of ``<out>/<model file stem>/<split>/``::

    logits.npy     (rows, classes)         float16 (default) or float32: the merged TTA scores
    ids.npy        (rows,)                 int64 image ids (or unicode paths for a folder split)
    views.npy      (views, rows, classes)  per-view logits, same dtype; only with --keep-views
    boxes.npy      (rows, 4)               float32 cam boxes, normalised (x0, y0, x1, y1) of the
                                           image; only with a cam view (--tta cam)
    manifest.json  what made the arrays, and ``"complete": true`` once they are all in place

Row ``i`` of ``logits`` (and of every view) belongs to image ``ids[i]``; rows follow the split's
order, less any image skipped as unreadable (listed under ``"skipped"`` in the manifest, with
its path and the reason). ``softmax(logits[i])`` is the merged probability whatever the merge
mode (``mean-logits`` stores logits, ``mean-probs`` and ``gmean`` log-probabilities). Column
``j`` is category ``class_ids[j]`` (the manifest's ``model.class_ids``; ``null`` means ``j``).
All ``.npy`` files are plain arrays that memory-map; :func:`read_store` is the one reader, and
:class:`StoreManifest` the one reader and writer of ``manifest.json``.

``manifest.json`` (format 1)::

    format, complete        1, true once every array is in place
    rows, classes, dtype    the shape and dtype of logits.npy
    keep_views              whether views.npy exists
    boxes                   whether boxes.npy exists (absent in stores of older ens: false)
    model                   file, realpath, sha256, architecture, input_size, mean, std, resize, crop_pct,
                            interpolation, precision, class_ids (null: column j is category j),
                            foreign (no ens metadata: preprocessing from the command line)
                            file: as the command gave it (relative to where it ran); realpath:
                            its absolute path, links resolved (absent in stores of older ens)
                            sha256: the model's identity, the .onnx's sha256, or for a model
                            with external data a sha256 over it and each data file's location
                            and sha256 (ensemble.inference.runtime.model_sha256)
    dataset                 split, source (json file or folder), sha256, images (before skips)
    pixels                  the version of how views are made from decoded images
                            (``ensemble.inference.decode.PIXELS``; absent in older stores: 1)
    tta                     views (names, in views.npy order; "identity" first), merge, and with
                            a cam view cam (threshold, pad, min of its boxes)
    device, provider        e.g. "cuda", "CUDAExecutionProvider"
    device_fallback         why --device auto ran on the CPU although CUDA was listed (else null)
    batch_size, chunk_size, workers
    engine, cluster         local or ray; for ray, the cluster's cpus, gpus, nodes and
                            inference_actors (else null). Not in run_key: both engines make the
                            same arrays, so either resumes or keeps the other's store
    images_per_s, seconds   the last run's rate over all its models, and its duration
    model_images_per_s      the rate of this model's forward passes alone
    decode_wait_s           time the models waited for decoding (large: use more --workers); for
                            engine ray, the time the driver waited for the cluster's results
                            (decoding and inference both: a Ray run's rate is in images_per_s)
    skipped                 [{id, path, reason}] of images left out (--on-bad-image skip)
    run_key                 digest of the arguments that determine the arrays, the chunk size
                            not among them (the arrays are the same bytes at any chunk size);
                            stores of an older ens digested their chunk_size too, and are kept
                            as well (:func:`keeps`)
    command                 the `ens infer` command that makes (or finishes) exactly this store
    arguments               the options of that command beside the model file and the split, by
                            name ({"tta": ["flip"], "batch_size": 64, "out": "runs", ...}): an
                            incomplete store's error prints the command rebuilt from these, the
                            model file and the split, each checked (:func:`rebuilt_command`),
                            never the ``command`` text

Resuming: while a store is being computed its rows accumulate as one file per finished chunk
under ``.partial/`` (each written atomically, so a chunk file exists exactly when the chunk is
done), beside ``.partial/key.json``, the arguments that determine the values. A rerun with the
same key computes only the missing chunks; at the end the manifest is marked incomplete, the
chunks are concatenated (in order, so the bytes equal an uninterrupted run's), the arrays
renamed into place, the manifest rewritten complete, and ``.partial`` removed. A new store's
manifest says ``"complete": false`` from the start, with the command that finishes it.

A complete store is replaced only at that last step: a run with other arguments that is
interrupted leaves the earlier store complete and readable (its chunks wait in ``.partial``
for a rerun of that run), and a run with the store's own arguments reuses it, whatever other
models share the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ensemble.errors import EnsError
from ensemble.fileio import atomic_path, write_json_atomic
from ensemble.formats.common import check_regular, is_count, is_finite, is_int, is_names, is_number, read_json
from ensemble.formats.dataset import check_store_name, split_name

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGITS = "logits.npy"
IDS = "ids.npy"
VIEWS = "views.npy"
BOXES = "boxes.npy"
PARTIAL = ".partial"
LOCK = ".lock"
DTYPES = ("float16", "float32")


def store_path(out: str | os.PathLike, model: str | os.PathLike, split: str, name: str | None = None) -> Path:
    """``<out>/<model file stem>/<split>``: where the store of ``model`` on ``split`` lives;
    ``<out>/<name>/<split>`` when the store is given a ``name`` (`ens infer --name`)."""
    return Path(out) / (Path(model).stem if name is None else name) / split


# --------------------------------------------------------------------------------------------
# manifest.json
#
# Fields ens reads back are checked by StoreManifest.read and typed; the others are kept as the
# file has them (``None`` where a store of an older ens lacks them), and the mapping a record
# reads as (``manifest["model"]["class_ids"]``) is the file's JSON itself.


@dataclass(frozen=True)
class ModelRecord:
    """``model``: the ONNX file the store was made with. ``class_ids``: the category of each
    column (``None``: column ``j`` is category ``j``); ``foreign``: a file without ens metadata
    (its preprocessing came from the command line)."""

    file: str
    sha256: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    crop_pct: float
    interpolation: str
    precision: str
    class_ids: tuple[int | str, ...] | None
    foreign: bool
    #: The file's absolute path, links resolved, when the store was written (``file`` is as the
    #: command gave it, relative to where it ran); ``None`` in stores of an older ens.
    realpath: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, **({} if self.realpath is None else {"realpath": self.realpath}),
                "sha256": self.sha256, "architecture": self.architecture,
                "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "precision": self.precision, "class_ids": None if self.class_ids is None else list(self.class_ids),
                "foreign": self.foreign}


@dataclass(frozen=True)
class DatasetRecord:
    """``dataset``: the split's name, its source (json file or folder), the source's sha256,
    and its images before any was skipped."""

    split: str
    source: str
    sha256: str
    images: int

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "source": self.source, "sha256": self.sha256, "images": self.images}


@dataclass(frozen=True)
class TtaRecord:
    """``tta``: the views (``"identity"`` first, in views.npy order), how they merged, and with a
    cam view its settings ``{threshold, pad, min}`` (``None`` without one: the key is absent)."""

    views: tuple[str, ...]
    merge: str
    cam: Mapping[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"views": list(self.views), "merge": self.merge, **({} if self.cam is None else {"cam": dict(self.cam)})}


@dataclass(frozen=True)
class RunFigures:
    """How the last run that wrote the store went: its decoding workers, its rate over all its
    models and its duration, the time the models waited for decoding, and the rate of this
    model's forward passes alone (``None`` where the run computed nothing)."""

    workers: int
    images_per_s: float | None
    seconds: float | None
    decode_wait_s: float | None
    model_images_per_s: float | None

    def to_json(self) -> dict[str, Any]:
        return {"workers": self.workers, "images_per_s": self.images_per_s, "seconds": self.seconds,
                "decode_wait_s": self.decode_wait_s, "model_images_per_s": self.model_images_per_s}


@dataclass(frozen=True)
class StoreArrays:
    """What a complete store's arrays hold: ``rows`` x ``classes`` logits of ``dtype``, whether
    views.npy and boxes.npy exist, and the images left out ``({id, path, reason}, ...)``."""

    rows: int
    classes: int
    dtype: str
    keep_views: bool
    boxes: bool
    skipped: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class StoreManifest(Mapping[str, Any]):
    """A store's ``manifest.json`` (see the module docstring), the one reader and writer of it.

    ``arrays`` is ``None`` until the store is complete (the manifest of a run in progress);
    ``figures`` is ``None`` in the manifest a new store starts with. :meth:`read` checks every
    field ens reads back; :meth:`write` writes :meth:`to_json`, whose keys keep the file's
    order. The record also reads as that JSON mapping (``manifest["tta"]["views"]``).
    """

    model: ModelRecord
    dataset: DatasetRecord
    tta: TtaRecord
    pixels: int
    device: str
    provider: str
    device_fallback: str | None
    batch_size: int
    chunk_size: int
    ens_version: str
    engine: str
    cluster: Mapping[str, int] | None
    command: str
    figures: RunFigures | None = None
    #: The options of ``command`` beside its model and split (:data:`INFER_ARGUMENTS`).
    arguments: Mapping[str, Any] | None = None
    arrays: StoreArrays | None = None
    run_key: str = ""
    format: int = FORMAT_VERSION
    #: The JSON as read from a file (``None`` for a record made in memory).
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def complete(self) -> bool:
        return self.arrays is not None

    @property
    def skipped_ids(self) -> tuple[int | str, ...]:
        return tuple(s["id"] for s in self.arrays.skipped) if self.arrays is not None else ()

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON values, in the file's key order; a record read from a file gives
        back that file's JSON as it was."""
        if self.source is not None:
            return dict(self.source)
        arrays = self.arrays
        return {
            "format": self.format, "complete": self.complete,
            **({} if arrays is None else {"rows": arrays.rows, "classes": arrays.classes, "dtype": arrays.dtype,
                                          "keep_views": arrays.keep_views, "boxes": arrays.boxes}),
            "model": self.model.to_json(), "dataset": self.dataset.to_json(), "tta": self.tta.to_json(),
            "pixels": self.pixels, "device": self.device, "provider": self.provider,
            "device_fallback": self.device_fallback, "batch_size": self.batch_size, "chunk_size": self.chunk_size,
            "ens_version": self.ens_version, "engine": self.engine,
            "cluster": None if self.cluster is None else dict(self.cluster), "command": self.command,
            **({} if self.arguments is None else {"arguments": dict(self.arguments)}),
            **({} if self.figures is None else self.figures.to_json()),
            **({} if arrays is None else {"skipped": [dict(s) for s in arrays.skipped]}),
            "run_key": self.run_key,
        }

    def write(self, folder: str | os.PathLike) -> None:
        """Write ``folder``/manifest.json atomically."""
        with _naming(Path(folder) / MANIFEST):
            write_json_atomic(Path(folder) / MANIFEST, self.to_json())

    @classmethod
    def read(cls, folder: str | os.PathLike) -> StoreManifest:
        """The complete manifest of the store in ``folder``; :class:`EnsError` when it is missing,
        incomplete (naming the command that finishes it), from a newer ens, or damaged (naming
        the first field that is missing or malformed)."""
        folder = Path(folder)
        manifest = read_manifest_json(folder)
        if manifest is None:
            raise EnsError(f"{folder}: not a logit store (no {MANIFEST})")
        if not isinstance(manifest, dict):  # (before any key is read: a list has none)
            raise EnsError(f"{folder / MANIFEST}: not a store manifest (a JSON object is expected)")
        if not is_int(manifest.get("format", 0)):
            raise EnsError(f"{folder / MANIFEST}: field 'format' is not an integer")
        if manifest.get("format", 0) > FORMAT_VERSION:
            raise EnsError(f"{folder}: store format {manifest['format']} is newer than this ens "
                           f"understands ({FORMAT_VERSION}); upgrade ens")
        if not manifest.get("complete"):
            command = rebuilt_command(folder, manifest)  # never the file's own command text
            finish = f"finish it with: {command}" if command else "run the same `ens infer` again to finish it"
            raise EnsError(f"{folder}: incomplete logit store (its run was interrupted); {finish}")
        _check(folder / MANIFEST, manifest)
        return cls._of(manifest)

    @classmethod
    def _of(cls, manifest: Mapping[str, Any]) -> StoreManifest:
        """The record of a checked complete manifest; fields ens does not check as found."""
        model, dataset, tta = manifest["model"], manifest["dataset"], manifest["tta"]
        class_ids = model["class_ids"]
        figures = None
        if "workers" in manifest:
            figures = RunFigures(manifest["workers"], manifest.get("images_per_s"), manifest.get("seconds"),
                                 manifest.get("decode_wait_s"), manifest.get("model_images_per_s"))
        return cls(
            model=ModelRecord(model.get("file"), model["sha256"], model.get("architecture"), model["input_size"],
                              tuple(model["mean"]), tuple(model["std"]), model["resize"], model["crop_pct"],
                              model.get("interpolation"), model.get("precision"),
                              None if class_ids is None else tuple(class_ids), model.get("foreign"),
                              model.get("realpath")),
            dataset=DatasetRecord(dataset.get("split"), dataset.get("source"), dataset.get("sha256"),
                                  dataset.get("images")),
            tta=TtaRecord(tuple(tta["views"]), tta["merge"], tta.get("cam")),
            # Stores made before these fields existed: version 1 pixels, the local engine.
            pixels=manifest.get("pixels", 1), device=manifest.get("device"), provider=manifest.get("provider"),
            device_fallback=manifest.get("device_fallback"), batch_size=manifest.get("batch_size"),
            chunk_size=manifest.get("chunk_size"), ens_version=manifest.get("ens_version"),
            engine=manifest.get("engine", "local"), cluster=manifest.get("cluster"), command=manifest.get("command"),
            figures=figures, arguments=manifest.get("arguments"),
            arrays=StoreArrays(manifest["rows"], manifest["classes"], manifest["dtype"], manifest["keep_views"],
                               bool(manifest.get("boxes")), tuple(manifest["skipped"])),
            run_key=manifest["run_key"], format=manifest.get("format", FORMAT_VERSION), source=manifest)

    # The mapping of the JSON, for readers by key.
    def __getitem__(self, key: str) -> Any:
        return self._json()[key]

    def __iter__(self):
        return iter(self._json())

    def __len__(self) -> int:
        return len(self._json())

    def _json(self) -> Mapping[str, Any]:
        return self.source if self.source is not None else self.to_json()


# --------------------------------------------------------------------------------------------
# The `ens infer` command of a store, from fields that pass their checks


_WORD = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_ADDRESS = re.compile(r"[A-Za-z0-9_.:/@\[\]-]+\Z")


def _is_word(value: Any) -> bool:
    return isinstance(value, str) and _WORD.match(value) is not None


def _is_text(value: Any) -> bool:
    """A path as a command may give it: a string without control or format characters."""
    return (isinstance(value, str) and value != ""
            and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value))


def _is_store_name(value: Any) -> bool:
    try:
        return _is_text(value) and check_store_name(value, "") == value
    except EnsError:
        return False


def _are(valid: Callable[[Any], bool], count: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and len(v) >= 1 and (count is None or len(v) == count)
                      and all(map(valid, v)))


#: The options an `ens infer` command gives beside its model file and split, by
#: :class:`~ensemble.inference.options.InferOptions` field name (the flag is ``--`` and the name
#: with dashes), in the command's order, with the check a recorded value must pass: words for
#: choices and view names, integers, finite numbers, lists of them, ``true`` for a flag alone;
#: paths are any text, printed quoted.
INFER_ARGUMENTS: dict[str, Callable[[Any], bool]] = {
    "tta": _are(_is_word), "scales": _are(is_finite), "merge": _is_word,
    "batch_size": lambda v: is_count(v, 1), "chunk_size": lambda v: is_count(v, 1), "dtype": _is_word,
    "on_bad_image": _is_word, "keep_views": lambda v: v is True,
    "cam_threshold": is_finite, "cam_pad": is_finite, "cam_min": is_finite,
    "engine": _is_word, "ray_address": lambda v: isinstance(v, str) and _ADDRESS.match(v) is not None,
    "device": _is_word, "out": _is_text, "name": _is_store_name,
    "input_size": lambda v: is_count(v, 1), "mean": _are(is_finite, 3), "std": _are(is_finite, 3),
    "resize": _is_word, "crop_pct": is_finite,
}


def _argument_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(_argument_text, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def infer_command(model_file: str, split: str, source: str, arguments: Mapping[str, Any]) -> str:
    """The `ens infer` command that runs ``model_file`` on ``split`` (from ``source``, a json or
    a folder) with ``arguments`` (by :data:`INFER_ARGUMENTS` name, in that order), quoted for a
    POSIX shell."""
    args = ["ens", "infer", _not_an_option(model_file)]
    if split_name(Path(source)) == split:
        args += ["--index", _not_an_option(source)]
    else:
        args += ["--data", _not_an_option(str(Path(source).parent)), *_option("--split", split)]
    for name in INFER_ARGUMENTS:
        if name in arguments:
            value, flag = arguments[name], "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif name == "out":
                args += [flag, _not_an_option(str(value))]
            else:
                args += _option(flag, _argument_text(value))
    return shlex.join(args)


def _not_an_option(path: str) -> str:
    """``path`` as an argument that is never read as an option: a relative path starting with
    ``-`` (``--help/m.onnx``) as ``./--help/m.onnx``, the same file."""
    return f"./{path}" if path.startswith("-") else path


def _option(flag: str, value: str) -> list[str]:
    """``flag value``; ``flag=value`` for a value starting with ``-`` (a name, a negative number)."""
    return [f"{flag}={value}"] if value.startswith("-") else [flag, value]


def rebuilt_command(folder: Path, manifest: Mapping[str, Any]) -> str | None:
    """The command that finishes the store in ``folder``, rebuilt (:func:`infer_command`) from
    its manifest's model file, split, split source and ``arguments``, each checked; ``None``
    when one is missing or fails its check (an unknown option included), or when the command
    would write another folder than ``folder`` (its model or split folder renamed; a runs folder
    moved or renamed is the command's ``--out``). The manifest's own
    ``command`` text is never used."""
    model, dataset, arguments = manifest.get("model"), manifest.get("dataset"), manifest.get("arguments")
    if not (isinstance(model, dict) and isinstance(dataset, dict) and isinstance(arguments, dict)):
        return None
    file, split, source = model.get("file"), dataset.get("split"), dataset.get("source")
    if not (_is_text(file) and _is_store_name(split) and _is_text(source)):
        return None
    if not all(name in INFER_ARGUMENTS and INFER_ARGUMENTS[name](value) for name, value in arguments.items()):
        return None
    where = Path(os.path.abspath(folder))  # (read_store(".") from inside the store folder)
    if (where.name, where.parent.name) != (split, arguments.get("name", Path(file).stem)):
        return None
    # --out is the folder read, wherever the store's runs folder is now (`mv runs runs_old`),
    # never the recorded one: relative below the current folder, else absolute.
    out = where.parent.parent
    with contextlib.suppress(ValueError, OSError):
        out = out.relative_to(Path.cwd())
    return infer_command(file, split, source, {**arguments, "out": str(out)})


def _check(source: Path, manifest: Mapping[str, Any]) -> None:
    """Every field of a complete manifest that ens reads, with its type; :class:`EnsError`
    naming ``source`` and the first field that is missing or malformed."""

    def fail(name: str, expected: str) -> None:
        raise EnsError(f"{source}: field {name!r} is missing or not {expected}; the store is damaged "
                       "(delete it and rerun `ens infer`)")

    def three_numbers(value: Any) -> bool:
        return isinstance(value, list) and len(value) == 3 and all(map(is_number, value))

    top = (("rows", lambda v: is_count(v, 0), "an integer >= 0"),
           ("classes", lambda v: is_count(v, 1), "an integer >= 1"),
           ("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
           ("keep_views", lambda v: isinstance(v, bool), "true or false"),
           ("run_key", lambda v: isinstance(v, str), "a string"),
           ("model", lambda v: isinstance(v, dict), "an object"),
           ("dataset", lambda v: isinstance(v, dict), "an object"),
           ("tta", lambda v: isinstance(v, dict), "an object"),
           ("skipped", lambda v: isinstance(v, list), "a list"),
           ("boxes", lambda v: v is None or isinstance(v, bool), "true or false"))
    for name, valid, expected in top:
        if not valid(manifest.get(name)):
            fail(name, expected)
    model, tta, classes = manifest["model"], manifest["tta"], manifest["classes"]
    cam = tta.get("cam")
    nested = (
        ("model.sha256", isinstance(model.get("sha256"), str), "a string"),
        ("model.input_size", is_count(model.get("input_size"), 1), "an integer >= 1"),
        ("model.mean", three_numbers(model.get("mean")), "three numbers"),
        ("model.std", three_numbers(model.get("std")), "three numbers"),
        ("model.resize", isinstance(model.get("resize"), str), "a string"),
        ("model.crop_pct", is_number(model.get("crop_pct")), "a number"),
        ("model.class_ids", model.get("class_ids") is None or (isinstance(model["class_ids"], list)
                                                               and len(model["class_ids"]) == classes),
         f"null or a list of {classes} category ids"),
        ("tta.views", is_names(tta.get("views"), 1), "a non-empty list of view names"),
        ("tta.merge", isinstance(tta.get("merge"), str), "a string"),
        # Only with a cam view; blends compare it across a model's stores.
        ("tta.cam", cam is None or (isinstance(cam, dict) and set(cam) == {"threshold", "pad", "min"}
                                    and all(map(is_number, cam.values()))),
         "absent, null or {threshold, pad, min} (numbers)"),
        ("skipped", all(isinstance(x, dict) and "id" in x for x in manifest["skipped"]),
         "a list of {id, path, reason}"),
    )
    for name, valid, expected in nested:
        if not valid:
            fail(name, expected)
    # Stores made before the field existed have version 1 pixels (ensemble.inference.decode.PIXELS).
    if not is_count(manifest.get("pixels", 1), 1):
        fail("pixels", "absent or an integer >= 1")
    # Stores made before --engine existed say neither: the local engine made them.
    if manifest.get("engine", "local") not in ("local", "ray"):
        fail("engine", "local or ray")
    cluster = manifest.get("cluster")
    if cluster is not None and not (isinstance(cluster, dict)
                                    and all(is_count(cluster.get(k), 0) for k in ("cpus", "gpus", "nodes"))):
        fail("cluster", "null or {cpus, gpus, nodes} (integers)")


def read_manifest_json(folder: Path) -> Any:
    """The JSON of ``folder``'s manifest.json as it is (any value, complete or not), ``None``
    when there is none; :class:`EnsError` when it cannot be read or is not JSON."""
    path = folder / MANIFEST
    try:
        path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        pass  # read_json names it
    return read_json(path, problem="unreadable")


def recorded_model(folder: str | os.PathLike) -> tuple[str | None, str | None, str | None] | None:
    """``(model file, model sha256, model realpath)`` as the manifest in ``folder`` records
    them, complete or not (``None`` for a field it lacks or that is not a string); ``None``
    when the folder holds no manifest, or one that cannot be read (such a store is computed
    afresh)."""
    try:
        manifest = read_manifest_json(Path(folder))
    except EnsError:
        return None
    if not isinstance(manifest, dict):
        return None
    model = manifest.get("model")
    if not isinstance(model, dict):
        return None
    return tuple(value if isinstance(value, str) else None
                 for value in (model.get("file"), model.get("sha256"), model.get("realpath")))


@dataclass(frozen=True)
class LogitStore:
    """A complete store, its arrays memory-mapped read-only.

    ``logits``: ``(rows, classes)``; ``ids``: ``(rows,)``; ``views``: ``(views, rows, classes)``
    or ``None`` when the run did not keep them; ``manifest``: its :class:`StoreManifest` (which
    also reads as the parsed ``manifest.json``); ``boxes``: float32 ``(rows, 4)`` cam boxes,
    normalised ``(x0, y0, x1, y1)``, or ``None`` when the run had no cam view.
    """

    path: Path
    logits: np.ndarray
    ids: np.ndarray
    manifest: StoreManifest
    views: np.ndarray | None = None
    boxes: np.ndarray | None = None

    @property
    def view_names(self) -> tuple[str, ...]:
        return self.manifest.tta.views

    @property
    def class_ids(self) -> tuple[int | str, ...] | None:
        return self.manifest.model.class_ids

    @property
    def skipped_ids(self) -> tuple[int | str, ...]:
        return self.manifest.skipped_ids


def read_store(path: str | os.PathLike) -> LogitStore:
    """Open the store at ``path`` (its folder, or its manifest.json) for reading.

    Raises :class:`EnsError` when it is missing, incomplete (an interrupted run: rerun the same
    ``ens infer`` to finish it), from a newer ens, or its arrays disagree with its manifest.
    """
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    manifest = StoreManifest.read(path)
    arrays = manifest.arrays
    logits = _mapped(path, LOGITS)
    ids = _mapped(path, IDS)
    views = _mapped(path, VIEWS) if arrays.keep_views else None
    boxes = _mapped(path, BOXES) if arrays.boxes else None
    rows, classes = arrays.rows, arrays.classes
    expected = [(LOGITS, logits, (rows, classes)), (IDS, ids, (rows,))]
    if views is not None:
        expected.append((VIEWS, views, (len(manifest.tta.views), rows, classes)))
    if boxes is not None:
        expected.append((BOXES, boxes, (rows, 4)))
    for name, array, shape in expected:
        if array.shape != shape:
            raise EnsError(f"{path / name}: shape {array.shape}, but the manifest says {shape}")
    return LogitStore(path=path, logits=logits, ids=ids, manifest=manifest, views=views, boxes=boxes)


def _mapped(path: Path, name: str) -> np.ndarray:
    """The store array ``name`` memory-mapped read-only; an :class:`EnsError` naming the file
    when it is not a regular file, cannot be read, or holds fewer bytes than its header says."""
    file = path / name
    try:
        check_regular(file)  # a FIFO would block np.load forever
        return np.load(file, mmap_mode="r")
    except (OSError, ValueError) as exc:
        if "mmap length is greater than file size" in str(exc):
            raise EnsError(f"{file}: cut short (fewer bytes than its header says); rerun `ens infer` on its "
                           "split to write the store again") from None
        raise EnsError(f"{file}: unreadable store array ({exc})") from None


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` raised again naming it: a ``write`` on a full disk or
    past a file-size limit names no file, and a temporary file's name beside it tells nothing."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and (exc.filename is None or Path(exc.filename).parent == path.parent):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def to_dtype(scores: np.ndarray, dtype: str) -> np.ndarray:
    """``scores`` as the store's dtype, clipped so no finite score becomes an infinity; scores
    already of that dtype and within its range are returned as they are (`ens infer` converts
    batch by batch, and a copy of a chunk's kept views would double the chunk's memory)."""
    limit = np.finfo(dtype).max
    if scores.dtype == np.dtype(dtype) and scores.size and -limit <= scores.min() and scores.max() <= limit:
        return scores
    return np.clip(scores, -limit, limit).astype(dtype)


def run_key(values: Mapping[str, Any]) -> str:
    """A digest of the arguments that determine a store's arrays."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def complete_key(key: Mapping[str, Any]) -> dict[str, Any]:
    """``key`` less ``chunk_size``: what decides whether a COMPLETE store is kept. Batches never
    straddle chunks, so a store's arrays are the same bytes at any chunk size; the chunk size
    matters only to resume the chunks of ``.partial``."""
    return {k: v for k, v in key.items() if k != "chunk_size"}


def keeps(manifest: Any, key: Mapping[str, Any]) -> bool:
    """Whether ``manifest`` (a manifest's JSON) is of a complete store made with ``key``,
    whatever its chunk size: its ``run_key`` is the digest of :func:`complete_key`, or, written
    by an ens before that, of the key with the store's own ``chunk_size``."""
    if not (isinstance(manifest, dict) and manifest.get("complete") is True):
        return False
    key = complete_key(key)
    return manifest.get("run_key") in (run_key(key), run_key({**key, "chunk_size": manifest.get("chunk_size")}))


class StoreWriter:
    """Writes one store chunk by chunk, resuming from the chunks a killed run finished.

    ``key`` holds everything that determines the arrays (model and dataset hashes, views,
    merge, dtype, batch and chunk sizes, provider); chunk ``c`` covers split rows
    ``[c * chunk_size, (c + 1) * chunk_size)``. The chunk size is in ``.partial/key.json``
    (chunks resume only at their own size), not in :attr:`digest`, the store's ``run_key``
    (:func:`complete_key`).
    """

    def __init__(self, path: Path, key: Mapping[str, Any], rows: int, chunk_size: int):
        self.path = Path(path)
        self.key = dict(key)
        self.digest = run_key(complete_key(self.key))
        self.rows = rows
        self.chunk_size = chunk_size
        self.chunks = -(-rows // chunk_size)
        self.done: set[int] = set()
        #: Why a complete store with this key is computed again (it failed its integrity check).
        self.note: str | None = None
        self._lock: int | None = None

    def lock(self) -> None:
        """Take the store's advisory lock (``.lock``, held until :meth:`release` or the process
        ends, however it ends); :class:`EnsError` when another process holds it."""
        if self._lock is not None or fcntl is None:  # no fcntl (Windows): no locking
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise EnsError(f"{self.path}: cannot create the store folder ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EnsError(f"{self.path}: in use by another ens infer (pid {holder}); wait for it to end, "
                           "or write to another --out") from None
        try:
            with _naming(self.path / LOCK):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
        except OSError:
            os.close(fd)
            raise
        self._lock = fd

    def release(self) -> None:
        """Let go of the lock (closing the file releases it)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __del__(self) -> None:
        self.release()

    @property
    def partial(self) -> Path:
        return self.path / PARTIAL

    def _chunk_file(self, index: int) -> Path:
        return self.partial / f"chunk-{index:06d}.npz"

    def open(self, manifest: StoreManifest) -> bool:
        """Prepare to write; ``True`` when a complete store with this key is already there.

        Otherwise chunks of an earlier run with the same key are kept (:attr:`done`) and
        anything else under ``.partial`` is removed. A store with no complete arrays is marked
        incomplete (``manifest``, without arrays); a complete store made with other
        arguments stays complete and readable until :meth:`finish` replaces it.
        """
        self.lock()
        try:
            existing = read_manifest_json(self.path)
        except EnsError as exc:  # an unreadable manifest: the store is computed afresh
            self.note, existing = f"{exc}; computing the store again", None
        if keeps(existing, self.key):
            try:
                read_store(self.path)
            except EnsError as exc:  # e.g. a truncated logits.npy: the arrays fail their own check
                self.note = f"{exc}; computing it again"
                existing = None
        key_file = self.partial / "key.json"
        try:
            same = read_json(key_file) == self.key
        except EnsError:
            same = False
        if keeps(existing, self.key):
            if same:
                shutil.rmtree(self.partial, ignore_errors=True)  # a run killed just after finishing
            return True
        if existing is None or not existing.get("complete"):
            self._incomplete(manifest).write(self.path)
        if not same:
            shutil.rmtree(self.partial, ignore_errors=True)
            with _naming(key_file):
                write_json_atomic(key_file, self.key)
        self.done = {i for i in range(self.chunks) if self._chunk_file(i).is_file()}
        return False

    def _incomplete(self, manifest: StoreManifest) -> StoreManifest:
        """``manifest`` as the store's while its arrays are not all in place."""
        return dataclasses.replace(manifest, arrays=None, run_key=self.digest, format=FORMAT_VERSION)

    def adopt(self, older: Mapping[str, Any], fields: Mapping[str, Any], same: Callable[[], bool]) -> bool:
        """Take a store made with the key ``older`` as this key's, when ``same()`` says its arrays
        are the ones this key makes (asked only when such a store is there); ``True`` when it did.

        A complete store of ``older`` has its manifest rewritten (atomically) with this key's
        ``run_key`` and ``fields``; chunks of ``older`` under ``.partial`` have their key.json
        rewritten, so :meth:`open` keeps them. Anything else is left to :meth:`open`.
        """
        self.lock()
        try:
            existing = read_manifest_json(self.path)
        except EnsError:
            existing = None
        complete = keeps(existing, older)
        key_file = self.partial / "key.json"
        try:
            chunks = read_json(key_file) == dict(older)
        except EnsError:
            chunks = False
        if not (complete or chunks) or not same():
            return False
        if complete:
            with _naming(self.path / MANIFEST):
                write_json_atomic(self.path / MANIFEST, {**existing, **fields, "run_key": self.digest})
        if chunks:
            with _naming(key_file):
                write_json_atomic(key_file, self.key)
        return True

    def write_chunk(self, index: int, logits: np.ndarray, keep: np.ndarray,
                    bad: Sequence[tuple[int, str]] = (), views: np.ndarray | None = None,
                    boxes: np.ndarray | None = None) -> None:
        """Record chunk ``index``: ``logits`` ``(rows, classes)`` scores of every row of the
        chunk, ``keep`` ``(rows,)`` bool (False for skipped images), ``bad`` ``(row in chunk,
        reason)`` pairs, ``views`` ``(views, rows, classes)`` when the views are kept, ``boxes``
        ``(rows, 4)`` with a cam view."""
        dtype = self.key["dtype"]
        arrays = {
            "logits": to_dtype(logits, dtype),
            "keep": np.asarray(keep, bool),
            "bad_rows": np.array([r for r, _ in bad], np.int64),
            "bad_reasons": np.array([reason for _, reason in bad], str),
        }
        if views is not None:
            arrays["views"] = to_dtype(views, dtype)
        if boxes is not None:
            arrays["boxes"] = np.asarray(boxes, np.float32)
        with _naming(self._chunk_file(index)), atomic_path(self._chunk_file(index)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        self.done.add(index)

    def finish(self, ids: Sequence[int | str], paths: Sequence[os.PathLike],
               manifest: StoreManifest) -> StoreManifest:
        """Concatenate the chunks into the final arrays and mark the store complete.

        ``ids`` and ``paths`` are the split's, in row order; ``manifest`` the run's (its
        arrays are filled in here); returns the manifest written.
        """
        missing = sorted(set(range(self.chunks)) - self.done)
        if missing:
            raise RuntimeError(f"{self.path}: chunks {missing} are not written yet")
        keep, skipped = [], []
        for index in range(self.chunks):
            with np.load(self._chunk_file(index)) as chunk:
                keep.append(chunk["keep"])
                first = index * self.chunk_size
                for row, reason in zip(chunk["bad_rows"].tolist(), chunk["bad_reasons"].tolist()):
                    skipped.append({"id": ids[first + row], "path": str(paths[first + row]), "reason": reason})
        keep = np.concatenate(keep)
        rows = int(keep.sum())
        kept_ids = np.asarray(ids)[keep]
        if kept_ids.dtype.kind in "iu":
            kept_ids = kept_ids.astype(np.int64)
        with np.load(self._chunk_file(0)) as chunk:
            classes = chunk["logits"].shape[1]
            num_views = chunk["views"].shape[0] if "views" in chunk else 0
            has_boxes = "boxes" in chunk
        dtype = self.key["dtype"]

        # From here the arrays change: no reader may trust them until the manifest is complete.
        self._incomplete(manifest).write(self.path)
        self._concatenate(LOGITS, (rows, classes), dtype, "logits", axis=0)
        if num_views:
            self._concatenate(VIEWS, (num_views, rows, classes), dtype, "views", axis=1)
        else:
            (self.path / VIEWS).unlink(missing_ok=True)
        if has_boxes:
            self._concatenate(BOXES, (rows, 4), "float32", "boxes", axis=0)
        else:
            (self.path / BOXES).unlink(missing_ok=True)
        with _naming(self.path / IDS), atomic_path(self.path / IDS) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, kept_ids.reshape(rows))
        complete = dataclasses.replace(
            self._incomplete(manifest),
            arrays=StoreArrays(rows=rows, classes=int(classes), dtype=dtype, keep_views=bool(num_views),
                               boxes=has_boxes, skipped=tuple(skipped)))
        complete.write(self.path)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.release()
        return complete

    def _concatenate(self, name: str, shape: tuple[int, ...], dtype: str, field: str, axis: int) -> None:
        """Write ``name``, the chunks' ``field`` arrays less their skipped rows, joined along
        ``axis`` (0: rows; 1: the rows of each view), as np.save writes the whole array.

        Plain writes, never a memory map: a full disk, a file-size limit or a quota is then the
        OSError of a write (named by :func:`_naming`), where a map takes a SIGBUS that kills the
        process at the first page the disk has no room for. Claiming the space first
        (posix_fallocate) is no fix: glibc emulates it by writing a byte per block where the
        file system lacks it (NFSv3, FUSE: millions of writes for a 10 GB array), and
        copy-on-write ZFS reserves nothing with it.
        """
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        with _naming(self.path / name), atomic_path(self.path / name) as tmp:
            with open(tmp, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                start = fh.tell()
                # Axis 1: view v's rows lie at [v * rows, (v + 1) * rows) of the data.
                view_bytes = shape[1] * int(np.prod(shape[2:], dtype=np.int64)) * dtype.itemsize if axis else 0
                row_bytes = int(np.prod(shape[axis + 1:], dtype=np.int64)) * dtype.itemsize
                row = 0
                for index in range(self.chunks):
                    with np.load(self._chunk_file(index)) as chunk:
                        keep, part = chunk["keep"], chunk[field]
                        if not keep.all():  # (a copy of the chunk's array: only where rows are dropped)
                            part = np.compress(keep, part, axis=axis)
                        part = np.ascontiguousarray(part, dtype=dtype)
                    others = part.shape[:axis] + part.shape[axis + 1:]
                    if others != shape[:axis] + shape[axis + 1:] or row + part.shape[axis] > shape[axis]:
                        raise EnsError(f"{self._chunk_file(index)}: holds {field} of shape {part.shape} where "
                                       f"this store's are {shape} in all; delete {self.partial} and run the same "
                                       "`ens infer` again")
                    if axis == 0:
                        fh.write(part.reshape(-1).view(np.uint8))
                    else:
                        for v in range(shape[0]):
                            fh.seek(start + v * view_bytes + row * row_bytes)
                            fh.write(np.ascontiguousarray(part[v]).reshape(-1).view(np.uint8))
                    row += part.shape[axis]
                if row != shape[axis]:
                    raise EnsError(f"{self.partial}: its chunks hold {row} of the {shape[axis]} rows of {field}; "
                                   "delete it and run the same `ens infer` again")
