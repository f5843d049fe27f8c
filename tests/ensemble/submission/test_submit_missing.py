"""`ens submit --missing fail|prior`: predictions that lack test ids (images `ens infer
--on-bad-image skip` left out), through the command line, with golden filled rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.formats.ledger import Ledger

from tests.ensemble.submission.submit_data import (KNOWN, TEST_IDS, ledger_columns, make_blend, make_data,  # noqa: F401
                                                   ranked, standin, write_csv, write_old_ledger)

runner = CliRunner()
COMPETITION = "inaturalist-2019-fgvc6"
#: The predictions lack the last two test ids of the json.
PRESENT, ABSENT = TEST_IDS[:4], sorted(TEST_IDS[4:])
#: Train annotations: 11 three times, 3 and 20 twice (3 first: the smaller id), 7 once; no
#: image of 42, 99 or 101, of which 42, the smallest, completes the five.
TRAIN_LABELS = (20, 11, 3, 11, 7, 20, 3, 11)
TRAIN_PRIOR = [11, 3, 20, 7, 42]
#: Blend rows: 42 ranks first twice; 7 and 99 once each, 99 more often in the top 5 (3 times
#: against once), so 99 before 7; of the classes never first, 3, 11 and 20 are each in all
#: four rows, 3 and 11 the smaller ids.
BLEND_ROWS = dict(zip(PRESENT, ([42, 3, 99, 11, 20], [42, 99, 3, 11, 20], [7, 101, 3, 11, 20],
                                [99, 101, 3, 11, 20])))
BLEND_PRIOR = [42, 99, 7, 3, 11]
HINT = "--missing prior fills them with the most frequent classes (of the train json, else of these predictions)"


def ens(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result, expected: str):
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {expected}\n"
    assert not any(p.is_file() for p in Path("submissions").glob("*"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", train_labels=TRAIN_LABELS)
    make_blend(tmp_path / "blends" / "x", {i: ranked()[i] for i in PRESENT})
    return tmp_path


def expected_file(rows: dict[int, list[int]], filler: list[int]) -> str:
    """The file: ``rows`` of the present ids, ``filler`` for the absent ones, ids ascending."""
    return "id,predicted\n" + "".join(f"{i},{' '.join(map(str, rows[i] if i in PRESENT else filler))}\n"
                                       for i in sorted(TEST_IDS))


def test_default_fails_naming_the_missing_ids_and_the_flag(work):
    csv = Path("blends/x/predictions.csv")
    message = f"{csv}: 2 test ids of test2019.json missing: 268246, 268247; {HINT}"
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run"), message)
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "fail"), message)
    assert not Path("submissions/ledger.sqlite").exists()


def test_prior_from_the_train_json(work):
    result = ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior")
    assert result.exit_code == 0, result.output
    wrote, filled, recorded = result.stdout.splitlines()
    path = Path(wrote.split()[1])
    assert wrote == f"wrote {path} (6 rows, inat2019)"
    assert filled == ("filled 2 rows missing from the predictions with train-prior (11 3 20 7 42: the most "
                      f"frequent classes of {Path('data/train2019.json')})")
    assert recorded == "ledger entry 1: not-uploaded (dry run)"
    assert path.read_text() == expected_file(ranked(), TRAIN_PRIOR)
    entry, = Ledger("submissions").entries()
    assert (entry.rows, entry.filled, entry.fill_source) == (6, 2, "train-prior")
    assert ens("submit", "--check", path, "--data", "data").exit_code == 0  # the filled rows pass every check
    table = ens("submissions").stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "created", "file", "filled", "status"]
    assert table[1].split()[2:6] == [path.name, "2", "train-prior", "not-uploaded"]


@pytest.mark.parametrize("train", ["absent", "without annotations"])
def test_prior_from_the_blend_without_a_train_json(work, train):
    train_json = work / "data" / "train2019.json"
    if train == "absent":
        # The known categories then come from val2019.json alone: give it all of them.
        train_json.unlink()
        (work / "data" / "val2019.json").write_text(json.dumps({"images": [], "categories": [{"id": c} for c in KNOWN]}))
    else:
        make_data(work / "data")  # no annotations
    make_blend(work / "blends" / "x", BLEND_ROWS)
    result = ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.split()[1])
    assert result.stdout.splitlines()[1] == ("filled 2 rows missing from the predictions with blend-prior "
                                             f"(42 99 7 3 11: the most frequent classes of "
                                             f"{Path('blends/x/predictions.csv')})")
    assert path.read_text() == expected_file(BLEND_ROWS, BLEND_PRIOR)
    entry, = Ledger("submissions").entries()
    assert (entry.filled, entry.fill_source) == (2, "blend-prior")


def test_nothing_missing_fills_nothing(work):
    make_blend(work / "blends" / "x")
    result = ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    entry, = Ledger("submissions").entries()
    assert (entry.filled, entry.fill_source) == (0, None)
    assert ens("submissions").stdout.splitlines()[1].split()[3] == "not-uploaded"  # blank filled cell


def test_only_missing_ids_are_filled(work):
    """Duplicated, extra and bad rows still fail as without --missing prior, naming their lines."""
    csv = work / "blends" / "x" / "predictions.csv"
    good = csv.read_text().splitlines()
    write_csv(csv, "\n".join(good + [good[2]]) + "\n")
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior"),
              f"{Path('blends/x/predictions.csv')}: duplicated id on line 6 ('{PRESENT[1]}')")
    write_csv(csv, "\n".join(good + ["999" + good[2][len(str(PRESENT[1])):]]) + "\n")
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior"),
              f"{Path('blends/x/predictions.csv')}: id not in test2019.json on line 6 ('999')")
    cells = good[3].split(",")
    cells[1] = "555"
    write_csv(csv, "\n".join(good[:3] + [",".join(cells)] + good[4:]) + "\n")
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior"),
              f"{Path('blends/x/predictions.csv')}: category ids 555 are not among the 7 categories of the "
              "dataset; on line 4")


def test_ids_to_fill_must_be_in_the_sample(work):
    sample = write_csv(work / "sample.csv", "id,predicted\n" + "".join(f"{i},1\n" for i in TEST_IDS[:-1]))
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior", "--sample", sample),
              f"{Path('blends/x/predictions.csv')}: 1 test id of test2019.json to fill is not in the sample "
              f"sample.csv: {TEST_IDS[-1]}")
    write_csv(sample, "id,predicted\n" + "".join(f"{i},1\n" for i in TEST_IDS))
    assert ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior",
               "--sample", sample).exit_code == 0


def test_a_train_json_with_unknown_labels_is_refused(work):
    make_data(work / "data", train_labels=(3, 555))
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior"),
              f"{Path('data/train2019.json')}: annotations name category ids 555, not among the 7 categories of "
              "the dataset")


def test_a_train_json_whose_annotations_are_not_a_list_is_refused(work):
    train = work / "data" / "train2019.json"
    doc = json.loads(train.read_text())
    doc["annotations"] = {"0": doc["annotations"][0]}
    train.write_text(json.dumps(doc))
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior"),
              f"{Path('data/train2019.json')}: 'annotations' is not a list")


@pytest.mark.network
def test_upload_with_filled_rows(work, standin):
    result = ens("submit", "blends/x", "--data", "data", "--missing", "prior", "--competition", COMPETITION,
                 "-m", "two images skipped")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("filled 2 rows missing from the predictions with train-prior (11 3 20 7 42")
    assert lines[3] == "ledger entry 1: uploaded; `ens submissions --refresh` fetches its score"
    entry, = Ledger("submissions").entries()
    assert (entry.status, entry.filled, entry.fill_source) == ("uploaded", 2, "train-prior")
    assert standin.files == {entry.file: expected_file(ranked(), TRAIN_PRIOR).encode()}


#: The table of ledgers written before `filled` and `fill_source` existed.
OLD_SCHEMA = """
CREATE TABLE submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, file TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, created TEXT NOT NULL,
    format TEXT NOT NULL, rows INTEGER NOT NULL, competition TEXT, message TEXT, source TEXT NOT NULL,
    blend_method TEXT, blend_members TEXT, blend_weights TEXT, cv_top1 REAL, cv_top1_low REAL, cv_top1_high REAL,
    status TEXT NOT NULL CHECK (status IN ('not-uploaded', 'uploaded', 'upload-failed')), error TEXT,
    kaggle_ref INTEGER, uploaded TEXT, kaggle_status TEXT, public_score REAL, private_score REAL, refreshed TEXT
)
"""


def test_a_ledger_of_the_old_schema_gains_the_columns(work):
    write_old_ledger(OLD_SCHEMA, {"file": "old.csv", "sha256": "ab" * 32, "created": "2019-05-30T10:00:00Z",
                                  "format": "inat2019", "rows": 6, "source": "blends/old", "status": "not-uploaded"})

    table = ens("submissions")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[1].split()[2:4] == ["old.csv", "not-uploaded"]
    result = ens("submit", "blends/x", "--data", "data", "--dry-run", "--missing", "prior")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "ledger entry 2: not-uploaded (dry run)"
    old, new = Ledger("submissions").entries()
    assert (old.file, old.filled, old.fill_source) == ("old.csv", 0, None)
    assert (new.filled, new.fill_source) == (2, "train-prior")
    columns, version = ledger_columns()
    assert columns[-8:] == ["filled", "fill_source", "prior_tau", "test_sha256", "test_check", "geo_weight",
                            "geo_file", "geo_sha256"]
    assert columns.count("filled") == 1 and version == 1
