"""The blend stage's parts that the CLI tests only reach end to end, as golden values on tiny
hand-made stores: alignment of a split's stores, the store digest, the prior's columns, notes
and tau, and the warnings on the fitted split (the finite check of every block as it is read:
tests/ensemble/formats/test_members.py and tests/ensemble/blend/test_blend_memory.py).

The stores are stand-ins holding only what these functions read (path, arrays, manifest);
the arrays the digest reads are real ``.npy`` files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import weights_search as ws
from ensemble.blend import checks, prior
from ensemble.blend.stores import BlendSplit, available_models, check_aligned, label_source
from ensemble.errors import EnsError
from ensemble.formats.blend import prior_counts, shown_ids, store_digest
from ensemble.formats.store import DatasetRecord


@dataclass(frozen=True)
class Store:
    """What the blend reads of a :class:`~ensemble.formats.store.LogitStore`."""

    path: Path
    logits: np.ndarray
    ids: np.ndarray
    class_ids: tuple[int | str, ...] | None = None
    views: np.ndarray | None = None
    view_names: tuple[str, ...] = ()
    manifest: Any = None


def store(name: str, logits, ids=(1, 2, 3), class_ids=None, **kw) -> Store:
    return Store(Path("runs") / name / "val", np.asarray(logits, dtype=np.float32), np.asarray(ids), class_ids, **kw)


THREE = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 3.0]]


def _made_from(source: str, sha256: str | None) -> SimpleNamespace:
    """A manifest holding only the dataset record these functions read."""
    return SimpleNamespace(dataset=DatasetRecord("val", source, sha256, 3))


# ------------------------------------------------------------------------------ alignment

def test_aligned_stores_pass():
    check_aligned("val", ("a", "b"), (store("a", THREE, class_ids=(7, 8, 9)), store("b", THREE, class_ids=(7, 8, 9))))


@pytest.mark.parametrize(("other", "message"), [
    (store("b", [[0, 1]] * 3), "val: b predicts 2 classes, a 3"),
    (store("b", THREE, class_ids=(7, 9, 8)),
     "val: b and a map their outputs to different category ids (export them with the same --classes)"),
    (store("b", THREE, ids=(1, 5, 6), class_ids=(7, 8, 9)),
     "val: the image ids of b and a differ: 2 rows differ, first: 2 in a and 5 in b at row 1, 3 in a and 6 in b at row 2"),
    (store("b", THREE[:2], ids=(1, 4), class_ids=(7, 8, 9)),
     "val: the image ids of b and a differ: 3 against 2 images; only in a: 2, 3; only in b: 4"),
])
def test_misaligned_stores_name_the_model_and_the_difference(other, message):
    with pytest.raises(EnsError) as info:
        check_aligned("val", ("a", "b"), (store("a", THREE, class_ids=(7, 8, 9)), other))
    assert str(info.value) == message


def test_a_store_without_class_ids_predicts_column_j_as_category_j():
    split = BlendSplit("val", (store("a", THREE),), ("a",))
    assert split.class_ids == (0, 1, 2)
    check_aligned("val", ("a", "b"), (store("a", THREE), store("b", THREE, class_ids=(0, 1, 2))))


def test_available_models_are_the_folders_with_a_store_of_the_split(tmp_path):
    for model, split in (("b", "val"), ("a", "val"), ("c", "test")):
        (tmp_path / model / split).mkdir(parents=True)
        (tmp_path / model / split / "manifest.json").write_text("{}")
    assert available_models(tmp_path, "val") == ("a", "b")
    with pytest.raises(EnsError, match="^--runs .*none: no such folder$"):
        available_models(tmp_path / "none", "val")


def test_label_source(tmp_path):
    labels = tmp_path / "val2019.json"
    labels.write_text("{}")
    made_from = _made_from(str(labels), None)
    assert label_source(BlendSplit("val", (store("a", THREE, manifest=made_from),), ("a",)), None) == labels
    data = tmp_path / "data"
    data.mkdir()
    (data / "val2019.json").write_text("{}")
    assert label_source(BlendSplit("val", (store("a", THREE, manifest=made_from),), ("a",)), data) == \
        data / "val2019.json"
    folder = _made_from(str(tmp_path / "images"), None)
    with pytest.raises(EnsError) as info:
        label_source(BlendSplit("val", (store("a", THREE, manifest=folder),), ("a",)), None)
    assert str(info.value) == (f"{Path('runs/a/val')}: the val split did not come from a json with labels; "
                               "give --data DIR")


# ---------------------------------------------------------------------------------- digest

def test_store_digest_is_the_sha256_of_ids_logits_and_blended_views(tmp_path):
    ids, logits, views = np.arange(3), np.asarray(THREE, dtype=np.float16), np.ones((2, 3, 3), np.float16)
    for name, array in (("ids", ids), ("logits", logits), ("views", views)):
        np.save(tmp_path / f"{name}.npy", array)
    files = {name: (tmp_path / f"{name}.npy").read_bytes() for name in ("ids", "logits", "views")}
    kept = Store(tmp_path, logits, ids, views=views)
    plain = hashlib.sha256(files["ids"] + files["logits"]).hexdigest()
    assert store_digest(kept, False) == plain
    assert store_digest(kept, True) == hashlib.sha256(files["ids"] + files["logits"] + files["views"]).hexdigest()
    assert store_digest(Store(tmp_path, logits, ids), True) == plain  # no views kept: none to hash
    np.save(tmp_path / "logits.npy", logits + 1)
    assert store_digest(kept, False) != plain


# ----------------------------------------------------------------------------------- prior

def test_prior_counts_follow_the_output_columns():
    counts = prior_counts({10: 5, 20: 0, 30: 2}, (30, 10, 20), Path("train.json"))
    assert counts.dtype == np.int64 and counts.tolist() == [2, 5, 0]


@pytest.mark.parametrize(("counts", "message"), [
    ({10: 5}, "--prior train.json: no count for 2 of the 3 categories the models predict: 30, 20"),
    ({10: 5, 20: 1, 30: 2, 40: 1, 50: 0},
     "--prior train.json: counts 2 categories that no model predicts: 40, 50 (were the models exported with "
     "other --classes?)"),
])
def test_prior_counts_that_do_not_match_the_columns(counts, message):
    with pytest.raises(EnsError) as info:
        prior_counts(counts, (30, 10, 20), Path("train.json"))
    assert str(info.value) == message


def test_shown_ids():
    assert shown_ids([1, 2, 3]) == "1, 2, 3"
    assert shown_ids(list(range(8))) == "0, 1, 2, 3, 4 and 3 more"


def test_prior_notes_name_the_classes_without_a_training_image():
    assert prior.prior_notes(np.array([3, 1]), (7, 8), Path("t.json")) == []
    assert prior.prior_notes(np.array([3, 0, 1, 0]), (7, 8, 9, 10), Path("t.json")) == [
        f"--prior t.json: 2 of the 4 categories have no training image (8, 10); each is counted as "
        f"{ws.ZERO_COUNT:g} images (half the rarest possible count), so that its log-prior stays finite"]


@pytest.mark.parametrize(("text", "tau"), [(None, None), ("auto", None), ("0", 0.0), ("1.5", 1.5), ("3", 3.0)])
def test_prior_tau(text, tau):
    assert prior.prior_tau(text) == tau


@pytest.mark.parametrize("text", ["x", "-0.1", "3.01", "nan", "inf"])
def test_prior_tau_out_of_bounds(text):
    with pytest.raises(EnsError) as info:
        prior.prior_tau(text)
    assert str(info.value) == (f"--prior-tau {text}: expected auto or a number from 0 to 3 (0: no correction, 1: "
                               "divide by the prior once)")


def test_prior_hint_names_the_training_json(tmp_path):
    (tmp_path / "train2019.json").write_text("{}")
    assert prior.prior_hint(None, False) == [] and prior.prior_hint(tmp_path, True) == []
    assert prior.prior_hint(tmp_path, False) == [
        f"{tmp_path / 'train2019.json'} holds the training labels: add --prior {tmp_path / 'train2019.json'} to "
        "correct the blend for the models' long-tailed training prior (logit adjustment, tau fitted on validation)"]
    (tmp_path / "empty").mkdir()
    assert prior.prior_hint(tmp_path / "empty", False) == []


@dataclass(frozen=True)
class _Row:
    name: str
    top1: float
    nll: float


@dataclass(frozen=True)
class _Report:
    rows: dict
    n_folds: int = 5

    def row(self, kind: str, corrected: bool) -> _Row:
        return self.rows[kind, corrected]


def test_prior_cv_note_when_the_correction_does_not_help():
    better = _Report({("method", True): _Row("nll+prior", 0.8, 1.0), ("method", False): _Row("nll", 0.7, 1.1)})
    assert prior.prior_cv_note(better, "nll") == []
    tie_better_nll = _Report({("method", True): _Row("nll+prior", 0.7, 1.0), ("method", False): _Row("nll", 0.7, 1.1)})
    assert prior.prior_cv_note(tie_better_nll, "nll") == []
    worse = _Report({("uniform", True): _Row("uniform+prior", 0.7, 1.2), ("uniform", False): _Row("uniform", 0.7, 1.1),
                     ("method", True): _Row("nll+prior", 0.9, 0.1), ("method", False): _Row("nll", 0.1, 9)})
    assert prior.prior_cv_note(worse, "uniform") == [
        "uniform+prior does not beat uniform on 5-fold CV (top-1 0.7000 vs 0.7000); the correction is applied as "
        "--prior asks: leave --prior out to blend without it"]


# ------------------------------------------------------------------------ fitted-split checks

def test_label_warnings_compare_the_labels_with_the_json_the_stores_came_from(tmp_path):
    labels = tmp_path / "val.json"
    labels.write_text('{"images": []}')
    sha = hashlib.sha256(labels.read_bytes()).hexdigest()
    made = _made_from("data/val2019.json", sha)
    assert checks.label_warnings(BlendSplit("val", (store("a", THREE, manifest=made),), ("a",)), labels) == []
    other = _made_from("data/val2019.json", "ab" * 32)
    assert checks.label_warnings(BlendSplit("val", (store("a", THREE, manifest=other),), ("a",)), labels) == [
        f"the labels in {labels} (sha256 {sha[:12]}...) are not from the json the val stores were made from, "
        "data/val2019.json (sha256 abababababab...); check that they label the same images"]
    folder = _made_from("data/images", None)
    assert checks.label_warnings(BlendSplit("val", (store("a", THREE, manifest=folder),), ("a",)), labels) == []


def test_class_order_warnings_flag_a_model_near_chance_beside_a_strong_one():
    # the models' top-1 come from the CV's single-member rows (ens blend reads no store for them)
    assert checks.class_order_warnings("val", 10, {"good": 1.0, "bad": 0.0}) == [
        "bad scores top-1 0.000 on val, under 3x chance (1/10), while good scores 1.000: its output columns are "
        "likely in another order than its --classes says; if it was trained on a torchvision ImageFolder, "
        "re-export it with `ens export --classes TRAIN_FOLDER` (ImageFolder's order)"]
    # the best reaches only 0.4: no model is called mis-mapped
    assert checks.class_order_warnings("val", 10, {"good": 0.4, "bad": 0.0}) == []
