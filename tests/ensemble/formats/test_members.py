"""Blend members read block by block with plain reads: the same values as the store's arrays, in
float32, checked finite, and no growth of resident memory with the rows read."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.members import Members
from ensemble.formats.store import StoreWriter, read_store
from tests.rss import measure
from tests.ensemble.inference.test_store import BASE, KEY

ROWS = 7


def _store(folder, dtype="float16", views=True, logits=None, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(ROWS, 5)) * 4 if logits is None else logits
    per_view = rng.normal(size=(2, ROWS, 5)) * 4
    writer = StoreWriter(folder, {**KEY, "dtype": dtype}, rows=ROWS, chunk_size=3)
    manifest = BASE if views else dataclasses.replace(BASE, tta=dataclasses.replace(BASE.tta, views=("identity",)))
    writer.open(manifest)
    for c in range(writer.chunks):
        lo, hi = c * 3, min(c * 3 + 3, ROWS)
        writer.write_chunk(c, logits[lo:hi], np.ones(hi - lo, bool), (), per_view[:, lo:hi] if views else None)
    ids = tuple(range(100, 100 + ROWS))
    writer.finish(ids, tuple(f"{i}.jpg" for i in ids), manifest)
    return read_store(folder)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_blocks_are_the_stores_rows_in_float32(tmp_path, dtype):
    a, b = _store(tmp_path / "a", dtype), _store(tmp_path / "b", dtype, seed=1)
    members = Members(["a", "b"], [a, b], views=False)
    assert (members.n_members, members.n_rows, members.n_classes) == (2, ROWS, 5)
    blocks = list(members.blocks(3))
    assert [start for start, _ in blocks] == [0, 3, 6]
    whole = np.concatenate([block for _, block in blocks], axis=1)
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(whole, np.stack([np.asarray(a.logits, np.float32), np.asarray(b.logits, np.float32)]))


def test_views_are_members_at_their_offsets(tmp_path):
    a = _store(tmp_path / "a")
    members = Members(["a"], [a], views=True)
    assert members.names == ["a/identity", "a/flip"]
    np.testing.assert_array_equal(members.block(2, 6), np.asarray(a.views[:, 2:6], np.float32))


def test_views_without_kept_views_is_one_line(tmp_path):
    a = _store(tmp_path / "a", views=False)
    with pytest.raises(EnsError, match="--keep-views"):
        Members(["a"], [a], views=True)


def test_a_non_finite_row_names_the_store_member_and_id(tmp_path):
    logits = np.zeros((ROWS, 5))
    logits[4, 2] = np.nan
    a = _store(tmp_path / "a", dtype="float32", logits=logits)
    members = Members(["a"], [a], views=False)
    members.block(0, 4)  # the rows before it are fine
    with pytest.raises(EnsError, match=r"a: a has NaN or infinite logits, first at image id 104$"):
        members.block(3, 7)


def test_a_store_cut_short_is_one_line(tmp_path):
    a = _store(tmp_path / "a", dtype="float32")
    members = Members(["a"], [a], views=False)
    path = a.path / "logits.npy"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(EnsError, match="ends before row 5 of a"):
        members.block(0, ROWS)


def test_reading_a_large_store_leaves_resident_memory_flat(tmp_path):
    """A 256 MB store read block by block: the reader's peak resident memory stays near its
    blocks (slicing the memory map instead grows it by the whole store)."""
    rows, classes = 32_768, 4_096
    folder = tmp_path / "big"
    writer = StoreWriter(folder, {**KEY, "dtype": "float16"}, rows=rows, chunk_size=rows)
    manifest = dataclasses.replace(BASE, tta=dataclasses.replace(BASE.tta, views=("identity",)))
    writer.open(manifest)
    writer.write_chunk(0, np.ones((rows, classes), np.float32), np.ones(rows, bool))
    writer.finish(tuple(range(rows)), tuple(f"{i}.jpg" for i in range(rows)), manifest)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from ensemble.formats.members import Members
        from ensemble.formats.store import read_store
        store = read_store({str(folder)!r})
        total = 0.0
        if sys.argv[1] == "blocks":
            for _, block in Members(["big"], [store], views=False).blocks(1024):
                total += float(block[0, :, 0].sum())
        elif sys.argv[1] == "map":
            for start in range(0, store.logits.shape[0], 1024):
                total += float(np.asarray(store.logits[start:start + 1024], np.float32)[:, 0].sum())
        else:
            total = {rows}
        assert total == {rows}
    """)
    peak = {how: _peak_rss_mb([sys.executable, "-c", script, how]) for how in ("none", "blocks", "map")}
    assert peak["blocks"] - peak["none"] < 64, peak  # MB: a few blocks of 1024 x 4096 float32 (16 MB)
    assert peak["map"] - peak["none"] > 200, peak  # the memory map's pages: the whole 256 MB store


def _peak_rss_mb(command) -> int:
    done = measure(command)
    assert done.returncode == 0, done.stderr
    return done.peak_mb
