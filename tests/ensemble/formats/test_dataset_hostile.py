"""Dataset splits against hostile and careless inputs (issue 23): links in folder splits, file
names that are not UTF-8, image ids no store can hold, val images labelled twice, and the one
rule every reader of category ids follows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.dataset import category_id, load_labels, load_split, read_class_counts
from ensemble.formats.store import read_store

from tests.ensemble.conftest import ens, ok, one_line_error, tiny_onnx, write_images


# ------------------------------------------------------------------------ links in folder splits


def _tree(root: Path) -> Path:
    """``root/own/img000.jpg`` and, outside ``root``, ``elsewhere/img000.png`` ..."""
    write_images(root / "own", [(20, 20)])
    write_images(root.parent / "elsewhere", [(20, 20), (24, 20)], ".png")
    return root


def test_a_linked_sub_folder_is_followed_as_imagefolder_follows_it(tmp_path):
    root = _tree(tmp_path / "test")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "one.png").symlink_to(tmp_path / "elsewhere" / "img001.png")  # a linked file, kept as before
    split = load_split(root)
    assert split.ids == ("linked/img000.png", "linked/img001.png", "one.png", "own/img000.jpg")
    assert split.paths[0] == root / "linked" / "img000.png"


def test_a_link_to_a_folder_above_it_is_refused_naming_the_link(tmp_path):
    root = _tree(tmp_path / "test")
    (root / "own" / "up").symlink_to(root, target_is_directory=True)
    with pytest.raises(EnsError) as info:
        load_split(root)
    assert str(info.value) == (f"{root / 'own' / 'up'}: a link to {root.resolve()}, a folder that holds it: "
                               "following it would never end; remove the link or point it outside that folder")


def test_links_that_loop_through_each_other_are_refused(tmp_path):
    root = tmp_path / "test"
    write_images(root / "a", [(20, 20)])
    (root / "b").mkdir()
    (root / "a" / "to_b").symlink_to(root / "b", target_is_directory=True)
    (root / "b" / "to_a").symlink_to(root / "a", target_is_directory=True)
    with pytest.raises(EnsError, match=r"a folder that holds it"):
        load_split(root)


def test_a_dangling_link_is_named_not_skipped(tmp_path):
    root = _tree(tmp_path / "test")
    (root / "gone").symlink_to(tmp_path / "moved", target_is_directory=True)
    with pytest.raises(EnsError) as info:
        load_split(root)
    assert str(info.value) == (f"{root / 'gone'}: a link to {tmp_path / 'moved'}, which does not exist; "
                               "remove the link or restore its target")


def test_an_image_named_file_that_is_not_regular_is_listed_for_infer_to_report(tmp_path):
    root = _tree(tmp_path / "test")
    os.mkfifo(root / "pipe.jpg")
    assert "pipe.jpg" in load_split(root).ids  # ens infer names it as a bad image (or skips it)


@pytest.mark.parametrize("form", ["data", "index"])
def test_ens_infer_runs_the_images_of_a_linked_sub_folder(tmp_path, form):
    data = tmp_path / "data"
    root = _tree(data / "test")
    (root / "linked").symlink_to(data / "elsewhere", target_is_directory=True)
    model = tiny_onnx(tmp_path / "m.onnx")
    where = ("--data", data, "--split", "test") if form == "data" else ("--index", root)
    ok(ens("infer", model, *where, "--out", tmp_path / "runs", "--workers", 0))
    assert read_store(tmp_path / "runs" / "m" / "test").ids.tolist() == [
        "linked/img000.png", "linked/img001.png", "own/img000.jpg"]


def test_a_loop_stops_ens_infer_in_one_line(tmp_path):
    root = _tree(tmp_path / "test")
    (root / "own" / "up").symlink_to(root, target_is_directory=True)
    one_line_error(ens("infer", tiny_onnx(tmp_path / "m.onnx"), "--index", root, "--out", tmp_path / "runs"),
                   f"{root / 'own' / 'up'}: a link to", "a folder that holds it")


# ----------------------------------------------------------------------- names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_an_id_of_its_own(tmp_path):
    root = tmp_path / "test"
    write_images(root, [(20, 20)])
    os.rename(os.fsencode(root / "img000.jpg"), os.path.join(os.fsencode(root), b"caf\xe9.jpg"))
    split = load_split(root)
    assert split.ids == (os.fsdecode(b"caf\xe9.jpg"),) and split.paths[0].is_file()


def test_ens_infer_stores_a_file_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "test"
    write_images(root, [(20, 20), (24, 20)])
    os.rename(os.fsencode(root / "img000.jpg"), os.path.join(os.fsencode(root), b"caf\xe9.jpg"))
    ok(ens("infer", tiny_onnx(tmp_path / "m.onnx"), "--index", root, "--out", tmp_path / "runs", "--workers", 1))
    store = read_store(tmp_path / "runs" / "m" / "test")
    assert [os.fsencode(i) for i in store.ids.tolist()] == [b"caf\xe9.jpg", b"img001.jpg"]


# ----------------------------------------------------------------- image ids beyond the stores' int64


@pytest.mark.parametrize("image_id", [2 ** 63, -(2 ** 63) - 1, 10 ** 30])
def test_an_image_id_no_store_can_hold_is_refused(tmp_path, image_id):
    path = tmp_path / "test2019.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": image_id, "file_name": "b.jpg"}]}))
    with pytest.raises(EnsError) as info:
        load_split(path)
    assert str(info.value) == (f"{path}: images[1] has id {image_id}, beyond the 64-bit integers a store holds "
                               "(-9223372036854775808..9223372036854775807)")


def test_the_largest_ids_a_store_holds_are_kept_exactly(tmp_path):
    ids = [2 ** 63 - 1, -(2 ** 63)]
    path = tmp_path / "test2019.json"
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{n}.jpg"} for n, i in enumerate(ids)]}))
    assert load_split(path).ids == tuple(ids)


# --------------------------------------------------------------------- labels of val images


def _val(path: Path, annotations, images=(1, 2)) -> Path:
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in images],
                                "annotations": [{"image_id": i, "category_id": c} for i, c in annotations]}))
    return path


def test_a_val_image_labelled_with_two_categories_is_refused(tmp_path):
    path = _val(tmp_path / "val2019.json", [(1, 3), (2, 4), (1, 5)])
    with pytest.raises(EnsError) as info:
        load_labels(path, np.array([1, 2]), [3, 4, 5])
    assert str(info.value) == (f"{path}: image 1 has annotations of two categories, 3 (annotations[0]) and 5 "
                               "(annotations[2]); a val image needs one label")


def test_a_val_image_annotated_twice_with_one_category_has_that_label(tmp_path):
    path = _val(tmp_path / "val2019.json", [(1, 3), (2, 4), (1, 3), (1, "3")])
    assert load_labels(path, np.array([1, 2]), [3, 4]).tolist() == [0, 1]


def test_a_multi_category_json_still_serves_as_a_split_to_infer(tmp_path):
    # ens infer needs no labels: a COCO detection json, many categories per image, is a split.
    path = _val(tmp_path / "instances.json", [(1, 3), (1, 5)])
    assert load_split(path).ids == (1, 2)


# ------------------------------------------------------------ one rule for category ids


SPELLINGS = {0: 0, "0": 0, "12": 12, " 7 ": 7, "-3": -3, "+4": 4, "007": 7, "a1": "a1", "1.0": "1.0",
             "1e3": "1e3", "\u0663": "\u0663", "\u00b2": "\u00b2", "--5": "--5", "": "", "Aardvark": "Aardvark"}


def test_the_rule_a_string_that_spells_an_ascii_integer_is_that_integer():
    assert {k: category_id(k) for k in SPELLINGS} == SPELLINGS
    assert all(type(category_id(k)) is type(v) for k, v in SPELLINGS.items())
    for not_an_id in (True, 1.0, None, [1], {"a": 1}):
        assert category_id(not_an_id) is None
    assert category_id("9" * 5000) == "9" * 5000  # beyond Python's int parsing: a name, not a traceback


def _distinct(spellings):
    """Spellings with distinct ids (``"007"`` and ``" 7 "`` name one category)."""
    seen, out = set(), []
    for spelling in spellings:
        if category_id(spelling) not in seen and spelling != "":
            seen.add(category_id(spelling))
            out.append(spelling)
    return out


def test_val_labels_follow_the_rule(tmp_path):
    spellings = [s for s in _distinct(SPELLINGS) if isinstance(s, str)]
    path = _val(tmp_path / "val2019.json", list(enumerate(spellings)), images=range(len(spellings)))
    models = [SPELLINGS[s] for s in reversed(spellings)]  # the models' class ids, as the exporter wrote them
    got = load_labels(path, np.arange(len(spellings)), models)
    assert [models[j] for j in got] == [SPELLINGS[s] for s in spellings]


def test_a_string_zero_in_val_is_category_zero(tmp_path):
    path = _val(tmp_path / "val2019.json", [(1, "0"), (2, 1)])
    assert load_labels(path, np.array([1, 2]), [0, 1]).tolist() == [0, 1]


def test_prior_counts_follow_the_rule(tmp_path):
    spellings = _distinct(s for s in SPELLINGS if isinstance(s, str))
    as_json = tmp_path / "counts.json"
    as_json.write_text(json.dumps({s: n for n, s in enumerate(spellings)}))
    as_csv = tmp_path / "counts.csv"
    as_csv.write_text("".join(f'"{s}",{n}\n' for n, s in enumerate(spellings)))
    coco = tmp_path / "train2019.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": n, "category_id": s}
                                                for n, s in enumerate(spellings) for _ in range(n)],
                                "categories": [{"id": s} for s in spellings]}))
    want = {SPELLINGS[s]: n for n, s in enumerate(spellings)}
    for path in (as_json, as_csv, coco):
        assert read_class_counts(path) == want, path.name


def test_classes_follow_the_rule(tmp_path):
    classes = pytest.importorskip("exporters.classes")
    spellings = _distinct(s for s in SPELLINGS if isinstance(s, str))
    listed = tmp_path / "classes.json"
    listed.write_text(json.dumps(spellings))
    assert classes.load_class_ids(listed, len(spellings)) == tuple(SPELLINGS[s] for s in spellings)
    folders = tmp_path / "train"
    names = [s for s in spellings if s == s.strip()]  # a folder name keeps its blanks, but why make one
    for name in names:
        (folders / name).mkdir(parents=True)
    assert classes.load_class_ids(folders, len(names)) == tuple(SPELLINGS[s] for s in sorted(names))


def test_a_superscript_digit_folder_is_a_category_name_not_a_traceback(tmp_path):
    classes = pytest.importorskip("exporters.classes")
    (tmp_path / "train" / "\u00b2").mkdir(parents=True)
    (tmp_path / "train" / "1").mkdir()
    assert classes.load_class_ids(tmp_path / "train", 2) == (1, "\u00b2")



def test_classes_from_coco_categories_are_sorted_as_the_ids_they_are(tmp_path):
    # "10" and "2" are categories 10 and 2: in integer order, as a json of integers would give.
    classes = pytest.importorskip("exporters.classes")
    coco = tmp_path / "train2019.json"
    coco.write_text(json.dumps({"categories": [{"id": "10"}, {"id": "2"}, {"id": 1}]}))
    assert classes.load_class_ids(coco, 3) == (1, 2, 10)
    coco.write_text(json.dumps({"categories": [{"id": "b"}, {"id": 2}]}))
    with pytest.raises(EnsError) as info:
        classes.load_class_ids(coco, 2)
    assert str(info.value) == (f"--classes {coco}: the categories mix integer and string ids (2 and 'b'), which "
                               "have no order; give a JSON list of the ids in the model's output order")


def test_an_image_id_of_more_digits_than_python_parses_is_one_line(tmp_path):
    path = tmp_path / "test2019.json"
    path.write_text('{"images": [{"id": 1' + "0" * 5000 + ', "file_name": "a.jpg"}]}')
    with pytest.raises(EnsError) as info:
        load_split(path)
    assert str(info.value).startswith(f"{path}: not a JSON file (Exceeds the limit (4300 digits) for integer string")
