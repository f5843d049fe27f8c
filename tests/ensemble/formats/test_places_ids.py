"""read_observations and the training json's image ids (issue 26's review, items 1, 6, 8): each
observation carries its image id (so `ens blend` can leave out the fitted split's images), an
image id twice is one line naming it, and a json whose images all have several categories says
so. Both readers (streaming, and json.loads for what yajl does not read) alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats import places
from ensemble.formats.stream_json import NeedsLoads


def _doc(ids, labels):
    images = [{"id": i, "latitude": 10.0 + k, "longitude": 20.0, "date": "2020-05-01", "location_uncertainty": 5}
              for k, i in enumerate(ids)]
    annotations = [{"id": n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(labels)]
    return {"images": images, "annotations": annotations, "categories": []}


def _streamed(path):
    return places._streamed_observations(path, f"--geo-prior {path}")


READERS = {"streamed": _streamed,
           "loaded": lambda p: places._loaded_observations(p, "--geo-prior"),
           "read": places.read_observations}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("ids, dtype", [([7, 3, 9, 4], np.int64), (["a", 3, "b", 4], object), ([2 ** 64, 1, 2, 3], object)])
def test_each_observation_carries_its_image_id(tmp_path, reader, ids, dtype):
    path = tmp_path / "train.json"
    # the second image has no category, the third no place
    doc = _doc(ids, [(ids[0], 1), (ids[2], 2), (ids[3], 1)])
    doc["images"][2]["latitude"] = None
    path.write_text(json.dumps(doc))
    if reader == "streamed" and dtype is object and 2 ** 64 in ids:
        # yajl reads no integer beyond 64 bits: the streaming reader hands the file to json.loads
        # (what "read" does, checked by its own case)
        with pytest.raises(NeedsLoads):
            _streamed(path)
        return
    obs = READERS[reader](path)
    assert obs.image_id.dtype == dtype and obs.image_id.tolist() == [ids[0], ids[3]]
    assert obs.category.tolist() == [1, 1]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("ids, named", [([1, 2, 3, 2, 3], "2"), (["x", "y", "y"], '"y"'), ([1, "z", 2 ** 64, "z"], '"z"')])
def test_an_image_id_twice_is_one_line_naming_it(tmp_path, reader, ids, named):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_doc(ids, [(i, 1) for i in ids])))
    if reader == "streamed" and 2 ** 64 in ids:  # handed to json.loads, as above
        with pytest.raises(NeedsLoads):
            _streamed(path)
        return
    with pytest.raises(EnsError, match=rf"train.json: duplicate image id {named}$"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_images_all_of_several_categories_are_named_so(tmp_path, reader):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_doc([1, 2, 3], [(1, 5), (1, 6), (2, 5), (2, 7), (3, 8), (3, 8), (3, 9)])))
    with pytest.raises(EnsError, match=r"train.json: no image is annotated with exactly one category \(3 have "
                                       r"several\)"):
        READERS[reader](path)
