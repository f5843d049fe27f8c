"""`ens blend` against hostile and careless use: where a saved blend finds its stores, a blend
run from inside its own folder, files in --out that no blend wrote, splits too small for
--cv, and folder names as long as the OS allows."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ensemble.formats.blend import BlendRecord

from tests.ensemble.conftest import LIMITED, ens, make_inat, ok, one_line_error, tiny_onnx

MODELS = ("m0", "m1")


@dataclass(frozen=True)
class Work:
    data: Path
    runs: Path  #: val and test stores of MODELS


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    root = tmp_path_factory.mktemp("hostile")
    data = make_inat(root / "inat", n_val=10, n_test=4)
    onnx = [tiny_onnx(root / "models" / f"{m}.onnx", seed=i) for i, m in enumerate(MODELS)]
    runs = root / "stores"  # not called runs: nothing may find it by its name
    ok(ens("infer", *onnx, "--data", data, "--workers", 0, "--out", runs))
    return Work(data, runs)


def fit(work: Work, out: Path, *args) -> dict:
    ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--cv", 2, "--out", out, *args))
    return json.loads((out / "blend.json").read_text())


# ------------------------------------------------------------- item 18: blend.json records its runs

def test_blend_json_records_the_resolved_runs_folder(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work.runs.parent)
    ok(ens("blend", "--runs", "stores", "--optimize", "val", "--data", work.data, "--cv", 2, "--out",
           tmp_path / "fit"))
    record = json.loads((tmp_path / "fit" / "blend.json").read_text())
    assert record["runs"] == str(work.runs.resolve())
    assert BlendRecord.read(tmp_path / "fit" / "blend.json").runs == str(work.runs.resolve())


def test_an_older_record_without_runs_reads_as_none(work, tmp_path):
    doc = fit(work, tmp_path / "fit")
    del doc["runs"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    record = BlendRecord.read(tmp_path / "old.json")
    assert record.runs is None and "runs" not in record.to_json()


def test_weights_without_runs_finds_the_stores_where_blend_json_records_them(work, tmp_path, monkeypatch):
    fitted = tmp_path / "fit"
    saved = fit(work, fitted)
    elsewhere = tmp_path / "elsewhere"  # no runs/ here
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = ok(ens("blend", "--weights", fitted / "blend.json", "--out", tmp_path / "applied"))
    applied = json.loads((tmp_path / "applied" / "blend.json").read_text())
    assert applied["runs"] == saved["runs"] == str(work.runs.resolve())
    assert (tmp_path / "applied" / "predictions.csv").read_bytes() == (fitted / "predictions.csv").read_bytes()
    assert f"note: read the test stores under {work.runs.resolve()}, where {fitted / 'blend.json'} records them" \
        in result.stdout


def test_weights_without_runs_prefers_a_runs_folder_here_that_holds_the_stores(work, tmp_path, monkeypatch):
    fitted = tmp_path / "fit"
    fit(work, fitted)
    project = tmp_path / "project"
    shutil.copytree(work.runs, project / "runs")
    monkeypatch.chdir(project)
    result = ok(ens("blend", "--weights", fitted / "blend.json", "--out", "applied"))
    assert json.loads((project / "applied" / "blend.json").read_text())["runs"] == str((project / "runs").resolve())
    assert f"note: read the test stores under runs (the default --runs); {fitted / 'blend.json'} was fitted on " \
           f"stores under {work.runs.resolve()}" in result.stdout


def test_weights_without_runs_and_no_stores_anywhere_names_both_places(work, tmp_path, monkeypatch):
    fitted = tmp_path / "fit"
    doc = fit(work, fitted)
    doc["runs"] = str(tmp_path / "gone")
    (fitted / "blend.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    one_line_error(ens("blend", "--weights", fitted / "blend.json", "--out", tmp_path / "applied"),
                   "no test store of m0 under runs (the default --runs) nor under", str(tmp_path / "gone"),
                   "give --runs DIR")
    assert not (tmp_path / "applied").exists()


# ------------------------------------------------- item 3: only an earlier blend's predictions go

def fit_only_runs(work: Work, tmp_path: Path) -> Path:
    """Stores where m1 has no test store: a fit applies nothing."""
    runs = Path(shutil.copytree(work.runs, tmp_path / "runs"))
    shutil.rmtree(runs / "m1" / "test")
    return runs


def fit_only(work: Work, runs: Path, out: Path):
    return ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--cv", 2, "--out", out)


def test_a_predictions_csv_no_blend_wrote_is_kept_and_the_fit_refused(work, tmp_path):
    runs = fit_only_runs(work, tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "predictions.csv").write_text("my own predictions\n")
    one_line_error(fit_only(work, runs, out), f"--out {out}: holds a predictions.csv that no blend.json there names",
                   "move it away or give another --out")
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv"]
    assert (out / "predictions.csv").read_text() == "my own predictions\n"

    # A blend.json of a blend that applied nothing did not write it either.
    ok(fit_only(work, runs, tmp_path / "fit"))
    shutil.copy(tmp_path / "fit" / "blend.json", out / "blend.json")
    before = (out / "blend.json").read_bytes()
    one_line_error(fit_only(work, runs, out), "holds a predictions.csv that no blend.json there names")
    assert (out / "predictions.csv").read_text() == "my own predictions\n" and (out / "blend.json").read_bytes() == before


def test_an_earlier_blends_predictions_are_removed_by_a_blend_that_applies_nothing(work, tmp_path):
    out = tmp_path / "blend"
    fit(work, out)  # applied to test: its blend.json names predictions.csv
    result = ok(fit_only(work, fit_only_runs(work, tmp_path), out))
    assert sorted(p.name for p in out.iterdir()) == ["blend.json"]
    assert f"note: removed {out / 'predictions.csv'}: it held an earlier blend's predictions (of test), and this " \
           "run applied nothing" in result.stdout


# ------------------------------------------------ item 12: --weights from inside the blend folder

@pytest.mark.parametrize("given", ["blend.json", "./blend.json", "ABSOLUTE", "sub/../blend.json"])
def test_weights_from_inside_the_blend_folder(work, tmp_path, monkeypatch, given):
    fitted = tmp_path / "fit"
    fit(work, fitted)
    (fitted / "sub").mkdir()
    monkeypatch.chdir(fitted)
    weights = str(fitted / "blend.json") if given == "ABSOLUTE" else given
    result = ok(ens("blend", "--weights", weights))  # no --runs: the stores blend.json records
    out = tmp_path / "fit-test"
    assert (out / "predictions.csv").read_bytes() == (fitted / "predictions.csv").read_bytes()
    assert sorted(p.name for p in fitted.iterdir()) == ["blend.json", "predictions.csv", "sub"]
    assert f"wrote {out / 'predictions.csv'} (4 images of test, top-5)" in result.stdout
    assert json.loads((out / "blend.json").read_text())["applied_from"] == str(Path(weights))


def test_weights_from_a_folder_below_the_blend_folder(work, tmp_path, monkeypatch):
    fitted = tmp_path / "fit"
    fit(work, fitted)
    (fitted / "sub").mkdir()
    monkeypatch.chdir(fitted / "sub")
    ok(ens("blend", "--weights", "../blend.json", "--runs", work.runs))
    assert (tmp_path / "fit-test" / "predictions.csv").read_bytes() == (fitted / "predictions.csv").read_bytes()
    assert sorted(p.name for p in (fitted / "sub").iterdir()) == []


def test_weights_at_the_root_of_the_file_system_asks_for_out(work, tmp_path, monkeypatch):
    from ensemble.blend.run import BlendOptions, _out_folder
    from ensemble.errors import EnsError

    with pytest.raises(EnsError, match=r"^--weights /blend.json: .*give --out DIR$"):
        _out_folder(BlendOptions(weights=Path("/blend.json")), "test")


# ------------------------------------------------------------- item 17: long names, small splits

def test_a_blend_folder_named_with_250_characters_and_its_applied_sibling(work, tmp_path):
    fitted = tmp_path / ("b" * 250)
    fit(work, fitted)
    ok(ens("blend", "--weights", fitted / "blend.json", "--runs", work.runs))  # writes <250 b>-test: 255
    applied = tmp_path / ("b" * 250 + "-test")
    assert (applied / "predictions.csv").read_bytes() == (fitted / "predictions.csv").read_bytes()
    assert not [p for p in (*fitted.iterdir(), *applied.iterdir()) if p.name.startswith(".")]


def test_an_applied_folder_name_longer_than_the_os_allows_is_one_line(work, tmp_path):
    fitted = tmp_path / ("b" * 252)
    fit(work, fitted)
    one_line_error(ens("blend", "--weights", fitted / "blend.json", "--runs", work.runs), "give --out DIR")


def test_more_folds_than_rows_names_cv_and_the_rows(work, tmp_path):
    args = ("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data)
    one_line_error(ens(*args, "--cv", 11, "--out", tmp_path / "out"),
                   "--cv 11: the val split has 10 rows, and cross-validation holds out at least one per fold; "
                   "give --cv 10 or fewer")
    assert not (tmp_path / "out").exists()
    ok(ens(*args, "--cv", 10, "--out", tmp_path / "ten"))


def test_a_val_split_smaller_than_the_default_folds(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=3, n_test=2)
    model = tiny_onnx(tmp_path / "m.onnx")
    ok(ens("infer", model, "--data", data, "--workers", 0, "--out", tmp_path / "runs"))
    args = ("blend", "--runs", tmp_path / "runs", "--optimize", "val", "--data", data, "--out", tmp_path / "out")
    one_line_error(ens(*args), "--cv 5 (the default): the val split has 3 rows", "give --cv 3 or fewer")
    ok(ens(*args, "--cv", 3))


def test_a_val_split_of_one_row(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=1, n_test=2)
    ok(ens("infer", tiny_onnx(tmp_path / "m.onnx"), "--data", data, "--workers", 0, "--out", tmp_path / "runs"))
    one_line_error(ens("blend", "--runs", tmp_path / "runs", "--optimize", "val", "--data", data, "--cv", 2,
                       "--out", tmp_path / "out"), "--cv 2: the val split has 1 row; fitting a blend", "needs at least 2")


@pytest.mark.parametrize("runs", ["relative/runs", "/runs\n; rm -rf ~", "/\x1b[31mruns", 17])
def test_a_runs_that_is_not_an_absolute_path_of_printable_text_reads_as_none(work, tmp_path, monkeypatch, runs):
    """`runs` is text from a file: what ens would not have written is kept as it was, never used
    nor echoed."""
    fitted = tmp_path / "fit"
    doc = fit(work, fitted)
    doc["runs"] = runs
    (fitted / "blend.json").write_text(json.dumps(doc))
    record = BlendRecord.read(fitted / "blend.json")
    assert record.runs is None and record.to_json()["runs"] == runs
    monkeypatch.chdir(tmp_path)
    result = ens("blend", "--weights", fitted / "blend.json", "--out", tmp_path / "applied")
    one_line_error(result, f"{Path('runs') / 'm0' / 'test'}: no logit store")
    assert str(runs) not in result.output


# ------------------- blend.json's apply records the applied split's dataset and its predictions

def test_apply_records_the_dataset_and_the_predictions_sha256(work, tmp_path):
    import hashlib

    out = tmp_path / "fit"
    doc = fit(work, out)
    manifest = json.loads((work.runs / "m0" / "test" / "manifest.json").read_text())
    assert doc["apply"]["dataset_sha256"] == manifest["dataset"]["sha256"]
    assert len(doc["apply"]["dataset_sha256"]) == 64
    assert doc["apply"]["predictions_sha256"] == hashlib.sha256((out / "predictions.csv").read_bytes()).hexdigest()
    record = BlendRecord.read(out / "blend.json")
    assert record.apply.dataset_sha256 == doc["apply"]["dataset_sha256"]
    assert record.apply.predictions_sha256 == doc["apply"]["predictions_sha256"]
    assert record.optimize.dataset_sha256 is None and "dataset_sha256" not in doc["optimize"]

    # An older record without them reads None, and is written back as it was.
    for key in ("dataset_sha256", "predictions_sha256"):
        del doc["apply"][key]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = BlendRecord.read(tmp_path / "old.json")
    assert old.apply.dataset_sha256 is None and old.apply.predictions_sha256 is None
    assert old.to_json() == doc


def test_stores_of_one_split_made_from_different_sources_are_refused(work, tmp_path):
    runs = Path(shutil.copytree(work.runs, tmp_path / "runs"))
    manifest = runs / "m1" / "test" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["dataset"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(doc))
    out = tmp_path / "fit"
    result = ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--cv", 2, "--out", out)
    one_line_error(result, "test: the stores of m0 and m1 were made from different test sources",
                   "000000000000...")
    assert not out.exists()


# ------------- item 3, second round: only the very predictions.csv an earlier blend wrote goes

def test_a_hand_edited_predictions_csv_beside_an_applied_blend_json_is_kept(work, tmp_path):
    out = tmp_path / "p4"
    fit(work, out)  # applied to test: blend.json records the predictions' sha256
    (out / "predictions.csv").write_text("id,my,hand,edited\n")
    before = (out / "blend.json").read_bytes()
    one_line_error(fit_only(work, fit_only_runs(work, tmp_path), out),
                   f"--out {out}: holds a predictions.csv that is not the one its blend.json records",
                   "move it away or give another --out")
    assert (out / "predictions.csv").read_text() == "id,my,hand,edited\n"
    assert (out / "blend.json").read_bytes() == before


def test_predictions_beside_an_older_blend_json_without_their_sha256_are_kept(work, tmp_path):
    out = tmp_path / "old"
    doc = fit(work, out)
    del doc["apply"]["predictions_sha256"]
    (out / "blend.json").write_text(json.dumps(doc))
    kept = (out / "predictions.csv").read_bytes()
    one_line_error(fit_only(work, fit_only_runs(work, tmp_path), out),
                   f"--out {out}: holds a predictions.csv that its blend.json (of an older ens) records no "
                   "sha256 of")
    assert (out / "predictions.csv").read_bytes() == kept


# ------------------ item 18, second round: a recorded runs the OS cannot use is no folder at all

@pytest.mark.parametrize("runs", ["/" + "x" * 5000, "/" + "x" * 300, "/tmp/" + "y/" * 3000])
def test_weights_with_a_recorded_runs_the_os_cannot_take_reads_as_absent(work, tmp_path, monkeypatch, runs):
    fitted = tmp_path / "fit"
    doc = fit(work, fitted)
    doc["runs"] = runs
    (fitted / "blend.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)  # no runs/ here: the recorded folder is the fallback
    result = ens("blend", "--weights", fitted / "blend.json", "--out", tmp_path / "applied")
    one_line_error(result, f"{Path('runs') / 'm0' / 'test'}: no logit store")
    assert "x" * 200 not in result.output and "y/" * 200 not in result.output
    # With the stores in ./runs it applies, and says nothing of the recorded folder.
    shutil.copytree(work.runs, tmp_path / "runs")
    result = ok(ens("blend", "--weights", fitted / "blend.json", "--out", tmp_path / "applied"))
    assert "note:" not in result.stdout


def test_a_long_recorded_runs_is_shown_shortened_in_notes(work, tmp_path, monkeypatch):
    deep = tmp_path
    for i in range(12):
        deep = deep / (f"{i:02d}" + "d" * 200)
    deep.mkdir(parents=True)
    (deep / "stores").symlink_to(work.runs, target_is_directory=True)
    fitted = tmp_path / "fit"
    doc = fit(work, fitted)
    doc["runs"] = str(deep / "stores")
    (fitted / "blend.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(work.runs, tmp_path / "runs")
    result = ok(ens("blend", "--weights", fitted / "blend.json", "--out", tmp_path / "applied"))
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "was fitted on stores under" in notes[0] and "..." in notes[0], notes
    assert len(notes[0]) < 600, notes


# ------------------------- item 15 for blend: a file-size limit names the file, leaves no folder


def limited(tmp_path: Path, limit: int, *args):
    import subprocess
    import sys

    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    return subprocess.run([sys.executable, str(script), str(limit), *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter per case
@pytest.mark.skipif(not hasattr(__import__("os"), "setpgid"), reason="POSIX resource limits")
@pytest.mark.parametrize("limit, written", [(64, "predictions.csv"), (1500, "blend.json")])
def test_a_file_size_limit_names_the_file_and_leaves_no_folder(work, tmp_path, limit, written):
    out = tmp_path / "bl15" / "deeper"
    result = limited(tmp_path, limit, "blend", "--runs", work.runs, "--optimize", "val", "--data", work.data,
                     "--cv", 2, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / written}: File too large; "), result.stderr
    assert "a file-size limit was reached" in lines[0] and "give --out DIR on another file system" in lines[0]
    assert "nothing was written" in lines[0] and "finished work is kept" not in lines[0]
    assert not (tmp_path / "bl15").exists()


# ------------------------------------------ --out is never a logit store nor a folder of stores

@pytest.mark.parametrize("where, said", [("m0/test", "is a logit store (it holds manifest.json)"),
                                         (".", "holds logit stores (m0/test"),
                                         ("m0", "holds logit stores (test")])
def test_an_out_that_is_a_store_or_holds_stores_is_refused(work, tmp_path, where, said):
    runs = Path(shutil.copytree(work.runs, tmp_path / "runs"))
    out = runs / where
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    line = one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", work.data, "--cv", 2,
                              "--out", out), f"--out {out}: {said}", "a blend goes in a folder of its own")
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before, line


# ------------------------------------------------ messages: columns, top-k of few classes, plurals

@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Work:
    """Two 3-class models, one test image."""
    root = tmp_path_factory.mktemp("three")
    data = make_inat(root / "inat", n_val=9, n_test=1, categories=3)
    onnx = [tiny_onnx(root / f"t{i}.onnx", seed=i, classes=3) for i in range(2)]
    ok(ens("infer", *onnx, "--data", data, "--workers", 0, "--out", root / "runs"))
    return Work(data, root / "runs")


def test_the_cv_tables_header_sits_over_its_columns(work, tmp_path):
    result = ok(ens("blend", "--runs", work.runs, "--optimize", "val", "--data", work.data, "--cv", 2,
                    "--method", "accuracy", "--out", tmp_path / "b"))
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "95% interval" in line)
    row = next(line for line in lines if line.startswith("accuracy "))
    # Each right-aligned header ends where its numbers end.
    numbers = [m.end() for m in __import__("re").finditer(r"\d\.\d{4}(?![\d\]])", row)]
    assert [header.index("top-1") + 5, header.index("top-5") + 5, header.index("NLL") + 3] == \
        [numbers[0], numbers[-2], numbers[-1]], (header, row)
    assert header.index("95% interval") == row.index("[")


def test_top_k_of_a_model_with_fewer_classes_is_the_classes(three, tmp_path):
    out = tmp_path / "b"
    result = ok(ens("blend", "--runs", three.runs, "--optimize", "val", "--data", three.data, "--cv", 2,
                    "--out", out))
    assert result.stdout.splitlines()[-1] == f"wrote {out / 'predictions.csv'} (1 image of test, top-3)"
    assert "top-3" in next(line for line in result.stdout.splitlines() if "95% interval" in line)
    assert (out / "predictions.csv").read_text().splitlines()[0] == \
        "id,category_1,category_2,category_3,prob_1,prob_2,prob_3"
    assert json.loads((out / "blend.json").read_text())["cv"]["top_k"] == 3


def test_counts_of_one_are_singular(three, tmp_path):
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"0": 5, "1": 3, "2": 0}))
    result = ok(ens("blend", "--runs", three.runs, "--optimize", "val", "--data", three.data, "--cv", 2,
                    "--prior", prior, "--out", tmp_path / "b"))
    assert f"note: --prior {prior}: 1 of the 3 categories has no training image (2); each is counted" in result.stdout
    prior.write_text(json.dumps({"0": 5, "1": 3, "2": 1, "7": 2}))
    one_line_error(ens("blend", "--runs", three.runs, "--optimize", "val", "--data", three.data, "--cv", 2,
                       "--prior", prior, "--out", tmp_path / "c"), "counts 1 category that no model predicts: 7")
    prior.write_text(json.dumps({"0": 5, "1": 3}))
    one_line_error(ens("blend", "--runs", three.runs, "--optimize", "val", "--data", three.data, "--cv", 2,
                       "--prior", prior, "--out", tmp_path / "c"), "no count for 1 of the 3 categories the models")


def test_one_row_of_differing_ids_is_singular(three, tmp_path):
    import numpy as np

    runs = Path(shutil.copytree(three.runs, tmp_path / "runs"))
    ids_file = runs / "t1" / "val" / "ids.npy"
    ids = np.load(ids_file)
    ids[2] = 1000  # one row differs from t0's
    np.save(ids_file, ids)
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", three.data, "--cv", 2,
                       "--out", tmp_path / "b"), "the image ids of t1 and t0 differ: 1 row differs, first:")
