"""`ens submit` against hostile and careless inputs (issue 23, items 4, 5 and 17).

- The test set: predictions are traced back, through the blend.json beside them, to the stores
  the blend applied (matched by sha256) and the test json those were made from; another json
  under ``--data`` (same ids, other images) is refused, and predictions that cannot be traced
  are written with a warning and recorded in the ledger as unverified.
- The layout names the format: iNat 2021's ``public_test.json`` gives ``Id,Predicted``
  without ``--format``; a ``--format`` that disagrees is honoured, with a warning.
- Fewer categories than the format's ids per row: a dataset that knows fewer gets rows of all
  of them; otherwise the message says what is true (the blend's --top-k, or the models' classes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.ledger import Ledger
from ensemble.submission.kaggle_csv import FORMATS
from ensemble.submission.submit import SubmitOptions, check, submit

from tests.ensemble.conftest import ens, make_inat, ok, one_line_error, tiny_onnx
from tests.ensemble.submission.submit_data import (BLEND, KNOWN, TEST_IDS, make_blend, make_data, ranked,
                                                   write_csv)

# ------------------------------------------------------------------------ item 4: the test set


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The working folder as a user leaves it: data/, models/, runs/ (two tiny models, val and
    test) and blends/b (fitted on val, applied to test)."""
    monkeypatch.chdir(tmp_path)
    data = make_inat(tmp_path / "data", n_val=10, n_test=6)
    onnx = [tiny_onnx(tmp_path / "models" / f"m{i}.onnx", seed=i) for i in range(2)]
    ok(ens("infer", *onnx, "--data", data, "--split", "val,test", "--workers", 0, "--out", tmp_path / "runs"))
    ok(ens("blend", "--runs", tmp_path / "runs", "--optimize", "val", "--data", data, "--cv", 2,
           "--out", tmp_path / "blends" / "b"))
    assert (tmp_path / "blends" / "b" / "predictions.csv").is_file()
    return tmp_path


def other_test_set(work: Path) -> Path:
    """``data2``: data's jsons and images, but a test2019.json with the same ids whose images are
    other ones (each id names the next image)."""
    other = work / "data2"
    shutil.copytree(work / "data", other)
    doc = json.loads((other / "test2019.json").read_text())
    names = [image["file_name"] for image in doc["images"]]
    for image, name in zip(doc["images"], names[1:] + names[:1]):
        image["file_name"] = name
    (other / "test2019.json").write_text(json.dumps(doc))
    return other


def as_older_blend_json(blend_dir: Path) -> None:
    """blend.json as an ens before ``apply.dataset_sha256`` and ``apply.predictions_sha256``
    wrote it: `ens submit` falls back to the stores."""
    doc = json.loads((blend_dir / "blend.json").read_text())
    assert {"dataset_sha256", "predictions_sha256"} <= set(doc["apply"]), doc["apply"]
    del doc["apply"]["dataset_sha256"], doc["apply"]["predictions_sha256"]
    (blend_dir / "blend.json").write_text(json.dumps(doc))


def test_predictions_of_the_data_test_json_are_verified(work):
    result = ok(ens("submit", "blends/b", "--data", "data", "--dry-run"))
    assert "warning" not in result.stderr, result.stderr
    (entry,) = Ledger("submissions").entries()
    assert entry.test_sha256 == sha256_file(work / "data" / "test2019.json")
    assert entry.test_check == "verified"


def test_predictions_of_another_test_json_with_the_same_ids_are_refused(work):
    other_test_set(work)
    result = ens("submit", "blends/b", "--data", "data2", "--dry-run")
    one_line_error(result, "blends/b/predictions.csv", sha256_file(work / "data" / "test2019.json")[:12],
                   "data2/test2019.json", "sha256")
    assert not (work / "submissions").exists()
    # a library call is refused alike
    with pytest.raises(EnsError, match="data2/test2019.json"):
        submit("blends/b", "data2", SubmitOptions())


def test_the_stores_are_found_from_another_working_folder(work, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    ok(ens("submit", work / "blends" / "b", "--data", work / "data", "--dry-run"))
    assert Ledger("submissions").entries()[0].test_check == "verified"
    other_test_set(work)
    one_line_error(ens("submit", work / "blends" / "b", "--data", work / "data2", "--dry-run"),
                   "data2/test2019.json")


def test_hand_made_predictions_are_written_with_a_warning_and_recorded_unverified(work):
    mine = shutil.copy(work / "blends" / "b" / "predictions.csv", work / "mine.csv")
    result = ok(ens("submit", mine, "--data", "data", "--dry-run"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "no blend.json" in warnings[0] and "test2019.json" in warnings[0], result.stderr
    (entry,) = Ledger("submissions").entries()
    assert entry.test_check == "unverified"
    assert entry.test_sha256 == sha256_file(work / "data" / "test2019.json")


def test_stores_gone_or_changed_since_the_blend_leave_it_unverified(work):
    as_older_blend_json(work / "blends" / "b")  # the stores are the chain only then
    (work / "runs").rename(work / "runs-moved")
    result = ok(ens("submit", "blends/b", "--data", "data", "--dry-run"))
    assert "warning: " in result.stderr and "not found" in result.stderr, result.stderr
    assert Ledger("submissions").entries()[-1].test_check == "unverified"

    (work / "runs-moved").rename(work / "runs")
    other = other_test_set(work)
    # The stores made again from data2 are not those the blend applied: its predictions are of
    # the old ones, whatever json the new ones came from.
    onnx = sorted((work / "models").glob("*.onnx"))
    ok(ens("infer", *onnx, "--data", other, "--split", "test", "--workers", 0, "--out", work / "runs"))
    result = ok(ens("submit", "blends/b", "--data", "data2", "--dry-run"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "sha256 differs" in warnings[0] and "blend again" in warnings[0], result.stderr
    assert Ledger("submissions").entries()[-1].test_check == "unverified"


@pytest.mark.parametrize("older", [False, True])
def test_predictions_edited_since_the_blend_are_unverified(older, work):
    if older:
        as_older_blend_json(work / "blends" / "b")
    csv = work / "blends" / "b" / "predictions.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")  # one image less than the stores
    result = ok(ens("submit", "blends/b", "--data", "data", "--dry-run", "--missing", "prior"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    why = "image ids are not those of the stores" if older else "edited or replaced since the blend"
    assert len(warnings) == 1 and why in warnings[0], result.stderr
    assert Ledger("submissions").entries()[0].test_check == "unverified"


def test_a_blend_json_without_an_applied_split_is_unverified(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    make_blend(tmp_path / "blends" / "x")  # BLEND has no "apply"
    result = submit("blends/x", "data", SubmitOptions())
    assert result.entry.test_check == "unverified"
    assert any("apply" in note for note in result.notes), result.notes


@pytest.mark.parametrize("runs", ["a\u0000b", "x" * 5000, "/dev/null"])
def test_a_hand_edited_runs_folder_is_only_a_place_not_found(runs, tmp_path, monkeypatch):
    """blend.json's runs is text from a file: a name the OS cannot take is a folder without the stores."""
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    blend = dict(BLEND, apply={"split": "test", "rows": 6, "stores": {"resnet50": "ab" * 32}}, runs=runs)
    make_blend(tmp_path / "blends" / "x", blend=blend)
    result = ok(ens("submit", "blends/x", "--data", "data", "--dry-run"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "not found" in warnings[0] and "\x00" not in warnings[0], result.stderr
    assert Ledger("submissions").entries()[0].test_check == "unverified"


# --------------------------------------------------------------- item 5: the layout names the format

def test_a_2021_layout_gets_the_2021_header_without_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", FORMATS["inat2021"])
    make_blend(tmp_path / "blends" / "x")
    result = ok(ens("submit", "blends/x", "--data", "data", "--dry-run"))
    assert "--format" not in result.stderr, result.stderr
    (entry,) = Ledger("submissions").entries()
    assert entry.format == "inat2021"
    assert (tmp_path / "submissions" / entry.file).read_text().startswith("Id,Predicted\n")
    # --check reads the layout alike
    written = tmp_path / "submissions" / entry.file
    assert check(written, "data").submission.format.name == "inat2021"


def test_a_format_that_disagrees_with_the_layout_is_honoured_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", FORMATS["inat2021"])
    make_blend(tmp_path / "blends" / "x")
    result = ok(ens("submit", "blends/x", "--data", "data", "--format", "inat2019", "--dry-run"))
    warnings = [line for line in result.stderr.splitlines() if "--format" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "public_test.json" in warnings[0] \
        and "inat2021" in warnings[0], result.stderr
    (entry,) = Ledger("submissions").entries()
    assert (tmp_path / "submissions" / entry.file).read_text().startswith("id,predicted\n")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_layout_names_its_format(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", FORMATS[name])
    make_blend(tmp_path / "blends" / "x")
    result = submit("blends/x", "data", SubmitOptions())
    assert result.entry.format == name
    assert not any("--format" in note for note in result.notes)


def test_a_folder_of_two_layouts_needs_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", FORMATS["inat2021"])
    make_data(tmp_path / "data", FORMATS["inat2019"])
    make_blend(tmp_path / "blends" / "x")
    one_line_error(ens("submit", "blends/x", "--data", "data", "--dry-run"),
                   "test2019.json", "public_test.json", "--format")
    assert not (tmp_path / "submissions").exists()
    assert submit("blends/x", "data", SubmitOptions(format="inat2021")).entry.format == "inat2021"


# ------------------------------------------------------------ item 17: fewer than five categories

def small_data(folder: Path, categories=(3, 7, 11)) -> Path:
    """make_data's files, but a dataset that knows only ``categories``."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"test/{i}.jpg"} for i in TEST_IDS]
    (folder / "test2019.json").write_text(json.dumps({"images": images}))
    (folder / "train2019.json").write_text(json.dumps({"images": [], "annotations": [],
                                                       "categories": [{"id": c} for c in categories]}))
    return folder


def test_a_dataset_of_three_categories_gets_rows_of_three(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small_data(tmp_path / "data")
    rows = {i: [11, 3, 7] if i % 2 else [7, 11, 3] for i in TEST_IDS}
    make_blend(tmp_path / "blends" / "x", rows, blend=dict(BLEND, class_ids=[3, 7, 11]))
    result = ok(ens("submit", "blends/x", "--data", "data", "--dry-run"))
    (entry,) = Ledger("submissions").entries()
    text = (tmp_path / "submissions" / entry.file).read_text()
    assert text == "id,predicted\n" + "".join(f"{i},{' '.join(map(str, rows[i]))}\n" for i in sorted(TEST_IDS))
    checked = ok(ens("submit", "--check", f"submissions/{entry.file}", "--data", "data"))
    assert "3 known category ids per row" in checked.stdout, checked.stdout
    assert result.exit_code == 0


def test_too_few_ids_per_row_from_too_small_a_top_k_says_blend_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    blend = make_blend(tmp_path / "blends" / "top3", ranked(k=3), blend=dict(BLEND, class_ids=list(KNOWN)))
    one_line_error(ens("submit", blend, "--data", "data", "--dry-run"),
                   f"{blend / 'predictions.csv'}: 3 categories per row", "--format inat2019 needs 5",
                   "blend again with --top-k 5")


def test_too_few_ids_per_row_from_models_of_three_classes_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    rows = {i: [11, 3, 7] for i in TEST_IDS}
    blend = make_blend(tmp_path / "blends" / "few", rows, blend=dict(BLEND, class_ids=[3, 7, 11]))
    result = ens("submit", blend, "--data", "data", "--dry-run")
    one_line_error(result, "the models predict only 3 categories", "--format inat2019 needs 5",
                   f"{len(KNOWN)} categories")
    assert "blend again" not in result.stderr and "top-k" not in result.stderr, result.stderr


def test_too_few_ids_per_row_without_a_blend_record_names_both_causes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    csv = make_blend(tmp_path / "blends" / "top3", ranked(k=3), blend=None) / "predictions.csv"
    one_line_error(ens("submit", csv, "--data", "data", "--dry-run"),
                   "3 categories per row", "--top-k 5", "fewer than 5 categories")
    write_csv(tmp_path / "hand.csv", "id,predicted\n" + "".join(f"{i},3 7 11\n" for i in TEST_IDS))
    one_line_error(ens("submit", "--check", tmp_path / "hand.csv", "--data", "data"), "expects 5 category ids")
