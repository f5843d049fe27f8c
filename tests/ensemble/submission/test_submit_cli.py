"""`ens submit` and `ens submissions` through the command line (typer's CliRunner)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.submission import submit as flow
from ensemble.cli import app
from ensemble.errors import EnsError

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

    for name in ("submit", "retry", "check", "refresh"):
        monkeypatch.setattr(flow, name, recorder(name))
    return calls


def test_options_reach_the_library(seen):
    result = ens("submit", "blends/x", "--data", "data", "--format", "inat2021", "--name", "try2", "--sample",
                 "s.csv", "--gzip", "--competition", COMPETITION, "-m", "two models")
    one_error(result, "stop here")
    args, kwargs = seen["submit"]
    assert args == (Path("blends/x"), Path("data"),
                    flow.SubmitOptions(format="inat2021", name="try2", sample=Path("s.csv"), compress=True,
                                       competition=COMPETITION, message="two models"))
    one_error(ens("submit", "blends/x", "--data", "data", "--dry-run"), "stop here")
    assert seen["submit"][0][2] == flow.SubmitOptions()


def test_check_retry_and_refresh_reach_the_library(seen):
    one_error(ens("submit", "--check", "f.csv", "--data", "d", "--sample", "s.csv"), "stop here")
    assert seen["check"] == ((Path("f.csv"), Path("d"), "inat2019", Path("s.csv")), {})
    one_error(ens("submit", "--retry", "3"), "stop here")
    assert seen["retry"] == ((3, None, None), {})
    one_error(ens("submit", "--retry", "3", "--competition", "c", "-m", "again"), "stop here")
    assert seen["retry"] == ((3, "c", "again"), {})
    one_error(ens("submissions", "--refresh"), "stop here")
    assert seen["refresh"] == ((), {})


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
])
def test_option_combinations(seen, args, expected):
    one_error(ens("submit", *args), expected)
    assert seen == {}


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
    assert lines[1].split() == ["ID", "created", "file", "status", "kaggle", "CV", "top-1", "error", "public",
                                "private", "message"]
    assert lines[2].split() == ["1", lines[2].split()[1], path.name, "uploaded", "complete", "0.2500",
                                "(0.2300-0.2700)", "0.2600", "blend", "of", "two"]


def test_failed_upload_through_the_cli(work, standin):
    standin.fail["StartSubmissionUpload"] = (503, {})
    result = ens("submit", "blends/x", "--data", "data", "--competition", COMPETITION, "-m", "first")
    path = next(Path("submissions").glob("*.csv"))
    one_error(result, f"upload of {path} to {COMPETITION} failed: Kaggle answered 503 to StartSubmissionUpload: "
                      "Service Unavailable; the file stays as ledger entry 1 (upload-failed), "
                      "`ens submit --retry 1` tries again")
    table = ens("submissions").stdout.splitlines()
    assert table[1].split()[3:5] == ["upload-failed", "0.2500"]

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
