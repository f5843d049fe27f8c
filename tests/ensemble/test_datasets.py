"""Split loading: iNat json, the --data/--split short form, image folders, and their errors."""

from __future__ import annotations

import json

import pytest

from ensemble.formats.dataset import find_split, load_split, resolve_splits, split_name
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file

from tests.ensemble.conftest import make_inat, write_images


def test_inat_json_rows_ids_paths_and_labels(inat):
    val = load_split(inat / "val2019.json")
    assert val.name == "val" and len(val) == 6
    assert val.ids == tuple(range(6))
    assert all(p.is_file() and p.is_relative_to(inat / "train_val2019") for p in val.paths)
    assert val.labels == (0, 1, 2, 3, 4, 0)
    assert val.sha256 == sha256_file(inat / "val2019.json")
    test = load_split(inat / "test2019.json")
    assert test.ids == tuple(range(6, 11)) and test.labels is None


def test_short_form_maps_split_names_to_files(inat, tmp_path):
    assert resolve_splits(inat, ["val", "test"]) == [inat / "val2019.json", inat / "test2019.json"]
    (inat / "extra.json").write_text((inat / "val2019.json").read_text())
    assert resolve_splits(inat, ["extra"]) == [inat / "extra.json"]
    with pytest.raises(EnsError, match=r"--data .*: no train split \(looked for train2019.json, train2018.json, "
                                       r"train2017.json, train.json, train\)"):
        resolve_splits(inat, ["train"])
    with pytest.raises(EnsError, match="--data .*nowhere: no such folder"):
        resolve_splits(tmp_path / "nowhere", ["val"])


@pytest.mark.parametrize("layout, files", [
    ("inat2017", {"val": "val2017.json", "test": "test2017.json"}),
    ("inat2018", {"val": "val2018.json", "test": "test2018.json"}),
    ("inat2021", {"val": "val.json", "test": "public_test.json"}),
])
def test_one_rule_finds_every_inat_layout(tmp_path, layout, files):
    for name in files.values():
        (tmp_path / name).write_text("{}")
    for split, name in files.items():
        assert find_split(tmp_path, split) == tmp_path / name


def test_a_competition_year_prefers_its_own_layout(tmp_path):
    for name in ("test2019.json", "test.json", "public_test.json", "test2018.json"):
        (tmp_path / name).write_text("{}")
    assert find_split(tmp_path, "test") == tmp_path / "test2019.json"
    assert find_split(tmp_path, "test", year=2021) == tmp_path / "test.json"
    assert find_split(tmp_path, "test", year=2018) == tmp_path / "test2018.json"
    (tmp_path / "test.json").unlink()
    assert find_split(tmp_path, "test", year=2021) == tmp_path / "public_test.json"


def test_folders_only_where_images_may_come_from_a_folder(tmp_path):
    (tmp_path / "val").mkdir()
    assert find_split(tmp_path, "val") == tmp_path / "val"
    assert find_split(tmp_path, "val", folders=False, required=False) is None
    with pytest.raises(EnsError, match=r"no val split \(looked for val2019.json, .*, val.json\)$"):
        find_split(tmp_path, "val", folders=False)


def test_split_names():
    assert split_name("a/val2019.json") == "val"
    assert split_name("test2019.json") == "test"
    assert split_name("custom.json") == "custom"
    assert split_name("2019.json") == "2019"
    assert split_name("photos") == "photos"
    assert split_name("inat/test2019") == "test2019"


def test_folder_of_images_ids_are_relative_paths(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder / "b", [(20, 20)], ".png")
    write_images(folder, [(20, 20), (30, 20)], ".jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    write_images(folder / ".hidden", [(20, 20)])
    split = load_split(folder)
    assert split.name == "photos"
    assert split.ids == ("b/img000.png", "img000.jpg", "img001.jpg")
    assert split.paths[0] == folder / "b" / "img000.png"
    assert split.labels is None and len(split.sha256) == 64
    (folder / "img001.jpg").write_bytes(b"changed")
    assert load_split(folder).sha256 != split.sha256


def _json(path, images, **extra):
    path.write_text(json.dumps({"images": images, **extra}))
    return path


def test_bad_split_files_name_the_file_and_id(tmp_path):
    with pytest.raises(EnsError, match=r"empty.json: no images"):
        load_split(_json(tmp_path / "empty.json", []))
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 1, "file_name": "c.jpg"}]
    with pytest.raises(EnsError, match=r"dup.json: duplicate image id 1"):
        load_split(_json(tmp_path / "dup.json", images))
    with pytest.raises(EnsError, match=r"noid.json: images\[0\] lacks"):
        load_split(_json(tmp_path / "noid.json", [{"file_name": "a.jpg"}]))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EnsError, match="broken.json: not a JSON file"):
        load_split(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(EnsError, match=r'list.json: no "images" list'):
        load_split(tmp_path / "list.json")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EnsError, match="nothing: no images"):
        load_split(tmp_path / "nothing")
    with pytest.raises(EnsError, match="missing.json: no such file"):
        load_split(tmp_path / "missing.json")


def test_generated_dataset_is_reproducible(tmp_path):
    a = make_inat(tmp_path / "a")
    b = make_inat(tmp_path / "b")
    assert (a / "val2019.json").read_bytes() == (b / "val2019.json").read_bytes()


def test_special_files_are_refused_not_read(tmp_path):
    import os

    from ensemble.inference.runtime import load_model

    os.mkfifo(tmp_path / "val2019.json")
    os.mkfifo(tmp_path / "model.onnx")
    with pytest.raises(EnsError, match=r"val2019.json: a named pipe \(FIFO\), not a regular file"):
        load_split(tmp_path / "val2019.json")
    with pytest.raises(EnsError, match=r"model.onnx: a named pipe \(FIFO\), not a regular file"):
        load_model(tmp_path / "model.onnx")
