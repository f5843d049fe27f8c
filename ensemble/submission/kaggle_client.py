"""Uploads and score look-ups through the official Kaggle client (the optional ``kaggle`` extra).

The client is imported only here, and only when a command needs Kaggle. Importing it has side
effects this module contains: ``kaggle/__init__.py`` authenticates at import time and, lacking
credentials, prints a page of help to stdout (and swallows the ``SystemExit``), so the import
and every client call run with stdout captured. Credentials are whatever the client itself
reads: ``KAGGLE_API_TOKEN`` or ``~/.kaggle/access_token``, ``KAGGLE_USERNAME`` and
``KAGGLE_KEY`` or ``kaggle.json`` in the client's config folder, or ``kaggle auth login``.

An upload calls, in order, ``StartSubmissionUpload`` (Kaggle answers with a storage URL and a
token), a PUT of the file's bytes to that URL, and ``CreateSubmission`` with the token and the
message; scores come from ``ListSubmissions``. All three are POSTs of JSON to
``<endpoint>/v1/competitions.CompetitionApiService/<call>`` (``https://api.kaggle.com`` in
production; ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` means ``http://localhost/api``).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Any, Iterator

from ensemble.errors import EnsError
from ensemble.formats.common import describe

INSTALL = "pip install 'ens[kaggle]'"
NO_CREDENTIALS = ("no Kaggle credentials: set KAGGLE_API_TOKEN (or save the token to ~/.kaggle/access_token), "
                  "or KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json), or run `kaggle auth login`")
#: Submissions asked for per ListSubmissions page.
_PAGE_SIZE = 100


class UploadError(EnsError):
    """An upload that did not go through; the message says why (HTTP status, network error)."""


@dataclass(frozen=True)
class Receipt:
    """Kaggle's answer to an accepted upload: its submission id and message."""

    ref: int | None
    message: str


@dataclass(frozen=True)
class RemoteSubmission:
    """One submission as Kaggle lists it. ``status``: pending, complete or error; scores are
    ``None`` until Kaggle has them; ``error``: Kaggle's reason when scoring failed."""

    ref: int
    file_name: str | None
    date: str | None
    status: str
    public_score: float | None
    private_score: float | None
    error: str | None


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Capture what the client prints (help pages, warnings, transfer errors)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        yield printed


def connect() -> "Kaggle":
    """An authenticated client; a missing client or missing credentials are one-line errors."""
    try:
        with _quiet():
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as exc:
        raise EnsError(f"the Kaggle client is not installed or incomplete ({exc}): {INSTALL}") from None
    except OSError as exc:  # it creates its config folder at import time
        raise EnsError(f"the Kaggle client could not start: {exc}") from None
    import requests

    api = KaggleApi()
    try:
        with _quiet():
            api.authenticate()
    except SystemExit:  # the client's way of saying that it found no credentials
        raise EnsError(NO_CREDENTIALS) from None
    except requests.RequestException as exc:  # an access token is checked with Kaggle
        raise EnsError(f"checking the Kaggle credentials failed: {_reason(exc)}") from None
    return Kaggle(api)


class Kaggle:
    """The calls `ens` makes, over an authenticated ``kaggle.api.KaggleApi``."""

    def __init__(self, api: Any):
        self._api = api

    def submit(self, path: str, competition: str, message: str) -> Receipt:
        """Upload ``path`` to ``competition``; :class:`UploadError` when it does not go through."""
        import requests

        try:
            with _quiet() as printed:
                response = self._api.competition_submit(str(path), message, competition, quiet=True)
        except requests.RequestException as exc:
            raise UploadError(_reason(exc)) from None
        except (ValueError, RecursionError) as exc:  # a reply that is not the JSON the client expects
            raise UploadError(f"unexpected reply from Kaggle ({exc})") from None
        if response.message == self._api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
            # A failed PUT of the file is not raised: the client prints what it knows and
            # returns this fixed message instead of Kaggle's.
            said = " ".join(printed.getvalue().split())
            raise UploadError(f"the transfer of the file to Kaggle's storage failed{': ' + said if said else ''}")
        return Receipt(ref=response.ref or None, message=response.message)

    def submissions(self, competition: str) -> list[RemoteSubmission]:
        """Every submission of the user's team to ``competition``, newest first."""
        import requests
        from kagglesdk.competitions.types.competition_api_service import ApiListSubmissionsRequest

        found: list[RemoteSubmission] = []
        tokens_seen = {""}
        token = ""
        try:
            with _quiet(), self._api.build_kaggle_client() as client:
                while True:
                    request = ApiListSubmissionsRequest()
                    request.competition_name = competition
                    request.page_size = _PAGE_SIZE
                    request.page_token = token
                    response = client.competitions.competition_api_client.list_submissions(request)
                    found += [_remote(s) for s in response.submissions]
                    token = response.next_page_token or ""
                    if token in tokens_seen:  # "" ends the list; a repeat would loop forever
                        return found
                    tokens_seen.add(token)
        except requests.RequestException as exc:
            raise EnsError(f"listing the submissions to {competition} failed: {_reason(exc)}") from None
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to parse
            raise EnsError(f"listing the submissions to {competition} failed: unexpected reply ({exc})") from None


def _remote(submission: Any) -> RemoteSubmission:
    return RemoteSubmission(
        ref=submission.ref,
        file_name=submission.file_name,
        date=None if submission.date is None else submission.date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        status=submission.status.name.lower(),
        public_score=_score(submission.public_score),
        private_score=_score(submission.private_score),
        error=submission.error_description or None,
    )


def _score(text: str | None) -> float | None:
    # Kaggle sends scores as text, empty or absent while scoring is pending.
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is None:
        return f"could not reach Kaggle ({describe(exc, whole=True)})"
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        body = None
    body = body if isinstance(body, dict) else {}
    # Kaggle can refuse with an error object ({"code": 400, "message": ...}) in any HTTP status.
    code = body.get("code") if isinstance(body.get("code"), int) else response.status_code
    detail = body.get("message") or response.reason
    call = response.url.rsplit("/", 1)[-1]
    return f"Kaggle answered {code} to {call}: {' '.join(str(detail).split())}"
