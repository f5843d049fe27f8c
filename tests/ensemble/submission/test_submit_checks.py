"""Bad input to `ens submit` and `ens submit --check`: one line naming the file and the first
offending rows, exit status 2, nothing written to submissions/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.submission.kaggle_csv import FORMATS

from tests.ensemble.submission.submit_data import BLEND, TEST_IDS, make_blend, make_data, ranked, write_csv

runner = CliRunner()
ROWS = ranked()
HEADER = "id,predicted"


def good_lines() -> list[str]:
    return [HEADER] + [f"{i},{' '.join(map(str, ROWS[i]))}" for i in TEST_IDS]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    return tmp_path


def fails(args, expected: str):
    """Exit 2 with exactly one stderr line, ``error: <expected>``, and no submission written."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {expected}\n"
    assert not any(p.is_file() for p in Path("submissions").glob("*"))


def check_text(work, text: str, expected: str, *extra):
    path = write_csv(work / "hand.csv", text)
    fails(["submit", "--check", path, "--data", "data", *extra], f"{path}: {expected}")


def with_line(index: int, line: str) -> str:
    lines = good_lines()
    lines[index] = line
    return "\n".join(lines) + "\n"


def test_a_good_hand_made_file_passes(work):
    path = write_csv(work / "hand.csv", "\n".join(good_lines()) + "\n")
    result = runner.invoke(app, ["submit", "--check", str(path), "--data", "data"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"ok: {path}: 6 rows, inat2019 (id,predicted, 5 known category ids per row), "
                             "every id of test2019.json once\n")
    assert not (work / "submissions").exists()


@pytest.mark.parametrize("text, expected", [
    ("Id,Predicted\n1,2\n", "header Id,Predicted; --format inat2019 expects id,predicted"),
    ("id,predicted,extra\n", "header id,predicted,extra; --format inat2019 expects id,predicted"),
    ("", "empty file, expected a header line"),
])
def test_header(work, text, expected):
    check_text(work, text, expected)


def test_missing_ids(work):
    text = "\n".join(good_lines()[:-2]) + "\n"  # drops 268246, 268247
    check_text(work, text, "2 test ids of test2019.json missing: 268246, 268247")


def test_duplicated_id(work):
    text = "\n".join(good_lines() + [good_lines()[2]]) + "\n"
    check_text(work, text, f"duplicated id on line 8 ('{TEST_IDS[1]}')")


def test_extra_id(work):
    text = "\n".join(good_lines() + ["999,3 7 11 20 42"]) + "\n"
    check_text(work, text, "id not in test2019.json on line 8 ('999')")


def test_non_integer_ids_names_the_first_lines(work):
    lines = good_lines()
    lines[2] = lines[2].replace(str(TEST_IDS[1]), f"{TEST_IDS[1]}.0")
    lines[5] = lines[5].replace(str(TEST_IDS[4]), "abc")
    check_text(work, "\n".join(lines) + "\n", f"non-integer id on lines 3 ('{TEST_IDS[1]}.0'), 6 ('abc')")


@pytest.mark.parametrize("cell, shown", [("nan", "'nan'"), ("", "''"), ("3 7  11 20", "'3 7  11 20'")])
def test_empty_or_nan_predictions(work, cell, shown):
    check_text(work, with_line(4, f"{TEST_IDS[3]},{cell}"), f"empty or NaN category ids on line 5 ({shown})")


def test_a_row_without_its_second_field(work):
    check_text(work, with_line(1, str(TEST_IDS[0])), "empty or NaN category ids on line 2 ('')")


def test_wrong_number_of_predictions(work):
    check_text(work, with_line(3, f"{TEST_IDS[2]},3 7 11"),
               "inat2019 expects 5 category ids separated by single spaces; other counts on line 4 ('3 7 11')")


def test_non_integer_category(work):
    check_text(work, with_line(6, f"{TEST_IDS[5]},3 7 11.5 20 42"),
               "non-integer category ids on line 7 ('3 7 11.5 20 42')")


def test_unknown_categories(work):
    lines = good_lines()
    lines[2] = f"{TEST_IDS[1]},3 7 11 20 555"
    lines[4] = f"{TEST_IDS[3]},0 7 11 20 42"
    check_text(work, "\n".join(lines) + "\n",
               "category ids 0, 555 are not among the 7 categories of the dataset; on lines 3, 5")


def test_unreadable_csv(work):
    check_text(work, with_line(2, f"{TEST_IDS[1]},3 7 11 20 42,9,9"),
               "not a readable CSV (Error tokenizing data. C error: Expected 2 fields in line 3, saw 4)")


def test_other_format(work):
    make_data(work / "data", FORMATS["inat2018"])
    check_text(work, "\n".join(good_lines()) + "\n",
               "inat2018 expects 3 category ids separated by single spaces; other counts on lines "
               + ", ".join(f"{n} ('{' '.join(map(str, ROWS[i]))}')" for n, i in zip(range(2, 7), TEST_IDS))
               + " and 1 more", "--format", "inat2018")


def test_sample_ids(work):
    good = "\n".join(good_lines()) + "\n"
    sample = write_csv(work / "sample.csv", "id,predicted\n" + "".join(f"{i},1 2 3 4 5\n" for i in TEST_IDS[:-1]))
    check_text(work, good, "id not in the sample sample.csv on line 7 ('268247')", "--sample", sample)
    sample = write_csv(work / "sample.csv", "id,predicted\n" + "".join(f"{i},1\n" for i in (*TEST_IDS, 7)))
    check_text(work, good, "1 id of the sample sample.csv missing: 7", "--sample", sample)
    sample = write_csv(work / "sample.csv", "Id,Predicted\n1,1\n")
    path = work / "hand.csv"
    fails(["submit", "--check", path, "--data", "data", "--sample", sample],
          f"--sample {sample}: header Id,Predicted; --format inat2019 expects id,predicted")


def test_data_folder_problems(work):
    good = write_csv(work / "hand.csv", "\n".join(good_lines()) + "\n")
    fails(["submit", "--check", good, "--data", "nowhere"], "--data nowhere: no such folder")
    (work / "empty").mkdir()
    fails(["submit", "--check", good, "--data", "empty"],
          "--data empty: no test json for --format inat2019 (looked for test2019.json, test2018.json, "
          "test2017.json, test.json, public_test.json)")
    fails(["submit", "--check", good, "--data", "empty", "--format", "inat2021"],
          "--data empty: no test json for --format inat2021 (looked for test.json, public_test.json, "
          "test2019.json, test2018.json, test2017.json)")
    (work / "data" / "train2019.json").write_text(json.dumps({"images": [], "categories": []}))
    (work / "data" / "val2019.json").unlink()
    fails(["submit", "--check", good, "--data", "data"],
          "--data data: no categories in any of train2019.json, test2019.json and no val json")


# -- the predictions side of `ens submit` ------------------------------------------------------

def submit_fails(work, blend, expected):
    fails(["submit", blend, "--data", "data", "--dry-run"], expected)
    assert not (work / "submissions" / "ledger.sqlite").exists()


def test_predictions_with_fewer_categories_than_the_format(work):
    blend = make_blend(work / "blends" / "top3", ranked(k=3))
    submit_fails(work, blend, f"{blend / 'predictions.csv'}: 3 categories per row (category_1..category_3); "
                              "--format inat2019 needs 5 of the dataset's 7 categories: blend again with --top-k 5; "
                              "if the models predict fewer than 5 categories, no blend of them can fill a row: "
                              "blend models that predict at least 5")


def test_predictions_header(work):
    csv = write_csv(work / "p.csv", "image,category_1\n1,2\n")
    submit_fails(work, csv, f"{csv}: header image,category_1; expected id,category_1,...,category_K,prob_1,...,"
                            "prob_K (the predictions.csv of `ens blend`)")


def test_predictions_with_a_nan_category(work):
    blend = make_blend(work / "blends" / "x")
    csv = blend / "predictions.csv"
    lines = csv.read_text().splitlines()
    cells = lines[3].split(",")
    cells[2] = ""
    lines[3] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    shown = " ".join([cells[1], "", *cells[3:6]])
    submit_fails(work, blend, f"{csv}: empty or NaN category ids on line 4 ('{shown}')")


def test_predictions_with_raw_output_indices(work):
    rows = {i: [0, 1, 2, 3, 4] for i in TEST_IDS}
    blend = make_blend(work / "blends" / "raw", rows)
    submit_fails(work, blend, f"{blend / 'predictions.csv'}: category ids 0, 1, 2, 4 are not among the 7 categories "
                              "of the dataset; on lines 2, 3, 4, 5, 6 and 1 more")


def test_bad_blend_json(work):
    broken = dict(BLEND, cv=dict(BLEND["cv"], chosen="nope"))
    blend = make_blend(work / "blends" / "x", blend=broken)
    submit_fails(work, blend, f"{blend / 'blend.json'}: cv.chosen 'nope' names none of cv.rows")
    (blend / "blend.json").write_text(json.dumps(dict(BLEND, weights=[1, 2])))
    submit_fails(work, blend, f"{blend / 'blend.json'}: 'weights' missing or not an object")


def test_missing_predictions(work):
    (work / "blends" / "empty").mkdir(parents=True)
    submit_fails(work, "blends/empty", "blends/empty: no predictions.csv in this folder")
    submit_fails(work, "nope.csv", "nope.csv: no such file")
