"""Files and ledger stay consistent (issue 11): races on a file name, a locked, damaged or
full ledger, a full disk, hand-edited ledger rows. Each failure is one line, and what it
leaves behind is either a file with its ledger row or neither."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.errors import EnsError
from ensemble import fileio
from ensemble.fileio import sha256_file
from ensemble.submission import kaggle_csv
from ensemble.formats import ledger as ledger_module
from ensemble.submission import submit as submit_module
from ensemble.formats.ledger import Ledger
from ensemble.submission.submit import SubmitOptions, submit

from tests.ensemble.submission.submit_data import BLEND, TEST_IDS, make_blend, make_data, ranked

runner = CliRunner()
WHEN = dt.datetime(2019, 5, 31, 14, 25, 1, tzinfo=dt.timezone.utc)
LEDGER = Path("submissions") / "ledger.sqlite"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    make_blend(tmp_path / "blends" / "greedy")
    monkeypatch.setattr(submit_module, "_now", lambda: WHEN, raising=False)
    return tmp_path


def listing() -> list[str]:
    """Everything in submissions/, hidden files included."""
    return sorted(p.name for p in Path("submissions").iterdir())


def sql(path: Path, *statements: str) -> None:
    """Run ``statements`` on the sqlite file at ``path`` as a sqlite client would, and close it."""
    con = sqlite3.connect(path)
    try:
        with con:
            for statement in statements:
                con.execute(statement)
    finally:
        con.close()


def one_line(result, expected: str):
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {expected}\n"


# ------------------------------------------------------------------------- 1. one name, one file

def test_two_runs_in_the_same_second_keep_both_files(work, monkeypatch):
    """Both runs pick their name before either writes (the barrier holds each until the other
    has got that far); both files survive with their own bytes and their own ledger rows."""
    make_blend(work / "a" / "x", ranked(seed=1))
    make_blend(work / "b" / "x", ranked(seed=2))
    barrier = threading.Barrier(2, timeout=60)
    real_render = kaggle_csv.render

    def render(submission):
        barrier.wait()
        return real_render(submission)

    monkeypatch.setattr(kaggle_csv, "render", render)
    results, errors = {}, []

    def run(blend):
        try:
            results[blend] = submit(blend, "data", SubmitOptions(name="same"))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(blend,)) for blend in ("a/x", "b/x")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.path.name for r in results.values()) == ["20190531T142501Z_same-2.csv",
                                                             "20190531T142501Z_same.csv"]
    for blend, seed in (("a/x", 1), ("b/x", 2)):
        path = results[blend].path
        rows = ranked(seed=seed)
        assert path.read_text() == "id,predicted\n" + "".join(f"{i},{' '.join(map(str, rows[i]))}\n"
                                                              for i in sorted(TEST_IDS))
    entries = Ledger("submissions").entries()
    assert sorted(e.source for e in entries) == ["a/x", "b/x"]
    for entry in entries:
        assert entry.sha256 == sha256_file(Path("submissions") / entry.file)
    assert listing() == sorted([LEDGER.name, *(r.path.name for r in results.values())])


def test_write_new_never_replaces_a_file(tmp_path, monkeypatch):
    """Eight writers race for one name, all of them past the point of choosing it: each gets its
    own file (``-2`` ... ``-8``), with its own bytes, and no temporary file is left."""
    writers = 8
    barrier = threading.Barrier(writers, timeout=60)
    real_link = os.link
    waited = threading.local()

    def link_once(src, dst, *args, **kwargs):
        if not getattr(waited, "done", False):  # each writer's first try waits for all the others
            waited.done = True
            barrier.wait()
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link_once)
    path = tmp_path / "20190531T142501Z_same.csv"
    written, errors = {}, []

    def run(n):
        try:
            written[n] = fileio.write_new(path, f"writer {n}\n".encode())
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = ["20190531T142501Z_same.csv"] + [f"20190531T142501Z_same-{k}.csv" for k in range(2, writers + 1)]
    assert sorted(p.name for p in written.values()) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for n, written_path in written.items():
        assert written_path.read_bytes() == f"writer {n}\n".encode()


def test_write_new_without_hard_links(tmp_path, monkeypatch):
    """A file system without hard links (FAT, some network mounts): the name is claimed with an
    exclusive create instead, and the bytes moved onto it."""
    def link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)
    path = tmp_path / "x.csv.gz"
    path.write_bytes(b"first")
    assert fileio.write_new(path, b"second") == tmp_path / "x-2.csv.gz"
    assert fileio.write_new(path, b"third") == tmp_path / "x-3.csv.gz"
    assert [p.read_bytes() for p in sorted(tmp_path.iterdir())] == [b"second", b"third", b"first"]


# --------------------------------------------------------- 2. a ledger that cannot take the row

def test_a_locked_ledger_stops_before_the_file_is_written(work, monkeypatch):
    first = submit("blends/greedy", "data", SubmitOptions()).path
    monkeypatch.setattr(ledger_module, "LOCK_WAIT", 0.05)
    holder = sqlite3.connect(LEDGER, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(EnsError) as info:
            submit("blends/greedy", "data", SubmitOptions())
        assert str(info.value) == (
            "submissions/ledger.sqlite: the ledger is locked by another process (still after 0.05 s); run the "
            "command again once it is done (another `ens submit`, or a sqlite client holding a transaction open)")
        assert listing() == [first.name, LEDGER.name]
        result = runner.invoke(app, ["submissions"])
        one_line(result, str(info.value))
    finally:
        holder.close()
    assert [e.file for e in Ledger("submissions").entries()] == [first.name]


DAMAGED = "; restore it from a copy, or move it aside to start a new one"


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 16)


def _malformed(path: Path) -> None:
    """A real ledger whose table pages were overwritten (page 1, the schema, stays readable)."""
    submit("blends/greedy", "data", SubmitOptions())
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xff" * (len(data) - page)
    path.write_bytes(bytes(data))


def _dropped(path: Path) -> None:
    submit("blends/greedy", "data", SubmitOptions())
    sql(path, "DROP TABLE submissions")


def _foreign(path: Path) -> None:
    sql(path, "CREATE TABLE notes (text TEXT)")


def _lost_column(path: Path) -> None:
    submit("blends/greedy", "data", SubmitOptions())
    sql(path, "ALTER TABLE submissions DROP COLUMN sha256")


@pytest.mark.parametrize("damage, reason", [
    (_garbage, "file is not a database"),
    (_malformed, "database disk image is malformed"),
    (_dropped, "no submissions table"),
    (_foreign, "user_version 0 and the tables notes: not made by ens"),
    (_lost_column, "the submissions table lacks the column sha256"),
])
def test_a_damaged_ledger_stops_before_the_file_is_written(work, damage, reason):
    (work / "submissions").mkdir()
    damage(work / LEDGER)
    before = listing()
    with pytest.raises(EnsError) as info:
        submit("blends/greedy", "data", SubmitOptions())
    assert str(info.value) == f"submissions/ledger.sqlite: the ledger is damaged ({reason}){DAMAGED}"
    assert listing() == before
    one_line(runner.invoke(app, ["submissions"]), str(info.value))


def test_an_empty_ledger_file_is_a_new_ledger(work):
    """A zero-byte file (``touch``) holds no tables: it becomes the ledger, unlike a foreign database."""
    (work / "submissions").mkdir()
    (work / LEDGER).touch()
    assert submit("blends/greedy", "data", SubmitOptions()).entry.id == 1
    (work / LEDGER).unlink()
    _foreign(work / LEDGER)
    with pytest.raises(EnsError, match="the ledger is damaged"):
        submit("blends/greedy", "data", SubmitOptions())


# ------------------------------------------------------------------------------- 4. a full disk

def test_a_full_disk_while_writing_the_file(work, monkeypatch):
    submit("blends/greedy", "data", SubmitOptions(name="kept"))

    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as info:
        submit("blends/greedy", "data", SubmitOptions())
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, "submissions/20190531T142501Z_greedy.csv")
    assert listing() == ["20190531T142501Z_kept.csv", LEDGER.name]
    assert [e.file for e in Ledger("submissions").entries()] == ["20190531T142501Z_kept.csv"]

    result = runner.invoke(app, ["submit", "blends/greedy", "--data", "data", "--dry-run"])
    one_line(result, "submissions/20190531T142501Z_greedy.csv: No space left on device; the disk is full: free "
                     "space and run the same command again (finished work is kept)")
    assert listing() == ["20190531T142501Z_kept.csv", LEDGER.name]


def test_a_full_disk_while_recording_removes_the_file(work, monkeypatch):
    """The ledger cannot grow (sqlite's own "database or disk is full", made real by capping its
    page count) after the file was written: the file goes, no row stays."""
    submit("blends/greedy", "data", SubmitOptions(name="kept"))
    members = [f"member_{i:04d}_{'x' * 40}" for i in range(400)]  # a row larger than a page
    (work / "blends" / "greedy" / "blend.json").write_text(json.dumps(dict(BLEND, members=members)))
    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        con = real_connect(*args, **kwargs)
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {pages}")
        return con

    written = []
    monkeypatch.setattr(submit_module, "write_new", lambda *args: written.append(fileio.write_new(*args)) or written[-1])
    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(OSError) as info:
        submit("blends/greedy", "data", SubmitOptions())
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, "submissions/ledger.sqlite")
    assert [p.name for p in written] == ["20190531T142501Z_greedy.csv"]  # it was written, then removed
    assert listing() == ["20190531T142501Z_kept.csv", LEDGER.name]
    result = runner.invoke(app, ["submit", "blends/greedy", "--data", "data", "--dry-run"])
    one_line(result, "submissions/ledger.sqlite: No space left on device; the disk is full: free space and run "
                     "the same command again (finished work is kept)")
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    assert [e.file for e in Ledger("submissions").entries()] == ["20190531T142501Z_kept.csv"]
    assert listing() == ["20190531T142501Z_kept.csv", LEDGER.name]


# ------------------------------------------------------------------ 3. hand-edited ledger rows

NAMES, WEIGHTS = "a JSON list of names or NULL", "a JSON object of member weights or NULL"


@pytest.mark.parametrize("column, value, shown, what", [
    ("blend_members", "resnet50, inception_v3", "'resnet50, inception_v3'", NAMES),
    ("blend_members", '{"a": 1}', """'{"a": 1}'""", NAMES),
    ("blend_members", "x" * 100, "'" + "x" * 36 + "...", NAMES),  # long values are cut
    ("blend_weights", "[0.5, 0.5]", "'[0.5, 0.5]'", WEIGHTS),
    ("blend_weights", '{"a": "half"}', """'{"a": "half"}'""", WEIGHTS),
    ("rows", "many", "'many'", "a whole number >= 0"),
    ("rows", -3, "-3", "a whole number >= 0"),
    ("filled", 1.5, "1.5", "a whole number >= 0"),
    ("kaggle_ref", "abc", "'abc'", "a whole number >= 0 or NULL"),
    ("cv_top1", "high", "'high'", "a number from 0 to 1 or NULL"),
    ("cv_top1_low", None, "NULL", "a number from 0 to 1 (cv_top1 is set)"),
    ("cv_top1_high", 7.5, "7.5", "a number from 0 to 1 or NULL"),
    ("public_score", "n/a", "'n/a'", "a finite number or NULL"),
    ("private_score", float("inf"), "inf", "a finite number or NULL"),
    ("status", "done", "'done'", "one of not-uploaded, uploaded, upload-failed"),
    ("fill_source", "guess", "'guess'", "one of train-prior, blend-prior or NULL"),
    ("prior_tau", "strong", "'strong'", "a finite number or NULL"),
    ("prior_tau", float("-inf"), "-inf", "a finite number or NULL"),
    ("sha256", "abc", "'abc'", "64 hex digits"),
    ("file", "../../etc/passwd", "'../../etc/passwd'", "a file name inside the submissions folder"),
    ("message", b"\x00\x01", "b'\\x00\\x01'", "text or NULL"),
])
def test_a_malformed_ledger_value_is_one_line(work, column, value, shown, what):
    submit("blends/greedy", "data", SubmitOptions())
    submit("blends/greedy", "data", SubmitOptions())
    with sqlite3.connect(LEDGER) as con:
        con.execute("PRAGMA ignore_check_constraints = ON")  # as a sqlite client can, for the status CHECK
        con.execute(f"UPDATE submissions SET {column} = ? WHERE id = 2", (value,))
    con.close()
    message = (f"submissions/ledger.sqlite: ledger entry 2: {column} {shown} is not {what}; correct the row with a "
               "sqlite client")
    with pytest.raises(EnsError) as info:
        Ledger("submissions").entries()
    assert str(info.value) == message
    one_line(runner.invoke(app, ["submissions"]), message)
    assert Ledger("submissions").get(1).id == 1  # the other rows stay readable one by one


#: One value per column that its check must refuse (sqlite stores each as given: a blob stays a
#: blob in a TEXT column, a text that is not a number stays text in an INTEGER or REAL one).
BAD_VALUES = {
    "id": -1, "file": "../x.csv", "sha256": "ABC", "created": b"\x00", "format": b"\x01", "rows": "many",
    "competition": b"\x02", "message": b"\x03", "source": b"\x04", "blend_method": b"\x05",
    "blend_members": '{"a": 1}', "blend_weights": "[0.5]", "cv_top1": 1.5, "cv_top1_low": -0.5,
    "cv_top1_high": "high", "status": "done", "error": b"\x06", "kaggle_ref": 2.5, "uploaded": b"\x07",
    "kaggle_status": b"\x08", "public_score": "n/a", "private_score": float("inf"), "refreshed": b"\x09",
    "filled": -2, "fill_source": "guess", "prior_tau": "strong", "test_sha256": "XYZ",
    "test_check": "maybe", "geo_weight": -0.5, "geo_file": b"\x0a", "geo_sha256": "abc",
}


def test_every_column_is_checked(tmp_path):
    """Each column's check refuses a bad value, and the refusal names the column (a new column
    must get a check, and a bad value here)."""
    assert set(BAD_VALUES) == set(ledger_module.CHECKS) == {f.name for f in dataclasses.fields(ledger_module.Entry)}
    book = Ledger(tmp_path)

    def write():
        (tmp_path / "a.csv").write_text("x")
        return tmp_path / "a.csv"

    good = book.record(write, created="2026-01-01T00:00:00Z", format="inat2019", rows=1, source="s", blend=None)
    with sqlite3.connect(book.path) as con:
        row = dict(zip((d[0] for d in con.execute("SELECT * FROM submissions").description),
                       con.execute("SELECT * FROM submissions").fetchone()))
    con.close()

    def set_value(column, value):  # the table holds one row
        con = sqlite3.connect(book.path)
        try:
            with con:
                con.execute("PRAGMA ignore_check_constraints = ON")  # for the status CHECK
                con.execute(f"UPDATE submissions SET {column} = ?", (value,))
        finally:
            con.close()

    for column, value in BAD_VALUES.items():
        set_value(column, value)
        with pytest.raises(EnsError) as info:
            book.entries()
        entry = value if column == "id" else 1
        assert str(info.value).startswith(f"{book.path}: ledger entry {entry}: {column} {value!r} is not "), column
        set_value(column, row[column])
        assert book.entries() == [good], column
