"""Atomic writes: all or nothing, and files as readable as a plain open() makes them."""

from __future__ import annotations

import os
import stat

import pytest

from ensemble.fileio import atomic_path, write_bytes_atomic, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "atomic.bin", b"x")
        write_json_atomic(tmp_path / "atomic.json", {"a": 1})
        (tmp_path / "plain.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)
    assert plain == 0o666 & ~umask
    for name in ("atomic.bin", "atomic.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
