"""The ledger's columns are listed once, as :class:`ensemble.formats.ledger.Entry`'s fields: the
table's schema, the columns added to older ledgers and the checks of a row read all derive from
them. The schema must stay the text every existing ledger was made with."""

from __future__ import annotations

import dataclasses
import sqlite3

from ensemble.formats import ledger

#: The table as every ledger so far was made (sqlite keeps this text in sqlite_master).
SCHEMA = """
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
    fill_source TEXT,
    prior_tau REAL,
    test_sha256 TEXT,
    test_check TEXT,
    geo_weight REAL,
    geo_file TEXT,
    geo_sha256 TEXT
)
"""


def test_the_schema_is_the_one_ledgers_were_made_with():
    assert ledger._SCHEMA == SCHEMA
    assert ledger._ADDED == {"filled": "INTEGER NOT NULL DEFAULT 0", "fill_source": "TEXT", "prior_tau": "REAL",
                             "test_sha256": "TEXT", "test_check": "TEXT", "geo_weight": "REAL", "geo_file": "TEXT",
                             "geo_sha256": "TEXT"}


def test_the_columns_are_the_entry_fields_in_order(tmp_path):
    names = [f.name for f in dataclasses.fields(ledger.Entry)]
    assert list(ledger.CHECKS) == names and len(names) == 31

    def write():
        (tmp_path / "a.csv").write_text("x")
        return tmp_path / "a.csv"

    entry = ledger.Ledger(tmp_path).record(write, created="2026-01-01T00:00:00Z", format="inat2019", rows=1,
                                           source="s", blend=None)
    assert (entry.id, entry.filled, entry.status) == (1, 0, "not-uploaded")
    with sqlite3.connect(tmp_path / ledger.LEDGER) as con:
        assert [row[1] for row in con.execute("PRAGMA table_info(submissions)")] == names
    con.close()


def test_null_is_allowed_where_the_column_definition_allows_it():
    nullable = {name for name, (_, _, allowed) in ledger.CHECKS.items() if allowed}
    assert nullable == {"competition", "message", "blend_method", "blend_members", "blend_weights", "cv_top1",
                        "cv_top1_low", "cv_top1_high", "error", "kaggle_ref", "uploaded", "kaggle_status",
                        "public_score", "private_score", "refreshed", "fill_source", "prior_tau", "test_sha256",
                        "test_check", "geo_weight", "geo_file", "geo_sha256"}
