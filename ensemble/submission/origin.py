"""Which test json the predictions were made from: `ens submit`'s check of the test set.

Image ids do not tell two test jsons apart: another ``test2019.json`` with the same ids may name
other images, and predictions of the one pass every check against the other. What tells them
apart is the json's sha256, which every store records (``manifest.json``'s ``dataset.sha256``,
:mod:`ensemble.formats.store`) and `ens blend` copies into the ``blend.json`` it writes beside
the predictions. :func:`check_test_set` follows the chain back to it, through that blend.json's
``apply`` (:class:`ensemble.formats.blend.SplitStores`):

1. ``predictions_sha256``, the sha256 of the predictions.csv the blend wrote: the file given
   must have it, else it was edited or replaced since the blend (another blend's predictions
   copied over it hold the same ids) and nothing ties it to the blend's stores;
2. ``dataset_sha256``, the sha256 of the json the applied stores were made from, which must be
   the sha256 of ``--data``'s test json. One that differs is refused (:class:`EnsError` naming
   both): the predictions are of other images. No store is read: the stores are gigabytes at
   iNat 2021's size, and blend.json already holds what they say.

A blend.json of an older ens records neither, and one whose stores recorded no json sha256
records no ``dataset_sha256`` (its ``predictions_sha256`` is still checked first); then the
stores themselves are the chain (the fallback): ``apply``'s split and the sha256 of each model's store arrays
(:func:`ensemble.formats.blend.store_digest`); those stores looked for where `ens report`
looks (:func:`ensemble.formats.blend.runs_candidates`: the folder blend.json records, then
``<work>/runs``, then ``./runs``); a folder counts only
when every model's store there has the recorded sha256 and their image ids are the
predictions' ids; and each store's ``dataset.sha256`` compared as in 2.

Where the chain cannot be made (hand-made predictions without a blend.json, a blend.json that
applied nothing, predictions edited since the blend, stores moved or made again since the
blend) the file is still written: the ids and categories are checked as always, hand-made
predictions are a supported input, and refusing would leave no way to submit them. The result
then says why, `ens submit` prints it as a one-line warning, and the ledger records the row as
``unverified`` (:data:`ensemble.formats.ledger.UNVERIFIED`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.blend import BLEND_FILE, runs_candidates, shown_path, store_digest
from ensemble.formats.common import is_sha256, read_json
from ensemble.formats.dataset import check_store_name
from ensemble.formats.ledger import UNVERIFIED, VERIFIED
from ensemble.formats.store import MANIFEST, LogitStore, read_store


@dataclass(frozen=True)
class TestSetCheck:
    """The outcome: ``sha256`` of the test json checked against, ``check`` (``verified`` or
    ``unverified``, as the ledger's ``test_check``) and, when unverified, ``warning``: one line
    saying why."""

    sha256: str
    check: str
    warning: str | None = None


def check_test_set(csv: Path, ids: np.ndarray, test_json: Path, sha256: str | None = None) -> TestSetCheck:
    """Whether the predictions at ``csv`` (their image ids ``ids``, ``(rows,)`` int64 ascending)
    were made from ``test_json`` (see the module docstring; ``sha256``: its bytes' sha256 when
    the caller has it, as :func:`~ensemble.formats.dataset.load_split` does); :class:`EnsError`
    when the stores they came from were made from another json."""
    sha256 = sha256_file(test_json) if sha256 is None else sha256
    blend_json, predictions, dataset = _recorded(csv)
    if predictions is not None and sha256_file(csv) != predictions:
        return TestSetCheck(sha256, UNVERIFIED, f"{csv}: not checked to be predictions of {test_json} (it is not the "
                                                f"predictions.csv {shown_path(blend_json)} records, by sha256: edited or "
                                                "replaced since the blend); written anyway and recorded in the ledger "
                                                "as unverified")
    if predictions is not None and dataset is not None:
        if dataset != sha256:
            raise EnsError(f"{csv}: made from a json of sha256 {dataset[:12]}... (as {shown_path(blend_json)} records of "
                           f"its stores), not from --data's {test_json} (sha256 {sha256[:12]}...): the same ids may "
                           f"name other images; give --data the folder of the json the predictions were made from, "
                           f"or run `ens infer` on {test_json} and `ens blend` again")
        return TestSetCheck(sha256, VERIFIED)
    stores, why = _trace(csv, ids)
    if stores is None:
        return TestSetCheck(sha256, UNVERIFIED, f"{csv}: not checked to be predictions of {test_json} ({why}); "
                                                "written anyway and recorded in the ledger as unverified")
    for store in stores:
        dataset = store.manifest.dataset
        if not isinstance(dataset.sha256, str):
            return TestSetCheck(sha256, UNVERIFIED, f"{csv}: not checked to be predictions of {test_json} "
                                                    f"({shown_path(store.path)} records no dataset sha256); written anyway and "
                                                    "recorded in the ledger as unverified")
        if dataset.sha256 != sha256:
            source = shown_path(Path(str(dataset.source)))
            raise EnsError(f"{csv}: made from {source} (sha256 {dataset.sha256[:12]}..., the json of its store "
                           f"{shown_path(store.path)}), not from --data's {test_json} "
                           f"(sha256 {sha256[:12]}...): the same ids may name other images; give --data the "
                           f"folder of the json the predictions were made from, or run `ens infer` on "
                           f"{test_json} and `ens blend` again")
    return TestSetCheck(sha256, VERIFIED)


def _recorded(csv: Path) -> tuple[Path, str | None, str | None]:
    """blend.json beside ``csv``, and the sha256s its ``apply`` records of the predictions.csv
    and of the stores' json; each ``None`` where it records none (an older ens; stores that
    recorded no json sha256)."""
    blend_json = csv.parent / BLEND_FILE
    if not os.path.isfile(blend_json):
        return blend_json, None, None
    doc = read_json(blend_json)
    apply = doc.get("apply") if isinstance(doc, dict) else None
    if not isinstance(apply, dict):
        return blend_json, None, None
    predictions, dataset = apply.get("predictions_sha256"), apply.get("dataset_sha256")
    return blend_json, predictions if is_sha256(predictions) else None, dataset if is_sha256(dataset) else None


def _trace(csv: Path, ids: np.ndarray) -> tuple[list[LogitStore] | None, str]:
    """The stores the predictions at ``csv`` were fused from, or ``None`` and why not."""
    blend_json = csv.parent / BLEND_FILE
    if not blend_json.is_file():
        return None, f"no {BLEND_FILE} beside it leads to the stores it was made from"
    doc = read_json(blend_json)
    apply = _applied(doc)
    if apply is None:
        return None, f"{blend_json} records no applied split ('apply': split and stores) to find its stores by"
    split, wanted = apply
    views = isinstance(doc, dict) and doc.get("views") is True
    problems: list[str] = []
    changed = False
    for runs in runs_candidates(doc.get("runs") if isinstance(doc, dict) else None, csv.parent):
        stores: list[LogitStore] = []
        for model, digest in wanted.items():
            path = runs / model / split
            if not os.path.isfile(path / MANIFEST):
                problems.append(f"no store at {shown_path(path)}")
                break
            try:
                store = read_store(path)
                same = store_digest(store, views) == digest
            except EnsError as exc:
                problems.append(str(exc))
                break
            except OSError as exc:
                problems.append(f"{shown_path(path)}: unreadable ({exc.strerror or exc})")
                break
            if not same:
                changed = True
                problems.append(f"{shown_path(path)} changed since the blend applied it (its sha256 differs)")
                break
            stores.append(store)
        else:
            if not np.array_equal(np.sort(np.asarray(stores[0].ids)), ids):
                problems.append(f"the predictions' image ids are not those of the stores under {shown_path(runs)} "
                                f"that {blend_json} applied")
                continue
            return stores, ""
    why = f"the stores {blend_json} applied are not found: {'; '.join(problems)}"
    if changed:
        why += "; blend again to submit predictions of the stores as they are now"
    return None, why


def _applied(doc: Any) -> tuple[str, Mapping[str, str]] | None:
    """``apply``'s split and model -> store sha256, when blend.json holds them as ens writes them
    (plain names: they are joined to a folder)."""
    apply = doc.get("apply") if isinstance(doc, dict) else None
    if not isinstance(apply, dict):
        return None
    split, stores = apply.get("split"), apply.get("stores")
    if not (isinstance(split, str) and isinstance(stores, dict) and stores
            and all(isinstance(m, str) and isinstance(d, str) for m, d in stores.items())):
        return None
    try:
        for name in (split, *stores):
            check_store_name(name, "name")
    except EnsError:
        return None
    return split, stores
