"""The store digests blend.json records when the fit reads the val stores in several blocks and
more than once (issue 24 review): a second pass must not be hashed again. With --memory 8 the
val stores are one block, which the fit keeps, so only a smaller budget tells."""

from __future__ import annotations

import json

from ensemble.blend.stores import BlendSplit, PassDigests
from ensemble.formats.blend import store_digest
from ensemble.formats.store import read_store
from ensemble.memory import GIB, rows_per_block
from tests.ensemble.blend.test_blend_memory import CLASSES, MODELS, _blend, stores  # noqa: F401 (a fixture)
from tests.ensemble.formats.test_members import _store


def test_digests_of_a_fit_in_several_blocks_and_two_passes_are_the_stores(stores, tmp_path):  # noqa: F811
    runs, data = stores
    assert rows_per_block(GIB // 4, len(MODELS), CLASSES, copies=4) < 800  # several blocks of the 800 val rows
    _blend(runs, data, tmp_path / "out", "--memory", "0.25", "--cv", "2")  # a stats pass and an evaluation pass
    record = json.loads((tmp_path / "out" / "blend.json").read_text())
    for split, part in (("val", "optimize"), ("test", "apply")):
        assert record[part]["stores"] == {m: store_digest(read_store(runs / m / split), False) for m in MODELS}


def test_a_second_full_pass_is_not_hashed_again(tmp_path):
    a = _store(tmp_path / "a", dtype="float16")
    b = _store(tmp_path / "b", dtype="float16", seed=1)
    split = BlendSplit("val", (a, b), ("a", "b"))
    members = split.members(False)
    digests = PassDigests(split, members, False)
    for _ in range(2):
        for _start, _block in members.blocks(3):
            pass
    assert digests.result() == {m: store_digest(s, False) for m, s in zip(("a", "b"), (a, b))}
