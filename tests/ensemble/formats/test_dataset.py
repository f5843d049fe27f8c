"""The dataset format's labels and class counts, unit by unit: ``load_labels`` checks the split
json as ``load_split`` does; the counters take counts and ids through the shared checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.dataset import coco_counts, load_labels, read_class_counts


def _split(path, images=(1, 2, 3), annotations=((1, 10), (2, 20), (3, 10)), **extra):
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in images],
           "annotations": [{"image_id": i, "category_id": c} for i, c in annotations], **extra}
    path.write_text(json.dumps(doc))
    return path


def test_labels_in_the_order_of_the_store_ids(tmp_path):
    path = _split(tmp_path / "val2019.json")
    labels = load_labels(path, np.array([3, 1, 2]), [20, 10])
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 0]
    assert load_labels(path, np.array([2]), [10, 20]).tolist() == [1]


def test_an_image_without_a_label_or_with_a_foreign_one(tmp_path):
    path = _split(tmp_path / "val.json", annotations=((1, 10), (3, 30)))
    with pytest.raises(EnsError, match=r"^\S+val.json: 1 image has no label, id 2$"):
        load_labels(path, np.array([1, 2, 3]), [10, 30])
    with pytest.raises(EnsError, match=r"^\S+val.json: image 3 is labelled 30, a category the models do not "
                                       r"predict \(1 such image\)$"):
        load_labels(path, np.array([1, 3]), [10, 20])


def test_no_annotations(tmp_path):
    for doc in ({"images": [{"id": 1, "file_name": "a.jpg"}]},
                {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}):
        (tmp_path / "t.json").write_text(json.dumps(doc))
        with pytest.raises(EnsError, match=r"t.json: no annotations, so no labels to fit blend weights on$"):
            load_labels(tmp_path / "t.json", np.array([1]), [0])


@pytest.mark.parametrize("doc, message", [
    ({"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}],
      "annotations": [{"image_id": 1, "category_id": 0}]}, "duplicate image id 1"),
    ({"annotations": [{"image_id": 1, "category_id": 0}]}, 'no "images" list (expected a COCO / iNaturalist json)'),
    ({"images": [{"id": True, "file_name": "a"}], "annotations": [{"image_id": 1, "category_id": 0}]},
     "images[0] has id true; expected an integer or a string"),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1}]},
     'annotations[0] lacks "image_id" or "category_id"'),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": ["x"]},
     'annotations[0] lacks "image_id" or "category_id"'),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": {"image_id": 1, "category_id": 0}},
     '"annotations" is not a list'),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1, "category_id": True}]},
     "image 1 is labelled true; expected an integer or a string category id"),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1, "category_id": [0]}]},
     "image 1 is labelled [0]; expected an integer or a string category id"),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1, "category_id": 1.0}]},
     "image 1 is labelled 1.0; expected an integer or a string category id"),
])
def test_labels_go_through_the_split_checks(tmp_path, doc, message):
    """Each of these was read without a word before (``True`` and ``1.0`` even matched class 1)."""
    path = tmp_path / "val2019.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(EnsError) as info:
        load_labels(path, np.array([1]), [0, 1])
    assert str(info.value) == f"{path}: {message}"


def test_unreadable_label_files_name_the_file(tmp_path):
    with pytest.raises(EnsError, match=r"none.json: no such file or folder$"):
        load_labels(tmp_path / "none.json", np.array([1]), [0])
    (tmp_path / "bad.json").write_bytes(b"\xff{")
    with pytest.raises(EnsError, match=r"bad.json: not a JSON file \("):
        load_labels(tmp_path / "bad.json", np.array([1]), [0])


def test_counts_json_object_coco_and_csv(tmp_path):
    (tmp_path / "c.json").write_text('{"3": 2, "x": 0, "-1": 5}')
    assert read_class_counts(tmp_path / "c.json") == {3: 2, "x": 0, -1: 5}
    (tmp_path / "c.csv").write_text("category_id,count\n3,2\nx,0\n")
    assert read_class_counts(tmp_path / "c.csv") == {3: 2, "x": 0}
    doc = {"categories": [{"id": 5}, {"id": True}, {"id": [1]}, "x"],
           "annotations": [{"category_id": 3}, {"category_id": "3"}, {"category_id": "a"}]}
    assert coco_counts(doc, "L") == {5: 0, 3: 2, "a": 1}


@pytest.mark.parametrize("text, message", [
    ('{"3": true}', "the count of category '3' is not a non-negative integer"),
    ('{"3": -1}', "the count of category '3' is not a non-negative integer"),
    ('{"3": 2.0}', "the count of category '3' is not a non-negative integer"),
    ('{"3": "2"}', "the count of category '3' is not a non-negative integer"),
    ("{", "not a JSON file (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
          'give a COCO/iNat json, a JSON object {"category_id": count} or a CSV category_id,count'),
])
def test_bad_counts_are_named(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(EnsError) as info:
        read_class_counts(path)
    assert str(info.value) == f"--prior {path}: {message}"


@pytest.mark.parametrize("annotation", [{"category_id": True}, {"category_id": 1.5}, {}, "x"])
def test_coco_annotation_without_a_category_id(annotation):
    with pytest.raises(EnsError, match=r"^L: annotations\[1\] has no category_id$"):
        coco_counts({"annotations": [{"category_id": 1}, annotation]}, "L")
