"""`ens blend` in bounded memory (issue 24): --memory sets the row blocks, not the results; the
peak resident memory stays far below what stacking the members would cost; bad --memory and
ENS_MEMORY values are one line; a disk without room for predictions.csv and blend.json is
refused before the fit.

The stores are 10,000-class float16 stores written through the real store writer, with
synthetic members: a true class per row, a signal of varied strength per member, noise shared
by the members and noise of each member's own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.blend import run as blend_run
from ensemble.blend.stores import BlendSplit, PassDigests
from ensemble.errors import EnsError
from ensemble.formats.blend import store_digest
from ensemble.formats.store import DatasetRecord, StoreWriter, read_store
from ensemble.memory import GIB, rows_per_block
from tests.ensemble.conftest import ens, ok, one_line_error
from tests.ensemble.formats.test_members import _store
from tests.ensemble.inference.test_store import BASE, KEY
from tests.rss import measure

CLASSES = 10_000
MODELS = ("a", "b", "c")


def _logits(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """One ``(rows, CLASSES)`` float32 array per model: correlated members of varied accuracy."""
    rng = np.random.default_rng(seed)
    rows = labels.size
    shared = rng.normal(size=(rows, CLASSES)).astype(np.float32)
    out = []
    for m, signal in enumerate((4.0, 3.0, 2.0)):
        member = rng.normal(size=(rows, CLASSES)).astype(np.float32) * (1.0 + 0.3 * m)
        member += shared
        member[np.arange(rows), labels] += signal
        out.append(member)
    return out


def _write_store(folder: Path, split: str, logits: np.ndarray, ids: np.ndarray) -> None:
    rows = ids.size
    manifest = dataclasses.replace(BASE, dataset=DatasetRecord(split, f"{split}.json", "d" * 64, rows),
                                   tta=dataclasses.replace(BASE.tta, views=("identity",)))
    writer = StoreWriter(folder, {**KEY, "dtype": "float16"}, rows=rows, chunk_size=rows)
    writer.open(manifest)
    writer.write_chunk(0, logits, np.ones(rows, bool))
    writer.finish(tuple(ids.tolist()), tuple(f"{i}.jpg" for i in ids.tolist()), manifest)


def _random_stores(root: Path, names, rows: int, classes: int, *, seed: int, scale: float):
    """A float16 val store of ``rows`` x ``classes`` normal logits times ``scale`` in ``root / name``
    for each name; the stores read back and each one's logits as float32 (rounded to float16, as stored)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(rows)
    stores, logits = [], []
    for name in names:
        x = rng.normal(size=(rows, classes)).astype(np.float32) * scale
        _write_store(root / name, "val", x, ids)
        stores.append(read_store(root / name))
        logits.append(x.astype(np.float16).astype(np.float32))
    return stores, logits


def _write_labels(data: Path, ids: np.ndarray, labels: np.ndarray) -> None:
    data.mkdir(parents=True, exist_ok=True)
    doc = {"images": [{"id": int(i), "file_name": f"{i}.jpg"} for i in ids],
           "annotations": [{"id": int(i), "image_id": int(i), "category_id": int(c)} for i, c in zip(ids, labels)],
           "categories": [{"id": c, "name": f"c{c}"} for c in range(CLASSES)]}
    (data / "val2019.json").write_text(json.dumps(doc))


def _make(root: Path, splits: dict[str, int], seed: int = 0) -> tuple[Path, Path]:
    """``runs`` and ``data`` under ``root``: stores of every model for each split of ``splits``
    (name: rows), labels for val."""
    rng = np.random.default_rng(seed)
    runs, data = root / "runs", root / "data"
    for s, (split, rows) in enumerate(splits.items()):
        ids = np.arange(1000 * (s + 1), 1000 * (s + 1) + rows)
        labels = rng.integers(0, CLASSES, rows)
        for model, logits in zip(MODELS, _logits(labels, seed + s)):
            _write_store(runs / model / split, split, logits, ids)
        if split == "val":
            _write_labels(data, ids, labels)
    return runs, data


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """800 val rows and 1,500 test rows of three 10,000-class models (float16: 126 MB)."""
    return _make(tmp_path_factory.mktemp("wide"), {"val": 800, "test": 1500})


def _peak_rss_mb(command) -> int:
    done = measure(command)
    assert done.returncode == 0, done.stderr
    return done.peak_mb


def _blend(runs: Path, data: Path, out: Path, *args):
    return ok(ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out, *args))


# --------------------------------------------------------------------- --memory: blocks only

@pytest.mark.parametrize("method", ["nll", "greedy"])
def test_a_small_budget_gives_the_same_blend_and_predictions_as_a_large_one(stores, tmp_path, monkeypatch, method):
    """--memory 0.25 reads 10,000-class blocks of a few hundred rows (the fit's 800 rows in
    two or more, the test's 1,500 in three or more); --memory 8 reads each split in one block:
    the same blend.json weights, CV table and predictions.csv, byte for byte."""
    runs, data = stores
    fit_rows, fuse_rows = (rows_per_block(GIB // 4, 3, CLASSES, copies)
                           for copies in (blend_run.FIT_COPIES, blend_run.FUSE_COPIES))
    assert fit_rows < 800 and fuse_rows < 750
    rows_seen: list[int] = []
    real = blend_run.Members.convert  # every block the passes read (as stored) is converted once

    def spy(self, raw):
        block = real(self, raw)
        rows_seen.append(block.shape[1])
        return block

    monkeypatch.setattr(blend_run.Members, "convert", spy)
    small, large = tmp_path / "small", tmp_path / "large"
    _blend(runs, data, small, "--memory", "0.25", "--method", method)
    assert set(rows_seen) == {fit_rows, 800 % fit_rows, fuse_rows, 1500 % fuse_rows}, rows_seen
    rows_seen.clear()
    _blend(runs, data, large, "--memory", "8", "--method", method)
    assert set(rows_seen) == {800, 1500}, rows_seen
    a, b = (json.loads((o / "blend.json").read_text()) for o in (small, large))
    assert a["weights"] == pytest.approx(b["weights"], abs=1e-9, rel=1e-9)
    assert a["cv"] == b["cv"]
    assert (small / "predictions.csv").read_bytes() == (large / "predictions.csv").read_bytes()
    assert a["apply"]["rows"] == 1500


def test_the_environment_sets_the_budget_when_the_option_is_left_out(stores, tmp_path, monkeypatch):
    runs, data = stores
    seen: list[int] = []
    real = blend_run._block_rows
    monkeypatch.setattr(blend_run, "_block_rows",
                        lambda budget, *args: seen.append(budget) or real(budget, *args))
    monkeypatch.setenv("ENS_MEMORY", "0.5")
    _blend(runs, data, tmp_path / "env", "--cv", "2")
    assert set(seen) == {1 << 29}
    seen.clear()
    _blend(runs, data, tmp_path / "option", "--cv", "2", "--memory", "0.25")  # the option wins
    assert set(seen) == {1 << 28}


@pytest.mark.parametrize("value, message", [
    ("abc", "--memory abc: expected a number of GiB, e.g. 3 or 0.5"),
    ("0.1", "--memory 0.1: give at least 0.25 GiB"),
    ("nan", "--memory nan: expected a finite number of GiB"),
])
def test_a_bad_memory_is_one_line_and_writes_nothing(stores, tmp_path, value, message):
    runs, data = stores
    out = tmp_path / "out"
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out, "--memory", value),
                   message)
    assert not out.exists()


def test_a_bad_ens_memory_is_one_line_naming_the_variable(stores, tmp_path, monkeypatch):
    runs, data = stores
    monkeypatch.setenv("ENS_MEMORY", "lots")
    out = tmp_path / "out"
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out),
                   "ENS_MEMORY=lots: expected a number of GiB, e.g. 3 or 0.5")
    assert not out.exists()


# ------------------------------------------------------------------------ NaN while streaming

def test_nan_logits_found_while_fusing_are_one_line_and_leave_nothing(stores, tmp_path):
    """No pass checks the stores before the work: a NaN in the applied split's last block is
    found when the fusion reads it, after predictions.csv is partly written to its temporary
    file; nothing is left in --out."""
    runs, data = stores
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    logits = np.load(copy / "b" / "test" / "logits.npy")
    logits[1400, 7] = np.nan
    np.save(copy / "b" / "test" / "logits.npy", logits)
    out = tmp_path / "out"
    one_line_error(ens("blend", "--runs", copy, "--optimize", "val", "--data", data, "--out", out, "--memory", "0.25",
                       "--cv", "2"),
                   f"{copy / 'b' / 'test'}: b has NaN or infinite logits, first at image id 3400")
    assert not out.exists()


# ---------------------------------------------------------------------------- peak memory

@pytest.mark.slow  # over 5 s on the 2-core machine
def test_peak_memory_stays_far_below_the_stacked_members(tmp_path):
    """Three models' 5,000 x 10,000 val stores: stacked as float32 they are 600 MB (and the old
    fusion's memory-map slices held every page it read). `ens blend --memory 0.25` fits on
    them and fuses them (--apply val) with a peak resident memory far below that."""
    runs, data = _make(tmp_path, {"val": 5000}, seed=3)
    stacked_mb = len(MODELS) * 5000 * CLASSES * 4 // 10**6
    assert stacked_mb >= 600
    base = [sys.executable, "-m", "ensemble", "blend", "--runs", str(runs), "--optimize", "val", "--data", str(data),
            "--memory", "0.25"]
    peak = _peak_rss_mb(base + ["--apply", "val", "--out", str(tmp_path / "out")])
    idle = _peak_rss_mb([sys.executable, "-c", "import ensemble.cli, ensemble.blend.run, scipy.optimize"])
    assert (tmp_path / "out" / "predictions.csv").is_file()
    assert peak < idle + 330, (peak, idle)  # MB: the 0.25 GiB of blocks, and (M, N) per-row arrays
    assert peak < stacked_mb * 0.75, (peak, stacked_mb)


# -------------------------------------------------------------------------- room on the disk

def test_the_room_estimates_bound_the_files_written(stores, tmp_path):
    """What the check asks for is at least what is written, and not much more."""
    runs, data = stores
    out = tmp_path / "out"
    _blend(runs, data, out, "--cv", "2")
    split = blend_run.open_split(runs, MODELS, "test")
    written = (out / "predictions.csv").stat().st_size
    estimate = blend_run._predictions_bytes(split, 5)
    assert written <= estimate <= 1.4 * written, (written, estimate)
    record = blend_run._record_bytes(None, blend_run.open_split(runs, MODELS, "val"), False)
    assert (out / "blend.json").stat().st_size <= record


def test_a_disk_without_room_is_refused_before_the_fit(stores, tmp_path, monkeypatch):
    runs, data = stores
    fits = []
    monkeypatch.setattr(blend_run, "_fit", lambda *a: fits.append(a))
    monkeypatch.setattr(blend_run.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10**5))
    out = tmp_path / "out"
    line = one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out))
    assert re.fullmatch(
        rf"error: --out {re.escape(str(out))}: predictions\.csv \(about [0-9.]+ kB for 1500 images of test\) and "
        r"blend\.json \(about [0-9.]+ kB\) need [0-9.]+ kB there, and its disk has 100\.0 kB free; free space, or give "
        r"--out on another disk", line), line
    assert fits == [] and not out.exists()


def test_a_fit_only_run_needs_room_for_blend_json(tmp_path, monkeypatch):
    runs, data = _make(tmp_path, {"val": 30}, seed=1)
    monkeypatch.setattr(blend_run.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 500))
    one_line_error(ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", tmp_path / "o"),
                   "blend.json (about ", "kB) needs ", "kB there, and its disk has 500 bytes free")


def test_a_real_small_disk_is_refused_in_one_line(stores, tmp_path):
    """A 100 kB tmpfs as --out: predictions.csv of 1,500 rows does not fit."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    runs, data = stores
    (tmp_path / "full").mkdir()
    command = (f"{sys.executable} -m ensemble blend --runs {runs} --optimize val --data {data} --cv 2 "
               "--out full/blend")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=100k tmpfs full && {command}; echo rc=$? >&2; ls -A full"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if "mount" in done.stderr and "rc=" not in done.stderr:
        pytest.skip("no unprivileged tmpfs mount here (unshare --user --mount)")
    assert "rc=2" in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "predictions.csv (about " in errors[0] and "free; free space, or give --out on " \
        "another disk" in errors[0], done.stderr
    assert done.stdout.split() == []  # nothing written under full/


def test_nan_in_a_blended_view_names_the_view(tmp_path):
    """With --views the members are the kept views, each checked as it is read."""
    a = _store(tmp_path / "a")
    views = np.load(a.path / "views.npy")
    views[1, 5, 2] = np.inf
    np.save(a.path / "views.npy", views)
    members = BlendSplit("val", (read_store(a.path),), ("a",)).members(True)
    assert members.names == ["a/identity", "a/flip"]
    members.block(0, 5)
    with pytest.raises(EnsError, match=r"a: a/flip has NaN or infinite logits, first at image id 105$"):
        members.block(3, 7)


# ------------------------------------------------------------------- each store read once

def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_the_recorded_digests_come_from_the_pass_and_each_store_is_read_once(stores, tmp_path):
    """The sha256 of every store that blend.json records is store_digest's, taken from the rows
    the fit and the fusion read: the val stores (800 rows, one block at --memory 8) and the
    test stores are read once each, not a second time to hash them."""
    runs, data = stores
    files = [runs / m / s / name for m in MODELS for s in ("val", "test") for name in ("ids.npy", "logits.npy")]
    total = sum(f.stat().st_size for f in files)
    before = _rchar()
    _blend(runs, data, tmp_path / "out", "--memory", "8", "--cv", "2")
    read = _rchar() - before
    assert read < 1.15 * total, (read, total)  # also the labels json, blend.json's checks, ...
    record = json.loads((tmp_path / "out" / "blend.json").read_text())
    for split, part in (("val", "optimize"), ("test", "apply")):
        expected = {m: store_digest(read_store(runs / m / split), False) for m in MODELS}
        assert record[part]["stores"] == expected


def test_a_store_the_pass_did_not_read_whole_is_hashed_on_its_own(tmp_path):
    """A float32 store, a store with bytes after its rows, rows read out of order, views:
    the digest is store_digest's whatever the pass read."""
    a = _store(tmp_path / "a", dtype="float32")
    b = _store(tmp_path / "b", dtype="float16", seed=1)
    split = BlendSplit("val", (a, b), ("a", "b"))
    for views in (False, True):
        members = split.members(views)
        digests = PassDigests(split, members, views)
        for start, _ in members.blocks(3):
            pass
        assert digests.result() == {m: store_digest(s, views) for m, s in zip(("a", "b"), (a, b))}
    members = split.members(False)
    digests = PassDigests(split, members, False)
    members.block(3, 7)
    members.block(0, 3)  # out of order: a and b are hashed again, from their files
    assert digests.result() == {m: store_digest(s, False) for m, s in zip(("a", "b"), (a, b))}
    with open(b.path / "logits.npy", "ab") as fh:
        fh.write(b"\0" * 10)  # bytes after the rows, which the pass does not read
    members = split.members(False)
    digests = PassDigests(split, members, False)
    members.block(0, 7)
    assert digests.result() == {m: store_digest(s, False) for m, s in zip(("a", "b"), (a, b))}
