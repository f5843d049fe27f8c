"""`ens submit --missing prior` counts the train json's annotations streaming
(ensemble.formats.dataset.streamed_coco_counts): the same fill and messages as json.loads of the
whole file, and a big train json in bounded memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats import stream_json
from ensemble.submission import fill
from ensemble.submission.kaggle_csv import Reference

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
from rss import measure  # noqa: E402

KNOWN = np.array([3, 7, 11, 20, 42, 99, 101], np.int64)


def reference(categories: np.ndarray = KNOWN) -> Reference:
    return Reference(test_source=Path("test.json"), test_ids=np.arange(3, dtype=np.int64), categories=categories)


def outcome(path: Path, k: int = 5, categories: np.ndarray = KNOWN):
    """What train_fill gives for ``path``: the fill's source and categories, None, or the error."""
    try:
        result = fill.train_fill(path, reference(categories), k)
    except EnsError as exc:
        return "error", str(exc)
    return None if result is None else (result.source, result.origin, result.categories.tolist())


def loaded(monkeypatch) -> None:
    """The json.loads path only: the streaming reader says the file is to be read whole."""
    monkeypatch.setattr(stream_json, "available", lambda: False)


def no_loads(monkeypatch) -> None:
    """A spy: the json.loads path fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("train_fill read the whole json")
    monkeypatch.setattr(fill, "read_json", refuse)


def doc(labels, **extra) -> dict:
    return {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(len(labels))],
            "annotations": [{"id": i, "image_id": i, "category_id": c} for i, c in enumerate(labels)],
            "categories": [{"id": int(c)} for c in KNOWN], **extra}


#: Files the streaming path reads: the counts, the tie rule, the errors.
STREAMED = {
    "counts": doc([20, 11, 3, 11, 7, 20, 3, 11]),
    "ties by the smaller id": doc([101, 99, 42]),
    "unknown categories": doc([3, 555, 556, 557, 558, 559, 560]),
    "an annotation without a category": {"annotations": [{"id": 0, "category_id": 3}, {"id": 1}]},
    "an annotation that is no object": {"annotations": [{"id": 0, "category_id": 3}, 7]},
    "categories first": {"categories": [{"id": 7}], "annotations": [{"category_id": 99}] * 3},
}
#: Files only json.loads reads (NeedsLoads): the fill's own rules.
LOADED = {
    "no annotations": doc([]),
    "annotations null": {"annotations": None},
    "not an object": [1, 2],
    "annotations not a list": {"annotations": {"0": {"category_id": 3}}},
    "an image id beyond 64 bits": doc([3, 7], info={"n": 2 ** 70}),
    "a key 'item'": doc([3, 7], info={"item": 1}),
}


@pytest.mark.parametrize("name", STREAMED)
def test_the_streaming_path_gives_the_json_loads_fill(name, tmp_path, monkeypatch):
    path = tmp_path / "train2019.json"
    path.write_text(json.dumps(STREAMED[name]))
    with monkeypatch.context() as patch:
        loaded(patch)
        expected = [outcome(path, k) for k in (2, 5)]
    no_loads(monkeypatch)
    assert [outcome(path, k) for k in (2, 5)] == expected and None not in expected


def test_the_golden_fill_of_a_streamed_file(tmp_path, monkeypatch):
    no_loads(monkeypatch)
    path = tmp_path / "train2019.json"
    path.write_text(json.dumps(STREAMED["counts"]))
    assert outcome(path) == ("train-prior", path, [11, 3, 20, 7, 42])
    path.write_text(json.dumps(STREAMED["unknown categories"]))
    assert outcome(path) == ("error", f"{path}: annotations name category ids 555, 556, 557, 558, 559 and more, "
                                      "not among the 7 categories of the dataset")
    path.write_text(json.dumps(STREAMED["an annotation without a category"]))
    assert outcome(path) == ("error", f"{path}: annotations[1] has no category_id")


@pytest.mark.parametrize("name", LOADED)
def test_a_file_the_stream_hands_on_keeps_the_fill_s_rules(name, tmp_path, monkeypatch):
    path = tmp_path / "train2019.json"
    path.write_text(json.dumps(LOADED[name]))
    calls = []
    real = fill.read_json
    monkeypatch.setattr(fill, "read_json", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = outcome(path)
    assert len(calls) == 1  # the streaming reader handed the file on: read whole, once
    with monkeypatch.context() as patch:
        loaded(patch)
        assert outcome(path) == got
    if name == "annotations not a list":
        assert got == ("error", f"{path}: 'annotations' is not a list")
    elif name.startswith(("an image", "a key")):
        assert got == ("train-prior", path, [3, 7, 11, 20, 42])
    else:
        assert got is None


def test_an_unreadable_train_json_is_one_line_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "train2019.json"
    path.write_text('{"annotations": [{"category_id": 3},')
    kind, message = outcome(path)
    assert kind == "error" and message.startswith(f"{path}: not a JSON file (") and "\n" not in message
    with monkeypatch.context() as patch:
        loaded(patch)
        assert outcome(path) == (kind, message)
    assert outcome(tmp_path / "none.json")[1].startswith(f"{tmp_path / 'none.json'}: not a JSON file (")


def write_big(path: Path, n: int) -> None:
    """An iNat-like train json of ``n`` images and annotations over 1,000 categories, written in
    pieces (the test's own memory stays small)."""
    with open(path, "w") as fh:
        fh.write('{"info": {"year": 2021}, "images": [')
        fh.write(", ".join(f'{{"id": {i}, "file_name": "train/{i % 1000:05d}/{i:08x}.jpg", "width": 500, '
                           f'"height": 375, "latitude": 12.5, "longitude": -3.25}}' for i in range(n)))
        fh.write('], "annotations": [')
        fh.write(", ".join(f'{{"id": {i}, "image_id": {i}, "category_id": {(i * i) % 1000}}}' for i in range(n)))
        fh.write('], "categories": [' + ", ".join(f'{{"id": {c}}}' for c in range(1000)) + "]}")


SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from ensemble.formats import stream_json
from ensemble.submission import fill
from ensemble.submission.kaggle_csv import Reference
if sys.argv[2] == "loads":
    stream_json.available = lambda: False
ref = Reference(test_source=Path("t"), test_ids=np.arange(1, dtype=np.int64), categories=np.arange(1000))
print(fill.train_fill(Path(sys.argv[1]), ref, 5).categories.tolist())
"""


@pytest.mark.slow
def test_a_big_train_json_is_counted_in_bounded_memory(tmp_path):
    """300,000 images and annotations (about 50 MB): json.loads holds every record at once, the
    streaming path a batch of annotations and the counts; the same fill (peaks when measured:
    167 MB streaming, 478 MB through json.loads)."""
    path = tmp_path / "train.json"
    write_big(path, 300_000)
    assert path.stat().st_size > 45e6
    python = ROOT / ".venv" / "bin" / "python"
    runs = {how: measure([python if python.exists() else sys.executable, "-c", SCRIPT, path, how], cwd=ROOT)
            for how in ("stream", "loads")}
    for run in runs.values():
        assert run.returncode == 0, run.stderr
    counts = np.bincount((np.arange(300_000) ** 2) % 1000, minlength=1000)
    expected = np.lexsort((np.arange(1000), -counts))[:5].tolist()
    assert runs["stream"].stdout == runs["loads"].stdout == f"{expected}\n"
    stream, whole = runs["stream"].peak_mb, runs["loads"].peak_mb
    assert whole - stream > 150, (stream, whole)
