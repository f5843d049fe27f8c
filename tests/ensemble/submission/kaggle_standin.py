"""A stand-in for the Kaggle API on loopback, for the real ``kaggle`` client to talk to.

It implements exactly the calls ``ens`` makes through kaggle 2.2 (read from
``kaggle/api/kaggle_api_extended.py`` and ``kagglesdk/kaggle_http_client.py``): JSON POSTs to
``/api/v1/competitions.CompetitionApiService/{StartSubmissionUpload, CreateSubmission,
ListSubmissions}`` and the PUT of the file to the ``createUrl`` that StartSubmissionUpload
hands out. Anything else is answered 404 and recorded, so a test can assert that nothing else
was asked.

How the client gets here: ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` makes it call
``http://localhost/api/v1/...`` on port 80, which needs root to listen on and would collide
between concurrent test runs. So the stand-in listens on a free port and is set as the HTTP
and HTTPS proxy (``NO_PROXY`` cleared): ``requests`` then sends it every request, the
plain-HTTP ones with their full ``http://localhost/...`` URL. HTTPS through it (a CONNECT,
e.g. to api.kaggle.com) is refused, so no test can reach the internet.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SERVICE = "/api/v1/competitions.CompetitionApiService/"
USERNAME, KEY = "tester", "not-a-real-key"


@dataclass
class Call:
    method: str
    url: str
    name: str
    body: dict | None
    authorization: str | None


@dataclass
class KaggleStandIn:
    """State of the fake service: ``calls`` in order; ``files``: file name -> bytes received
    by the PUT; ``submissions``: as ListSubmissions returns them, newest first.

    ``fail[name] = (status, json_body)`` makes every call of ``name`` (a call name, or
    ``"upload"`` for the PUT) answer with that until the key is removed; ``page_size``: how many
    submissions ListSubmissions returns per page whatever the client asks."""

    calls: list[Call] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    submissions: list[dict] = field(default_factory=list)
    fail: dict[str, tuple[int, dict]] = field(default_factory=dict)
    page_size: int = 2
    #: CONNECT targets other than a Kaggle host (a library's telemetry in the same process): refused, not calls.
    tunnels: list[str] = field(default_factory=list)
    _started: dict[str, str] = field(default_factory=dict)  # token -> file name, before the PUT
    _blobs: dict[str, str] = field(default_factory=dict)  # token -> file name, after the PUT

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def score(self, ref: int, public: str, private: str = "") -> None:
        sub = next(s for s in self.submissions if s["ref"] == ref)
        sub.update(status="COMPLETE", publicScore=public, privateScore=private)

    # -- the service ----------------------------------------------------------------------------

    def handle(self, method: str, url: str, body: bytes, authorization: str | None) -> tuple[int, dict]:
        path = urlsplit(url).path
        if method == "PUT" and path.startswith("/upload/"):
            token = path.rsplit("/", 1)[-1]
            self.calls.append(Call(method, url, "upload", None, authorization))
            if "upload" in self.fail:
                return self.fail["upload"]
            if token not in self._started:
                return 404, {}
            self._blobs[token] = self._started[token]
            self.files[self._started[token]] = body
            return 200, {}
        name = path[len(SERVICE):] if method == "POST" and path.startswith(SERVICE) else path
        request = json.loads(body) if body else {}
        self.calls.append(Call(method, url, name, request, authorization))
        if name in self.fail:
            return self.fail[name]
        if name == "StartSubmissionUpload":
            token = f"blob-{len(self.calls)}"
            self._started[token] = request["fileName"]
            return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}
        if name == "CreateSubmission":
            token = request["blobFileTokens"]
            if token not in self._blobs:
                return 400, {"code": 400, "message": f"no uploaded file for token {token}"}
            ref = 5000 + len(self.submissions)
            self.submissions.insert(0, {"ref": ref, "fileName": self._blobs.pop(token),
                                        "date": "2019-06-01T10:00:00.000Z",
                                        "description": request.get("submissionDescription"), "status": "PENDING"})
            return 200, {"message": f"Successfully submitted to {request['competitionName']}", "ref": ref}
        if name == "ListSubmissions":
            start = int(request.get("pageToken") or 0)
            page = self.submissions[start:start + self.page_size]
            more = start + self.page_size < len(self.submissions)
            return 200, {"submissions": page, "nextPageToken": str(start + self.page_size) if more else ""}
        return 404, {"code": 404, "message": f"the stand-in has no {method} {path}"}


def _handler(service: KaggleStandIn):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, reply = service.handle(self.command, self.path, body, self.headers.get("Authorization"))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_PUT = _serve

        def do_CONNECT(self):  # HTTPS through the proxy: refused, nothing leaves the machine
            host = self.path.rsplit(":", 1)[0].lower()
            if host == "kaggle.com" or host.endswith(".kaggle.com"):
                service.calls.append(Call("CONNECT", self.path, "CONNECT", None, None))
            else:
                service.tunnels.append(self.path)
            self.send_error(403, "the Kaggle stand-in does not tunnel")

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def running(service: KaggleStandIn):
    """Serve ``service`` on a free loopback port; yield its proxy URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(service))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def basic_auth(username: str = USERNAME, key: str = KEY) -> str:
    return "Basic " + base64.b64encode(f"{username}:{key}".encode()).decode()


def quiet_import():
    """Import the client as ens does (it prints when it finds no credentials)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi
