"""Split loading: iNat json, the --data/--split short form, image folders, and their errors."""

from __future__ import annotations

import json

import pytest

from ensemble.datasets import load_split, resolve_splits, split_name
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
    with pytest.raises(EnsError, match=r"--split train: none of train2019.json, train.json, train in"):
        resolve_splits(inat, ["train"])
    with pytest.raises(EnsError, match="--data .*nowhere: no such folder"):
        resolve_splits(tmp_path / "nowhere", ["val"])


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
