"""`ens submit` against hostile and careless inputs, second round (issue 23, second round's findings).

- Warnings are shown before the upload, and still when it fails.
- ``unverified`` is visible in `ens submissions`.
- Paths in messages are shown by the one rule (:func:`ensemble.errors.printable`); a non-UTF-8
  blend folder is recorded in the ledger as valid text.
- The default file name: shortened to what the folder's file system takes, other characters
  than letters, digits, '.', '_' and '-' replaced; a bad --name is refused, shown printable.
- A FIFO or a folder where a file is expected is "not a regular file", the ledger included.
- ``--check`` says what it does not check.
- `ens submit` run inside a blend folder is refused (`ens report` would not find its ledger).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ensemble.formats.ledger import Ledger
from ensemble.submission import kaggle_client
from ensemble.submission.kaggle_client import UploadError
from ensemble.submission.kaggle_csv import FORMATS

from tests.ensemble.conftest import ens, ok, one_line_error
from tests.ensemble.submission.submit_data import BLEND, TEST_IDS, make_blend, make_data, ranked


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """A working folder with data/ (iNat 2019 layout) and blends/x (predictions without an
    applied split: unverified)."""
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    make_blend(tmp_path / "blends" / "x")
    return tmp_path


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


# ------------------------------------------------------ warnings before the upload, and on failure

class _FailingKaggle:
    def __init__(self, log):
        self.log = log

    def submit(self, path, competition, message):
        self.log.append("upload")
        raise UploadError("network unreachable")


def test_warnings_are_shown_before_the_upload_and_when_it_fails(here, monkeypatch, capsys):
    make_data(here / "data21", FORMATS["inat2021"])
    log: list[str] = []
    monkeypatch.setattr(kaggle_client, "connect", lambda: (log.append("connect"), _FailingKaggle(log))[1])
    from ensemble.submission.submit import SubmitRequest, run_request

    def warn(text):
        log.append(f"warning: {text}")

    request = SubmitRequest(predictions=Path("blends/x"), data=Path("data21"), format="inat2019",
                            competition="c", message="m")
    with pytest.raises(UploadError):
        run_request(request, warn=warn)
    format_warning = next(i for i, e in enumerate(log) if "--format inat2019" in e)
    trace_warning = next(i for i, e in enumerate(log) if "unverified" in e)
    assert format_warning < log.index("connect") < trace_warning < log.index("upload"), log
    # the command line shows both, then the one error line
    result = ens("submit", "blends/x", "--data", "data21", "--format", "inat2019", "--competition", "c", "-m", "m")
    one_line_error(result, "upload", "network unreachable", "--retry")
    warnings = warnings_of(result)
    assert len(warnings) == 2 and "--format" in warnings[0] and "unverified" in warnings[1], result.stderr


# ------------------------------------------------------------- unverified seen in `ens submissions`

def test_submissions_marks_unverified_rows(here):
    ok(ens("submit", "blends/x", "--data", "data", "--dry-run"))
    assert Ledger("submissions").entries()[0].test_check == "unverified"
    lines = ok(ens("submissions")).stdout.splitlines()
    header, row = lines[0].split(), lines[1]
    assert "test" in header, lines
    assert "unverified" in row, lines


# ------------------------------------------------------------------- paths shown by the one rule

@pytest.mark.parametrize("part", ["a\u00a0b", "a\u200db", os.fsdecode(b"a\xfdb")])
def test_paths_in_the_trace_are_shown_by_the_one_rule(part, here):
    from ensemble.errors import printable

    blend = dict(BLEND, apply={"split": "test", "rows": 6, "stores": {"resnet50": "ab" * 32}},
                 runs=f"/nowhere/{part}")
    make_blend(here / "blends" / "y", blend=blend)
    result = ok(ens("submit", "blends/y", "--data", "data", "--dry-run"))
    (warning,) = warnings_of(result)
    assert f"/nowhere/{printable(part)}/resnet50/test" in warning, warning
    assert "\\xdcfd" not in warning, warning


# --------------------------------------------------------- a non-UTF-8 blend folder in the ledger

def test_a_non_utf8_blend_folder_is_recorded_as_valid_text(here):
    folder = here / "blends" / os.fsdecode(b"bl\xfd")
    make_blend(folder)
    ok(ens("submit", folder, "--data", "data", "--dry-run", "--name", "ok"))
    (entry,) = Ledger("submissions").entries()
    assert entry.source == os.fsencode(folder).decode("utf-8", "backslashreplace")
    assert entry.source.endswith("bl\\xfd")


# ------------------------------------------------------------------------ the default file name

def test_a_long_blend_folder_name_is_shortened_for_the_file_name(here):
    folder = here / "blends" / ("b" * 250)
    make_blend(folder)
    result = ok(ens("submit", folder, "--data", "data", "--dry-run", "--gzip"))
    (entry,) = Ledger("submissions").entries()
    assert len(os.fsencode(entry.file)) <= 255
    assert entry.file.endswith(".csv.gz") and "_bbbbbbbbbb" in entry.file
    assert any("--name" in line and "shortened" in line for line in result.stderr.splitlines()), result.stderr
    # again in the same second: the -2 name fits too
    ok(ens("submit", folder, "--data", "data", "--dry-run", "--gzip"))
    assert len(Ledger("submissions").entries()) == 2


def test_a_too_long_name_is_refused_naming_name(here):
    one_line_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--name", "n" * 250),
                   "--name", "too long")
    assert not (here / "submissions").exists()


@pytest.mark.parametrize("folder, default", [("café", "caf_"), (os.fsdecode(b"bl\xfd"), "bl_"),
                                             ("a b", "a_b"), ("-x", "x")])
def test_a_default_name_with_other_characters_is_made_safe(folder, default, here):
    make_blend(here / "blends" / folder)
    result = ok(ens("submit", here / "blends" / folder, "--data", "data", "--dry-run"))
    (entry,) = Ledger("submissions").entries()
    assert entry.file.endswith(f"Z_{default}.csv"), entry.file
    assert any("--name" in line and default in line for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("name, shown", [("café", "café"), (os.fsdecode(b"bl\xfd"), "bl\\xfd")])
def test_a_bad_name_is_refused_shown_printable(name, shown, here):
    error = one_line_error(ens("submit", "blends/x", "--data", "data", "--dry-run", "--name", name),
                           f"--name '{shown}'", "letters, digits")
    assert "\\udc" not in error, error


# -------------------------------------------------------------------- FIFOs and folders for files

@pytest.mark.parametrize("how", ["predictions", "--check", "--sample", "--sample folder"])
def test_a_fifo_or_folder_for_a_file_is_not_a_regular_file(how, here):
    fifo = here / "fifo"
    os.mkfifo(fifo)
    if how == "predictions":
        result = ens("submit", fifo, "--data", "data", "--dry-run")
    elif how == "--check":
        result = ens("submit", "--check", fifo, "--data", "data")
    elif how == "--sample":
        result = ens("submit", "blends/x", "--data", "data", "--dry-run", "--sample", fifo)
    else:
        result = ens("submit", "blends/x", "--data", "data", "--dry-run", "--sample", here / "data")
    shown = "data" if how == "--sample folder" else "fifo"
    one_line_error(result, shown, "not a regular file")
    assert "no such file" not in result.stderr


def test_a_fifo_ledger_is_one_line_naming_it(here):
    (here / "submissions").mkdir()
    os.mkfifo(here / "submissions" / "ledger.sqlite")
    one_line_error(ens("submissions"), "submissions/ledger.sqlite", "not a regular file")
    one_line_error(ens("submit", "blends/x", "--data", "data", "--dry-run"),
                   "submissions/ledger.sqlite", "not a regular file")
    assert sorted(p.name for p in (here / "submissions").iterdir()) == ["ledger.sqlite"]


# ------------------------------------------------------------------- what --check does not check

def test_check_says_it_checks_ids_and_categories_only(here):
    ok(ens("submit", "blends/x", "--data", "data", "--dry-run"))
    (entry,) = Ledger("submissions").entries()
    result = ok(ens("submit", "--check", f"submissions/{entry.file}", "--data", "data"))
    notes = [line for line in result.output.splitlines() if "ids and categories only" in line]
    assert len(notes) == 1, result.output


# ---------------------------------------------------------------- where the submissions folder is

def test_submit_inside_a_blend_folder_is_refused(here, monkeypatch):
    monkeypatch.chdir(here / "blends" / "x")
    one_line_error(ens("submit", ".", "--data", here / "data", "--dry-run"), "blend.json", "submissions")
    assert not (here / "blends" / "x" / "submissions").exists()


def test_submit_in_the_folder_of_blend_folders_is_refused(here, monkeypatch):
    """`cd blends && ens submit x`: the ledger would land in blends/submissions, where `ens
    report` never looks."""
    monkeypatch.chdir(here / "blends")
    one_line_error(ens("submit", "x", "--data", here / "data", "--dry-run"), "is the folder of blend folders (blends/)")
    assert not (here / "blends" / "submissions").exists()


def test_submit_beside_a_blend_written_elsewhere_is_not_refused(here):
    """`ens blend --out nll` in the work folder, then `ens submit nll` there: the ledger is in
    ./submissions, where `ens report` run there looks."""
    shutil.copytree(here / "blends" / "x", here / "nll")
    ok(ens("submit", "nll", "--data", "data", "--dry-run"))
    assert (here / "submissions" / "ledger.sqlite").is_file()


# ------------------------------------------- the chain through blend.json's recorded sha256s

from ensemble.fileio import sha256_file  # noqa: E402
from tests.ensemble.submission.test_submit_hostile import as_older_blend_json, work  # noqa: E402,F401


def recording_blend(here: Path, **apply) -> Path:
    """blends/r: predictions.csv and a blend.json whose apply records the sha256s of an ens that
    writes them (``apply`` overrides them); the stores it names exist nowhere."""
    folder = here / "blends" / "r"
    csv = make_blend(folder, blend=None) / "predictions.csv"
    recorded = {"split": "test", "rows": len(TEST_IDS), "stores": {"resnet50": "ab" * 32},
                "dataset_sha256": sha256_file(here / "data" / "test2019.json"),
                "predictions_sha256": sha256_file(csv)}
    (folder / "blend.json").write_text(json.dumps(dict(BLEND, apply=dict(recorded, **apply))))
    return folder


def test_recorded_sha256s_verify_without_reading_any_store(here):
    recording_blend(here)
    result = ok(ens("submit", "blends/r", "--data", "data", "--dry-run"))
    assert warnings_of(result) == [], result.stderr
    assert Ledger("submissions").entries()[0].test_check == "verified"


def test_a_recorded_dataset_sha256_of_another_json_is_refused(here):
    recording_blend(here, dataset_sha256="0f" * 32)
    one_line_error(ens("submit", "blends/r", "--data", "data", "--dry-run"),
                   "blends/r/predictions.csv", "0f0f0f0f0f0f", "data/test2019.json", "other images")
    assert not (here / "submissions").exists()


def test_predictions_swapped_for_others_of_the_same_ids_are_unverified(here):
    folder = recording_blend(here)
    rows = ranked(seed=1)  # another blend's predictions: the same ids, other rows
    make_blend(folder, rows, blend=None)
    result = ok(ens("submit", "blends/r", "--data", "data", "--dry-run"))
    (warning,) = warnings_of(result)
    assert "edited or replaced since the blend" in warning, warning
    assert Ledger("submissions").entries()[0].test_check == "unverified"


def test_swapped_predictions_of_a_real_blend_are_unverified(work):
    """The issue's repro: the predictions of a blend of other stores (same ids) copied over."""
    csv = work / "blends" / "b" / "predictions.csv"
    text = csv.read_text().splitlines()
    header, rows = text[0], text[1:]
    swapped = [row.split(",", 1)[0] + "," + other.split(",", 1)[1] for row, other in zip(rows, rows[1:] + rows[:1])]
    csv.write_text("\n".join([header, *swapped]) + "\n")
    result = ok(ens("submit", "blends/b", "--data", "data", "--dry-run"))
    (warning,) = warnings_of(result)
    assert "edited or replaced" in warning, warning
    assert Ledger("submissions").entries()[0].test_check == "unverified"


def test_recorded_sha256s_are_used_where_the_stores_are_gone(work):
    shutil.move(work / "runs", work / "elsewhere")  # no store left where submit could look
    ok(ens("submit", "blends/b", "--data", "data", "--dry-run"))
    assert Ledger("submissions").entries()[0].test_check == "verified"


def test_an_older_blend_json_finds_its_stores_in_the_recorded_runs_folder(work, tmp_path_factory, monkeypatch):
    """The fallback: blend.json's runs, outside the work folder and the folder ens runs in."""
    blend_dir = work / "blends" / "b"
    as_older_blend_json(blend_dir)
    runs = tmp_path_factory.mktemp("far") / "stores"
    shutil.move(work / "runs", runs)
    doc = json.loads((blend_dir / "blend.json").read_text())
    doc["runs"] = str(runs)
    (blend_dir / "blend.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    result = ok(ens("submit", blend_dir, "--data", work / "data", "--dry-run"))
    assert warnings_of(result) == [], result.stderr
    assert Ledger("submissions").entries()[0].test_check == "verified"


def test_the_reports_ledger_table_marks_unverified_rows(here):
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    from ensemble.report import page
    from ensemble.report.build import ledger_points

    ok(ens("submit", "blends/x", "--data", "data", "--dry-run"))  # blends/x applied nothing: unverified
    ledger = Ledger("submissions")
    ledger.store_scores(1, kaggle_ref=9, kaggle_status="complete", public_score=0.3, private_score=None, error=None,
                        uploaded=None)
    path, points = ledger_points(here / "blends" / "x")
    assert [p.unverified for p in points] == [True]
    html = page.leaderboard(SimpleNamespace(missing={}, ledger_points=points, ledger=path))
    assert f"{ledger.entries()[0].file} (unverified)</td>" in html


def test_an_older_blend_json_outside_blends_does_not_look_in_its_grandparent(work, tmp_path_factory, monkeypatch):
    """<work>/runs is looked in only for a blend folder under blends/: the grandparent of one
    written elsewhere (--out other/b) is no folder of this project."""
    moved = work / "other" / "b"
    moved.parent.mkdir()
    shutil.move(work / "blends" / "b", moved)
    as_older_blend_json(moved)
    doc = json.loads((moved / "blend.json").read_text())
    doc.pop("runs", None)
    (moved / "blend.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    result = ok(ens("submit", moved, "--data", work / "data", "--dry-run"))
    (warning,) = warnings_of(result)
    assert "not found" in warning and str(work / "runs") not in warning, warning
    monkeypatch.chdir(work)  # ./runs: the folder ens runs in
    assert warnings_of(ok(ens("submit", moved, "--data", work / "data", "--dry-run"))) == []


def test_predictions_sha256_is_checked_without_a_dataset_sha256(here):
    """A blend whose stores recorded no json sha256 records only the predictions' sha256: a
    swapped file is still said to be one, before the (here fruitless) search for stores."""
    folder = recording_blend(here, dataset_sha256=None)
    make_blend(folder, ranked(seed=1), blend=None)
    (warning,) = warnings_of(ok(ens("submit", "blends/r", "--data", "data", "--dry-run")))
    assert "edited or replaced since the blend" in warning, warning
