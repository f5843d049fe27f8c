"""predictions.csv (:mod:`ensemble.formats.predictions`): the writer's bytes on a hand-made top-k,
and the header rule the submission reads K from, against the writer's own header."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.formats.predictions import header, header_top_k, write_predictions


def test_written_bytes(tmp_path):
    path = tmp_path / "predictions.csv"
    ids = np.array([7, 3, 9])
    class_ids = (30, 10, 20)
    blocks = [(0, np.array([[2, 0], [1, 2]]), np.array([[0.5, 0.25], [0.9, 0.09999999]])),
              (2, np.array([[0, 1]]), np.array([[1 / 3, 1e-7]]))]
    assert write_predictions(path, ids, class_ids, iter(blocks), 2) == 3
    assert path.read_bytes() == (b"id,category_1,category_2,prob_1,prob_2\n"
                                 b"7,20,30,0.5,0.25\n"
                                 b"3,10,20,0.9,0.1\n"
                                 b"9,30,10,0.333333,1e-07\n")


@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_the_header_written_reads_back_as_its_k(k):
    assert header_top_k(header(k)) == k


@pytest.mark.parametrize(("columns", "k"), [
    (["id", "category_2", "category_1"], 2),  # any order, no prob columns needed
    (["id", "category_1", "prob_1", "extra"], 1),
    (["id"], None),
    ([], None),
    (["image", "category_1"], None),
    (["category_1", "id"], None),
    (["id", "category_1", "category_3"], None),  # category_2 missing
    (["id", "category_0"], None),
])
def test_header_rule(columns, k):
    assert header_top_k(columns) == k
