"""The stores of one split as the blend reads them: one per model, checked to line up (rows, ids,
classes) and to have been made as the blend's provenance says; their members read in blocks of
rows (:class:`ensemble.formats.members.Members`, which checks each block finite as it reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.blend import ModelProvenance, check_provenance, counted
from ensemble.formats.dataset import find_split
from ensemble.formats.members import Members, StoreDigests
from ensemble.formats.store import MANIFEST, LogitStore, read_store


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

    def members(self, views: bool) -> Members:
        """The blend members (each model, or with ``views`` each ``model/view``), read in blocks
        of rows; nothing is read yet."""
        return Members(self.models, self.stores, views)

    def check_provenance(self, reference: Mapping[str, ModelProvenance], reference_name: str) -> None:
        """Each model's store must have been made as ``reference`` (a blend record's
        provenance) says (:func:`ensemble.formats.blend.check_provenance`)."""
        check_provenance(reference, reference_name, self.name, self.models, self.stores)


class PassDigests(StoreDigests):
    """The digest of each of ``split``'s stores that blend.json records
    (:func:`ensemble.formats.blend.store_digest`), taken from the bytes a pass over ``members``
    reads (:class:`ensemble.formats.members.StoreDigests`): each store is not read a second time
    for it. A blend of views reads views.npy, not logits.npy: its stores are hashed from their
    files in :meth:`result`."""

    def __init__(self, split: BlendSplit, members: Members, views: bool) -> None:
        super().__init__(split.models, split.stores, members, views)


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
    check_aligned(split, models, stores)
    return BlendSplit(split, tuple(stores), tuple(models))


def check_aligned(split: str, models: Sequence[str], stores: Sequence[LogitStore]) -> None:
    """The stores of ``split`` (one per model) must predict the same classes, map them to the
    same category ids and hold the same image ids in the same order; otherwise an EnsError
    naming the first model that differs from the first model, and how."""
    first, ref = models[0], stores[0]
    for model, store in zip(models[1:], stores[1:]):
        if store.logits.shape[1] != ref.logits.shape[1]:
            raise EnsError(f"{split}: {model} predicts {counted(store.logits.shape[1], 'class', 'classes')}, {first} "
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


def _id_difference(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> str:
    if a.shape != b.shape:
        only_a = np.setdiff1d(a, b)[:3]
        only_b = np.setdiff1d(b, a)[:3]
        return (f"{a.size} against {counted(b.size, 'image')}; only in {name_a}: {', '.join(map(str, only_a)) or '-'}; "
                f"only in {name_b}: {', '.join(map(str, only_b)) or '-'}")
    rows = np.flatnonzero(a != b)
    first = ", ".join(f"{a[r]} in {name_a} and {b[r]} in {name_b} at row {r}" for r in rows[:3])
    return f"{counted(rows.size, 'row')} differ{'s' if rows.size == 1 else ''}, first: {first}"


def label_source(split: BlendSplit, data: Path | None) -> Path:
    """The json holding the split's labels: the split's file under ``--data`` (found by the rule
    every command uses, :func:`ensemble.formats.dataset.find_split`), else the json the stores were
    made from."""
    if data is not None:
        return find_split(data, split.name, folders=False)
    source = split.stores[0].manifest.dataset.source
    if source and str(source).endswith(".json") and Path(source).is_file():
        return Path(source)
    raise EnsError(f"{split.stores[0].path}: the {split.name} split did not come from a json with labels; "
                   "give --data DIR")
