"""Tiny competition files for the `ens submit` tests, and the fixture that points the real
Kaggle client at the stand-in (:mod:`tests.ensemble.submission.kaggle_standin`)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest

from ensemble.submission.kaggle_csv import FORMATS, SubmissionFormat

from tests.ensemble.submission.kaggle_standin import KEY, USERNAME, KaggleStandIn, quiet_import, running

#: Test image ids in json order (not sorted, as nothing promises that).
TEST_IDS = (268245, 268243, 268248, 268244, 268246, 268247)
#: Categories of the first and second category json: the known ids are their union.
TRAIN_CATEGORIES = (3, 7, 11, 20)
VAL_CATEGORIES = (20, 42, 99, 101)
KNOWN = tuple(sorted(set(TRAIN_CATEGORIES) | set(VAL_CATEGORIES)))


#: The file names of each format's competition, as downloaded: test, train and val json.
LAYOUTS = {
    "inat2019": ("test2019.json", "train2019.json", "val2019.json"),
    "inat2018": ("test2018.json", "train2018.json", "val2018.json"),
    "inat2021": ("public_test.json", "train.json", "val.json"),
}


def make_data(folder: Path, fmt: SubmissionFormat = FORMATS["inat2019"], ids: Sequence[int] = TEST_IDS,
              train_labels: Sequence[int] = ()) -> Path:
    """The format's test json (no categories, as 2019's), and train and val jsons whose
    categories are the known ids; the train json has one annotation per ``train_labels``."""
    folder.mkdir(parents=True, exist_ok=True)
    test, train, val = LAYOUTS[fmt.name]
    images = [{"id": i, "file_name": f"test/{i}.jpg", "width": 8, "height": 8} for i in ids]
    (folder / test).write_text(json.dumps({"images": images}))
    annotations = [{"id": j, "image_id": j, "category_id": c} for j, c in enumerate(train_labels)]
    for name, cats, anns in ((train, TRAIN_CATEGORIES, annotations), (val, VAL_CATEGORIES, [])):
        (folder / name).write_text(json.dumps({
            "images": [{"id": a["image_id"], "file_name": f"train/{a['image_id']}.jpg"} for a in anns],
            "annotations": anns, "categories": [{"id": c, "name": f"species {c}"} for c in cats]}))
    return folder


def ranked(ids: Sequence[int] = TEST_IDS, k: int = 5, seed: int = 0) -> dict[int, list[int]]:
    """``k`` distinct known categories per id, in a random order."""
    rng = np.random.default_rng(seed)
    return {i: [int(c) for c in rng.permutation(KNOWN)[:k]] for i in ids}


def write_predictions(folder: Path, rows: Mapping[int, Sequence[int]]) -> Path:
    """``predictions.csv`` as `ens blend` writes it: id, category_1..K, prob_1..K."""
    folder.mkdir(parents=True, exist_ok=True)
    k = len(next(iter(rows.values())))
    lines = [",".join(["id", *(f"category_{j}" for j in range(1, k + 1)), *(f"prob_{j}" for j in range(1, k + 1))])]
    for i, cats in rows.items():
        probs = [f"{0.5 / (j + 1):.6f}" for j in range(k)]
        lines.append(",".join([str(i), *map(str, cats), *probs]))
    path = folder / "predictions.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


BLEND = {
    "method": "greedy",
    "members": ["resnet50", "inception_v3"],
    "weights": {"resnet50": 0.6, "inception_v3": 0.4},
    "temperatures": None,
    "cv": {"folds": 5, "chosen": "greedy",
           "rows": [{"name": "resnet50", "top1": 0.70, "top1_low": 0.68, "top1_high": 0.72, "top5": 0.9, "nll": 1.2},
                    {"name": "greedy", "top1": 0.75, "top1_low": 0.73, "top1_high": 0.77, "top5": 0.93, "nll": 1.0}]},
    "stores": {"resnet50": "ab" * 32, "inception_v3": "cd" * 32},
    "labels": "data/val2019.json",
}


def make_blend(folder: Path, rows: Mapping[int, Sequence[int]] | None = None, blend: dict | None = BLEND) -> Path:
    """A blend folder: predictions.csv and, unless ``blend`` is None, blend.json."""
    write_predictions(folder, ranked() if rows is None else rows)
    if blend is not None:
        (folder / "blend.json").write_text(json.dumps(blend))
    return folder


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


#: The ledger, relative to the work folder the tests run in.
LEDGER = "submissions/ledger.sqlite"


def write_old_ledger(schema: str, row: Mapping[str, object]) -> None:
    """A ledger as an older ens wrote it, in the current folder: the table ``schema`` (its
    ``CREATE TABLE``), schema version 1 and one entry, ``row`` (column: value)."""
    Path(LEDGER).parent.mkdir()
    with sqlite3.connect(LEDGER) as con:
        con.execute(schema)
        con.execute("PRAGMA user_version = 1")
        con.execute(f"INSERT INTO submissions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()))
    con.close()


def ledger_columns() -> tuple[list[str], int]:
    """The ledger's columns, in order, and its schema version."""
    with sqlite3.connect(LEDGER) as con:
        columns = [row[1] for row in con.execute("PRAGMA table_info(submissions)")]
        version = con.execute("PRAGMA user_version").fetchone()[0]
    con.close()
    return columns, version


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """The real client, with fake credentials, talking to a fresh stand-in; yields the stand-in."""
    service = KaggleStandIn()
    with running(service) as proxy:
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no real ~/.kaggle/access_token or OAuth login
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
        monkeypatch.setenv("KAGGLE_USERNAME", USERNAME)
        monkeypatch.setenv("KAGGLE_KEY", KEY)
        monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
        monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(var, proxy)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        api = quiet_import()
        # The client reads KAGGLE_API_ENVIRONMENT once, when first imported; pin the result so
        # the order in which tests import it cannot send a call to the production endpoint.
        monkeypatch.setattr(api, "args", ["--local"])
        yield service
