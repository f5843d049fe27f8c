"""`ens blend`'s passes overlapped (issue 24): the stores' sha256 is taken on a thread of its own
(ensemble.formats.members.StoreDigests) and the fit's passes work on a block while the next one
is read (weights_search.fitted.Reader.each_block). The outputs are those of the plain loops, byte
for byte; the digests are the stores'; an error on either thread is one line and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import types

import pytest

from ensemble.blend import run as blend_run
from ensemble.formats import members as members_module
from ensemble.formats.blend import store_digest
from ensemble.formats.store import read_store
from ensemble.memory import GIB, rows_per_block
from tests.ensemble.blend.test_blend_memory import CLASSES, MODELS, _blend, stores  # noqa: F401 (a fixture)
from tests.ensemble.conftest import ens, one_line_error
from weights_search import fitted as ws_fitted


def _plain(monkeypatch) -> None:
    """Every pass on the calling thread, its digest taken as it reads."""
    monkeypatch.setattr(members_module, "HASH_THREAD", False)
    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", 0)
    monkeypatch.setattr(blend_run, "FUSE_WORKERS", 0)


def test_overlapped_passes_give_the_plain_loops_bytes(stores, tmp_path, monkeypatch):  # noqa: F811
    runs, data = stores
    assert rows_per_block(GIB // 4, len(MODELS), CLASSES, copies=blend_run.FIT_COPIES) < 800  # several blocks of the 800 val rows
    monkeypatch.setattr(blend_run, "FUSE_WORKERS", 1)
    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", 1)
    _blend(runs, data, tmp_path / "overlapped", "--memory", "0.25", "--cv", "3")
    with monkeypatch.context() as plain:
        _plain(plain)
        _blend(runs, data, tmp_path / "plain", "--memory", "0.25", "--cv", "3")
    for name in ("predictions.csv", "blend.json"):
        assert (tmp_path / "overlapped" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    record = json.loads((tmp_path / "overlapped" / "blend.json").read_text())
    for split, part in (("val", "optimize"), ("test", "apply")):
        assert record[part]["stores"] == {m: store_digest(read_store(runs / m / split), False) for m in MODELS}


def test_the_digests_and_the_fit_s_work_run_beside_the_reading_thread(stores, tmp_path, monkeypatch):  # noqa: F811
    """Seen red before the overlap: every update and every collector's block on the main thread."""
    runs, data = stores
    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", 1)
    hashing, adding = set(), set()

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def update(self, data):
            hashing.add(threading.get_ident())
            self.inner.update(data)

        def copy(self):
            return self.inner.copy()

    monkeypatch.setattr(members_module, "hashlib", types.SimpleNamespace(sha256=lambda: Spy(hashlib.sha256())))
    add = ws_fitted.StatsPass.add

    def spy_add(self, start, log_probs):
        adding.add(threading.get_ident())
        return add(self, start, log_probs)

    monkeypatch.setattr(ws_fitted.StatsPass, "add", spy_add)
    _blend(runs, data, tmp_path / "out", "--memory", "0.25", "--cv", "2")
    main = threading.get_ident()
    assert hashing - {main} and adding and main not in adding
    record = json.loads((tmp_path / "out" / "blend.json").read_text())
    assert record["optimize"]["stores"] == {m: store_digest(read_store(runs / m / "val"), False) for m in MODELS}


def test_an_error_in_the_hasher_is_one_line_and_writes_nothing(stores, tmp_path, monkeypatch):  # noqa: F811
    runs, data = stores

    class Failing:
        def __init__(self):
            self.inner, self.rows = hashlib.sha256(), 0

        def update(self, data):
            if memoryview(data).nbytes > 1 << 16:  # a block of rows, not ids.npy or a header
                raise MemoryError("no room for the digest")
            self.inner.update(data)

        def copy(self):
            return self.inner.copy()

    monkeypatch.setattr(members_module, "hashlib", types.SimpleNamespace(sha256=Failing))
    out = tmp_path / "out"
    result = ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out, "--memory", "0.25")
    one_line_error(result, "logits.npy", "sha256", "no room for the digest")
    assert not out.exists()


def test_an_error_in_the_fit_s_worker_is_one_line_and_writes_nothing(stores, tmp_path, monkeypatch):  # noqa: F811
    runs, data = stores
    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", 1)
    seen = []

    def failing_add(self, start, log_probs):
        seen.append(threading.get_ident())
        raise ValueError("the collector broke")

    monkeypatch.setattr(ws_fitted.StatsPass, "add", failing_add)
    out = tmp_path / "out"
    result = ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out, "--memory", "0.25")
    one_line_error(result, "the collector broke")
    assert seen and threading.get_ident() not in seen
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_each_block_sees_every_block_in_order_once(workers, monkeypatch):
    import numpy as np

    from weights_search.source import ArraySource

    monkeypatch.setattr(ws_fitted, "OVERLAP_WORKERS", workers)
    logits = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
    got = []
    ws_fitted.Reader(ArraySource(logits), 3).each_block(lambda start, block: got.append((start, block.copy())))
    assert [s for s, _ in got] == [0, 3, 6, 9]
    assert np.array_equal(np.concatenate([b for _, b in got], axis=1), logits)


def test_after_a_failure_ordered_map_works_on_no_later_item():
    """The item after the failing one is already submitted when the failure happens (seen red
    before: the worker took it up before the failure was raised and the rest cancelled)."""
    from weights_search.parallel import ordered_map

    drawn, worked = threading.Event(), []

    def items():
        for i in range(6):
            if i == 2:
                drawn.set()  # item 2 is drawn, and submitted at once
            yield i

    def func(i):
        worked.append(i)
        if i == 1:
            drawn.wait(5)
            time.sleep(0.3)  # item 2 submitted meanwhile
            raise ValueError("item 1 broke")
        return i

    with pytest.raises(ValueError, match="item 1 broke"):
        list(ordered_map(func, items(), 1))
    assert worked == [0, 1]
