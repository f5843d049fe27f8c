"""`ens blend` end to end on logit stores written by `ens infer` from a small iNat-layout dataset.

Three tiny models map their outputs to the categories through a non-identity ``class_ids``, so
a prediction only comes out right when the blend maps columns to category ids. Every fused
prediction is checked against the mixture computed here, independently, from the stores'
``.npy`` files and the weights in ``blend.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import weights_search
from ensemble.fileio import json_text
from ensemble.formats.blend import BlendRecord

from tests.ensemble.conftest import ens, make_inat, ok, one_line_error, tiny_onnx

MODELS = ("m0", "m1", "m2")
#: Column j of every tiny model is category PERM[j].
PERM = (3, 0, 4, 1, 2)
VAL_IDS = list(range(15))
TEST_IDS = list(range(15, 22))
METRICS = ("top1", "top1_low", "top1_high", "topk", "nll")




@dataclass(frozen=True)
class Work:
    data: Path
    runs: Path  #: val, test (json) and test2019 (image folder, string ids) stores, with views
    onnx: tuple[Path, ...]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    root = tmp_path_factory.mktemp("blend")
    data = make_inat(root / "inat", n_val=len(VAL_IDS), n_test=len(TEST_IDS))
    onnx = tuple(tiny_onnx(root / "models" / f"{m}.onnx", seed=i, class_ids=PERM) for i, m in enumerate(MODELS))
    runs = root / "runs"
    common = ("--tta", "flip", "--keep-views", "--workers", 0, "--out", runs)
    ok(ens("infer", *onnx, "--data", data, *common))
    ok(ens("infer", *onnx, "--index", data / "test2019", *common))
    return Work(data, runs, onnx)


def copy_runs(work: Work, tmp_path: Path) -> Path:
    """A copy of the stores that a test may change."""
    return Path(shutil.copytree(work.runs, tmp_path / "runs"))


def fused(runs: Path, record: dict, split: str) -> np.ndarray:
    """The blend's class probabilities ``(rows, classes)`` in float64, from the stores' files."""
    weights, temps = record["weights"], record["temperatures"] or {}
    total = 0.0
    for name in record["members"]:
        model, _, view = name.partition("/")
        store = runs / model / split
        if view:
            views = json.loads((store / "manifest.json").read_text())["tta"]["views"]
            x = np.load(store / "views.npy")[views.index(view)]
        else:
            x = np.load(store / "logits.npy")
        x = x.astype(np.float64) / temps.get(name, 1.0)
        log_p = x - x.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        total = total + weights[name] * (np.exp(log_p) if record["fusion"] == "mixture" else log_p)
    if record["fusion"] == "mixture":
        return total / sum(weights.values())
    p = np.exp(total - total.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return header, rows


def check_predictions(path: Path, runs: Path, record: dict, split: str, k: int = 5) -> list[list[str]]:
    """predictions.csv holds the top-k of the blend in ``record``, in store order, as category ids."""
    header, rows = read_predictions(path)
    assert header == ["id", *(f"category_{i}" for i in range(1, k + 1)), *(f"prob_{i}" for i in range(1, k + 1))]
    ids = np.load(runs / "m0" / split / "ids.npy")
    assert [r[0] for r in rows] == [str(i) for i in ids.tolist()]
    p = fused(runs, record, split)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    categories = np.asarray([[int(c) for c in r[1:k + 1]] for r in rows])
    probs = np.asarray([[float(v) for v in r[k + 1:]] for r in rows])
    assert (categories[:, 0] == np.asarray(PERM)[p.argmax(axis=1)]).all()
    np.testing.assert_array_equal(categories, np.asarray(PERM)[order])
    assert (np.diff(probs, axis=1) <= 0).all()
    np.testing.assert_allclose(probs, np.take_along_axis(p, order, axis=1), rtol=1e-4, atol=1e-6)
    return rows


def store_sha256(store: Path, views: bool = False) -> str:
    names = ["ids.npy", "logits.npy"] + (["views.npy"] if views else [])
    return hashlib.sha256(b"".join((store / n).read_bytes() for n in names)).hexdigest()


def _labels(work: Work) -> np.ndarray:
    """Column index of each val image's true category, in store row order."""
    doc = json.loads((work.data / "val2019.json").read_text())
    truth = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    ids = np.load(work.runs / "m0" / "val" / "ids.npy").tolist()
    return np.array([PERM.index(truth[i]) for i in ids])


def test_optimize_val_applies_test_and_reports_cv(work, tmp_path):
    out = tmp_path / "blend"
    # Top-3 of 5 classes: a top-k that can miss (top-5 of 5 always hits).
    result = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", out,
                    "--top-k", 3))
    record = json.loads((out / "blend.json").read_text())

    assert (record["method"], record["requested_method"], record["fusion"]) == ("nll", "nll", "mixture")
    assert record["models"] == record["members"] == list(MODELS) and record["views"] is False
    assert list(record["weights"]) == list(MODELS) and all(w >= 0 for w in record["weights"].values())
    assert sum(record["weights"].values()) == pytest.approx(1)
    assert record["temperatures"] is None and record["fallback"] is False
    assert record["class_ids"] == list(PERM)
    assert record["labels"] == str(work.data / "val2019.json")
    assert record["stores"] == {m: store_sha256(work.runs / m / "val") for m in MODELS}
    assert record["optimize"] == {"split": "val", "rows": len(VAL_IDS), "stores": record["stores"]}
    assert record["apply"] == {"split": "test", "rows": len(TEST_IDS),
                               "stores": {m: store_sha256(work.runs / m / "test") for m in MODELS},
                               "dataset_sha256": hashlib.sha256((work.data / "test2019.json").read_bytes()).hexdigest(),
                               "predictions_sha256": hashlib.sha256((out / "predictions.csv").read_bytes()).hexdigest()}
    cv = record["cv"]
    assert (cv["folds"], cv["top_k"], cv["temperature"], cv["chosen"]) == (5, 3, False, "nll")
    assert [(r["name"], r["kind"]) for r in cv["rows"]] == [
        *((m, "member") for m in MODELS), ("uniform", "uniform"), ("nll", "method")]
    # A single model's CV row involves no fitting: its scores are the model's own on all of val.
    labels = _labels(work)
    for model, row in zip(MODELS, cv["rows"]):
        logits = np.load(work.runs / model / "val" / "logits.npy").astype(np.float64)
        ranks = (logits > logits[np.arange(labels.size), labels][:, None]).sum(axis=1)
        assert row["top1"] == pytest.approx((ranks == 0).mean())
        assert row["topk"] == pytest.approx((ranks < 3).mean())
    assert {r["topk"] for r in cv["rows"]} != {1.0}
    for row in cv["rows"]:
        assert row["top1_low"] <= row["top1"] <= row["top1_high"] and row["top1"] <= row["topk"]
    rows = {r["name"]: r for r in cv["rows"]}
    assert cv["beats_uniform"] == ((rows["nll"]["top1"], -rows["nll"]["nll"])
                                   > (rows["uniform"]["top1"], -rows["uniform"]["nll"]))

    rows = check_predictions(out / "predictions.csv", work.runs, record, "test", k=3)
    assert [int(r[0]) for r in rows] == TEST_IDS

    lines = result.stdout.splitlines()
    assert lines[0] == f"5-fold CV on val ({len(VAL_IDS)} images)"
    assert lines[1].split() == ["top-1", "95%", "interval", "top-3", "NLL"]
    for line, row in zip(lines[2:7], cv["rows"]):
        assert line.split()[:2] == [row["name"], f"{row['top1']:.4f}"]
        assert f"[{row['top1_low']:.4f}, {row['top1_high']:.4f}]" in line and f"{row['nll']:.4f}" in line
        assert line.endswith("<- used") == (row["name"] == "nll")
    assert lines[7] == "weights: " + ", ".join(f"{m} {record['weights'][m]:.3f}" for m in MODELS)
    assert lines[8:] == [f"wrote {out / 'blend.json'}",
                         f"wrote {out / 'predictions.csv'} ({len(TEST_IDS)} images of test, top-3)"]


def test_blend_json_reads_and_writes_back_to_its_bytes(work, tmp_path):
    """BlendRecord is blend.json's one reader and writer: a record `ens blend` wrote (fitted with
    temperatures, and applied), read and written again, is the same bytes; re-applying it keeps
    its keys in their order and adds applied_from after them, as `ens blend --weights` always did."""
    fitted, applied = tmp_path / "fitted", tmp_path / "applied"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--temperature", "--out", fitted))
    ok(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--out", applied))
    for path in (fitted / "blend.json", applied / "blend.json"):
        record = BlendRecord.read(path)
        assert record.text() == path.read_text()
        record.write(tmp_path / "again.json")
        assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    saved, again = (json.loads((p / "blend.json").read_text()) for p in (fitted, applied))
    assert list(again) == [*saved, "applied_from"] and list(saved)[-2:] == ["cv", "apply"]
    assert {k: v for k, v in again.items() if k != "applied_from"} == saved
    record = BlendRecord.read(fitted / "blend.json")
    assert record.cv.rows[0].name == "m0" and record.provenance["m0"].pixels == 3
    assert record.optimize.split == "val" and record.apply.split == "test"


def test_an_older_or_hand_edited_blend_json_is_applied_as_it_was(work, tmp_path):
    """What a blend.json holds that this ens does not write (a key of a hand edit, a CV table it
    cannot read) or leaves out (an older ens's provenance without cam and pixels, no prior) is
    written back as it was when the blend is re-applied."""
    fitted = tmp_path / "fitted"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", fitted))
    doc = json.loads((fitted / "blend.json").read_text())
    del doc["prior"], doc["apply"]
    for given in doc["provenance"].values():
        del given["cam"]
    doc["cv"] = {"rows": "hand-edited"}
    doc = {"note": "kept", **doc}
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    assert BlendRecord.read(old).text() == json_text(doc)
    out = tmp_path / "out"
    ok(ens("blend", "--runs", work.runs, "--weights", old, "--out", out))
    written = json.loads((out / "blend.json").read_text())
    expected = dict(doc, applied_from=str(old), apply=written["apply"])
    assert (out / "blend.json").read_text() == json_text(expected)


def test_stores_made_differently_are_never_blended(work, tmp_path):
    """Fit on val stores made with flip TTA; test stores made otherwise stop the blend."""
    infer_args = ("--data", work.data, "--split", "test", "--workers", 0, "--keep-views")
    out = tmp_path / "blend"
    fit = ("blend", "--optimize", "val", "--data", work.data, "--out", out)

    runs = copy_runs(work, tmp_path / "views")
    ok(ens("infer", work.onnx[1], *infer_args, "--out", runs))  # no --tta flip
    one_line_error(ens(*fit, "--runs", runs), "m1: its test store was made with TTA views [identity], the val "
                                              "store with [identity, flip]")
    runs = copy_runs(work, tmp_path / "merge")
    ok(ens("infer", work.onnx[1], *infer_args, "--tta", "flip", "--merge", "gmean", "--out", runs))
    one_line_error(ens(*fit, "--runs", runs), "m1: its test store was made with TTA merge gmean, the val store "
                                              "with mean-logits")
    # The same file name, other weights: a re-export between the two runs. (Its test store is
    # deleted first, as `ens infer` asks: it never replaces a store another model file made.)
    runs = copy_runs(work, tmp_path / "reexport")
    again = tiny_onnx(tmp_path / "reexport" / "m2.onnx", seed=11, class_ids=PERM)
    shutil.rmtree(runs / "m2" / "test")
    ok(ens("infer", again, *infer_args, "--tta", "flip", "--out", runs))
    one_line_error(ens(*fit, "--runs", runs), "m2: its test store was made with model file sha256 ",
                   "the val store with ")
    assert not out.exists()

    # Saved weights are checked against the stores they are applied to, in the same way.
    fitted = tmp_path / "fitted"
    ok(ens(*fit[:-1], fitted, "--runs", work.runs))
    one_line_error(ens("blend", "--runs", runs, "--weights", fitted / "blend.json", "--out", out),
                   f"m2: its test store was made with model file sha256 ", f"the {fitted / 'blend.json'} with ")
    assert not out.exists()

    # Only the stored dtype differs: that blends.
    runs = copy_runs(work, tmp_path / "dtype")
    ok(ens("infer", work.onnx[0], *infer_args, "--tta", "flip", "--dtype", "float32", "--out", runs))
    ok(ens(*fit, "--runs", runs))
    assert (out / "predictions.csv").is_file()


def test_stores_of_other_pixel_pipelines_are_never_blended(work, tmp_path):
    """A test store made by an ens before the region resize (no pixel version in its manifest:
    version 1) does not blend with current-version val stores of the same model; stores and a
    blend.json that all predate the field still go together."""
    runs = copy_runs(work, tmp_path / "old")

    def drop_pixels(manifest_path: Path) -> None:
        manifest = json.loads(manifest_path.read_text())
        assert manifest.pop("pixels") == 3
        manifest_path.write_text(json.dumps(manifest))

    drop_pixels(runs / "m1" / "test" / "manifest.json")
    out = tmp_path / "blend"
    fit = ("blend", "--optimize", "val", "--data", work.data, "--runs", runs, "--out", out)
    one_line_error(ens(*fit), "m1: its test store was made with pixel pipeline version 1, the val store with 3")
    assert not out.exists()
    for manifest in runs.glob("*/*/manifest.json"):
        if manifest.parent != runs / "m1" / "test":
            drop_pixels(manifest)
    ok(ens(*fit))
    record = json.loads((out / "blend.json").read_text())
    assert {model: p["pixels"] for model, p in record["provenance"].items()} == {m: 1 for m in MODELS}
    for given in record["provenance"].values():
        del given["pixels"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(record))
    ok(ens("blend", "--runs", runs, "--weights", old, "--out", tmp_path / "applied"))
    # ... but not to the stores of this ens.
    one_line_error(ens("blend", "--runs", work.runs, "--weights", old, "--out", tmp_path / "new"),
                   "its test store was made with pixel pipeline version 3", f"the {old} with 1")


def test_a_blend_json_without_provenance_is_refused(work, tmp_path):
    fitted = tmp_path / "fitted"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", fitted))
    record = json.loads((fitted / "blend.json").read_text())
    del record["provenance"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(record))
    one_line_error(ens("blend", "--runs", work.runs, "--weights", old, "--out", tmp_path / "out"),
                   f"--weights {old}: records no provenance of its models", "fit it again with --optimize")


def test_applying_saved_weights_never_replaces_the_fitted_blend(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data))
    fitted = Path("blends") / "nll"
    before = {p.name: p.read_bytes() for p in fitted.iterdir()}
    result = ok(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--apply", "val"))
    assert f"wrote {Path('blends') / 'nll-val' / 'predictions.csv'} ({len(VAL_IDS)} images of val" in result.stdout
    ok(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json"))
    assert {p.name: p.read_bytes() for p in fitted.iterdir()} == before
    assert (Path("blends") / "nll-test" / "predictions.csv").read_bytes() == before["predictions.csv"]
    one_line_error(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--out", fitted),
                   f"--out {fitted}: holds the blend that --weights {fitted / 'blend.json'} reads")
    assert {p.name: p.read_bytes() for p in fitted.iterdir()} == before


def test_labels_of_an_inat2021_layout(work, tmp_path):
    data = tmp_path / "inat2021"
    data.mkdir()
    shutil.copy(work.data / "val2019.json", data / "val.json")
    out = tmp_path / "blend"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", data, "--out", out))
    assert json.loads((out / "blend.json").read_text())["labels"] == str(data / "val.json")


def test_a_model_near_chance_beside_a_strong_one_is_flagged(tmp_path):
    """Twenty classes: m_good predicts the labels; m_shifted predicts them one column off, as a
    model exported with the wrong class order does."""
    classes = 20
    data = make_inat(tmp_path / "inat", n_val=40, n_test=4, categories=classes)
    runs = tmp_path / "runs"
    for i, name in enumerate(("m_good", "m_shifted", "m_weak")):
        model = tiny_onnx(tmp_path / f"{name}.onnx", classes=classes, seed=i)
        ok(ens("infer", model, "--data", data, "--split", "val", "--workers", 0, "--keep-views", "--out", runs))
    doc = json.loads((data / "val2019.json").read_text())
    truth = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    labels = np.array([truth[i] for i in np.load(runs / "m_good" / "val" / "ids.npy").tolist()])
    rng = np.random.default_rng(0)
    good = rng.normal(0, 1, (labels.size, classes))
    good[np.arange(labels.size), labels] += 8
    weak = rng.normal(0, 1, (labels.size, classes))
    weak[np.arange(labels.size)[:12], labels[:12]] += 6  # 12 of 40 right: 0.30, above 3x chance (0.15)
    for name, logits in (("m_good", good), ("m_shifted", np.roll(good, 1, axis=1)), ("m_weak", weak)):
        _rewrite(runs / name / "val", logits=logits.astype(np.float16))
    result = ok(ens("blend", "--runs", runs, "--optimize", "val", "--out", tmp_path / "blend"))
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, notes
    assert notes[0].startswith("note: m_shifted scores top-1 0.000 on val, under 3x chance (1/20), while m_good "
                               "scores 1.000")
    assert "`ens export --classes TRAIN_FOLDER`" in notes[0]


def test_saved_weights_are_applied_without_refitting(work, tmp_path, monkeypatch):
    fitted = tmp_path / "fitted"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", fitted))
    saved = json.loads((fitted / "blend.json").read_text())

    def no_fitting(*args, **kwargs):
        raise AssertionError("--weights must not fit anything")

    monkeypatch.setattr(weights_search, "fit_blend", no_fitting)
    monkeypatch.setattr(weights_search, "cross_validate", no_fitting)
    # --apply defaults to test with --weights; the order of --models does not matter.
    out = tmp_path / "again"
    result = ok(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--models", "m2,m0,m1",
                    "--out", out))
    assert (out / "predictions.csv").read_bytes() == (fitted / "predictions.csv").read_bytes()
    record = json.loads((out / "blend.json").read_text())
    assert record["weights"] == saved["weights"] and record["applied_from"] == str(fitted / "blend.json")
    assert "CV" not in result.stdout and f"wrote {out / 'predictions.csv'}" in result.stdout

    other = tmp_path / "other"
    ok(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--apply", "val", "--out", other))
    check_predictions(other / "predictions.csv", work.runs, saved, "val")

    bad = tmp_path / "bad"
    one_line_error(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--models", "m0,m1",
                       "--out", bad), "names models that are not given: m2")
    one_line_error(ens("blend", "--runs", work.runs, "--weights", fitted / "blend.json", "--optimize", "val",
                       "--out", bad), "drop --optimize")
    one_line_error(ens("blend", "--runs", work.runs, "--weights", tmp_path / "none.json", "--out", bad),
                   "none.json: no such file")
    assert not bad.exists()


@pytest.mark.parametrize("method", ["uniform", "nll", "logit", "greedy", "accuracy"])
def test_every_method_runs(work, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    result = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--method", method,
                    "--top-k", 3))
    out = Path("blends") / method
    record = json.loads((out / "blend.json").read_text())
    assert record["method"] == method and list(record["weights"]) == list(MODELS)
    assert all(w >= 0 for w in record["weights"].values())
    # Geometric pooling may weight every model 0 (the uniform distribution); a mixture may not.
    assert record["fusion"] == ("geometric" if method == "logit" else "mixture")
    assert method == "logit" or sum(record["weights"].values()) == pytest.approx(1)
    names = [r["name"] for r in record["cv"]["rows"]]
    assert names == [*MODELS, "uniform"] + ([] if method == "uniform" else [method])
    if method == "uniform":
        assert record["weights"] == {m: pytest.approx(1 / 3) for m in MODELS} and record["cv"]["chosen"] == "uniform"
    check_predictions(out / "predictions.csv", work.runs, record, "test", k=3)
    assert f"({len(TEST_IDS)} images of test, top-3)" in result.stdout


def test_temperatures_are_fitted_stored_and_applied(work, tmp_path):
    out = tmp_path / "blend"
    result = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--temperature",
                    "--out", out))
    record = json.loads((out / "blend.json").read_text())
    temps = record["temperatures"]
    assert list(temps) == list(MODELS) and all(isinstance(t, float) and t > 0 for t in temps.values())
    assert record["cv"]["temperature"] is True and "temperatures fitted per fold" in result.stdout
    assert "temperatures: " + ", ".join(f"{m} {temps[m]:.2f}" for m in MODELS) in result.stdout
    check_predictions(out / "predictions.csv", work.runs, record, "test")


def test_views_weight_model_view_pairs(work, tmp_path):
    out = tmp_path / "blend"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--views", "--out", out))
    record = json.loads((out / "blend.json").read_text())
    members = [f"{m}/{v}" for m in MODELS for v in ("identity", "flip")]
    assert record["views"] is True and record["models"] == list(MODELS)
    assert record["members"] == list(record["weights"]) == members
    assert sum(record["weights"].values()) == pytest.approx(1)
    assert record["stores"] == {m: store_sha256(work.runs / m / "val", views=True) for m in MODELS}
    assert [r["name"] for r in record["cv"]["rows"]] == [*members, "uniform", "nll"]
    check_predictions(out / "predictions.csv", work.runs, record, "test")

    again = tmp_path / "again"
    ok(ens("blend", "--runs", work.runs, "--weights", out / "blend.json", "--out", again))
    assert (again / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()


def test_fallback_uniform_takes_over_when_the_method_does_not_beat_it(work, tmp_path, monkeypatch):
    monkeypatch.setattr(weights_search.CvReport, "beats_uniform", property(lambda self: False))
    args = ("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data)

    kept = ok(ens(*args, "--out", tmp_path / "kept"))
    assert "note: nll does not beat uniform weights on 5-fold CV" in kept.stdout
    assert "--fallback uniform would use equal weights" in kept.stdout
    assert json.loads((tmp_path / "kept" / "blend.json").read_text())["method"] == "nll"

    # The default folder is named after the method asked for, not the one that took over.
    monkeypatch.chdir(tmp_path)
    out = Path("blends") / "nll"
    result = ok(ens(*args, "--fallback", "uniform"))
    record = json.loads((out / "blend.json").read_text())
    assert (record["method"], record["requested_method"], record["fallback"]) == ("uniform", "nll", True)
    assert record["weights"] == {m: pytest.approx(1 / 3) for m in MODELS}
    assert record["cv"]["chosen"] == "uniform" and record["cv"]["beats_uniform"] is False
    assert "--fallback uniform: using uniform weights" in result.stdout
    used = [line.split()[0] for line in result.stdout.splitlines() if line.endswith("<- used")]
    assert used == ["uniform"]
    check_predictions(out / "predictions.csv", work.runs, record, "test")
    one_line_error(ens(*args, "--fallback", "best", "--out", tmp_path / "bad"), "--fallback best")


def test_folder_split_with_string_ids(work, tmp_path):
    out = tmp_path / "blend"
    result = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--apply", "test2019",
                    "--out", out))
    record = json.loads((out / "blend.json").read_text())
    rows = check_predictions(out / "predictions.csv", work.runs, record, "test2019")
    ids = [r[0] for r in rows]
    assert ids == sorted(p.name for p in (work.data / "test2019").iterdir()) and all(i.endswith(".jpg") for i in ids)
    assert "images of test2019" in result.stdout


def test_apply_defaults_to_test_only_when_every_model_has_it(work, tmp_path):
    runs = copy_runs(work, tmp_path)
    ok(ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--models", "m0,m1", "--out",
           tmp_path / "both"))
    assert (tmp_path / "both" / "predictions.csv").is_file()

    shutil.rmtree(runs / "m2" / "test")
    out = tmp_path / "fit"
    out.mkdir()
    (out / "predictions.csv").write_text("an earlier blend's predictions\n")
    stand_in = hashlib.sha256((out / "predictions.csv").read_bytes()).hexdigest()
    (out / "blend.json").write_text(json.dumps({"apply": {"split": "test", "rows": 7, "stores": {},  # that blend's
                                                          "predictions_sha256": stand_in}}))
    result = ok(ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--out", out))
    record = json.loads((out / "blend.json").read_text())
    assert "apply" not in record and record["models"] == list(MODELS)
    # A fit-only run leaves no stale predictions beside its new blend.json, and says why.
    assert sorted(p.name for p in out.iterdir()) == ["blend.json"]
    assert result.stdout.splitlines()[-1] == f"wrote {out / 'blend.json'}"
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert notes[0].startswith(f"note: fitted only: m2 has no test store under {runs} (run `ens infer` on test")
    assert notes[-1] == (f"note: removed {out / 'predictions.csv'}: it held an earlier blend's predictions (of test), "
                         "and this run applied nothing")
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--apply", "test",
                       "--out", tmp_path / "bad"), f"{runs / 'm2' / 'test'}: no logit store")
    assert not (tmp_path / "bad").exists()


def test_predictions_that_fail_leave_the_blend_folder_as_it_was(work, tmp_path, monkeypatch):
    out = tmp_path / "blend"
    out.mkdir()
    (out / "blend.json").write_text("old\n")
    (out / "predictions.csv").write_text("old\n")
    real_top_k, calls = weights_search.top_k, []

    def failing_top_k(log_probs, k):
        calls.append(k)
        if len(calls) > 1:
            raise ValueError("disk on fire")
        return real_top_k(log_probs, k)

    monkeypatch.setattr(weights_search, "top_k", failing_top_k)
    monkeypatch.setattr("ensemble.blend.run.CHUNK_ROWS", 3)
    one_line_error(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", out),
                   "test: cannot fuse its stores (disk on fire)")
    assert len(calls) == 2
    assert sorted(p.name for p in out.iterdir()) == ["blend.json", "predictions.csv"]
    assert (out / "blend.json").read_text() == (out / "predictions.csv").read_text() == "old\n"


def _rewrite(store: Path, rows: slice | None = None, ids=None, logits=None) -> None:
    """Change a store's arrays by hand, keeping its manifest consistent with them."""
    manifest = json.loads((store / "manifest.json").read_text())
    arrays = {name: np.load(store / f"{name}.npy") for name in ("ids", "logits", "views")}
    if rows is not None:
        arrays = {"ids": arrays["ids"][rows], "logits": arrays["logits"][rows], "views": arrays["views"][:, rows]}
    if ids is not None:
        arrays["ids"] = ids
    if logits is not None:
        arrays["logits"] = logits
    for name, array in arrays.items():
        np.save(store / f"{name}.npy", array)
    manifest["rows"] = int(arrays["ids"].size)
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_stores_whose_image_ids_differ(work, tmp_path):
    runs = copy_runs(work, tmp_path)
    out = tmp_path / "blend"
    args = ("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--out", out)

    ids = np.load(runs / "m2" / "test" / "ids.npy")
    ids[[3, 5]] = [901, 902]
    _rewrite(runs / "m2" / "test", ids=ids)
    one_line_error(ens(*args), "test: the image ids of m2 and m0 differ: 2 rows differ, first: "
                               "18 in m0 and 901 in m2 at row 3, 20 in m0 and 902 in m2 at row 5")
    assert not out.exists()

    _rewrite(runs / "m1" / "val", rows=slice(0, -2))
    one_line_error(ens(*args), "val: the image ids of m1 and m0 differ: 15 against 13 images; "
                               "only in m0: 13, 14; only in m1: -")
    assert not out.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits(work, tmp_path, bad):
    runs = copy_runs(work, tmp_path)
    out = tmp_path / "blend"
    logits = np.load(runs / "m1" / "test" / "logits.npy")
    logits[[2, 4], 1] = bad
    _rewrite(runs / "m1" / "test", logits=logits)
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--out", out),
                   f"{runs / 'm1' / 'test'}: m1 has NaN or infinite logits, first at image ids 17, 19")
    assert not out.exists()

    views = np.load(runs / "m0" / "val" / "views.npy")
    views[1, 7, 0] = bad
    np.save(runs / "m0" / "val" / "views.npy", views)
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--views",
                       "--out", out), "m0/flip has NaN or infinite logits, first at image id 7")
    assert not out.exists()


def test_classes_and_class_mappings_must_agree(work, tmp_path):
    runs = copy_runs(work, tmp_path)
    models = tmp_path / "models"
    four = tiny_onnx(models / "four.onnx", classes=4, seed=5, class_ids=PERM[:4])
    ident = tiny_onnx(models / "ident.onnx", seed=6, class_ids=range(5))
    plain = tiny_onnx(models / "plain.onnx", seed=7)  # no class_ids: column j is category j
    ok(ens("infer", four, ident, plain, "--data", work.data, "--split", "val", "--workers", 0, "--out", runs))
    out = tmp_path / "blend"
    args = ("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--out", out)

    one_line_error(ens(*args, "--models", "m0,four"), "val: four predicts 4 classes, m0 5")
    one_line_error(ens(*args, "--models", "m0,ident"), "val: ident and m0 map their outputs to different category ids")
    # None of them has a test store: fit only, and ``null`` is the same mapping as 0..4.
    ok(ens(*args, "--models", "ident,plain"))
    assert sorted(p.name for p in out.iterdir()) == ["blend.json"]
    # Stores without per-view logits cannot be blended by view.
    shutil.rmtree(out)
    one_line_error(ens(*args, "--models", "ident,plain", "--views"),
                   f"{runs / 'ident' / 'val'}: no per-view logits; rerun `ens infer` with --keep-views")
    assert not out.exists()


def test_bad_options_and_labels(work, tmp_path):
    out = tmp_path / "blend"
    args = ("--runs", work.runs, "--data", work.data, "--out", out)

    one_line_error(ens("blend", *args), "give --optimize SPLIT to fit weights, or --weights blend.json")
    one_line_error(ens("blend", *args, "--optimize", "val", "--method", "best"),
                   "unknown blend method 'best'; choose from: uniform, nll, logit, greedy, accuracy")
    one_line_error(ens("blend", "--runs", tmp_path / "nowhere", "--optimize", "val", "--out", out),
                   f"--runs {tmp_path / 'nowhere'}: no such folder")
    one_line_error(ens("blend", *args, "--optimize", "val", "--cv", 1), "--cv 1: cross-validation needs at least 2")
    one_line_error(ens("blend", *args, "--optimize", "val", "--top-k", 0), "--top-k 0: must be at least 1")
    one_line_error(ens("blend", *args, "--optimize", "val", "--models", "m0,m9"),
                   f"{work.runs / 'm9' / 'val'}: no logit store")

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    doc = json.loads((work.data / "val2019.json").read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in (4, 9)]
    (unlabelled / "val2019.json").write_text(json.dumps(doc))
    one_line_error(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", unlabelled, "--out", out),
                   f"{unlabelled / 'val2019.json'}: 2 images have no label, first ids 4, 9")
    one_line_error(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", tmp_path, "--out", out),
                   f"--data {tmp_path}: no val split (looked for val2019.json")
    assert not out.exists()


def test_labels_default_to_the_json_the_stores_were_made_from(work, tmp_path):
    out = tmp_path / "blend"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--out", out))
    assert json.loads((out / "blend.json").read_text())["labels"] == str(work.data / "val2019.json")


def test_labels_from_another_json_than_the_stores_are_flagged(work, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    doc = json.loads((work.data / "val2019.json").read_text())
    doc["info"] = {"note": "relabelled"}
    (other / "val2019.json").write_text(json.dumps(doc))
    result = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", other, "--out", tmp_path / "b"))
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: the labels in {other / 'val2019.json'} (sha256 ")
    assert f"are not from the json the val stores were made from, {work.data / 'val2019.json'}" in notes[0]
    same = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", tmp_path / "c"))
    assert "note: " not in same.stdout


@pytest.mark.parametrize("field, value, message", [
    ("weights", {"m0": -1.0, "m1": 1.0, "m2": 1.0}, "field 'weights' is malformed; expected an object member -> "
                                                     "weight >= 0"),
    ("weights", {"m0": 1.0, "m1": 1.0}, "field 'weights' is malformed"),
    ("fusion", "average", "field 'fusion' is malformed; expected one of mixture, geometric"),
    ("temperatures", {"m0": 0, "m1": 1, "m2": 1}, "field 'temperatures' is malformed"),
    ("members", "m0", "field 'members' is malformed"),
    ("format", "2", "field 'format' is not an integer"),
])
def test_a_malformed_blend_json_is_one_line(work, tmp_path, field, value, message):
    fitted = tmp_path / "fitted"
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--out", fitted))
    record = json.loads((fitted / "blend.json").read_text())
    record[field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    one_line_error(ens("blend", "--runs", work.runs, "--weights", bad, "--out", tmp_path / "out"),
                   f"--weights {bad}: {message}")
    assert not (tmp_path / "out").exists()
