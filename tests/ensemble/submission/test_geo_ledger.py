"""`ens submit` and the ledger show the blend's geo prior (issue 26): its weight beta and the
training json it came from (name and sha256), as they show the long-tail prior's tau; a ledger
written before the geo columns existed still reads, and gains them."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.fileio import sha256_file
from ensemble.formats.blend import BlendSummary
from ensemble.formats.ledger import Ledger

from tests.ensemble.conftest import ens as ens_process
from tests.ensemble.conftest import make_inat, ok, tiny_onnx
from tests.ensemble.submission.submit_data import BLEND, ledger_columns, make_blend, make_data, write_old_ledger

runner = CliRunner()
SHA = "3a04d814be56" + "0" * 52
GEO = {"file": "data/train.json", "sha256": SHA, "used": 2_686_843, "skipped": {"no_place": 12},
       "settings": {"k": 64, "alpha": 16.0, "time_scale": 100.0, "radius_km": 1000.0, "max_uncertainty_m": 100000.0},
       "weight": "auto", "beta": 0.8125, "no_place": {"val": 3, "test": 2}}


def ens(*args):
    return runner.invoke(app, [str(a) for a in args])


def with_geo(geo=GEO, prior=None) -> dict:
    blend = copy.deepcopy(BLEND)
    blend["geo"] = geo
    if prior is not None:
        blend["prior"] = prior
    return blend


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path / "data")
    make_blend(tmp_path / "blends" / "geo", blend=with_geo(prior={"tau": 0.5}))
    make_blend(tmp_path / "blends" / "plain")
    return tmp_path


def test_submit_records_and_shows_the_geo_prior(work):
    result = ens("submit", "blends/geo", "--data", "data", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "geo prior: weight 0.812, train.json 3a04d814" in result.stdout.splitlines()
    entry, = Ledger("submissions").entries()
    assert (entry.geo_weight, entry.geo_file, entry.geo_sha256, entry.prior_tau) == (0.8125, "data/train.json", SHA,
                                                                                    0.5)
    plain = ens("submit", "blends/plain", "--data", "data", "--dry-run", "--name", "plain")
    assert plain.exit_code == 0 and "geo prior" not in plain.stdout
    _, none = Ledger("submissions").entries()
    assert (none.geo_weight, none.geo_file, none.geo_sha256) == (None, None, None)

    table = ens("submissions").stdout.splitlines()
    header = table[0].split()
    assert header[header.index("tau") + 1] == "geo"
    start = table[0].index("geo")
    assert table[1][start:].split()[:3] == ["0.812", "train.json", "3a04d814"]
    assert table[2][start:start + 5].strip() == ""  # blank without a geo prior
    assert table[1][table[0].index("tau"):].split()[0] == "0.500"


def test_a_blend_json_with_a_broken_geo_record_is_one_line(work):
    for key, value, what in (("beta", "strong", "'beta' missing or not a number >= 0"),
                             ("beta", -1, "'beta' missing or not a number >= 0"),
                             ("sha256", "abc", "'sha256' missing or not a sha256"),
                             ("file", None, "'file' missing or not a string")):
        make_blend(work / "blends" / "bad", blend=with_geo({**GEO, key: value}))
        result = ens("submit", "blends/bad", "--data", "data", "--dry-run")
        assert result.exit_code == 2 and result.stderr.startswith("error: blends/bad/blend.json: geo.") \
            and what in result.stderr and len(result.stderr.splitlines()) == 1, result.output
    assert not Path("submissions/ledger.sqlite").exists() or Ledger("submissions").entries() == []


#: The table as the ledgers of ens before the geo prior made it (every column up to test_check).
BEFORE_GEO = """
CREATE TABLE submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, file TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, created TEXT NOT NULL,
    format TEXT NOT NULL, rows INTEGER NOT NULL, competition TEXT, message TEXT, source TEXT NOT NULL,
    blend_method TEXT, blend_members TEXT, blend_weights TEXT, cv_top1 REAL, cv_top1_low REAL, cv_top1_high REAL,
    status TEXT NOT NULL CHECK (status IN ('not-uploaded', 'uploaded', 'upload-failed')), error TEXT,
    kaggle_ref INTEGER, uploaded TEXT, kaggle_status TEXT, public_score REAL, private_score REAL, refreshed TEXT,
    filled INTEGER NOT NULL DEFAULT 0, fill_source TEXT, prior_tau REAL, test_sha256 TEXT, test_check TEXT
)
"""


def test_a_ledger_written_before_the_geo_prior_reads_and_gains_its_columns(work):
    write_old_ledger(BEFORE_GEO, {"file": "old.csv", "sha256": "ab" * 32, "created": "2026-01-30T10:00:00Z",
                                  "format": "inat2021", "rows": 6, "source": "blends/old", "status": "not-uploaded",
                                  "prior_tau": 0.75})
    old, = Ledger("submissions").entries()
    assert (old.file, old.prior_tau, old.geo_weight, old.geo_file, old.geo_sha256) == ("old.csv", 0.75, None, None,
                                                                                      None)
    table = ens("submissions")
    assert table.exit_code == 0, table.output
    assert ens("submit", "blends/geo", "--data", "data", "--dry-run").exit_code == 0
    old, new = Ledger("submissions").entries()
    assert old.geo_weight is None and (new.geo_weight, new.geo_sha256) == (0.8125, SHA)
    columns, version = ledger_columns()
    assert columns[-3:] == ["geo_weight", "geo_file", "geo_sha256"] and columns.count("geo_weight") == 1
    assert version == 1


def test_a_hand_edited_geo_value_is_one_line_naming_the_row(work):
    assert ens("submit", "blends/geo", "--data", "data", "--dry-run").exit_code == 0
    with sqlite3.connect("submissions/ledger.sqlite") as con:
        con.execute("UPDATE submissions SET geo_weight = -0.5 WHERE id = 1")
    con.close()
    result = ens("submissions")
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: submissions/ledger.sqlite: ledger entry 1: geo_weight -0.5 is not a finite number >= 0 or NULL; "
        "correct the row with a sqlite client")


def test_the_summary_reads_the_geo_record_of_blend_json(tmp_path):
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(with_geo()))
    summary = BlendSummary.read(path)
    assert (summary.geo_weight, summary.geo_file, summary.geo_sha256) == (0.8125, "data/train.json", SHA)
    path.write_text(json.dumps(BLEND))
    assert BlendSummary.read(path).geo_weight is None


def test_a_real_blend_with_the_geo_prior_is_recorded_end_to_end(tmp_path, monkeypatch):
    """ens infer, ens blend --geo-prior, ens submit: the ledger holds blend.json's beta and the
    training json's name and sha256."""
    monkeypatch.chdir(tmp_path)
    data = make_inat(tmp_path / "data", n_val=20, n_test=6, categories=3)
    for split in ("val", "test"):
        doc = json.loads((data / f"{split}2019.json").read_text())
        for i, image in enumerate(doc["images"]):
            image["latitude"], image["longitude"] = (10.0 * (i % 3), 20.0 * (i % 3))
        (data / f"{split}2019.json").write_text(json.dumps(doc))
    images = [{"id": 100 + i, "file_name": f"t{i}.jpg", "latitude": 10.0 * (i % 3) + 0.1, "longitude": 20.0 * (i % 3)}
              for i in range(30)]
    annotations = [{"id": i, "image_id": 100 + i, "category_id": i % 3} for i in range(30)]
    (data / "train2019.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": [{"id": c} for c in range(3)]}))
    model = tiny_onnx(tmp_path / "m.onnx", classes=3)
    ok(ens_process("infer", model, "--data", data, "--split", "val,test", "--workers", 0, "--out", "runs"))
    ok(ens_process("blend", "--optimize", "val", "--cv", 2, "--data", data, "--geo-prior", data / "train2019.json",
                   "--out", "blends/geo"))
    record = json.loads(Path("blends/geo/blend.json").read_text())
    result = ens("submit", "blends/geo", "--data", data, "--dry-run")
    assert result.exit_code == 0, result.output
    sha = sha256_file(data / "train2019.json")
    assert f"geo prior: weight {record['geo']['beta']:.3f}, train2019.json {sha[:8]}" in result.stdout
    entry, = Ledger("submissions").entries()
    assert (entry.geo_weight, entry.geo_file, entry.geo_sha256, entry.test_check) == (
        record["geo"]["beta"], record["geo"]["file"], sha, "verified")
