"""The ledger across dry runs, uploads, failures, retries and refreshes (real client, stand-in API)."""

from __future__ import annotations

import gzip
import json
import re
import sqlite3

import pytest

from ensemble.submission import kaggle_client
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.submission.kaggle_client import UploadError
from ensemble.formats.blend import BlendSummary
from ensemble.formats.ledger import Ledger
from ensemble.submission.submit import SubmitOptions, refresh_scores, retry, submit

from tests.ensemble.submission.submit_data import BLEND, TEST_IDS, make_blend, make_data, standin  # noqa: F401  (fixture)

COMPETITION = "inaturalist-2019-fgvc6"
UPLOAD = SubmitOptions(competition=COMPETITION, message="greedy blend")


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    make_blend(tmp_path / "blends" / "greedy")
    return tmp_path


def test_dry_run_records_the_file_and_its_blend(work):
    result = submit("blends/greedy", "data", SubmitOptions())
    entry = result.entry
    assert result.receipt is None and result.path.parent.name == "submissions"
    assert re.fullmatch(r"\d{8}T\d{6}Z_greedy\.csv", entry.file) and result.path.name == entry.file
    assert entry.created[:4] + entry.created[5:7] + entry.created[8:10] == entry.file[:8]
    assert entry.sha256 == sha256_file(result.path)
    assert (entry.id, entry.format, entry.rows, entry.source) == (1, "inat2019", len(TEST_IDS), "blends/greedy")
    assert (entry.blend_method, entry.blend_members, entry.blend_weights) == ("greedy", ("resnet50", "inception_v3"),
                                                                            BLEND["weights"])
    assert (entry.cv_top1, entry.cv_top1_low, entry.cv_top1_high) == (0.75, 0.73, 0.77)
    assert (entry.status, entry.competition, entry.message, entry.kaggle_ref) == ("not-uploaded", None, None, None)
    assert Ledger("submissions").entries() == [entry]


def test_hand_made_predictions_record_no_blend(work):
    (work / "blends" / "greedy" / "blend.json").rename(work / "elsewhere.json")
    csv = work / "blends" / "greedy" / "predictions.csv"
    mine = csv.rename(work / "mine.csv")
    entry = submit(mine, "data", SubmitOptions(compress=True)).entry
    assert entry.file.endswith("_mine.csv.gz") and entry.source == str(mine)
    assert entry.blend_method is entry.blend_members is entry.blend_weights is entry.cv_top1 is None
    path = work / "submissions" / entry.file
    assert entry.sha256 == sha256_file(path) and gzip.decompress(path.read_bytes()).startswith(b"id,predicted\n")


def test_blend_without_cv(tmp_path):
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(dict(BLEND, cv=None)))
    blend = BlendSummary.read(path)
    assert blend.method == "greedy" and blend.cv_top1 is blend.cv_top1_low is blend.cv_top1_high is None


@pytest.mark.network
def test_upload_success(work, standin):
    result = submit("blends/greedy", "data", UPLOAD)
    assert result.receipt.ref == 5000
    entry = result.entry
    assert (entry.status, entry.kaggle_ref, entry.competition, entry.message, entry.error) == \
        ("uploaded", 5000, COMPETITION, "greedy blend", None)
    assert entry.uploaded is not None
    assert standin.files == {entry.file: result.path.read_bytes()}


@pytest.mark.network
def test_failure_then_retry(work, standin):
    standin.fail["CreateSubmission"] = (500, {})
    with pytest.raises(UploadError) as info:
        submit("blends/greedy", "data", UPLOAD)
    entry, = Ledger("submissions").entries()
    path = work / "submissions" / entry.file
    assert str(info.value) == (f"upload of {path.relative_to(work)} to {COMPETITION} failed: Kaggle answered 500 to "
                               "CreateSubmission: Internal Server Error; the file stays as ledger entry 1 "
                               "(upload-failed), `ens submit --retry 1` tries again")
    assert (entry.status, entry.competition, entry.message) == ("upload-failed", COMPETITION, "greedy blend")
    assert entry.error == "Kaggle answered 500 to CreateSubmission: Internal Server Error"
    assert path.is_file() and sha256_file(path) == entry.sha256

    with pytest.raises(UploadError, match="ledger entry 1 \\(upload-failed\\)"):
        retry(1)
    del standin.fail["CreateSubmission"]
    result = retry(1)
    assert (result.entry.status, result.entry.kaggle_ref, result.entry.error) == ("uploaded", 5000, None)
    assert [s["description"] for s in standin.submissions] == ["greedy blend"]
    assert len(Ledger("submissions").entries()) == 1
    with pytest.raises(EnsError, match="^ledger entry 1: .* was already uploaded to inaturalist-2019-fgvc6 "
                                       r"\(Kaggle submission 5000\); write a new file to upload again$"):
        retry(1)


@pytest.mark.network
def test_retry_of_a_dry_run_needs_a_competition_and_message(work, standin):
    entry = submit("blends/greedy", "data", SubmitOptions()).entry
    with pytest.raises(EnsError, match=f"^ledger entry 1: {entry.file} was never uploaded; give --competition C -m MSG$"):
        retry(1)
    result = retry(1, COMPETITION, "later")
    assert (result.entry.status, result.entry.competition, result.entry.message) == ("uploaded", COMPETITION, "later")


@pytest.mark.network
def test_retry_refuses_a_changed_or_missing_file(work, standin):
    entry = submit("blends/greedy", "data", SubmitOptions()).entry
    path = work / "submissions" / entry.file
    path.write_text(path.read_text().replace("268243", "268299"))
    with pytest.raises(EnsError, match="changed since it was recorded"):
        retry(1, COMPETITION, "m")
    path.unlink()
    with pytest.raises(EnsError, match="no longer exists"):
        retry(1, COMPETITION, "m")
    with pytest.raises(EnsError, match=r"^ledger entry 9: no such entry in submissions/ledger.sqlite \(1 entries\)$"):
        retry(9)
    assert standin.calls == []


@pytest.mark.network
def test_missing_credentials_write_nothing(work, standin, monkeypatch):
    monkeypatch.setattr(kaggle_client, "connect", lambda: (_ for _ in ()).throw(EnsError(kaggle_client.NO_CREDENTIALS)))
    with pytest.raises(EnsError, match="^no Kaggle credentials"):
        submit("blends/greedy", "data", UPLOAD)
    assert not (work / "submissions").exists()


@pytest.mark.network
def test_refresh_stores_scores_next_to_the_cv_estimate(work, standin):
    first = submit("blends/greedy", "data", UPLOAD).entry
    submit("blends/greedy", "data", SubmitOptions())  # a dry run: nothing to ask Kaggle
    standin.fail["CreateSubmission"] = (500, {})
    with pytest.raises(UploadError):
        submit("blends/greedy", "data", UPLOAD)
    del standin.fail["CreateSubmission"]
    standin.score(first.kaggle_ref, "0.24100", "0.25000")

    result = refresh_scores()
    assert (result.asked, result.found) == (2, 1)
    uploaded, dry, failed = result.entries
    assert (uploaded.kaggle_status, uploaded.public_score, uploaded.private_score) == ("complete", 0.241, 0.25)
    assert uploaded.cv_top1 == 0.75 and uploaded.refreshed is not None
    assert dry.kaggle_status is None and failed.kaggle_status is None and failed.status == "upload-failed"

    # An upload whose reply was lost: Kaggle has the file, the ledger says it failed.
    kaggle_client.connect().submit(str(work / "submissions" / failed.file), COMPETITION, "greedy blend")
    result = refresh_scores()
    assert result.found == 2
    healed = result.entries[2]
    assert (healed.status, healed.kaggle_ref, healed.kaggle_status) == ("uploaded", 5001, "pending")


def test_refresh_without_uploads_needs_no_client(work, monkeypatch):
    monkeypatch.setattr(kaggle_client, "connect", lambda: pytest.fail("no upload was tried"))
    submit("blends/greedy", "data", SubmitOptions())
    assert (refresh_scores().asked, refresh_scores().found) == (0, 0)


def test_a_foreign_or_newer_ledger_is_refused(work):
    (work / "submissions").mkdir()
    (work / "submissions" / "ledger.sqlite").write_text("not a database")
    with pytest.raises(EnsError, match=r"^submissions/ledger.sqlite: the ledger is damaged \(file is not a database\)"):
        submit("blends/greedy", "data", SubmitOptions())
    assert [p.name for p in (work / "submissions").iterdir()] == ["ledger.sqlite"]  # no CSV without its record
    (work / "submissions" / "ledger.sqlite").unlink()
    with sqlite3.connect(work / "submissions" / "ledger.sqlite") as con:
        con.execute("PRAGMA user_version = 7")
    with pytest.raises(EnsError, match="schema version 7; this ens reads version 1"):
        Ledger("submissions").entries()
