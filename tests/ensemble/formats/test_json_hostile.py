"""Hostile JSON in every file ens reads: nested 100,000 levels deep, nested just past the depth
ens accepts, or a path that is a FIFO, a device or a folder. Each is one line naming the file
(and the key), never a RecursionError traceback nor a read that waits forever."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from ensemble.errors import EnsError
from ensemble.formats.common import MAX_JSON_DEPTH, parse_json, read_json

from tests.ensemble.conftest import ens, make_inat, ok, one_line_error, tiny_onnx

DEEP = "[" * 100_000 + "]" * 100_000


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_file(tmp_path: Path, name: str = "deep.json", text: str = DEEP) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# Each reader kind: (tmp_path, text) -> what it raises on, and the words its message must hold.

def _read_json(tmp_path, text):
    path = _deep_file(tmp_path, text=text)
    return lambda: read_json(path), f"{path}: not a JSON file ("


def _parse_json(tmp_path, text):
    return lambda: parse_json(text, "--x"), "--x: not JSON ("


def _model_metadata(tmp_path, text):
    from ensemble.formats.model import ModelMetadata

    props = {"ens.format": "1", "ens.architecture": text}
    return lambda: ModelMetadata.from_props(props, "m.onnx"), "m.onnx: ens.architecture "


def _split_json(tmp_path, text):
    from ensemble.formats.dataset import load_split

    path = _deep_file(tmp_path, "val2019.json", text)
    return lambda: load_split(path), f"{path}: not a JSON file ("


def _prior_json(tmp_path, text):
    from ensemble.formats.dataset import read_class_counts

    path = _deep_file(tmp_path, "train2019.json", text)
    return lambda: read_class_counts(path), f"--prior {path}: not a JSON file ("


def _manifest(tmp_path, text):
    from ensemble.formats.store import StoreManifest

    _deep_file(tmp_path, "manifest.json", text)
    return lambda: StoreManifest.read(tmp_path), f"{tmp_path / 'manifest.json'}: unreadable ("


def _blend_json(tmp_path, text):
    from ensemble.formats.blend import BlendRecord

    path = _deep_file(tmp_path, "blend.json", text)
    return lambda: BlendRecord.read(path, f"--weights {path}"), f"--weights {path}: not a blend.json ("


def _blend_summary(tmp_path, text):
    from ensemble.formats.blend import BlendSummary

    path = _deep_file(tmp_path, "blend.json", text)
    return lambda: BlendSummary.read(path), f"{path}: not a readable JSON file ("


def _classes(tmp_path, text):
    from exporters.classes import load_class_ids

    path = _deep_file(tmp_path, "classes.json", text)
    return lambda: load_class_ids(path, 5), f"--classes {path}: not valid JSON ("


def _submit_categories(tmp_path, text):
    from ensemble.submission.kaggle_csv import FORMATS, _categories

    _deep_file(tmp_path, "train2019.json", text)
    return lambda: _categories(tmp_path, FORMATS["inat2019"]), f"{tmp_path / 'train2019.json'}: not a JSON file ("


def _train_fill(tmp_path, text):
    from ensemble.submission.fill import train_fill

    path = _deep_file(tmp_path, "train2019.json", text)
    return lambda: train_fill(path, None, 5), f"{path}: not a JSON file ("


def _ledger(tmp_path, text):
    from ensemble.formats.ledger import Ledger

    ledger = Ledger(tmp_path / "submissions")

    def write():
        path = tmp_path / "submissions" / "a.csv"
        path.write_text("id,predicted\n")
        return path

    ledger.record(write, created="2026-01-01T00:00:00Z", format="inat2019", rows=0, source="p.csv", blend=None)
    with sqlite3.connect(ledger.path) as con:
        con.execute("UPDATE submissions SET blend_members = ? WHERE id = 1", (text,))
    con.close()
    return ledger.entries, "ledger entry 1: blend_members '[[["


READERS = [_read_json, _parse_json, _model_metadata, _split_json, _prior_json, _manifest, _blend_json,
           _blend_summary, _classes, _submit_categories, _train_fill, _ledger]


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__.lstrip("_"))
@pytest.mark.parametrize("text", [DEEP, nested(MAX_JSON_DEPTH + 1)], ids=["100000", "past-the-limit"])
def test_deeply_nested_json_is_one_line_in_every_reader(tmp_path, reader, text):
    call, words = reader(tmp_path, text)
    with pytest.raises(EnsError) as info:
        call()
    message = str(info.value)
    assert words in message, message
    if reader is not _ledger:  # the ledger says which column is malformed, not why
        assert f"(nested deeper than {MAX_JSON_DEPTH} levels)" in message, message
    assert "\n" not in message and len(message) < 400, message
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_the_depth_limit_names_itself_and_what_is_allowed_passes(tmp_path):
    assert parse_json(nested(MAX_JSON_DEPTH), "x") == json.loads(nested(MAX_JSON_DEPTH))
    assert parse_json('{"a": [1, {"b": [2]}]}', "x") == {"a": [1, {"b": [2]}]}
    assert parse_json("3", "x") == 3 and parse_json('"s"', "x") == "s"  # scalars at the top
    with pytest.raises(EnsError, match=rf"^x: not JSON \(nested deeper than {MAX_JSON_DEPTH} levels\)$"):
        parse_json(nested(MAX_JSON_DEPTH + 1), "x")
    with pytest.raises(EnsError, match=rf"^x: not JSON \(nested deeper than {MAX_JSON_DEPTH} levels\)$"):
        parse_json(DEEP, "x")
    deep_object = '{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(EnsError, match="nested deeper"):
        parse_json(deep_object, "x")
    with pytest.raises(EnsError, match=r"^x: not JSON \(Expecting value: line 1 column 1 \(char 0\)\); do this$"):
        parse_json("", "x", hint="do this")


# End to end: the commands that read these files --------------------------------------------

def test_ens_info_of_a_model_with_deep_metadata(tmp_path):
    import onnx

    model = tiny_onnx(tmp_path / "m.onnx")
    graph = onnx.load(str(model))
    for prop in graph.metadata_props:
        if prop.key == "ens.class_ids":
            prop.value = DEEP
    onnx.save(graph, str(model))
    one_line_error(ens("info", model), f"{model}: ens.class_ids [[[[")


def test_ens_blend_with_deep_weights_and_prior_and_an_infer_index(tmp_path):
    deep = _deep_file(tmp_path)
    one_line_error(ens("blend", "--weights", deep, "--runs", tmp_path), f"--weights {deep}: not a blend.json (nested")
    one_line_error(ens("infer", tmp_path / "m.onnx", "--index", deep), f"{deep}: not a JSON file (nested")


def test_ens_export_deep_arch_kwargs():
    pytest.importorskip("torch")
    one_line_error(ens("export", "x.pt", "--arch", "resnet18", "--arch-kwargs", DEEP),
                   "--arch-kwargs: not valid JSON (nested deeper than")


def test_a_deep_key_json_left_in_a_partial_store_is_computed_afresh(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=2, n_test=1)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    partial = tmp_path / "runs" / "tiny" / "val" / ".partial"
    partial.mkdir(parents=True)
    (partial / "key.json").write_text(DEEP)
    ok(ens("infer", model, "--data", data, "--split", "val", "--workers", "0", "--out", tmp_path / "runs"))


# Paths that are not regular files ------------------------------------------------------------

@pytest.fixture
def fifo(tmp_path):
    """A named pipe no one writes to. Should a reader open it for a blocking read, a guard
    thread opens its write end after 10 s so the test fails instead of hanging."""
    path = tmp_path / "blend.json"
    os.mkfifo(path)
    done = threading.Event()

    def guard():
        if not done.wait(10):
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails if no reader: nothing waits then
            os.write(fd, b"{}")
            os.close(fd)

    thread = threading.Thread(target=lambda: _quietly(guard), daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


def _quietly(call):
    try:
        call()
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_read_json_refuses_a_fifo_without_opening_it(fifo):
    with pytest.raises(EnsError, match=rf"^{fifo}: a named pipe \(FIFO\), not a regular file$"):
        read_json(fifo)
    with pytest.raises(EnsError, match=rf"^--w {fifo}: a named pipe \(FIFO\), not a regular file; give a file$"):
        read_json(fifo, f"--w {fifo}", hint="give a file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_ens_blend_weights_fifo_is_one_line(fifo, tmp_path):
    one_line_error(ens("blend", "--weights", fifo, "--runs", tmp_path),
                   f"--weights {fifo}: a named pipe (FIFO), not a regular file")


def test_read_json_of_a_folder_and_of_a_device(tmp_path):
    with pytest.raises(EnsError, match=rf"^{tmp_path}: a folder, not a regular file$"):
        read_json(tmp_path)
    if os.path.exists("/dev/zero"):  # a read of it would never end
        with pytest.raises(EnsError, match=r"^/dev/zero: a character device, not a regular file$"):
            read_json("/dev/zero")
    one_line_error(ens("blend", "--weights", tmp_path, "--runs", tmp_path),
                   f"--weights {tmp_path}: a folder, not a regular file")


def test_read_json_missing_file_keeps_its_messages(tmp_path):
    path = tmp_path / "none.json"
    with pytest.raises(EnsError, match=r"^.*none\.json: gone$"):
        read_json(path, missing="gone")
    with pytest.raises(EnsError, match=r"No such file or directory"):
        read_json(path)


def test_a_deeply_nested_reply_from_kaggle_is_one_line():
    """Kaggle's error bodies are JSON the client parses; a deep one is no reason, not a traceback."""
    from ensemble.submission.kaggle_client import _reason

    class Response:
        status_code, reason, url = 500, "Internal Server Error", "https://api.kaggle.com/v1/x/CreateSubmission"

        def json(self):
            return json.loads(DEEP)

    error = OSError("refused")
    error.response = Response()
    assert _reason(error) == "Kaggle answered 500 to CreateSubmission: Internal Server Error"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_in_place_of_a_store_array_is_one_line(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=4, n_test=1)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    runs = tmp_path / "runs"
    ok(ens("infer", model, "--data", data, "--split", "val", "--workers", "0", "--out", runs))
    logits = runs / "tiny" / "val" / "logits.npy"
    logits.unlink()
    os.mkfifo(logits)
    done = threading.Event()

    def guard():  # should a reader open it for a blocking read: fail the test, do not hang
        if not done.wait(10):
            fd = os.open(logits, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    thread = threading.Thread(target=lambda: _quietly(guard), daemon=True)
    thread.start()
    try:
        one_line_error(ens("blend", "--optimize", "val", "--runs", runs, "--out", tmp_path / "b"),
                       f"{logits}: a named pipe (FIFO), not a regular file")
    finally:
        done.set()
        thread.join()
