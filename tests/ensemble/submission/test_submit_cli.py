"""`ens submit` and `ens submissions` through the command line (typer's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.submission import submit as submit_module
from ensemble.cli import app
from ensemble.errors import EnsError
from ensemble.submission.kaggle_csv import FORMATS
from ensemble.submission.submit import SubmitOptions, SubmitRequest

from tests.ensemble.submission.submit_data import TEST_IDS, make_blend, make_data, ranked, standin  # noqa: F401  (fixture)

runner = CliRunner()
COMPETITION = "inaturalist-2019-fgvc6"


def ens(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result, expected: str):
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {expected}\n"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    make_blend(tmp_path / "blends" / "x")
    return tmp_path


@pytest.fixture
def seen(monkeypatch):
    """Replace the library calls with recorders that stop with an EnsError."""
    calls = {}

    def recorder(name):
        def record(*args, **kwargs):
            calls[name] = (args, kwargs)
            raise EnsError("stop here")
        return record

    for name in ("submit", "retry", "check", "refresh_scores"):
        monkeypatch.setattr(submit_module, name, recorder(name))
    return calls


def test_options_reach_the_library(seen):
    result = ens("submit", "blends/x", "--data", "data", "--format", "inat2021", "--name", "try2", "--sample",
                 "s.csv", "--gzip", "--competition", COMPETITION, "-m", "two models", "--missing", "prior")
    one_error(result, "stop here")
    args, kwargs = seen["submit"]
    assert args == (Path("blends/x"), Path("data"),
                    SubmitOptions(format="inat2021", name="try2", sample=Path("s.csv"), compress=True,
                                       competition=COMPETITION, message="two models", missing="prior"))
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run"), "stop here")
    assert seen["submit"][0][2] == SubmitOptions()


def test_check_retry_and_refresh_reach_the_library(seen):
    one_error(ens("submit", "--check", "f.csv", "--data", "d", "--sample", "s.csv"), "stop here")
    assert seen["check"][0] == (Path("f.csv"), Path("d"), None, Path("s.csv"))  # None: the layout's format
    one_error(ens("submit", "--retry", "3"), "stop here")
    assert seen["retry"] == ((3, None, None), {})
    one_error(ens("submit", "--retry", "3", "--competition", "c", "-m", "again"), "stop here")
    assert seen["retry"] == ((3, "c", "again"), {})
    one_error(ens("submissions", "--refresh"), "stop here")
    assert seen["refresh_scores"] == ((), {})


def test_the_command_line_hands_every_option_over_as_given(monkeypatch):
    """One library call, with what was typed; None (False) for what was not: the stage decides."""
    seen = []

    def record(request, warn=None):
        seen.append(request)
        raise EnsError("stop here")

    monkeypatch.setattr(submit_module, "run_request", record)
    one_error(ens("submit", "p.csv", "--data", "d", "--format", "inat2018", "--name", "n", "--sample", "s.csv",
                  "--missing", "prior", "--gzip", "--dry-run", "--competition", "c", "-m", "msg", "--check", "f.csv",
                  "--retry", "4"), "stop here")
    one_error(ens("submit"), "stop here")
    assert seen == [SubmitRequest(predictions=Path("p.csv"), data=Path("d"), format="inat2018", name="n",
                                  sample=Path("s.csv"), missing="prior", compress=True, dry_run=True, competition="c",
                                  message="msg", check=Path("f.csv"), retry=4),
                    SubmitRequest()]


@pytest.mark.parametrize("args, expected", [
    ((), "give PREDICTIONS and --data DIR (or --check FILE, or --retry ID)"),
    (("p.csv",), "give PREDICTIONS and --data DIR (or --check FILE, or --retry ID)"),
    (("p.csv", "--data", "d"), "give --competition C -m MSG to upload, or --dry-run to only write and record the file"),
    (("p.csv", "--data", "d", "--competition", "c"),
     "give --competition C -m MSG to upload, or --dry-run to only write and record the file"),
    (("p.csv", "--data", "d", "--dry-run", "-m", "x"), "--dry-run uploads nothing: leave out --competition and -m"),
    (("--check", "f.csv"), "--check FILE needs --data DIR (the test ids and categories to check against)"),
    (("--check", "f.csv", "--data", "d", "--name", "n", "--gzip"), "--check does not take --name, --gzip"),
    (("p.csv", "--retry", "1", "--data", "d", "--format", "inat2019"),
     "--retry does not take PREDICTIONS, --data, --format"),
    (("--check", "f.csv", "--retry", "1"), "--check and --retry do not go together"),
    (("--check", "f.csv", "--data", "d", "--missing", "prior"), "--check does not take --missing"),
    (("--retry", "1", "--missing", "fail"), "--retry does not take --missing"),
    (("p.csv", "--data", "d", "--dry-run", "--missing", "zero"), "--missing zero: choose one of fail, prior"),
])
def test_option_combinations(seen, args, expected):
    one_error(ens("submit", *args), expected)
    assert seen == {}


@pytest.mark.network
def test_end_to_end_dry_run_retry_refresh(work, standin):
    result = ens("submit", "blends/x", "--data", "data", "--dry-run")
    assert result.exit_code == 0, result.output
    wrote, recorded = result.stdout.splitlines()
    path = Path(wrote.split()[1])
    assert wrote == f"wrote {path} ({len(TEST_IDS)} rows, inat2019)" and path.parent == Path("submissions")
    assert recorded == "ledger entry 1: not-uploaded (dry run)"
    rows = ranked()
    assert path.read_text() == "id,predicted\n" + "".join(f"{i},{' '.join(map(str, rows[i]))}\n"
                                                          for i in sorted(TEST_IDS))
    assert ens("submit", "--check", path, "--data", "data").exit_code == 0
    assert standin.calls == []

    result = ens("submit", "--retry", "1", "--competition", COMPETITION, "-m", "blend of two")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"uploaded {path} to {COMPETITION}: Kaggle submission 5000 says 'Successfully submitted to {COMPETITION}'",
        "ledger entry 1: uploaded; `ens submissions --refresh` fetches its score"]
    assert standin.files == {path.name: path.read_bytes()}

    standin.score(5000, "0.26000")
    result = ens("submissions", "--refresh")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Kaggle lists 1 of the 1 files an upload was tried for"
    assert lines[1].split() == ["ID", "created", "file", "filled", "status", "test", "set", "kaggle", "CV", "top-1",
                                "error", "tau", "geo", "public", "private", "message"]
    assert lines[2].split() == ["1", lines[2].split()[1], path.name, "uploaded", "unverified", "complete", "0.2500",
                                "(0.2300-0.2700)", "0.2600", "blend", "of", "two"]


@pytest.mark.network
def test_failed_upload_through_the_cli(work, standin):
    standin.fail["StartSubmissionUpload"] = (503, {})
    result = ens("submit", "blends/x", "--data", "data", "--competition", COMPETITION, "-m", "first")
    path = next(Path("submissions").glob("*.csv"))
    # the warning (blends/x's blend.json applied nothing: unverified) is shown before the upload's error
    warning, error = result.stderr.splitlines()
    assert warning.startswith("warning: blends/x/predictions.csv: not checked") and "unverified" in warning
    assert result.exit_code == 2 and error == (
        f"error: upload of {path} to {COMPETITION} failed: Kaggle answered 503 to StartSubmissionUpload: "
        "Service Unavailable; the file stays as ledger entry 1 (upload-failed), `ens submit --retry 1` tries again")
    table = ens("submissions").stdout.splitlines()
    assert table[1].split()[3:6] == ["upload-failed", "unverified", "0.2500"]

    del standin.fail["StartSubmissionUpload"]
    result = ens("submit", "--retry", "1")
    assert result.exit_code == 0, result.output
    assert ens("submissions").stdout.splitlines()[1].split()[3] == "uploaded"


def test_empty_ledger(work):
    result = ens("submissions")
    assert result.exit_code == 0 and result.stdout == "no submissions recorded in submissions/ yet\n"
    result = ens("submissions", "--refresh")
    assert result.exit_code == 0 and result.stdout.splitlines() == [
        "no upload tried yet: no scores to fetch", "no submissions recorded in submissions/ yet"]


def _categories(path: Path, cats) -> None:
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": c} for c in cats]}))


@pytest.mark.parametrize("train", ["train.json", "train_mini.json"])
def test_inat2021_finds_its_own_files(tmp_path, monkeypatch, train):
    """public_test.json and train.json (or train_mini.json) / val.json, not the 2019 files beside them."""
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", FORMATS["inat2021"])
    if train != "train.json":
        (tmp_path / "data" / "train.json").rename(tmp_path / "data" / train)
    # Another year's files in the same folder: other test ids, other categories.
    make_data(tmp_path / "data", FORMATS["inat2019"], ids=(1, 2, 3))
    for name in ("train2019.json", "val2019.json"):
        _categories(tmp_path / "data" / name, [500])
    # Each row holds categories that only train (3, 7, 11) or only val (42, 99, 101) knows.
    rows = {i: [3, 42, 7, 99, 11] if n % 2 else [101, 11, 42, 3, 20] for n, i in enumerate(TEST_IDS)}
    make_blend(tmp_path / "blends" / "x", rows)
    result = ens("submit", "blends/x", "--data", "data", "--format", "inat2021", "--dry-run")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.split()[1])
    assert path.read_text() == "Id,Predicted\n" + "".join(f"{i},{' '.join(map(str, rows[i]))}\n"
                                                          for i in sorted(TEST_IDS))
    result = ens("submit", "--check", path, "--data", "data", "--format", "inat2021")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"ok: {path}: 6 rows, inat2021 (Id,Predicted, 5 known category ids per row), "
                             "every id of public_test.json once\n")


def test_inat2018_finds_test2018(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data", FORMATS["inat2018"])
    make_data(tmp_path / "other", FORMATS["inat2019"], ids=(1, 2, 3))
    for name in ("test2019.json", "train2019.json", "val2019.json"):
        (tmp_path / "other" / name).rename(tmp_path / "data" / name)
    _categories(tmp_path / "data" / "train2019.json", [500])
    make_blend(tmp_path / "blends" / "x")
    result = ens("submit", "blends/x", "--data", "data", "--format", "inat2018", "--dry-run")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.split()[1])
    rows = ranked()
    assert path.read_text() == "id,predicted\n" + "".join(f"{i},{' '.join(map(str, rows[i][:3]))}\n"
                                                          for i in sorted(TEST_IDS))
    result = ens("submit", "--check", path, "--data", "data", "--format", "inat2018")
    assert result.stdout == (f"ok: {path}: 6 rows, inat2018 (id,predicted, 3 known category ids per row), "
                             "every id of test2018.json once\n")
