"""Members.block reuses the arrays of earlier blocks that nothing holds any more (issue 24: at
iNat 2021's shape a pass writes 20 GB of fresh float32 blocks, and faulting their pages in cost
as much system time as the float16 conversion): a pass reuses one block's array, not a new one
per block; a block still held, or viewed, is never written over."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from ensemble.formats.members import Members
from tests.ensemble.blend.test_blend_memory import _random_stores

ROWS, CLASSES = 3_000, 10_000


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two float16 stores of 3,000 rows x 10,000 classes (60 MB each) and their logits."""
    return _random_stores(tmp_path_factory.mktemp("reuse"), ("a", "b"), ROWS, CLASSES, seed=0, scale=3)


def test_a_pass_reuses_the_block_nothing_holds(wide):
    """Each block after the first is the array of the one before (freed by the loop), rewritten
    whole: no new 80 MB array per block (the old way: each a new array, its pages faulted in and
    zeroed by the kernel, 1.4 ns a value measured)."""
    stores, logits = wide
    members = Members(["a", "b"], stores, views=False)
    members.reuse_arrays = True
    rows, last = 1_000, None
    for start, block in members.blocks(rows):
        assert np.array_equal(block, np.stack([x[start:start + rows] for x in logits]))
        if last is not None:
            assert block is last()
        last = weakref.ref(block)
        del block


def test_a_held_block_or_a_view_of_one_is_not_written_over(wide):
    stores, logits = wide
    members = Members(["a", "b"], stores, views=False)
    members.reuse_arrays = True
    first = members.block(0, 1_000)
    kept = first.copy()
    second = members.block(1_000, 2_000)
    assert not np.shares_memory(first, second)
    view = second[1, 5:9]
    view_kept = view.copy()
    del second
    third = members.block(2_000, 3_000)
    assert not np.shares_memory(third, view) and not np.shares_memory(third, first)
    assert np.array_equal(first, kept) and np.array_equal(view, view_kept)
    del first, view
    off = Members(["a", "b"], stores, views=False)  # reuse_arrays off (the default): new arrays
    block = off.block(0, 10)
    link = weakref.ref(block)
    del block
    assert link() is None
    again = members.block(0, 1_000)  # an array nothing holds now: reused, rewritten whole
    assert np.array_equal(again, np.stack([x[:1_000] for x in logits]))
    assert np.array_equal(third, np.stack([x[2_000:] for x in logits]))
    members.close()
