"""A small end-to-end blend for the report tests: `ens infer` then `ens blend`, as a user runs them.

One work folder laid out as `ens blend` leaves it (``runs/``, ``blends/<name>``) with a dataset
in the iNat layout whose training json is long-tailed. Three tiny models (column ``j`` is
category ``PERM[j]``) and three blends of them:

- ``full``: nll weights, temperatures and the prior correction (every section has its inputs
  but the ledger);
- ``views``: one member per model and TTA view, with temperatures;
- ``single``: one model, blended with ``--data`` pointing at a copy of the val json alone (no
  training json beside it: no long-tail section, and no pairs for the diversity section).

:func:`copy_work` copies the runs and a blend where a test may add a ledger (:func:`add_ledger`)
or change a store.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ensemble.formats.blend import BlendSummary
from ensemble.formats.ledger import Ledger

from tests.ensemble.conftest import ens, make_inat, ok, tiny_onnx

MODELS = ("m0", "m1", "m2")
PERM = (3, 0, 4, 1, 2)
#: Training images per category id 0..4: a long tail.
TRAIN_COUNTS = {0: 40, 1: 3, 2: 20, 3: 9, 4: 1}
N_VAL = 30


@dataclass(frozen=True)
class Work:
    root: Path  #: the folder `ens blend` ran in
    data: Path
    runs: Path
    full: Path
    views: Path
    single: Path
    bare_data: Path  #: the val json (and its images) without a training json


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Work:
    root = tmp_path_factory.mktemp("report")
    data = make_inat(root / "data", n_val=N_VAL, n_test=4)
    annotations = [{"id": i, "image_id": i, "category_id": c}
                   for i, c in enumerate(c for c, n in TRAIN_COUNTS.items() for _ in range(n))]
    (data / "train2019.json").write_text(json.dumps({"images": [], "annotations": annotations,
                                                     "categories": [{"id": c} for c in TRAIN_COUNTS]}))
    onnx = [tiny_onnx(root / "models" / f"{m}.onnx", seed=i, class_ids=PERM) for i, m in enumerate(MODELS)]
    runs = root / "runs"
    ok(ens("infer", *onnx, "--data", data, "--split", "val", "--tta", "flip", "--keep-views", "--workers", 0,
           "--out", runs))
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(data / "val2019.json", bare / "val2019.json")
    shutil.copytree(data / "train_val2019", bare / "train_val2019")
    fit = ("blend", "--runs", runs, "--optimize", "val", "--cv", 3)
    ok(ens(*fit, "--data", data, "--temperature", "--prior", data / "train2019.json", "--out", root / "blends/full"))
    ok(ens(*fit, "--data", data, "--views", "--temperature", "--out", root / "blends/views"))
    ok(ens(*fit, "--data", bare, "--models", "m1", "--out", root / "blends/single"))
    return Work(root, data, runs, root / "blends/full", root / "blends/views", root / "blends/single", bare)


def copy_work(work, tmp_path: Path, blend: str = "full") -> Path:
    """The runs and one blend folder under ``tmp_path``, laid out as `ens blend` writes them."""
    shutil.copytree(work.runs, tmp_path / "runs")
    shutil.copytree(getattr(work, blend), tmp_path / "blends" / blend)
    return tmp_path / "blends" / blend


def add_ledger(root: Path, source: str, cv: tuple[float, float, float], public: float | None,
               private: float | None) -> int:
    ledger = Ledger(root / "submissions")
    n = len(ledger.entries())
    path = root / "submissions" / f"s{n}.csv"
    entry = ledger.record(lambda: (path.write_text("id,predicted\n"), path)[1], created="2026-01-01T00:00:00Z",
                          format="inat2019", rows=0, source=source,
                          blend=BlendSummary("nll", ("m0",), {"m0": 1.0}, *cv))
    if public is not None or private is not None:
        ledger.store_scores(entry.id, kaggle_ref=100 + n, kaggle_status="complete", public_score=public,
                            private_score=private, error=None, uploaded=None)
    return entry.id
