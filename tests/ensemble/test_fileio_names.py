"""Temporary files beside a target keep within the folder's longest file name: any name the OS
accepts for the target works, through :func:`atomic_path` and :func:`write_new` alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ensemble.fileio import atomic_path, write_bytes_atomic, write_new

NAME_MAX = os.pathconf("/tmp", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255


@pytest.mark.parametrize("length", [200, 216, 217, 240, NAME_MAX])
def test_atomic_path_to_a_name_as_long_as_the_os_allows(tmp_path, length):
    target = tmp_path / ("n" * (length - 5) + ".json")
    seen = []
    with atomic_path(target) as tmp:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".nnn") and tmp.name.endswith(".tmp")
        assert len(os.fsencode(tmp.name)) <= NAME_MAX
        tmp.write_text("{}")
    assert target.read_text() == "{}" and sorted(tmp_path.iterdir()) == [target] and not seen[0].exists()


@pytest.mark.parametrize("name", ["é" * 125 + ".csv", "\udcff" * 251 + ".csv"])
def test_long_names_of_multibyte_or_undecodable_characters(tmp_path, name):
    target = tmp_path / name
    write_bytes_atomic(target, b"x")
    assert target.read_bytes() == b"x" and sorted(tmp_path.iterdir()) == [target]


def test_write_new_to_a_name_as_long_as_the_os_allows(tmp_path):
    name = "s" * (NAME_MAX - 4) + ".csv"
    assert write_new(tmp_path / name, b"a") == tmp_path / name
    # Taken: the next free name is longer than the OS allows, so the OS's own error names it.
    with pytest.raises(OSError):
        write_new(tmp_path / name, b"b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and (tmp_path / name).read_bytes() == b"a"


def test_a_blend_folder_named_with_250_characters(tmp_path):
    folder = tmp_path / ("b" * 250)
    write_bytes_atomic(folder / "blend.json", b"{}")
    write_bytes_atomic(folder / ("p" * 250), b"1")
    assert sorted(p.name for p in folder.iterdir()) == ["blend.json", "p" * 250]
