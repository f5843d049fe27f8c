"""The submission ledger: every file `ens submit` wrote, where it came from, what Kaggle said.

One sqlite table, ``submissions``, in ``submissions/ledger.sqlite`` (the standard library's
sqlite3; every call opens the file, runs one transaction and closes it, so concurrent `ens`
processes see each other's rows). One row per written file:

==================  ====================================================================
id                  integer, the ID that ``ens submit --retry ID`` takes
file                the file's name inside the submissions folder
sha256              of the file's bytes (compressed bytes for ``.csv.gz``)
created             UTC time the file was written, ISO 8601 (``2019-05-31T14:25:01Z``)
format              the competition format (``inat2019``...)
rows                rows in the file
competition         Kaggle competition slug; NULL until an upload is tried
message             the submission message; NULL until an upload is tried
source              the blend folder (or the hand-made predictions file) the rows came from
blend_method        ``method`` of the blend.json beside the predictions; this and the next
                    five are NULL without one
blend_members       JSON list of the member names
blend_weights       JSON object member -> weight
cv_top1             cross-validated top-1 accuracy of the chosen blend
cv_top1_low         lower end of its interval
cv_top1_high        upper end of its interval
status              ``not-uploaded``, ``uploaded`` or ``upload-failed``
error               why the last upload failed, or Kaggle's reason when scoring failed
kaggle_ref          Kaggle's submission id once uploaded
uploaded            UTC time of the successful upload
kaggle_status       Kaggle's scoring state from ``--refresh``: pending, complete or error
public_score        public leaderboard score from ``--refresh``
private_score       private leaderboard score from ``--refresh``
refreshed           UTC time of the last ``--refresh`` that found the submission
filled              rows not in the predictions that ``--missing prior`` filled (0: none)
fill_source         what the filled rows hold: ``train-prior`` (the most frequent classes
                    of the train json) or ``blend-prior`` (those the blend predicts most
                    often); NULL when none was filled
==================  ====================================================================

Columns added after a ledger was created (``filled``, ``fill_source``) are added to it, with
their defaults, the first time this ens opens it; ``user_version`` changes only for changes an
older ens could not live with.

A row is inserted ``not-uploaded`` right after its file is written and only then is an upload
tried, so a crash mid-upload leaves a row that ``--retry`` can finish, never a file that an
upload sent but the ledger does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from ensemble.errors import EnsError

LEDGER = "ledger.sqlite"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    format TEXT NOT NULL,
    rows INTEGER NOT NULL,
    competition TEXT,
    message TEXT,
    source TEXT NOT NULL,
    blend_method TEXT,
    blend_members TEXT,
    blend_weights TEXT,
    cv_top1 REAL,
    cv_top1_low REAL,
    cv_top1_high REAL,
    status TEXT NOT NULL CHECK (status IN ('not-uploaded', 'uploaded', 'upload-failed')),
    error TEXT,
    kaggle_ref INTEGER,
    uploaded TEXT,
    kaggle_status TEXT,
    public_score REAL,
    private_score REAL,
    refreshed TEXT,
    filled INTEGER NOT NULL DEFAULT 0,
    fill_source TEXT
)
"""
#: Columns younger than the table: name -> definition, added to older ledgers on open.
_ADDED = {"filled": "INTEGER NOT NULL DEFAULT 0", "fill_source": "TEXT"}


@dataclass(frozen=True)
class BlendProvenance:
    """Where a submission's rows came from, read from ``blend.json`` beside ``predictions.csv``.

    ``cv_top1*`` are the cross-validated top-1 accuracy of the blend that was used and its
    interval; ``None`` when the blend ran without cross-validation.
    """

    method: str
    members: tuple[str, ...]
    weights: Mapping[str, float]
    cv_top1: float | None
    cv_top1_low: float | None
    cv_top1_high: float | None


@dataclass(frozen=True)
class Entry:
    """One ledger row (see the module docstring for the fields)."""

    id: int
    file: str
    sha256: str
    created: str
    format: str
    rows: int
    competition: str | None
    message: str | None
    source: str
    blend_method: str | None
    blend_members: tuple[str, ...] | None
    blend_weights: Mapping[str, float] | None
    cv_top1: float | None
    cv_top1_low: float | None
    cv_top1_high: float | None
    status: str
    error: str | None
    kaggle_ref: int | None
    uploaded: str | None
    kaggle_status: str | None
    public_score: float | None
    private_score: float | None
    refreshed: str | None
    filled: int = 0
    fill_source: str | None = None


def utc_now() -> str:
    """The current UTC time as the ledger writes it."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_blend(path: str | os.PathLike) -> BlendProvenance:
    """The provenance in a ``blend.json`` written by `ens blend`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnsError(f"{path}: not a readable JSON file ({exc})") from None

    def field(container, key, kind, where):
        value = container.get(key) if isinstance(container, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EnsError(f"{path}: {where}{key!r} missing or not {_kind_name(kind)}")
        return value

    method = field(doc, "method", str, "")
    members = field(doc, "members", list, "")
    weights = field(doc, "weights", dict, "")
    if not all(isinstance(m, str) for m in members):
        raise EnsError(f"{path}: 'members' must be a list of names")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights.values()):
        raise EnsError(f"{path}: 'weights' must map member names to numbers")
    cv = doc.get("cv")
    top1 = low = high = None
    if cv is not None:
        rows = field(cv, "rows", list, "cv.")
        chosen = field(cv, "chosen", str, "cv.")
        row = next((r for r in rows if isinstance(r, dict) and r.get("name") == chosen), None)
        if row is None:
            raise EnsError(f"{path}: cv.chosen {chosen!r} names none of cv.rows")
        top1, low, high = (float(field(row, key, (int, float), f"cv.rows[{chosen!r}].")) for key in
                           ("top1", "top1_low", "top1_high"))
    return BlendProvenance(method=method, members=tuple(members), weights={k: float(v) for k, v in weights.items()},
                 cv_top1=top1, cv_top1_low=low, cv_top1_high=high)


def _kind_name(kind) -> str:
    names = {str: "a string", list: "a list", dict: "an object"}
    return names.get(kind, "a number")


class Ledger:
    """The ledger of one submissions folder; ``<folder>/ledger.sqlite`` is created on first write."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise EnsError(f"{self.path}: cannot open the ledger ({exc})") from None
        con.row_factory = sqlite3.Row
        try:
            with con:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    con.execute(_SCHEMA)
                    con.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                elif version != _SCHEMA_VERSION:
                    raise EnsError(f"{self.path}: ledger schema version {version}; this ens reads version "
                                   f"{_SCHEMA_VERSION}")
                else:
                    _add_columns(con)
                yield con
        except sqlite3.DatabaseError as exc:
            raise EnsError(f"{self.path}: not a usable ledger ({exc})") from None
        finally:
            con.close()

    def ensure(self) -> None:
        """Create the ledger, or check that the one there is readable, before a file is written."""
        with self._connect():
            pass

    def record(self, *, file: str, sha256: str, created: str, format: str, rows: int, source: str,
               blend: BlendProvenance | None, filled: int = 0, fill_source: str | None = None) -> Entry:
        """Insert a freshly written file as ``not-uploaded``."""
        values = dict(file=file, sha256=sha256, created=created, format=format, rows=rows, source=source,
                      status="not-uploaded", filled=filled, fill_source=fill_source)
        if blend is not None:
            values.update(blend_method=blend.method, blend_members=json.dumps(list(blend.members)),
                          blend_weights=json.dumps(dict(blend.weights)), cv_top1=blend.cv_top1,
                          cv_top1_low=blend.cv_top1_low, cv_top1_high=blend.cv_top1_high)
        with self._connect() as con:
            cursor = con.execute(f"INSERT INTO submissions ({', '.join(values)}) "
                                 f"VALUES ({', '.join('?' * len(values))})", tuple(values.values()))
            return self._get(con, cursor.lastrowid)

    def get(self, entry_id: int) -> Entry:
        if not self.path.is_file():
            raise EnsError(f"ledger entry {entry_id}: there is no ledger at {self.path}")
        with self._connect() as con:
            return self._get(con, entry_id)

    def entries(self) -> list[Entry]:
        """All rows, oldest first; none when there is no ledger yet."""
        if not self.path.is_file():
            return []
        with self._connect() as con:
            return [_entry(row) for row in con.execute("SELECT * FROM submissions ORDER BY id")]

    def upload_tried(self, entry_id: int, competition: str, message: str, *, kaggle_ref: int | None = None,
                     error: str | None = None) -> Entry:
        """Record an upload's outcome: ``uploaded`` with Kaggle's ref, or ``upload-failed`` with why."""
        if error is None:
            status, uploaded = "uploaded", utc_now()
        else:
            status, uploaded = "upload-failed", None
        with self._connect() as con:
            con.execute("UPDATE submissions SET competition = ?, message = ?, status = ?, error = ?, kaggle_ref = ?, "
                        "uploaded = ? WHERE id = ?", (competition, message, status, error, kaggle_ref, uploaded,
                                                      entry_id))
            return self._get(con, entry_id)

    def store_scores(self, entry_id: int, *, kaggle_ref: int, kaggle_status: str, public_score: float | None,
                     private_score: float | None, error: str | None, uploaded: str | None) -> Entry:
        """Store what Kaggle lists for an entry's submission. Kaggle listing it proves the
        upload happened, so the row becomes ``uploaded`` even if a crash kept it from saying so."""
        with self._connect() as con:
            con.execute("UPDATE submissions SET status = 'uploaded', kaggle_ref = ?, kaggle_status = ?, "
                        "public_score = ?, private_score = ?, error = ?, uploaded = COALESCE(uploaded, ?), "
                        "refreshed = ? WHERE id = ?",
                        (kaggle_ref, kaggle_status, public_score, private_score, error, uploaded, utc_now(),
                         entry_id))
            return self._get(con, entry_id)

    def _get(self, con: sqlite3.Connection, entry_id: int) -> Entry:
        row = con.execute("SELECT * FROM submissions WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            count = con.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
            raise EnsError(f"ledger entry {entry_id}: no such entry in {self.path} ({count} entries)")
        return _entry(row)


def _add_columns(con: sqlite3.Connection) -> None:
    """Add the :data:`_ADDED` columns a ledger written by an older ens lacks."""
    def absent() -> list[str]:
        present = {row["name"] for row in con.execute("PRAGMA table_info(submissions)")}
        return [name for name in _ADDED if name not in present]

    if absent():
        # Take the write lock, then look again: another ens may have migrated in between.
        con.execute("BEGIN IMMEDIATE")
        for name in absent():
            con.execute(f"ALTER TABLE submissions ADD COLUMN {name} {_ADDED[name]}")


def _entry(row: sqlite3.Row) -> Entry:
    values = dict(row)
    for key in ("blend_members", "blend_weights"):
        if values[key] is not None:
            values[key] = json.loads(values[key])
    if values["blend_members"] is not None:
        values["blend_members"] = tuple(values["blend_members"])
    return Entry(**{f.name: values[f.name] for f in dataclasses.fields(Entry)})

