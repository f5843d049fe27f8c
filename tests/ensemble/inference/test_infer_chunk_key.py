"""The chunk size decides how a store is computed and resumed, never whether a complete store is
kept: its arrays are the same bytes at any chunk size (batches never straddle chunks), so a run
whose chunk follows another ``--memory``, ``ENS_MEMORY`` or number of models keeps it. Chunks of
an interrupted run resume at their own chunk size when ``--chunk-size`` is left out and they fit
the budget; one line says what to pass when they do not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ensemble.errors import EnsError
from ensemble.formats import store as store_module
from ensemble.formats.dataset import load_split
from ensemble.formats.store import LOGITS, MANIFEST, PARTIAL
from ensemble.inference.decode import queue_budget
from ensemble.inference.run import ChunkRoom, InferOptions, LogitMemory, infer
from ensemble.memory import GIB, MIN_GIB

from tests.ensemble.conftest import Killed, ens, kill_after, make_inat, store_bytes, tiny_onnx

#: Bytes of --memory under which one 1,000-class model gets chunks of 1024 images (batches of
#: 2) and three get fewer (about 460).
TIGHT = 4_000_000


def _options(out: Path, **kw) -> InferOptions:
    return InferOptions(**{"workers": 0, "batch_size": 2, "out": out, **kw})


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _stamp(folder: Path) -> tuple:
    """The store's array bytes and its files' modification times (a rewrite changes them; the
    lock file ``.lock`` gets each run's pid)."""
    return store_bytes(folder), {p.name: p.stat().st_mtime_ns for p in folder.iterdir()
                                 if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def wide3(tmp_path):
    """Three 1,000-class models (other seeds: other sha256s) and a small dataset."""
    models = [tiny_onnx(tmp_path / f"{n}.onnx", classes=1000, seed=i) for i, n in enumerate("abc")]
    return models, make_inat(tmp_path / "inat", n_val=6, n_test=5)


def test_a_complete_store_has_the_same_bytes_at_any_chunk_size(tmp_path, inat):
    model = tiny_onnx(tmp_path / "a.onnx")
    splits = [load_split(inat / "val2019.json"), load_split(inat / "test2019.json")]
    kw = dict(tta=("flip",), keep_views=True, batch_size=3)
    small = infer([model], splits, _options(tmp_path / "small", chunk_size=3, **kw))
    large = infer([model], splits, _options(tmp_path / "large", chunk_size=1000, **kw))
    for a, b in zip(small.stores, large.stores):
        assert _manifest(a.path)["chunk_size"] == 3 and _manifest(b.path)["chunk_size"] == 1002
        assert store_bytes(a.path) == store_bytes(b.path)
        assert set(store_bytes(a.path)) >= {"logits.npy", "ids.npy", "views.npy"}


def test_adding_models_under_a_tight_memory_keeps_the_first_store(wide3):
    models, inat = wide3
    val = load_split(inat / "val2019.json")
    out = models[0].parent / "runs"
    first = infer(models[:1], [val], _options(out, memory=TIGHT)).stores[0]
    assert _manifest(first.path)["chunk_size"] == 1024
    before = _stamp(first.path)
    three = infer(models, [val], _options(out, memory=TIGHT))
    assert [(s.path.parent.name, s.computed) for s in three.stores] == [("a", False), ("b", True), ("c", True)]
    assert _manifest(out / "b" / "val")["chunk_size"] < 1024  # this run's chunk was another
    assert _stamp(first.path) == before
    again = infer(models[:1], [val], _options(out, memory=TIGHT))
    assert again.decodes == 0 and not again.stores[0].computed and _stamp(first.path) == before


def test_an_ens_memory_change_keeps_complete_stores(tmp_path, monkeypatch):
    """10,000 classes, crop10 kept: 0.25 GiB gives chunks under 1024 images, 3 GiB 1024."""
    make_inat(tmp_path / "inat", n_val=2, n_test=3)
    model = tiny_onnx(tmp_path / "wide.onnx", classes=10_000)
    test = load_split(tmp_path / "inat" / "test2019.json")
    kw = dict(tta=("crop10",), keep_views=True)
    monkeypatch.setenv("ENS_MEMORY", "0.25")
    small = infer([model], [test], _options(tmp_path / "small", **kw)).stores[0]
    assert _manifest(small.path)["chunk_size"] < 1024
    monkeypatch.setenv("ENS_MEMORY", "3")
    store = infer([model], [test], _options(tmp_path / "runs", **kw)).stores[0]
    assert _manifest(store.path)["chunk_size"] == 1024
    before = _stamp(store.path)
    monkeypatch.setenv("ENS_MEMORY", "0.25")
    again = infer([model], [test], _options(tmp_path / "runs", **kw))
    assert again.decodes == 0 and not again.stores[0].computed and _stamp(store.path) == before


def test_a_store_of_the_previous_ens_with_its_chunk_in_the_key_is_kept(wide3, monkeypatch):
    """The ens before this one digested the chunk size into run_key: its stores stay valid."""
    models, inat = wide3
    keys = []
    init = store_module.StoreWriter.__init__
    monkeypatch.setattr(store_module.StoreWriter, "__init__",
                        lambda self, path, key, *a: keys.append(dict(key)) or init(self, path, key, *a))
    val = load_split(inat / "val2019.json")
    out = models[0].parent / "runs"
    store = infer(models[:1], [val], _options(out, memory=TIGHT)).stores[0].path
    manifest = _manifest(store)
    assert keys[0]["chunk_size"] == manifest["chunk_size"] == 1024
    manifest["run_key"] = hashlib.sha256(json.dumps(keys[0], sort_keys=True).encode()).hexdigest()
    (store / MANIFEST).write_text(json.dumps(manifest))
    before = _stamp(store)
    three = infer(models, [val], _options(out, memory=TIGHT))
    assert [s.computed for s in three.stores] == [False, True, True] and _stamp(store) == before
    # A key that differs in anything else is still another store.
    manifest["run_key"] = hashlib.sha256(json.dumps({**keys[0], "merge": "gmean"}, sort_keys=True)
                                         .encode()).hexdigest()
    (store / MANIFEST).write_text(json.dumps(manifest))
    assert infer(models[:1], [val], _options(out, memory=TIGHT)).stores[0].computed


def test_a_partial_store_resumes_under_another_budget_with_its_recorded_chunk(wide3):
    models, inat = wide3
    val = load_split(inat / "val2019.json")  # 6 images: 3 chunks of 2
    root = models[0].parent
    whole = infer(models[:2], [val], _options(root / "whole", chunk_size=2))
    out = root / "runs"
    with pytest.raises(Killed):
        infer(models[:2], [val], _options(out, chunk_size=2, memory=TIGHT), progress=kill_after(1))
    assert (out / "a" / "val" / PARTIAL / "chunk-000000.npz").is_file()
    notes = []
    resumed = infer(models[:2], [val], _options(out, memory=2 * TIGHT),
                    progress=lambda e: notes.append(e.message) if e.kind == "note" else None)
    assert resumed.decodes == 4  # the 2 images of the chunk saved are not decoded again
    for s, w in zip(resumed.stores, whole.stores):
        assert s.computed and _manifest(s.path)["chunk_size"] == 2
        assert store_bytes(s.path) == store_bytes(w.path)
        assert "--chunk-size 2" in _manifest(s.path)["command"]  # the command that finishes it repeats it
    assert any("chunks of 2" in n for n in notes if n), notes


def test_a_partial_whose_chunk_no_longer_fits_is_one_line_saying_what_to_pass(wide3):
    models, inat = wide3
    val = load_split(inat / "val2019.json")
    out = models[0].parent / "runs"
    with pytest.raises(Killed):
        infer(models[:1], [val], _options(out, chunk_size=4), progress=kill_after(1))
    chunk = out / "a" / "val" / PARTIAL / "chunk-000000.npz"
    saved = chunk.read_bytes()
    # 250,000 bytes of --memory leave room for chunks of 2 images of this model, not 4.
    with pytest.raises(EnsError) as failed:
        infer(models[:1], [val], _options(out, memory=250_000))
    line = str(failed.value)
    assert "\n" not in line and "chunks of 4" in line and "--memory 0.25" in line, line
    assert "--chunk-size 2" in line and str(out / "a" / "val") in line, line
    assert chunk.read_bytes() == saved  # nothing dropped
    # Given what the line says: the store is computed again at that chunk size.
    again = infer(models[:1], [val], _options(out, memory=250_000, chunk_size=2)).stores[0]
    assert again.computed and _manifest(again.path)["chunk_size"] == 2 and not (again.path / PARTIAL).exists()
    assert (again.path / LOGITS).is_file()


@pytest.mark.parametrize("need", [100_000, 200_000_000, 2_900_000_000, 3_500_000_000, 20_000_000_000])
def test_the_memory_the_line_gives_holds_the_chunks_and_a_hundredth_less_does_not(need):
    """Left a quarter of a budget for the decoded images, at most 1 GiB: a chunk needing 3.5 GB
    needs --memory 4.26, not 3.5 / 0.75 = 4.34."""
    room = ChunkRoom(LogitMemory(row=need, batch=0), 0, 0, 0, "", "")
    gib = room.memory_for(1)
    fits = [int(g * GIB) - queue_budget(int(g * GIB)) >= need for g in (gib, gib - 0.01)]
    assert fits[0] and (gib == MIN_GIB or not fits[1]), (need, gib)
    assert gib >= MIN_GIB and round(gib, 2) == gib
    if need == 3_500_000_000:
        assert gib == 4.26


def test_the_memory_help_says_what_it_sizes_in_ens_infer():
    """The --memory help every command shares named only blocks of rows, which ens infer has
    not: there it sizes the chunk buffers and the queue of decoded batches."""
    from ensemble import memory

    text = " ".join(memory.HELP.split())
    assert "ens infer" in text and "chunk" in text and "decoded" in text, text
    shown = " ".join(ens("infer", "--help").output.replace("│", " ").split())
    assert "ens infer: the chunks of logits" in shown, shown
