"""The upload path with the real kaggle client against the loopback stand-in of the Kaggle API."""

from __future__ import annotations

import socket
import sys

import pytest

from ensemble.submission import kaggle_client
from ensemble.errors import EnsError
from ensemble.submission.kaggle_client import UploadError

from tests.ensemble.submission.kaggle_standin import basic_auth, quiet_import
from tests.ensemble.submission.submit_data import standin  # noqa: F401  (fixture)

COMPETITION = "inaturalist-2019-fgvc6"


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "20190601T100000Z_x.csv"
    path.write_bytes(b"id,predicted\n1,3 7 11 20 42\n")
    return path


@pytest.mark.network
def test_successful_upload_calls_the_three_endpoints_with_the_credentials(standin, csv_file):
    receipt = kaggle_client.connect().submit(str(csv_file), COMPETITION, "first try")
    assert receipt.ref == 5000 and receipt.message == f"Successfully submitted to {COMPETITION}"
    assert standin.names() == ["StartSubmissionUpload", "upload", "CreateSubmission"]
    start, put, create = standin.calls
    assert start.url == "http://localhost/api/v1/competitions.CompetitionApiService/StartSubmissionUpload"
    assert start.body["competitionName"] == COMPETITION and start.body["fileName"] == csv_file.name
    assert start.body["contentLength"] == csv_file.stat().st_size
    assert start.authorization == create.authorization == basic_auth()
    assert standin.files == {csv_file.name: csv_file.read_bytes()}
    assert create.body["submissionDescription"] == "first try"
    assert create.body["blobFileTokens"] == put.url.rsplit("/", 1)[-1]


@pytest.mark.network
@pytest.mark.parametrize("call", ["StartSubmissionUpload", "CreateSubmission"])
def test_server_error(standin, csv_file, call):
    standin.fail[call] = (500, {})
    with pytest.raises(UploadError, match=f"Kaggle answered 500 to {call}: Internal Server Error"):
        kaggle_client.connect().submit(str(csv_file), COMPETITION, "m")
    assert standin.submissions == []


@pytest.mark.network
def test_failed_transfer_of_the_file(standin, csv_file):
    standin.fail["upload"] = (403, {})
    with pytest.raises(UploadError, match="transfer of the file to Kaggle's storage failed"):
        kaggle_client.connect().submit(str(csv_file), COMPETITION, "m")
    assert "CreateSubmission" not in standin.names()


@pytest.mark.network
def test_refused_file_carries_kaggles_reason(standin, csv_file):
    standin.fail["CreateSubmission"] = (400, {"code": 400, "message": "Submission must have 35350 rows"})
    with pytest.raises(UploadError) as info:
        kaggle_client.connect().submit(str(csv_file), COMPETITION, "m")
    assert str(info.value) == "Kaggle answered 400 to CreateSubmission: Submission must have 35350 rows"


@pytest.mark.network
def test_network_down(standin, csv_file, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, closed)
    with pytest.raises(UploadError, match=r"^could not reach Kaggle \(ProxyError"):
        kaggle_client.connect().submit(str(csv_file), COMPETITION, "m")


@pytest.mark.network
def test_listing_follows_pages_and_parses_scores(standin, csv_file):
    client = kaggle_client.connect()
    refs = [client.submit(str(csv_file), COMPETITION, f"try {i}").ref for i in range(3)]
    standin.score(refs[0], "0.18100", "0.18500")
    standin.submissions[0]["status"] = "ERROR"
    standin.submissions[0]["errorDescription"] = "bad row 7"
    listed = client.submissions(COMPETITION)
    assert [s.ref for s in listed] == refs[::-1]
    assert standin.names().count("ListSubmissions") == 2  # pages of two
    assert all(c.body["competitionName"] == COMPETITION for c in standin.calls if c.name == "ListSubmissions")
    newest, _, oldest = listed
    assert (newest.status, newest.error, newest.public_score) == ("error", "bad row 7", None)
    assert (oldest.status, oldest.public_score, oldest.private_score) == ("complete", 0.181, 0.185)
    assert oldest.file_name == csv_file.name and oldest.date == "2019-06-01T10:00:00Z"


@pytest.mark.network
def test_listing_error_is_one_line(standin):
    standin.fail["ListSubmissions"] = (403, {"code": 403, "message": "You must accept the rules"})
    with pytest.raises(EnsError, match=f"^listing the submissions to {COMPETITION} failed: Kaggle answered 403 to "
                                       "ListSubmissions: You must accept the rules$"):
        kaggle_client.connect().submissions(COMPETITION)


@pytest.mark.network
def test_missing_credentials(standin, monkeypatch, tmp_path, capsys):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setattr(quiet_import(), "config", str(tmp_path / "no-kaggle.json"))
    with pytest.raises(EnsError) as info:
        kaggle_client.connect()
    assert str(info.value) == kaggle_client.NO_CREDENTIALS
    assert capsys.readouterr().out == ""  # the client's help page stays inside
    assert standin.calls == []


def test_absent_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)
    with pytest.raises(EnsError, match=r"^the Kaggle client is not installed or incomplete \(.*\): "
                                       r"pip install 'ens\[kaggle\]'$"):
        kaggle_client.connect()


@pytest.mark.network
def test_nothing_leaves_the_machine(standin):
    import requests

    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://api.kaggle.com/v1/anything", timeout=5)
    assert standin.names() == ["CONNECT"]
    # Another host (a library's telemetry): refused too, and kept apart from the client's calls.
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://telemetry.example.org/v1/events", timeout=5)
    assert standin.names() == ["CONNECT"] and standin.tunnels == ["telemetry.example.org:443"]
