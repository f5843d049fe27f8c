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


# A write that fails names the file being written, and leaves no folder it made (issue 23 round 2).

def test_a_write_error_without_a_file_name_names_the_target(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(OSError) as caught:
        with atomic_path(target):
            raise OSError(27, "File too large")  # what write() past `ulimit -f` raises: no file name
    assert caught.value.errno == 27 and caught.value.filename == str(target)
    # An error about another file is left as it was.
    with pytest.raises(OSError) as caught:
        with atomic_path(target):
            open(tmp_path / "no such file")
    assert caught.value.filename == str(tmp_path / "no such file")


def test_a_failed_write_removes_the_folders_it_made_and_only_those(tmp_path):
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper" / "blend.json"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    # A folder it made that holds something else by then stays.
    with pytest.raises(OSError):
        with atomic_path(target):
            (tmp_path / "kept" / "new" / "other").write_text("someone's")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "new", "other"]
    # Success keeps them.
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"


def test_out_of_room_names_the_file_the_hint_and_that_nothing_was_written(tmp_path):
    from ensemble.errors import EnsError
    from ensemble.fileio import out_of_room

    target = tmp_path / "b" / "blend.json"
    with pytest.raises(EnsError) as caught:
        with out_of_room("--out DIR"), atomic_path(target):
            raise OSError(27, "File too large")
    line = str(caught.value)
    assert line.startswith(f"{target}: File too large; a file-size limit was reached (see `ulimit -f`"), line
    assert "give --out DIR on another file system" in line and line.endswith("nothing was written"), line
    assert "finished work is kept" not in line and not (tmp_path / "b").exists()
    with pytest.raises(EnsError, match="the disk is full: free space, or give -o FILE on another disk"):
        with out_of_room("-o FILE"), atomic_path(target):
            raise OSError(28, "No space left on device")
    with pytest.raises(PermissionError):  # not a matter of room: the OS's error as it was
        with out_of_room("-o FILE"), atomic_path(target):
            raise PermissionError(13, "Permission denied", str(target))


def test_a_temporary_file_that_cannot_be_made_is_named_after_its_target(tmp_path, monkeypatch):
    real_open = os.open

    def full(path, flags, mode=0o777):
        if Path(path).name.endswith(".tmp"):
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "new" / "page.html"):
            pass
    assert caught.value.errno == 28 and caught.value.filename == str(tmp_path / "new" / "page.html")
    assert not (tmp_path / "new").exists()


# Never replace what is not a regular file (a FIFO, a device, a folder, a link to one).

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("kind", ["fifo", "link to fifo", "folder", "dangling link"])
def test_atomic_path_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    from ensemble.errors import EnsError

    os.mkfifo(tmp_path / "fifo")
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "link to fifo":
        target.symlink_to(tmp_path / "fifo")
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(tmp_path / "nowhere")
    before = os.lstat(target)
    with pytest.raises(EnsError, match=f"^{target}: not a regular file"):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "target"]


def test_atomic_path_replaces_a_regular_file_and_a_link_to_one(tmp_path):
    (tmp_path / "file").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    write_bytes_atomic(tmp_path / "file", b"new")
    write_bytes_atomic(tmp_path / "link", b"newer")
    assert (tmp_path / "file").read_text() == "new" and (tmp_path / "link").read_text() == "newer"
