"""Member sources (weights_search.source): blocks of rows from arrays, stacks and memory maps."""

import numpy as np
import pytest

from weights_search.source import ArraySource, as_source, blocks, check_labels, default_block_rows


def _stack(m=3, n=11, c=4, seed=0):
    return np.random.default_rng(seed).normal(size=(m, n, c)).astype(np.float16)


def test_blocks_of_a_stack_rebuild_it_in_float32():
    stack = _stack()
    source = ArraySource(stack)
    assert (source.n_members, source.n_rows, source.n_classes) == stack.shape
    got = list(blocks(source, 4))
    assert [s for s, _ in got] == [0, 4, 8]
    assert [b.shape[1] for _, b in got] == [4, 4, 3]
    joined = np.concatenate([b for _, b in got], axis=1)
    assert joined.dtype == np.float32
    np.testing.assert_array_equal(joined, stack.astype(np.float32))


def test_a_list_of_memory_maps_is_read_block_by_block(tmp_path):
    stack = _stack()
    maps = []
    for m, member in enumerate(stack):
        np.save(tmp_path / f"{m}.npy", member)
        maps.append(np.load(tmp_path / f"{m}.npy", mmap_mode="r"))
    source = as_source(maps)
    np.testing.assert_array_equal(source.block(5, 9), stack[:, 5:9].astype(np.float32))
    # A stop past the end ends the block at the last row.
    assert source.block(9, 100).shape == (3, 2, 4)


def test_a_source_is_returned_as_it_is():
    source = ArraySource(_stack())
    assert as_source(source) is source


def test_bad_members_and_rows_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        ArraySource([np.zeros((3, 4)), np.zeros((3, 5))])
    with pytest.raises(ValueError, match="n_members, n_samples, n_classes"):
        ArraySource(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="outside"):
        ArraySource(_stack()).block(12, 13)
    with pytest.raises(ValueError, match="at least 1"):
        list(blocks(ArraySource(_stack()), 0))


def test_a_source_giving_blocks_of_the_wrong_shape_is_named():
    class Short(ArraySource):
        def block(self, start, stop):
            return super().block(start, stop)[:, :1]
    with pytest.raises(ValueError, match="shape"):
        list(blocks(Short(_stack()), 4))


def test_labels_are_checked_against_the_source():
    source = ArraySource(_stack())
    assert check_labels(source, np.arange(11) % 4).shape == (11,)
    with pytest.raises(ValueError, match="11 samples"):
        check_labels(source, np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="0..3"):
        check_labels(source, np.full(11, 4))


def test_default_block_rows_follow_the_bytes():
    source = ArraySource(np.zeros((2, 3, 1000), dtype=np.float32))
    assert default_block_rows(source, 80_000) == 10
    assert default_block_rows(source, 1) == 1
