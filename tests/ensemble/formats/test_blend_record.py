"""blend.json's one owner (:mod:`ensemble.formats.blend`) on hand-made records: what the typed
record reads, that it writes back the same JSON (keys in order, what it cannot read kept), every
check with its message, the blend it applies, the provenance check, and the ledger's summary."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import weights_search as ws
from ensemble.errors import EnsError
from ensemble.fileio import json_text
from ensemble.formats.blend import (BlendRecord, BlendSummary, CvRow, CvTable, ModelProvenance, PriorCorrection,
                                    SplitStores, check_provenance)
from ensemble.formats.store import ModelRecord, TtaRecord

PROVENANCE = {"model_sha256": "ab" * 32, "input_size": 224, "resize": "shorter", "crop_pct": 0.875,
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
              "views": ["identity", "flip"], "merge": "mean-logits", "cam": None, "pixels": 2}
ROW = {"name": "a", "kind": "member", "top1": 0.5, "top1_low": 0.4, "top1_high": 0.6, "topk": 0.9, "nll": 1.25,
       "prior": False}


def record_doc() -> dict[str, Any]:
    """A blend.json as `ens blend --optimize val --prior ...` writes it, keys in its order."""
    stores = {"a": "cd" * 32, "b": "ef" * 32}
    return {
        "format": 3, "ens": "0.1.0", "method": "nll", "requested_method": "nll", "fallback": False,
        "fusion": "mixture", "params": {"steps": [1, 2]}, "models": ["a", "b"], "members": ["a", "b"], "views": False,
        "weights": {"a": 0.75, "b": 0.25}, "temperatures": {"a": 1.5, "b": 0.5}, "train_score": 0.123,
        "class_ids": [30, 10, 20], "optimize": {"split": "val", "rows": 4, "stores": stores},
        "labels": "data/val2019.json", "stores": stores,
        "provenance": {"a": dict(PROVENANCE), "b": dict(PROVENANCE, model_sha256="12" * 32)},
        "prior": {"file": "data/train2019.json", "sha256": "34" * 32, "counts": [4, 0, 2], "zero_count": 0.5,
                  "tau": 1.25, "tau_fitted": True},
        "cv": {"folds": 2, "top_k": 5, "temperature": True, "prior": True, "fold_taus": [1.0, 1.5],
               "chosen": "nll+prior", "beats_uniform": True,
               "rows": [ROW, dict(ROW, name="b"), dict(ROW, name="nll+prior", kind="method", prior=True)]},
    }


def read(doc: Any, tmp_path: Path, source: str | None = None) -> BlendRecord:
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(doc))
    return BlendRecord.read(path, source)


def test_the_record_reads_typed(tmp_path):
    record = read(record_doc(), tmp_path)
    assert (record.format, record.method, record.fusion, record.models, record.members) == \
        (3, "nll", "mixture", ("a", "b"), ("a", "b"))
    assert record.weights == {"a": 0.75, "b": 0.25} and record.class_ids == (30, 10, 20)
    assert record.optimize == SplitStores("val", 4, {"a": "cd" * 32, "b": "ef" * 32})
    assert record.provenance["a"].mean == (0.485, 0.456, 0.406) and record.provenance["b"].pixels == 2
    assert record.prior == PriorCorrection("data/train2019.json", "34" * 32, (4, 0, 2), 0.5, 1.25, True)
    assert record.cv.chosen == "nll+prior" and record.cv.fold_taus == (1.0, 1.5)
    assert record.cv.row("nll+prior") == CvRow("nll+prior", "method", 0.5, 0.4, 0.6, 0.9, 1.25, True)
    assert record.apply is None and record.applied_from is None


def test_written_back_the_same(tmp_path):
    doc = record_doc()
    record = read(doc, tmp_path)
    assert record.to_json() == doc and list(record.to_json()) == list(doc)
    assert record.text() == json_text(doc)
    record.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == json_text(doc)


def test_a_record_made_here_writes_the_keys_in_the_writers_order(tmp_path):
    record = read(record_doc(), tmp_path)
    fields = {k: getattr(record, k) for k in record_doc()}
    made = BlendRecord(**fields)  # no json_keys: the writer's order
    assert made.text() == json_text(record_doc())
    apply = SplitStores("test", 3, {"a": "00" * 32})
    assert list(made.applied(None, apply).to_json())[-2:] == ["cv", "apply"]
    assert made.applied(None, apply).to_json()["apply"] == {"split": "test", "rows": 3, "stores": {"a": "00" * 32}}
    rows = (ws.CvRow("a", "member", 0.5, 0.4, 0.6, 0.9, 1.25), ws.CvRow("uniform", "uniform", 0.5, 0.4, 0.6, 0.9, 1.25),
            ws.CvRow("nll", "method", 0.5, 0.4, 0.6, 0.9, 1.25))
    report = ws.CvReport(method="nll", top_k=5, n_folds=2, temperature=True, rows=rows, prior=False,
                         fold_taus=(1.0, 1.5))
    assert CvTable.of(report, "nll").to_json() == {
        "folds": 2, "top_k": 5, "temperature": True, "prior": False, "fold_taus": [1.0, 1.5], "chosen": "nll",
        "beats_uniform": report.beats_uniform,
        "rows": [ROW, dict(ROW, name="uniform", kind="uniform"), dict(ROW, name="nll", kind="method")]}


def test_applied_keys_follow_the_records_own(tmp_path):
    doc = record_doc()
    doc["apply"] = {"split": "test", "rows": 1, "stores": {}}
    record = read(doc, tmp_path).applied("blends/nll/blend.json", SplitStores("val", 4, {}))
    out = record.to_json()
    assert list(out) == [*doc, "applied_from"]
    assert out["apply"] == {"split": "val", "rows": 4, "stores": {}} and out["applied_from"] == "blends/nll/blend.json"


def test_what_an_older_ens_left_out_or_a_hand_edit_added_is_written_back_as_it_was(tmp_path):
    doc = record_doc()
    for key in ("format", "ens", "requested_method", "fallback", "params", "views", "train_score", "prior"):
        del doc[key]
    del doc["provenance"]["a"]["cam"], doc["provenance"]["a"]["pixels"]
    doc["note"] = {"by": "hand"}
    doc["cv"] = {"folds": "two"}
    doc["optimize"] = "val"
    record = read(doc, tmp_path)
    assert (record.format, record.params, record.views, record.prior) == (1, {}, False, None)
    assert (record.provenance["a"].cam, record.provenance["a"].pixels) == (None, 1)
    assert record.cv is None and record.optimize is None
    assert record.text() == json_text(doc)
    assert record.fitted().tau is None


def test_fitted_is_the_blend_the_record_holds(tmp_path):
    doc = record_doc()
    doc["members"], doc["weights"], doc["temperatures"] = ["b", "a"], {"b": 1, "a": 3}, {"b": 2, "a": 0.5}
    blend = read(doc, tmp_path).fitted()
    assert (blend.method, blend.fusion, blend.weights, blend.temperatures) == ("nll", "mixture", (1.0, 3.0), (2.0, 0.5))
    assert blend.params == {"steps": (1, 2)} and blend.tau == 1.25
    np.testing.assert_array_equal(blend.log_prior, ws.class_log_prior([4, 0, 2], 0.5))
    doc["temperatures"], doc["prior"] = None, None
    blend = read(doc, tmp_path).fitted()
    assert blend.temperatures is None and blend.log_prior is None and blend.tau is None


def _broken(change) -> dict:
    doc = copy.deepcopy(record_doc())
    change(doc)
    return doc


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.clear(), "not a blend.json (no 'method')"),
    (lambda d: d.pop("fusion"), "not a blend.json (no 'fusion')"),
    (lambda d: d.update(format=True), "field 'format' is not an integer"),
    (lambda d: d.update(format=5), "blend format 5 is newer than this ens understands"),
    (lambda d: d.pop("provenance"), "records no provenance of its models (an older ens wrote it), so its stores "
                                    "cannot be checked against the applied ones; fit it again with --optimize"),
    (lambda d: d.update(method=1), "field 'method' is malformed; expected a string"),
    (lambda d: d.update(fusion="mean"), "field 'fusion' is malformed; expected one of mixture, geometric"),
    (lambda d: d.update(models=["a", "a"]), "field 'models' is malformed; expected a list of distinct model names"),
    (lambda d: d.update(members=[]), "field 'members' is malformed; expected a list of distinct member names"),
    (lambda d: d.update(weights={"b": 0.5, "a": 0.5}), "field 'weights' is malformed; expected an object member -> "
                                                       "weight >= 0, one per member in member order"),
    (lambda d: d.update(weights={"a": True, "b": 0.5}), "field 'weights' is malformed"),
    (lambda d: d.update(weights={"a": float("nan"), "b": 0.5}), "field 'weights' is malformed"),
    (lambda d: d.update(temperatures={"a": 1, "b": 0}), "field 'temperatures' is malformed; expected null or an "
                                                        "object member -> temperature > 0"),
    (lambda d: d.update(views=1), "field 'views' is malformed; expected true or false"),
    (lambda d: d.update(params=[]), "field 'params' is malformed; expected an object"),
    (lambda d: d.update(class_ids={}), "field 'class_ids' is malformed; expected a list"),
    (lambda d: d["prior"].update(counts=[4, 0]), "field 'prior' is malformed; expected null or an object with counts "
                                                 "(one non-negative integer per class id), zero_count > 0 and tau "
                                                 "from 0 to 3"),
    (lambda d: d["prior"].update(counts=[4, -1, 2]), "field 'prior' is malformed"),
    (lambda d: d["prior"].update(zero_count=0), "field 'prior' is malformed"),
    (lambda d: d["prior"].update(tau=3.5), "field 'prior' is malformed"),
    (lambda d: d.update(class_ids=None), "field 'prior' is malformed"),
    (lambda d: d["provenance"]["b"].pop("merge"), "field 'provenance.b' lacks some of model_sha256, input_size, "
                                                  "resize, crop_pct, mean, std, interpolation, views, merge, cam, "
                                                  "pixels"),
    (lambda d: d["provenance"].pop("a"), "field 'provenance.a' lacks some of"),
])
def test_every_check_names_the_source_and_the_field(tmp_path, change, message):
    with pytest.raises(EnsError) as info:
        read(_broken(change), tmp_path, "--weights b.json")
    assert str(info.value).startswith(f"--weights b.json: {message}")


def test_a_file_that_is_not_a_blend_json(tmp_path):
    with pytest.raises(EnsError) as info:
        BlendRecord.read(tmp_path / "none.json", "--weights none.json")
    assert str(info.value) == "--weights none.json: no such file"
    (tmp_path / "bad.json").write_text('{"method": ')
    with pytest.raises(EnsError, match=r"^.*bad\.json: not a blend\.json \(Expecting value"):
        BlendRecord.read(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(EnsError, match=r"list\.json: not a blend\.json \(a JSON object is expected\)$"):
        BlendRecord.read(tmp_path / "list.json")


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("optimize"), "records no fitted split ('optimize'), so there is nothing to report on"),
    (lambda d: d["optimize"].update(rows="4"), "records no fitted split ('optimize')"),
    (lambda d: d["cv"].update(temperature=None), "field 'cv' is malformed; expected folds, top_k, temperature, chosen "
                                                 "and rows of {name, kind, top1, top1_low, top1_high, topk, nll}, as "
                                                 "`ens blend` writes them"),
    (lambda d: d["cv"]["rows"][1].pop("nll"), "field 'cv' is malformed"),
    (lambda d: d["cv"].update(folds=2.0), "field 'cv' is malformed"),
])
def test_the_report_needs_the_fitted_split_and_a_readable_cv_table(tmp_path, change, message):
    record = read(_broken(change), tmp_path)
    with pytest.raises(EnsError) as info:
        record.check_fitted("b/blend.json")
    assert str(info.value).startswith(f"b/blend.json: {message}")


def test_the_report_takes_a_record_without_cv(tmp_path):
    record = read(_broken(lambda d: d.update(cv=None)), tmp_path)
    assert record.check_fitted("b").split == "val" and record.cv is None


class _Store:
    def __init__(self, **changes):
        model = {"sha256": "ab" * 32, "input_size": 224, "resize": "shorter", "crop_pct": 0.875,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
        tta = {"views": ["identity", "flip"], "merge": "mean-logits"}
        model = {"file": "a.onnx", "architecture": "a", "precision": "fp32", "class_ids": None, "foreign": False,
                 **model, **changes.pop("model", {})}
        model["mean"], model["std"] = tuple(model["mean"]), tuple(model["std"])
        tta = {**tta, **changes.pop("tta", {})}
        self.manifest = SimpleNamespace(model=ModelRecord(**model),
                                        tta=TtaRecord(tuple(tta["views"]), tta["merge"], tta.get("cam")),
                                        pixels=changes.pop("pixels", 2))


def test_provenance_of_a_store_and_its_check(tmp_path):
    reference = read(record_doc(), tmp_path).provenance
    assert ModelProvenance.of_store(_Store()) == reference["a"]
    check_provenance(reference, "val store", "test", ("a",), (_Store(),))
    cases = [
        (_Store(model={"sha256": "99" * 32}), "a: its test store was made with model file sha256 999999999999..., the "
                                               "val store with abababababab...; blend stores of one model file, "
                                               "preprocessing and TTA (rerun `ens infer` on both splits alike)"),
        (_Store(tta={"views": ["identity"]}), "a: its test store was made with TTA views [identity], the val store with "
                                              "[identity, flip]"),
        (_Store(pixels=1), "a: its test store was made with pixel pipeline version 1, the val store with 2"),
        (_Store(tta={"cam": {"threshold": 0.5, "pad": 0.1, "min": 0.2}}), "a: its test store was made with cam view "
                                                                         "settings {'threshold': 0.5"),
    ]
    for other, message in cases:
        with pytest.raises(EnsError) as info:
            check_provenance(reference, "val store", "test", ("a",), (other,))
        assert str(info.value).startswith(message)
    with pytest.raises(EnsError, match="^val store: records nothing of how c was made$"):
        check_provenance(reference, "val store", "test", ("c",), (_Store(),))


def test_an_older_records_provenance_stands_for_cam_none_and_pixels_1(tmp_path):
    doc = record_doc()
    del doc["provenance"]["a"]["cam"], doc["provenance"]["a"]["pixels"]
    reference = read(doc, tmp_path).provenance
    check_provenance(reference, "old.json", "test", ("a",), (_Store(pixels=1),))
    with pytest.raises(EnsError, match="pixel pipeline version 2, the old.json with 1"):
        check_provenance(reference, "old.json", "test", ("a",), (_Store(),))


# ------------------------------------------------------------------- the ledger's summary

SUMMARY = {"method": "greedy", "members": ["a", "b"], "weights": {"a": 1, "b": 0.5},
           "cv": {"chosen": "greedy", "rows": [{"name": "greedy", "top1": 0.75, "top1_low": 0.7, "top1_high": 0.8}]},
           "prior": {"tau": 1}}


def test_the_summary_of_a_hand_made_blend_json(tmp_path):
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(SUMMARY))
    assert BlendSummary.read(path) == BlendSummary("greedy", ("a", "b"), {"a": 1.0, "b": 0.5}, 0.75, 0.7, 0.8, 1.0)
    path.write_text(json.dumps(dict(SUMMARY, cv=None, prior=None)))
    assert BlendSummary.read(path) == BlendSummary("greedy", ("a", "b"), {"a": 1.0, "b": 0.5}, None, None, None, None)


@pytest.mark.parametrize(("doc", "message"), [
    ("[", "not a readable JSON file (Expecting value"),
    ([], "'method' missing or not a string"),
    (dict(SUMMARY, members="a"), "'members' missing or not a list"),
    (dict(SUMMARY, weights=[1]), "'weights' missing or not an object"),
    (dict(SUMMARY, members=["a", 2]), "'members' must be a list of names"),
    (dict(SUMMARY, weights={"a": True}), "'weights' must map member names to numbers"),
    (dict(SUMMARY, cv={"chosen": "x"}), "cv.'rows' missing or not a list"),
    (dict(SUMMARY, cv={"rows": []}), "cv.'chosen' missing or not a string"),
    (dict(SUMMARY, cv={"rows": [], "chosen": "x"}), "cv.chosen 'x' names none of cv.rows"),
    (dict(SUMMARY, cv={"rows": [{"name": "x", "top1": 1}], "chosen": "x"}), "cv.rows['x'].'top1_low' missing or not "
                                                                             "a number"),
    (dict(SUMMARY, prior={"tau": "1"}), "prior.'tau' missing or not a number"),
])
def test_the_summarys_checks_keep_the_ledgers_words(tmp_path, doc, message):
    path = tmp_path / "blend.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(EnsError) as info:
        BlendSummary.read(path)
    assert str(info.value).startswith(f"{path}: {message}")
