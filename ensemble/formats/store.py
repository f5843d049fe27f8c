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
All ``.npy`` files are plain arrays that memory-map; :func:`read_store` is the one reader.

``manifest.json`` (format 1)::

    format, complete        1, true once every array is in place
    rows, classes, dtype    the shape and dtype of logits.npy
    keep_views              whether views.npy exists
    boxes                   whether boxes.npy exists (absent in stores of older ens: false)
    model                   file, sha256, architecture, input_size, mean, std, resize, crop_pct,
                            interpolation, precision, class_ids (null: column j is category j),
                            foreign (no ens metadata: preprocessing from the command line)
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
    run_key                 digest of the arguments that determine the arrays
    command                 the `ens infer` command that makes (or finishes) exactly this store

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

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ensemble.errors import EnsError
from ensemble.fileio import atomic_path, write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGITS = "logits.npy"
IDS = "ids.npy"
VIEWS = "views.npy"
BOXES = "boxes.npy"
PARTIAL = ".partial"
LOCK = ".lock"
DTYPES = ("float16", "float32")


def store_path(out: str | os.PathLike, model: str | os.PathLike, split: str) -> Path:
    """``<out>/<model file stem>/<split>``: where the store of ``model`` on ``split`` lives."""
    return Path(out) / Path(model).stem / split


@dataclass(frozen=True)
class LogitStore:
    """A complete store, its arrays memory-mapped read-only.

    ``logits``: ``(rows, classes)``; ``ids``: ``(rows,)``; ``views``: ``(views, rows, classes)``
    or ``None`` when the run did not keep them; ``manifest``: the parsed ``manifest.json``;
    ``boxes``: float32 ``(rows, 4)`` cam boxes, normalised ``(x0, y0, x1, y1)``, or ``None``
    when the run had no cam view.
    """

    path: Path
    logits: np.ndarray
    ids: np.ndarray
    manifest: Mapping[str, Any]
    views: np.ndarray | None = None
    boxes: np.ndarray | None = None

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["tta"]["views"])

    @property
    def class_ids(self) -> tuple[int | str, ...] | None:
        ids = self.manifest["model"]["class_ids"]
        return None if ids is None else tuple(ids)

    @property
    def skipped_ids(self) -> tuple[int | str, ...]:
        return tuple(s["id"] for s in self.manifest["skipped"])


def read_store(path: str | os.PathLike) -> LogitStore:
    """Open the store at ``path`` (its folder, or its manifest.json) for reading.

    Raises :class:`EnsError` when it is missing, incomplete (an interrupted run: rerun the same
    ``ens infer`` to finish it), from a newer ens, or its arrays disagree with its manifest.
    """
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    manifest = _read_manifest(path)
    if manifest is None:
        raise EnsError(f"{path}: not a logit store (no {MANIFEST})")
    if manifest.get("format", 0) > FORMAT_VERSION:
        raise EnsError(f"{path}: store format {manifest['format']} is newer than this ens "
                       f"understands ({FORMAT_VERSION}); upgrade ens")
    if not isinstance(manifest, dict):
        raise EnsError(f"{path / MANIFEST}: not a store manifest (a JSON object is expected)")
    if not manifest.get("complete"):
        command = manifest.get("command")
        finish = f"finish it with: {command}" if command else "run the same `ens infer` again to finish it"
        raise EnsError(f"{path}: incomplete logit store (its run was interrupted); {finish}")
    check_manifest(path / MANIFEST, manifest)
    try:
        logits = np.load(path / LOGITS, mmap_mode="r")
        ids = np.load(path / IDS, mmap_mode="r")
        views = np.load(path / VIEWS, mmap_mode="r") if manifest["keep_views"] else None
        boxes = np.load(path / BOXES, mmap_mode="r") if manifest.get("boxes") else None
    except (OSError, ValueError) as exc:
        raise EnsError(f"{path}: unreadable store array ({exc})") from None
    rows, classes = manifest["rows"], manifest["classes"]
    expected = [(LOGITS, logits, (rows, classes)), (IDS, ids, (rows,))]
    if views is not None:
        expected.append((VIEWS, views, (len(manifest["tta"]["views"]), rows, classes)))
    if boxes is not None:
        expected.append((BOXES, boxes, (rows, 4)))
    for name, array, shape in expected:
        if array.shape != shape:
            raise EnsError(f"{path / name}: shape {array.shape}, but the manifest says {shape}")
    return LogitStore(path=path, logits=logits, ids=ids, manifest=manifest, views=views, boxes=boxes)


def check_manifest(source: Path, manifest: Mapping[str, Any]) -> None:
    """Every field of a complete manifest that ens reads, with its type; :class:`EnsError`
    naming ``source`` and the first field that is missing or malformed."""

    def fail(field: str, expected: str) -> None:
        raise EnsError(f"{source}: field {field!r} is missing or not {expected}; the store is damaged "
                       "(delete it and rerun `ens infer`)")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    top = {"rows": lambda v: count(v, 0), "classes": lambda v: count(v, 1), "dtype": lambda v: v in DTYPES,
           "keep_views": lambda v: isinstance(v, bool), "run_key": lambda v: isinstance(v, str),
           "model": lambda v: isinstance(v, dict), "dataset": lambda v: isinstance(v, dict),
           "tta": lambda v: isinstance(v, dict), "skipped": lambda v: isinstance(v, list),
           "boxes": lambda v: v is None or isinstance(v, bool)}
    kinds = {"rows": "an integer >= 0", "classes": "an integer >= 1", "dtype": f"one of {', '.join(DTYPES)}",
             "keep_views": "true or false", "run_key": "a string", "skipped": "a list", "boxes": "true or false"}
    for field, valid in top.items():
        if not valid(manifest.get(field)):
            fail(field, kinds.get(field, "an object"))
    model, tta = manifest["model"], manifest["tta"]
    checks = {
        "model.sha256": (isinstance(model.get("sha256"), str), "a string"),
        "model.input_size": (count(model.get("input_size"), 1), "an integer >= 1"),
        "model.mean": (isinstance(model.get("mean"), list) and len(model["mean"]) == 3
                       and all(map(number, model["mean"])), "three numbers"),
        "model.std": (isinstance(model.get("std"), list) and len(model["std"]) == 3
                      and all(map(number, model["std"])), "three numbers"),
        "model.resize": (isinstance(model.get("resize"), str), "a string"),
        "model.crop_pct": (number(model.get("crop_pct")), "a number"),
        "model.class_ids": (model.get("class_ids") is None or (isinstance(model["class_ids"], list)
                            and len(model["class_ids"]) == manifest["classes"]),
                            f"null or a list of {manifest['classes']} category ids"),
        "tta.views": (isinstance(tta.get("views"), list) and len(tta["views"]) >= 1
                      and all(isinstance(v, str) for v in tta["views"]), "a non-empty list of view names"),
        "tta.merge": (isinstance(tta.get("merge"), str), "a string"),
        # Only with a cam view; blends compare it across a model's stores.
        "tta.cam": (tta.get("cam") is None or (isinstance(tta["cam"], dict) and set(tta["cam"]) == {"threshold", "pad", "min"}
                                               and all(map(number, tta["cam"].values()))),
                    "absent, null or {threshold, pad, min} (numbers)"),
        "skipped": (all(isinstance(x, dict) and "id" in x for x in manifest["skipped"]),
                    "a list of {id, path, reason}"),
    }
    for field, (valid, expected) in checks.items():
        if not valid:
            fail(field, expected)
    # Stores made before the field existed have version 1 pixels (ensemble.inference.decode.PIXELS).
    if not count(manifest.get("pixels", 1), 1):
        fail("pixels", "absent or an integer >= 1")
    # Stores made before --engine existed say neither: the local engine made them.
    if manifest.get("engine", "local") not in ("local", "ray"):
        fail("engine", "local or ray")
    cluster = manifest.get("cluster")
    if cluster is not None and not (isinstance(cluster, dict)
                                    and all(count(cluster.get(k), 0) for k in ("cpus", "gpus", "nodes"))):
        fail("cluster", "null or {cpus, gpus, nodes} (integers)")


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnsError(f"{path / MANIFEST}: unreadable ({exc})") from None


def to_dtype(scores: np.ndarray, dtype: str) -> np.ndarray:
    """``scores`` as the store's dtype, clipped so no finite score becomes an infinity."""
    limit = np.finfo(dtype).max
    return np.clip(scores, -limit, limit).astype(dtype)


def run_key(values: Mapping[str, Any]) -> str:
    """A digest of the arguments that determine a store's arrays."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


class StoreWriter:
    """Writes one store chunk by chunk, resuming from the chunks a killed run finished.

    ``key`` holds everything that determines the arrays (model and dataset hashes, views,
    merge, dtype, batch and chunk sizes, provider); chunk ``c`` covers split rows
    ``[c * chunk_size, (c + 1) * chunk_size)``.
    """

    def __init__(self, path: Path, key: Mapping[str, Any], rows: int, chunk_size: int):
        self.path = Path(path)
        self.key = dict(key)
        self.digest = run_key(self.key)
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
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
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

    def open(self, manifest: Mapping[str, Any]) -> bool:
        """Prepare to write; ``True`` when a complete store with this key is already there.

        Otherwise chunks of an earlier run with the same key are kept (:attr:`done`) and
        anything else under ``.partial`` is removed. A store with no complete arrays is marked
        incomplete (``manifest`` plus ``"complete": false``); a complete store made with other
        arguments stays complete and readable until :meth:`finish` replaces it.
        """
        self.lock()
        try:
            existing = _read_manifest(self.path)
        except EnsError as exc:  # an unreadable manifest: the store is computed afresh
            self.note, existing = f"{exc}; computing the store again", None
        if existing is not None and existing.get("complete") and existing.get("run_key") == self.digest:
            try:
                read_store(self.path)
            except EnsError as exc:  # e.g. a truncated logits.npy: the arrays fail their own check
                self.note = f"{exc}; computing it again"
                existing = None
        key_file = self.partial / "key.json"
        try:
            same = json.loads(key_file.read_text()) == self.key
        except (OSError, ValueError):
            same = False
        if existing is not None and existing.get("complete") and existing.get("run_key") == self.digest:
            if same:
                shutil.rmtree(self.partial, ignore_errors=True)  # a run killed just after finishing
            return True
        if existing is None or not existing.get("complete"):
            write_json_atomic(self.path / MANIFEST, self._manifest(manifest, complete=False))
        if not same:
            shutil.rmtree(self.partial, ignore_errors=True)
            write_json_atomic(key_file, self.key)
        self.done = {i for i in range(self.chunks) if self._chunk_file(i).is_file()}
        return False

    def _manifest(self, manifest: Mapping[str, Any], complete: bool, **values: Any) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "complete": complete, **values, **manifest, "run_key": self.digest}

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
        with atomic_path(self._chunk_file(index)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        self.done.add(index)

    def finish(self, ids: Sequence[int | str], paths: Sequence[os.PathLike],
               manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Concatenate the chunks into the final arrays and mark the store complete.

        ``ids`` and ``paths`` are the split's, in row order; returns the manifest written.
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
        write_json_atomic(self.path / MANIFEST, self._manifest(manifest, complete=False))
        self._concatenate(LOGITS, (rows, classes), dtype, "logits", axis=0)
        if num_views:
            self._concatenate(VIEWS, (num_views, rows, classes), dtype, "views", axis=1)
        else:
            (self.path / VIEWS).unlink(missing_ok=True)
        if has_boxes:
            self._concatenate(BOXES, (rows, 4), "float32", "boxes", axis=0)
        else:
            (self.path / BOXES).unlink(missing_ok=True)
        with atomic_path(self.path / IDS) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, kept_ids.reshape(rows))
        complete = self._manifest({**manifest, "skipped": skipped}, complete=True, rows=rows,
                                  classes=int(classes), dtype=dtype, keep_views=bool(num_views),
                                  boxes=has_boxes)
        write_json_atomic(self.path / MANIFEST, complete)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.release()
        return complete

    def _concatenate(self, name: str, shape: tuple[int, ...], dtype: str, field: str, axis: int) -> None:
        with atomic_path(self.path / name) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            row = 0
            for index in range(self.chunks):
                with np.load(self._chunk_file(index)) as chunk:
                    keep = chunk["keep"]
                    part = np.compress(keep, chunk[field], axis=axis)
                count = part.shape[axis]
                if axis == 0:
                    out[row:row + count] = part
                else:
                    out[:, row:row + count] = part
                row += count
            out.flush()
            del out
