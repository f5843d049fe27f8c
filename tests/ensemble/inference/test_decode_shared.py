"""Decoded batches in shared memory: the same pixels as decoding inline, reused blocks that
leave no stale rows, a queue within its memory bound, and no block left behind."""

from __future__ import annotations

import subprocess
import sys
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import pytest

from ensemble.inference.decode import PREFETCH_BYTES, Decoder, queue_batches, remove_stale_blocks
from ensemble.inference.tta import Preprocess, geometries, plan_views

from tests.ensemble.conftest import write_images

SHM = Path("/dev/shm")


def _batches(paths, batch):
    return [(lo, paths[lo:lo + batch]) for lo in range(0, len(paths), batch)]


def _copy(decoded):
    return (decoded.start, decoded.count, decoded.bad, decoded.decodes,
            {g: a.copy() for g, a in decoded.arrays.items()})


def test_workers_give_the_inline_pixels_through_reused_blocks(tmp_path):
    paths = write_images(tmp_path / "imgs", [(60, 45), (45, 70), (50, 50), (97, 40), (40, 30), (33, 61), (70, 50)])
    paths[5].write_text("not an image")  # a bad row in a block that held an image before
    geos = geometries(Preprocess(32), plan_views(["scale", "crop5"], (0.875, 1.143)))
    batches = _batches(paths, 2)  # four batches, the last one padded: blocks are reused
    with Decoder(geos, 2, workers=0) as inline:
        want = [_copy(d) for d in inline.map(batches)]
    with Decoder(geos, 2, workers=1, prefetch=2) as decoder:
        got = [_copy(d) for d in decoder.map(batches)]
        assert decoder.queue_bytes == 2 * decoder.batch_bytes
    assert [g[:4] for g in got] == [w[:4] for w in want]
    assert got[2][2][0][0] == 1  # the bad image, row 1 of batch 2
    for (*_, arrays), (*_, expected) in zip(got, want):
        for g in geos:
            np.testing.assert_array_equal(arrays[g], expected[g])
    assert not got[3][4][geos[0]][1].any() and not got[2][4][geos[0]][1].any()  # padding, bad row: zeros


def test_the_queue_stays_within_its_memory_bound():
    # crop10 x scale at 560 px in batches of 32: 15 geometries, 430 MiB a batch.
    geos = tuple(dict.fromkeys(geometries(Preprocess(560), plan_views(["crop10", "scale"]))))
    for workers in (1, 4, 15):
        decoder = Decoder(geos, 32, workers=workers)
        assert decoder.prefetch == 2 and decoder.prefetch * decoder.batch_bytes > PREFETCH_BYTES / 2
    # flip, scale at 560 px (three geometries, 88 MiB a batch): as many as fit in 1 GiB (11),
    # not two per worker (32).
    geos = tuple(dict.fromkeys(geometries(Preprocess(560), plan_views(["flip", "scale"]))))
    decoder = Decoder(geos, 32, workers=15)
    assert decoder.prefetch == 11 and decoder.prefetch * decoder.batch_bytes <= PREFETCH_BYTES
    assert queue_batches(3, 1 << 20) == 8  # small batches: two per worker, plus two


def _blocks(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM.glob(prefix + "*"))


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_blocks_are_removed_at_the_end_and_after_an_error(tmp_path):
    paths = write_images(tmp_path / "imgs", [(40, 30)] * 3)
    geos = geometries(Preprocess(16), plan_views([]))
    with Decoder(geos, 1, workers=1) as decoder:
        list(decoder.map(_batches(paths, 1)))  # (blocks are made as the batches need them)
        names = [memory.name for memory, _ in decoder._blocks]
        assert names and all((SHM / n).exists() for n in names)
    assert not any((SHM / n).exists() for n in names)
    with pytest.raises(KeyError):
        with Decoder(geos, 1, workers=1) as decoder:
            for decoded in decoder.map(_batches(paths, 1)):
                names = [memory.name for memory, _ in decoder._blocks]
                raise KeyError("the consumer failed")  # holding a batch's arrays
    assert not any((SHM / n).exists() for n in names)


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_blocks_of_a_killed_run_are_removed_by_the_next():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = int(gone.stdout)
    stale = shared_memory.SharedMemory(f"ens-{dead}-test-0", create=True, size=16)
    live = shared_memory.SharedMemory(f"ens-{__import__('os').getpid()}-test-0", create=True, size=16)
    try:
        assert f"ens-{dead}-test-0" in remove_stale_blocks()
        assert _blocks(f"ens-{dead}-") == [] and _blocks(live.name) == [live.name]
    finally:
        resource_tracker.unregister(stale._name, "shared_memory")  # unlinked by ens, not by its owner
        stale.close()
        live.close()
        live.unlink()
