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


# The depth check reads the text, not the parsed value ------------------------------------------
# parse_json measures the depth on the JSON text (brackets outside strings), which is cheaper
# than walking every parsed list and dict. The walk it replaced is kept here as the oracle.

def walk_depth(value) -> int:
    """How deep ``value`` (as json.loads returns it) nests lists and dicts: the old check."""
    level, depth = ([value] if isinstance(value, (list, dict)) else []), 0
    while level:
        depth += 1
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (list, dict))]
    return depth


#: Pieces of strings that a scan of the text could take for structure: quotes, runs of
#: backslashes (before a quote or not), brackets, JSON's escapes, non-ASCII (2-, 3- and 4-byte
#: UTF-8, a lone surrogate), control characters.
TRICKY = ['"', "\\", "\\\\", '\\"', '\\\\"', "\\\\\\", "[", "]", "{", "}", "[[[", "}}", '"]', '\\[',
          "é", "ÿ", "€", "😀", "\ud800", "\udfff", "\x00", "\n", "\t", "/", "u", "\\u", "a", " ", ","]


def tricky_string(rng) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(rng.randrange(0, 8)))


def random_value(rng, depth: int):
    """A value nested exactly ``depth`` deep, its keys distinct, with tricky strings around (the
    siblings of the deepest child nest at most 3 deep, so the size grows with ``depth``, not
    exponentially)."""
    if depth == 0:
        return rng.choice([tricky_string(rng), rng.randrange(-10**6, 10**6), rng.random(), True, None, ""])
    children = [random_value(rng, rng.randrange(min(depth, 4))) for _ in range(rng.randrange(0, 4))]
    children.insert(rng.randrange(len(children) + 1), random_value(rng, depth - 1))
    if rng.random() < 0.5:
        return children
    keys = set()
    while len(keys) < len(children):
        keys.add(tricky_string(rng) + str(len(keys)))
    return dict(zip(keys, children))


def random_text(rng, value):
    """``value`` as json.dumps writes it (ASCII or not, indented or compact), then as str or as
    bytes in each encoding json.loads reads (UTF-8 with and without a BOM, UTF-16, UTF-32)."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 0, 2, "\t"]),
                      separators=rng.choice([None, (",", ":"), (" , ", " : ")]))
    encoding = rng.choice([None, "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                           "utf-32-le", "utf-32-be"])
    return text if encoding is None else text.encode(encoding, "surrogatepass")


def test_the_text_depth_is_the_depth_of_the_value_on_random_documents():
    """Seeded random documents (depth 0-12, tricky strings in keys and values, every encoding),
    each measured whole and in chunks of a few bytes (at most 40), so escapes and strings
    cross chunks' edges: the same depth as the walk of the parsed value."""
    import random

    from ensemble.formats.common import json_depth

    rng = random.Random(23)
    for _ in range(2000):
        value = random_value(rng, rng.randrange(13))
        text = random_text(rng, value)
        want = walk_depth(json.loads(text))
        chunk = max(rng.choice((1, 2, 3, 5, 8, 13, 64)), len(text) // 40)  # 40 edges at most
        assert (json_depth(text), json_depth(text, chunk=chunk)) == (want, want), (chunk, text)


def test_the_text_depth_of_hand_made_edge_cases():
    from ensemble.formats.common import json_depth

    cases = {
        "3": 0, '"[[["': 0, "[]": 1, "{}": 1, "[[], {}]": 2, ' [ { "a" : [ ] } ] ': 3,
        '["\\\\"]': 1, '["\\\\", [1]]': 2, '["\\"", [1]]': 2, '["\\\\\\"]", [1]]': 2,
        '["' + "\\\\" * 50 + '", [[1]]]': 3, '["' + "\\\\" * 50 + '\\"[[[[", []]': 2,
        '{"\\"": {"]]]]}}}}": ["[[[[[[", {}]}}': 4, '"' + "[" * 1000 + '"': 0,
        "[" * 300 + "]" * 300: 300, '[1, "a\\u005c", [2]]': 2, '[1, "\\u0022", [2]]': 2,
    }
    for text, depth in cases.items():
        assert walk_depth(json.loads(text)) == depth, text  # the cases themselves
        for chunk in (None, 1, 2, 3, 4, 7):
            got = json_depth(text) if chunk is None else json_depth(text, chunk=chunk)
            assert got == depth, (chunk, text)


def test_the_depth_limit_is_kept_whatever_the_strings_hold():
    """Documents just at and just past the limit, their strings full of brackets, quotes and
    backslashes: the one at the limit is returned as json.loads reads it, the other refused."""
    import random

    rng = random.Random(5)
    for depth in (MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH + 2):
        for _ in range(20):
            text = random_text(rng, random_value(rng, depth))
            if depth <= MAX_JSON_DEPTH:
                assert parse_json(text, "x") == json.loads(text)
            else:
                with pytest.raises(EnsError, match=rf"^x: not JSON \(nested deeper than {MAX_JSON_DEPTH} levels\)$"):
                    parse_json(text, "x")
    shallow = '{"a": "' + "[" * 1000 + '", "b": "' + "{" * 1000 + '\\"' + "[" * 10 + '"}'
    assert parse_json(shallow, "x") == json.loads(shallow)


def test_a_deep_value_dropped_by_a_duplicate_key_is_still_refused(tmp_path):
    """json.loads keeps the last of two equal keys, so a walk of the parsed value never saw the
    deep one: the text nests deeper than the limit all the same, and is refused."""
    text = '{"a": ' + nested(MAX_JSON_DEPTH + 1) + ', "a": 1}'
    assert walk_depth(json.loads(text)) == 1
    with pytest.raises(EnsError, match=rf"^x: not JSON \(nested deeper than {MAX_JSON_DEPTH} levels\)$"):
        parse_json(text, "x")
    path = _deep_file(tmp_path, text=text)
    with pytest.raises(EnsError, match=rf"^{path}: not a JSON file \(nested deeper than {MAX_JSON_DEPTH} levels\)$"):
        read_json(path)
