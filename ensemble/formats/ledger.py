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
source              the blend folder (or the hand-made predictions file) the rows came from,
                    as given to `ens submit`; a byte of the path that is not UTF-8 as ``\\xNN``
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
prior_tau           ``tau`` of the blend's long-tail prior correction (``ens blend --prior``);
                    NULL without one
geo_weight          ``beta``, the weight of the blend's geo prior (``ens blend --geo-prior``,
                    given or fitted); NULL without one
geo_file            the training json the geo prior was estimated from, as blend.json
                    records it; NULL without one
geo_sha256          that json's sha256, as blend.json records it; NULL without one
test_sha256         sha256 of the test json of ``--data`` the rows were checked against
test_check          ``verified``: the stores the predictions came from (through the
                    blend.json beside them) were made from that very json; ``unverified``:
                    no such chain could be made (hand-made predictions, stores moved or
                    changed since the blend), which `ens submit` warned of
==================  ====================================================================

Columns added after a ledger was created (``filled``, ``fill_source``, ``prior_tau``,
``test_sha256``, ``test_check``, ``geo_weight``, ``geo_file``, ``geo_sha256``) are added to it,
with their defaults (0 for ``filled``, NULL for the others: not recorded), the first time this ens opens it; ``user_version`` changes only
for changes an older ens could not live with.

Writing a file and inserting its row is one step (:meth:`Ledger.record`): the ledger's write
lock is taken first, waiting at most :data:`LOCK_WAIT` seconds for another process, so a
locked or damaged ledger stops `ens submit` before the file is written; if the file cannot be
written, or its row cannot be inserted or committed (a full disk), the file is removed and the
row rolled back. So there is never a row whose file is missing; only a process killed between
the file and the commit can leave a file without a row. The row is ``not-uploaded`` and only
then is an upload tried, so a crash mid-upload leaves a row that ``--retry`` can finish, never
a file that an upload sent but the ledger does not know.

A ledger is *damaged* when sqlite cannot read it (not a database, malformed), when it lacks
the ``submissions`` table or one of its columns, or when it is a database with other tables
that ens did not make (``user_version`` 0); an empty or new file becomes a ledger. Every value
of a row read is checked (:data:`CHECKS`): a hand edit that left a non-JSON ``blend_members``
or a text where a number belongs is one line naming the row and the column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.blend import BlendSummary
from ensemble.formats.common import check_regular, is_count, is_finite, is_names, is_sha256, parse_json

LEDGER = "ledger.sqlite"
#: Seconds a command waits for another process's lock on the ledger before it gives up.
LOCK_WAIT = 5.0
STATUSES = ("not-uploaded", "uploaded", "upload-failed")
_SCHEMA_VERSION = 1
#: What filled rows hold (``ens submit --missing prior``), as ``fill_source`` records it.
TRAIN_PRIOR, BLEND_PRIOR = "train-prior", "blend-prior"
FILL_SOURCES = (TRAIN_PRIOR, BLEND_PRIOR)
#: Whether the predictions were traced to stores made from the test json checked against, as
#: ``test_check`` records it.
VERIFIED, UNVERIFIED = "verified", "unverified"
TEST_CHECKS = (VERIFIED, UNVERIFIED)
#: Columns added after a ledger was first made: ``ALTER TABLE ... ADD COLUMN`` on open.
_ADDED_COLUMNS = ("filled", "fill_source", "prior_tau", "test_sha256", "test_check", "geo_weight", "geo_file",
                  "geo_sha256")


def _column(sql: str, check: tuple[Callable[[object], object], str], **default: Any) -> Any:
    """An :class:`Entry` field that is a column of the table: its SQL definition, and how a value
    read is checked (and converted: JSON to a tuple or dict, numbers to float) with what it must
    be. NULL is allowed where the definition allows it (neither NOT NULL nor the PRIMARY KEY)."""
    return field(metadata={"sql": sql, "check": check}, **default)


# The value checks: a value -> the converted value, or _INVALID.
_INVALID = object()


def _text(value: object) -> object:
    return value if isinstance(value, str) else _INVALID


def _whole(value: object) -> object:
    return value if is_count(value) else _INVALID


def _number(value: object) -> object:
    return float(value) if is_finite(value) else _INVALID


def _non_negative(value: object) -> object:
    number = _number(value)
    return number if number is not _INVALID and number >= 0 else _INVALID


def _fraction(value: object) -> object:
    number = _number(value)
    return number if number is not _INVALID and 0 <= number <= 1 else _INVALID


def _json(value: object) -> object:
    if not isinstance(value, str):
        return _INVALID
    try:
        return parse_json(value, "")
    except EnsError:
        return _INVALID


def _names(value: object) -> object:
    doc = _json(value)
    return tuple(doc) if is_names(doc) else _INVALID


def _weights(value: object) -> object:
    doc = _json(value)
    if not isinstance(doc, dict):
        return _INVALID
    weights = {name: _number(w) for name, w in doc.items()}
    return _INVALID if _INVALID in weights.values() else weights


def _file_name(value: object) -> object:
    """A plain name: ``--retry`` joins it to the submissions folder, so it must stay inside it."""
    ok = isinstance(value, str) and value not in ("", ".", "..") and not re.search(r"[/\\\x00]", value)
    return value if ok else _INVALID


def _sha256(value: object) -> object:
    return value if is_sha256(value) else _INVALID


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[object], object], str]:
    return (lambda value: value if value in choices else _INVALID), f"one of {', '.join(choices)}"


_TEXT = (_text, "text")
_WHOLE = (_whole, "a whole number >= 0")
_FRACTION = (_fraction, "a number from 0 to 1")
_NUMBER = (_number, "a finite number")


@dataclass(frozen=True)
class Entry:
    """One ledger row (see the module docstring for the fields). Its fields are the table's
    columns, in order: the table's schema and the checks of a row read derive from them."""

    id: int = _column("INTEGER PRIMARY KEY AUTOINCREMENT", _WHOLE)
    file: str = _column("TEXT NOT NULL UNIQUE", (_file_name, "a file name inside the submissions folder"))
    sha256: str = _column("TEXT NOT NULL", (_sha256, "64 hex digits"))
    created: str = _column("TEXT NOT NULL", _TEXT)
    format: str = _column("TEXT NOT NULL", _TEXT)
    rows: int = _column("INTEGER NOT NULL", _WHOLE)
    competition: str | None = _column("TEXT", _TEXT)
    message: str | None = _column("TEXT", _TEXT)
    source: str = _column("TEXT NOT NULL", _TEXT)
    blend_method: str | None = _column("TEXT", _TEXT)
    blend_members: tuple[str, ...] | None = _column("TEXT", (_names, "a JSON list of names"))
    blend_weights: Mapping[str, float] | None = _column("TEXT", (_weights, "a JSON object of member weights"))
    cv_top1: float | None = _column("REAL", _FRACTION)
    cv_top1_low: float | None = _column("REAL", _FRACTION)
    cv_top1_high: float | None = _column("REAL", _FRACTION)
    status: str = _column(f"TEXT NOT NULL CHECK (status IN ({', '.join(repr(s) for s in STATUSES)}))",
                          _one_of(STATUSES))
    error: str | None = _column("TEXT", _TEXT)
    kaggle_ref: int | None = _column("INTEGER", _WHOLE)
    uploaded: str | None = _column("TEXT", _TEXT)
    kaggle_status: str | None = _column("TEXT", _TEXT)
    public_score: float | None = _column("REAL", _NUMBER)
    private_score: float | None = _column("REAL", _NUMBER)
    refreshed: str | None = _column("TEXT", _TEXT)
    filled: int = _column("INTEGER NOT NULL DEFAULT 0", _WHOLE, default=0)
    fill_source: str | None = _column("TEXT", _one_of(FILL_SOURCES), default=None)
    prior_tau: float | None = _column("REAL", _NUMBER, default=None)
    test_sha256: str | None = _column("TEXT", (_sha256, "64 hex digits"), default=None)
    test_check: str | None = _column("TEXT", _one_of(TEST_CHECKS), default=None)
    geo_weight: float | None = _column("REAL", (_non_negative, "a finite number >= 0"), default=None)
    geo_file: str | None = _column("TEXT", _TEXT, default=None)
    geo_sha256: str | None = _column("TEXT", (_sha256, "64 hex digits"), default=None)


def _nullable(sql: str) -> bool:
    return "NOT NULL" not in sql and "PRIMARY KEY" not in sql


#: Every column: its SQL definition, as the table was made.
_COLUMNS = {f.name: f.metadata["sql"] for f in dataclasses.fields(Entry)}
_SCHEMA = ("\nCREATE TABLE IF NOT EXISTS submissions (\n"
           + ",\n".join(f"    {name} {sql}" for name, sql in _COLUMNS.items()) + "\n)\n")
#: Columns younger than the table: name -> definition, added to older ledgers on open.
_ADDED = {name: _COLUMNS[name] for name in _ADDED_COLUMNS}
#: Every column: how its value is checked (and converted), what it must be, and whether NULL is
#: allowed.
CHECKS: dict[str, tuple[Callable[[object], object], str, bool]] = {
    f.name: (*f.metadata["check"], _nullable(f.metadata["sql"])) for f in dataclasses.fields(Entry)}


def as_text(text: str) -> str:
    """``text`` as valid UTF-8 text for the ledger: a path from the OS may hold bytes that are
    not UTF-8 (Python carries them as lone surrogates, which sqlite refuses); each such byte is
    stored as ``\\xNN``, the way ens shows it, and the rest as it is."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def utc_now() -> str:
    """The current UTC time as the ledger writes it."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Ledger:
    """The ledger of one submissions folder; ``<folder>/ledger.sqlite`` is created on first write."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction, committed when the block ends and rolled back if it raises; sqlite's
        errors become one line (:meth:`_failure`). ``write`` takes the write lock first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._exists()
        try:
            con = sqlite3.connect(self.path, timeout=LOCK_WAIT, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        con.row_factory = sqlite3.Row
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            changes = self._schema_changes(con)
            if changes and not write:
                # Take the write lock, then look again: another ens may have made them in between.
                con.execute("ROLLBACK")
                con.execute("BEGIN IMMEDIATE")
                changes = self._schema_changes(con)
            for statement in changes:
                con.execute(statement)
            yield con
            if con.in_transaction:  # the block may have committed itself
                con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        finally:
            con.close()  # without the COMMIT above, this rolls back

    def _exists(self) -> bool:
        """Whether the ledger file exists; an :class:`EnsError` naming it when something other
        than a regular file stands there (a FIFO would leave sqlite waiting or failing with
        "disk I/O error")."""
        if not self.path.exists():
            return False
        try:
            check_regular(self.path)
        except EnsError as exc:
            raise EnsError(f"{exc}; the ledger is the sqlite file ens makes: move it aside to start a new one") \
                from None
        return True

    def _schema_changes(self, con: sqlite3.Connection) -> list[str]:
        """What makes this file a current ledger: the table for a new (empty) file, the
        :data:`_ADDED` columns for an older ledger, nothing for a current one."""
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                  if not row[0].startswith("sqlite_")]
        if version == 0:
            if tables:
                raise self._damaged(f"user_version 0 and the tables {', '.join(tables)}: not made by ens")
            return [_SCHEMA, f"PRAGMA user_version = {_SCHEMA_VERSION}"]
        if version != _SCHEMA_VERSION:
            raise EnsError(f"{self.path}: ledger schema version {version}; this ens reads version {_SCHEMA_VERSION}")
        if "submissions" not in tables:
            raise self._damaged("no submissions table")
        present = {row["name"] for row in con.execute("PRAGMA table_info(submissions)")}
        lost = [name for name in CHECKS if name not in present and name not in _ADDED]
        if lost:
            raise self._damaged(f"the submissions table lacks the column{'s' if len(lost) > 1 else ''} "
                                f"{', '.join(lost)}")
        return [f"ALTER TABLE submissions ADD COLUMN {name} {_ADDED[name]}" for name in _ADDED if name not in present]

    def _failure(self, exc: sqlite3.Error) -> Exception:
        """The one-line error for what sqlite raised: locked, damaged, a full disk (an OSError,
        which the command line words like any other), or anything else."""
        kind = _kind(exc)
        if kind == "locked":
            return EnsError(f"{self.path}: the ledger is locked by another process (still after {LOCK_WAIT:g} s); "
                            "run the command again once it is done (another `ens submit`, or a sqlite client "
                            "holding a transaction open)")
        if kind == "damaged":
            return self._damaged(str(exc))
        if kind == "full":
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return EnsError(f"{self.path}: cannot use the ledger ({exc})")

    def _damaged(self, reason: str) -> EnsError:
        return EnsError(f"{self.path}: the ledger is damaged ({reason}); restore it from a copy, or move it aside "
                        "to start a new one")

    def record(self, write: Callable[[], Path], *, created: str, format: str, rows: int, source: str,
               blend: BlendSummary | None, filled: int = 0, fill_source: str | None = None,
               test_sha256: str | None = None, test_check: str | None = None) -> Entry:
        """Write a file and insert its row as ``not-uploaded``, as one step.

        The write lock is taken first, so a locked or damaged ledger stops before anything is
        written; then ``write()`` writes the file into the folder and returns its path, and the
        row, with the file's sha256, is inserted and committed. If anything fails, the file is
        removed and the row rolled back.
        """
        path, committed = None, False
        try:
            with self._transaction(write=True) as con:
                path = write()
                values = dict(file=path.name, sha256=sha256_file(path), created=created, format=format, rows=rows,
                              source=as_text(source), status="not-uploaded", filled=filled, fill_source=fill_source,
                              test_sha256=test_sha256, test_check=test_check)
                if blend is not None:
                    values.update(blend_method=blend.method, blend_members=json.dumps(list(blend.members)),
                                  blend_weights=json.dumps(dict(blend.weights)), cv_top1=blend.cv_top1,
                                  cv_top1_low=blend.cv_top1_low, cv_top1_high=blend.cv_top1_high,
                                  prior_tau=blend.prior_tau, geo_weight=blend.geo_weight,
                                  geo_file=None if blend.geo_file is None else as_text(blend.geo_file),
                                  geo_sha256=blend.geo_sha256)
                cursor = con.execute(f"INSERT INTO submissions ({', '.join(values)}) "
                                     f"VALUES ({', '.join('?' * len(values))})", tuple(values.values()))
                entry = self._get(con, cursor.lastrowid)
                con.execute("COMMIT")
                committed = True
        except BaseException:
            if path is not None and not committed:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return entry

    def get(self, entry_id: int) -> Entry:
        if not self._exists():
            raise EnsError(f"ledger entry {entry_id}: there is no ledger at {self.path}")
        with self._transaction(write=False) as con:
            return self._get(con, entry_id)

    def entries(self) -> list[Entry]:
        """All rows, oldest first; none when there is no ledger yet."""
        if not self._exists():
            return []
        with self._transaction(write=False) as con:
            return [self._entry(row) for row in con.execute("SELECT * FROM submissions ORDER BY id")]

    def upload_tried(self, entry_id: int, competition: str, message: str, *, kaggle_ref: int | None = None,
                     error: str | None = None) -> Entry:
        """Record an upload's outcome: ``uploaded`` with Kaggle's ref, or ``upload-failed`` with why."""
        if error is None:
            status, uploaded = "uploaded", utc_now()
        else:
            status, uploaded = "upload-failed", None
        with self._transaction(write=True) as con:
            con.execute("UPDATE submissions SET competition = ?, message = ?, status = ?, error = ?, kaggle_ref = ?, "
                        "uploaded = ? WHERE id = ?", (as_text(competition), as_text(message), status,
                                                      None if error is None else as_text(error), kaggle_ref,
                                                      uploaded, entry_id))
            return self._get(con, entry_id)

    def store_scores(self, entry_id: int, *, kaggle_ref: int, kaggle_status: str, public_score: float | None,
                     private_score: float | None, error: str | None, uploaded: str | None) -> Entry:
        """Store what Kaggle lists for an entry's submission. Kaggle listing it proves the
        upload happened, so the row becomes ``uploaded`` even if a crash kept it from saying so."""
        with self._transaction(write=True) as con:
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
        return self._entry(row)

    def _entry(self, row: sqlite3.Row) -> Entry:
        """The row as an :class:`Entry`, every value checked against :data:`CHECKS`."""
        values = dict(row)
        fields: dict[str, Any] = {}
        for column, (convert, what, nullable) in CHECKS.items():
            value = values[column]
            if value is None and nullable:
                fields[column] = None
                continue
            fields[column] = _INVALID if value is None else convert(value)
            if fields[column] is _INVALID:
                raise self._bad_value(values, column, what + (" or NULL" if nullable else ""))
        for column in ("cv_top1_low", "cv_top1_high"):  # the table shows the interval with the estimate
            if fields["cv_top1"] is not None and fields[column] is None:
                raise self._bad_value(values, column, f"{CHECKS[column][1]} (cv_top1 is set)")
        return Entry(**fields)

    def _bad_value(self, values: dict, column: str, what: str) -> EnsError:
        value = values[column]
        shown = "NULL" if value is None else repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        return EnsError(f"{self.path}: ledger entry {values['id']}: {column} {shown} is not {what}; correct the row "
                        "with a sqlite client")


#: sqlite's primary result codes that mean something to the user, and (for Python 3.10, whose
#: exceptions carry no code) the words of their messages.
_KINDS = {5: "locked", 6: "locked", 11: "damaged", 26: "damaged", 13: "full"}
_KIND_WORDS = {"is locked": "locked", "malformed": "damaged", "not a database": "damaged", "is full": "full"}


def _kind(exc: sqlite3.Error) -> str | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return _KINDS.get(code & 0xFF)
    return next((kind for words, kind in _KIND_WORDS.items() if words in str(exc)), None)
