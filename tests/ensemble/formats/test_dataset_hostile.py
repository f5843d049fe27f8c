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
    with pytest.raises(EnsError) as info:  # each real folder is listed once: root/a's second path ends it
        load_split(root)
    assert str(info.value).startswith(f"{root / 'a'} and {root / 'b' / 'to_a'}: two paths to one folder")


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
    assert str(info.value) == (f'--classes {coco}: the categories mix integer and string ids (2 and "b"), which '
                               "have no order; give a JSON list of the ids in the model's output order")


def test_an_image_id_of_more_digits_than_python_parses_is_one_line(tmp_path):
    path = tmp_path / "test2019.json"
    path.write_text('{"images": [{"id": 1' + "0" * 5000 + ', "file_name": "a.jpg"}]}')
    with pytest.raises(EnsError) as info:
        load_split(path)
    assert str(info.value).startswith(f"{path}: not a JSON file (Exceeds the limit (4300 digits) for integer string")


# --------------------------------------------- second round: links listed fast, each real folder once


def test_linked_files_are_listed_without_resolving_each_one(tmp_path, monkeypatch):
    # A split made of links to the files elsewhere (a common way to cut a subset): realpath, which
    # looks at every component of the path, is for linked folders; a linked file needs one stat.
    from ensemble.formats import dataset

    write_images(tmp_path / "all", [(8, 8)] * 30, ".png")
    root = tmp_path / "test"
    root.mkdir()
    for path in sorted((tmp_path / "all").iterdir()):
        (root / path.name).symlink_to(path)
    calls = []
    realpath = os.path.realpath
    monkeypatch.setattr(dataset.os.path, "realpath", lambda p, *a, **k: calls.append(p) or realpath(p, *a, **k))
    assert len(load_split(root)) == 30
    assert len(calls) <= 1, calls


def test_links_that_fan_out_are_refused_at_once(tmp_path):
    """Twenty levels, each with two links to the next: 2**20 paths to one image. Each real
    folder is listed once, so the second path to one is refused in one line naming both."""
    import subprocess
    import sys

    levels = [tmp_path / f"d{i}" for i in range(21)]
    for level in levels:
        level.mkdir()
    write_images(levels[-1], [(8, 8)], ".png")
    for level, below in zip(levels, levels[1:]):
        for name in ("a", "b"):
            (level / name).symlink_to(below, target_is_directory=True)
    code = ("import sys\nfrom ensemble.errors import EnsError\nfrom ensemble.formats.dataset import load_split\n"
            "try:\n    load_split(sys.argv[1])\nexcept EnsError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(levels[5])], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[3])
    assert done.stdout.strip() == (
        f"{levels[5] / 'a'} and {levels[5] / 'b'}: two paths to one folder ({levels[6]}), whose images would be "
        "listed twice under two ids; remove one of the links"), done.stderr


def test_a_folder_reached_through_a_link_and_by_its_own_path_is_refused(tmp_path):
    root = tmp_path / "test"
    write_images(root / "birds", [(8, 8)], ".png")
    (root / "also").symlink_to(root / "birds", target_is_directory=True)
    with pytest.raises(EnsError) as info:
        load_split(root)
    assert str(info.value) == (f"{root / 'also'} and {root / 'birds'}: two paths to one folder ({root / 'birds'}), "
                               "whose images would be listed twice under two ids; remove one of the links")


def test_two_links_to_one_file_stay_two_images(tmp_path):
    # Files are not folders: a duplicated image is a dataset's business, as in ImageFolder.
    root = tmp_path / "test"
    write_images(root, [(8, 8)], ".png")
    (root / "copy.png").symlink_to(root / "img000.png")
    assert load_split(root).ids == ("copy.png", "img000.png")


# ------------------------------------------------------- a split json that is not a regular file


@pytest.mark.parametrize("name", ["val2019.json", "test2019.json", "train2019.json"])
def test_a_fifo_in_place_of_a_split_json_is_named_not_missing(tmp_path, name):
    from ensemble.formats.dataset import find_split

    os.mkfifo(tmp_path / name)
    split = name.split("2019")[0]
    with pytest.raises(EnsError) as info:
        find_split(tmp_path, split, folders=False, required=split != "train")
    assert str(info.value) == f"{tmp_path / name}: a named pipe (FIFO), not a regular file"


def test_ens_infer_names_a_fifo_val_json(tmp_path):
    os.mkfifo(tmp_path / "val2019.json")
    one_line_error(ens("infer", tiny_onnx(tmp_path / "m.onnx"), "--data", tmp_path, "--split", "val",
                       "--out", tmp_path / "runs"),
                   f"{tmp_path / 'val2019.json'}: a named pipe (FIFO), not a regular file")


def test_one_rule_for_files_that_are_not_regular(tmp_path):
    from ensemble.formats.dataset import check_regular_file

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(EnsError) as info:
        check_regular_file(tmp_path / "pipe", "--prior")
    assert str(info.value) == f"--prior {tmp_path / 'pipe'}: a named pipe (FIFO), not a regular file"
    with pytest.raises(EnsError) as info:
        check_regular_file(tmp_path)
    assert str(info.value) == f"{tmp_path}: a folder, not a regular file"
    with pytest.raises(EnsError) as info:
        check_regular_file(tmp_path / "none.json")
    assert str(info.value) == f"{tmp_path / 'none.json'}: no such file or folder"


# ------------------------------------------------------------------ messages show JSON as JSON


@pytest.mark.parametrize("text, shown", [("true", "true"), ("null", "null"), ("1e400", "Infinity"), ("1.5", "1.5"),
                                         ('[1, "a"]', '[1, "a"]')])
def test_an_image_id_that_is_no_id_is_shown_as_json(tmp_path, text, shown):
    path = tmp_path / "test2019.json"
    path.write_text('{"images": [{"id": %s, "file_name": "a.jpg"}]}' % text)
    with pytest.raises(EnsError) as info:
        load_split(path)
    assert str(info.value) == f"{path}: images[0] has id {shown}; expected an integer or a string"


def test_a_duplicate_string_id_is_shown_as_json(tmp_path):
    path = tmp_path / "test2019.json"
    path.write_text(json.dumps({"images": [{"id": "x", "file_name": "a.jpg"}, {"id": "x", "file_name": "b.jpg"}]}))
    with pytest.raises(EnsError) as info:
        load_split(path)
    assert str(info.value) == f'{path}: duplicate image id "x"'


@pytest.mark.parametrize("label, shown", [(True, "true"), (1.5, "1.5"), ([3], "[3]")])
def test_a_label_that_is_no_id_is_shown_as_json(tmp_path, label, shown):
    path = _val(tmp_path / "val2019.json", [(1, label), (2, 3)])
    with pytest.raises(EnsError) as info:
        load_labels(path, np.array([1, 2]), [3])
    assert str(info.value) == (f"{path}: image 1 is labelled {shown}; expected an integer or a string category id")


def test_one_image_is_one_image(tmp_path):
    path = _val(tmp_path / "val2019.json", [(1, 3)], images=(1, 2))
    with pytest.raises(EnsError) as info:
        load_labels(path, np.array([1, 2]), [3])
    assert str(info.value) == f"{path}: 1 image has no label, id 2"
    path = _val(tmp_path / "val2019.json", [(1, 3), (2, "x")], images=(1, 2))
    with pytest.raises(EnsError) as info:
        load_labels(path, np.array([1, 2]), [3])
    assert str(info.value) == f'{path}: image 2 is labelled "x", a category the models do not predict (1 such image)'


def test_an_empty_category_id_is_shown_quoted(tmp_path):
    csv_file = tmp_path / "counts.csv"
    csv_file.write_text("x,1\n,2\n,3\n")
    with pytest.raises(EnsError) as info:
        read_class_counts(csv_file)
    assert str(info.value) == f'--prior {csv_file}: line 3 counts category "" again (first on line 2)'


@pytest.mark.parametrize("count", ["\u0663", "1_000", "\uff15"])
def test_a_prior_count_is_ascii_digits_as_a_category_id_is(tmp_path, count):
    csv_file = tmp_path / "counts.csv"
    csv_file.write_text(f"1,2\n3,{count}\n")
    with pytest.raises(EnsError) as info:
        read_class_counts(csv_file)
    assert str(info.value) == f"--prior {csv_file}: line 2: the count {count!r} is not a non-negative integer"


def test_a_prior_count_with_a_sign_or_blanks_reads_as_a_category_id_would(tmp_path):
    csv_file = tmp_path / "counts.csv"
    csv_file.write_text("1, +4 \n2,007\n")
    assert read_class_counts(csv_file) == {1: 4, 2: 7}


def test_one_category_is_one_category(tmp_path):
    classes = pytest.importorskip("exporters.classes")
    listed = tmp_path / "classes.json"
    listed.write_text("[7]")
    with pytest.raises(EnsError) as info:
        classes.load_class_ids(listed, 3)
    assert str(info.value) == f"--classes {listed}: lists 1 category but the model predicts 3"
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(EnsError) as info:
        classes.load_class_ids(tmp_path / "train", 3)
    assert str(info.value) == f"--classes {tmp_path / 'train'}: holds 1 class folder but the model predicts 3"
    listed.write_text("[7, true]")
    with pytest.raises(EnsError) as info:
        classes.load_class_ids(listed, 2)
    assert str(info.value) == f"--classes {listed}: category ids must be integers or strings, got true"
