"""`ens blend` fuses the applied split's blocks on a worker thread while the main thread reads
the next (issue 24: the fusion pass is CPU-bound at iNat 2021's 500,000 x 10,000): the same
predictions.csv and blend.json byte for byte as all on one thread, at any --memory; the stores'
digests still come from the pass's reads, in order."""

from __future__ import annotations

import json
import threading

import pytest

import weights_search as ws
from ensemble.blend import run as blend_run
from ensemble.formats.blend import store_digest
from ensemble.formats.store import read_store
from tests.ensemble.blend.test_blend_memory import MODELS, _blend, stores  # noqa: F401 (a fixture)


@pytest.mark.parametrize("memory", ["0.25", "8"])
def test_a_worker_thread_gives_the_same_files(stores, tmp_path, monkeypatch, memory):  # noqa: F811
    runs, data = stores
    fused_on = set()
    real = ws.top_k

    def spy(log_probs, k):
        fused_on.add(threading.get_ident())
        return real(log_probs, k)

    monkeypatch.setattr(ws, "top_k", spy)
    outs = {}
    for workers in (0, 1):
        monkeypatch.setattr(blend_run, "FUSE_WORKERS", workers)
        fused_on.clear()
        outs[workers] = tmp_path / f"w{workers}"
        _blend(runs, data, outs[workers], "--memory", memory, "--cv", "2")
        assert (threading.get_ident() in fused_on) == (workers == 0), fused_on
    a, b = ((o / "predictions.csv").read_bytes() for o in outs.values())
    assert a == b and a.count(b"\n") == 1501
    records = [json.loads((o / "blend.json").read_text()) for o in outs.values()]
    assert records[0] == records[1]
    assert records[1]["apply"]["stores"] == {m: store_digest(read_store(runs / m / "test"), False) for m in MODELS}
