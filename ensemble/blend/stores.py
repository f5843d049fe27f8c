"""The stores of one split as the blend reads them: one per model, checked to line up (rows, ids,
classes), to hold only finite logits, and to have been made as the blend's provenance says."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.blend import _LATER_FIELDS, PROVENANCE_FIELDS, _shown, provenance
from ensemble.formats.dataset import find_split
from ensemble.formats.store import IDS, LOGITS, MANIFEST, VIEWS, LogitStore, read_store

#: Rows checked for NaN / inf, and fused, per step: bounded memory whatever the split size.
CHUNK_ROWS = 2048


@dataclass(frozen=True)
class BlendSplit:
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


def open_split(runs: Path, models: Sequence[str], split: str) -> BlendSplit:
    stores = []
    for model in models:
        path = runs / model / split
        if not (path / MANIFEST).is_file():
            raise EnsError(f"{path}: no logit store; run `ens infer` on the {split} split for {model}")
        stores.append(read_store(path))
    _check_aligned(split, models, stores)
    return BlendSplit(split, tuple(stores), tuple(models))


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


def check_provenance(reference: Mapping[str, Mapping[str, Any]], reference_name: str, split: "BlendSplit") -> None:
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


def label_source(split: BlendSplit, data: Path | None) -> Path:
    """The json holding the split's labels: the split's file under ``--data`` (found by the rule
    every command uses, :func:`ensemble.formats.dataset.find_split`), else the json the stores were
    made from."""
    if data is not None:
        return find_split(data, split.name, folders=False)
    source = split.stores[0].manifest.get("dataset", {}).get("source")
    if source and str(source).endswith(".json") and Path(source).is_file():
        return Path(source)
    raise EnsError(f"{split.stores[0].path}: the {split.name} split did not come from a json with labels; "
                   "give --data DIR")
