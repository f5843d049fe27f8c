"""Streaming reads of the training json (ensemble.formats.stream_json, ijson): the same
observations, class counts and messages as the json.loads path, on files with every oddity;
malformed files one line naming the file; memory bounded on a big file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats import places, stream_json
from ensemble.formats.stream_json import NeedsLoads

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
from rss import measure  # noqa: E402


def test_the_c_backend_is_used():
    assert stream_json.available() and stream_json.ijson.backend == "yajl2_c"


def image(i, lat=10.0, lon=20.0, date="2010-04-27 00:00:00+00:00", unc=5, **extra):
    return {"id": i, "file_name": f"{i}.jpg", "latitude": lat, "longitude": lon, "date": date,
            "location_uncertainty": unc, **extra}


def doc(images, labels, **extra):
    return {"info": {"year": 2021}, "images": images,
            "annotations": [{"id": n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(labels)], **extra}


def outcome(function, *args):
    try:
        return function(*args)
    except EnsError as exc:
        return f"EnsError: {exc}"


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    arrays = all(getattr(a, k).dtype == getattr(b, k).dtype
                 and np.array_equal(getattr(a, k), getattr(b, k), equal_nan=getattr(a, k).dtype.kind == "f")
                 for k in ("lat", "lon", "day", "uncertainty"))
    return (arrays and a.category.dtype == b.category.dtype and a.category.tolist() == b.category.tolist()
            and a.image_id.dtype == b.image_id.dtype and a.image_id.tolist() == b.image_id.tolist()
            and (a.counts, a.unlabelled, a.sha256, a.source) == (b.counts, b.unlabelled, b.sha256, b.source))


def check(path: Path, streams: bool = True):
    """read_observations of ``path`` equals the json.loads path's (or its message); ``streams``:
    whether the streaming path reads it (else it hands the file to json.loads)."""
    label = f"--geo-prior {path}"
    loaded = outcome(places._loaded_observations, path, "--geo-prior")
    if streams:
        streamed = outcome(places._streamed_observations, path, label)
    else:
        with pytest.raises(NeedsLoads):
            places._streamed_observations(path, label)
        streamed = outcome(places.read_observations, path)
    assert same(streamed, loaded), (streamed, loaded)
    return streamed


ODD_IMAGES = [
    image(1), image(2, lat=-33.5, lon=-179.9, date="2016-05-03", unc=None), image(3, date=None),
    image(4, lat=None), image(5, lat=200), image(6, date="April 2010"), image(7, lat=1e3),
    image(8, lat=-0, lon=-0.0, unc=1e300), image(9, lon=180, date="2016/12/31"),
    image(10, unc=2 ** 63 - 1), image(11, lat=12, lon=13, unc=-1), image(12, date="\u00e9t\u00e9 \"2010\" \\ \u2603"),
    {"id": 13, "latitude": 1.5, "longitude": 2.5}, image(14, nested={"a": [1, {"b": None}], "items": 3}),
    image(15), image(17, lat=45), image("s\u00e9", lat=5), image(16, lat=7.25, extra="\U0001F600 \u00e9"),
]
ODD_LABELS = [(1, 10), (2, 11), (3, 10), (4, 10), (5, 10), (6, 12), (7, 10), (8, 10), (9, 10), (9, 10), (10, 10),
              (11, 10), (12, 13), (13, 10), (14, 10), (15, 10), ("s\u00e9", "owl"), (16, 10), (99, 10), (12, 13)]


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_observations_equal_the_json_loads_path(tmp_path, ensure_ascii):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc(ODD_IMAGES, ODD_LABELS), ensure_ascii=ensure_ascii), encoding="utf-8")
    obs = check(path)
    assert obs.category.dtype == object and len(obs) > 5
    # integer categories only: the int64 path (an image of two categories)
    labels = [(i, c) for i, c in ODD_LABELS if i != "s\u00e9"] + [(3, 11)]
    path.write_text(json.dumps(doc(ODD_IMAGES, labels, categories=[{"id": 10}])), encoding="utf-8")
    obs = check(path)
    assert obs.category.dtype == np.int64 and 1 in obs.image_id.tolist() and 3 not in obs.image_id.tolist()


def test_numbers_as_json_loads_reads_them(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"images": [{"id": 1, "latitude": 1e1, "longitude": -0, "location_uncertainty": 1E2, '
                    '"date": null},'
                    ' {"id": 2, "latitude": -0.0, "longitude": 2.5e-3, "location_uncertainty": 9223372036854775807},'
                    ' {"id": 3, "latitude": 5e-324, "longitude": 179.99999999999999999, "date": "2016-02-29"},'
                    ' {"id": -9223372036854775807, "latitude": -90, "longitude": 180.0}],\n'
                    ' "annotations": [{"image_id": 1, "category_id": 9223372036854775807}, {"image_id": 2, '
                    '"category_id": -0}, {"image_id": 3, "category_id": " 7 "}, {"image_id": -9223372036854775807, '
                    '"category_id": 4}]}')
    obs = check(path)
    assert obs.category.tolist() == [9223372036854775807, 0, 7, 4] and obs.lat.tolist()[:2] == [10.0, 0.0]
    path.write_text(path.read_text().replace('"category_id": 4', '"category_id": 1e0'))
    assert check(path).endswith("is labelled 1.0; expected an integer or a string category id")


def test_without_the_c_backend_the_json_loads_path_reads(tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc(ODD_IMAGES, ODD_LABELS)))
    streamed = places.read_observations(path)
    monkeypatch.setattr(stream_json, "available", lambda: False)
    with pytest.raises(NeedsLoads):
        places._streamed_observations(path, "x")
    assert same(places.read_observations(path), streamed)


def test_surrogate_pairs_cut_between_chunks_stream(tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    images = [image(i, extra="\U0001F600" * (i % 3)) for i in range(40)]
    path.write_text(json.dumps(doc(images, [(i, i % 4) for i in range(40)])))  # ensure_ascii: \ud83d\ude00
    for chunk in (5, 7, 13, 29):
        monkeypatch.setattr(stream_json, "CHUNK", chunk)
        assert len(check(path)) == 40


def test_records_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_json, "RECORDS", 3)
    monkeypatch.setattr(stream_json, "CHUNK", 7)  # keys, escapes and brackets cut between chunks
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc(ODD_IMAGES, ODD_LABELS)))
    check(path)
    path.write_text(json.dumps(doc(ODD_IMAGES[:12], ODD_LABELS[:12]), indent=1))
    check(path)


@pytest.mark.parametrize("text", [
    '{"images": [{"id": 1, "latitude": NaN, "longitude": 3}], "annotations": [{"image_id": 1, "category_id": 0}]}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 1e400}], "annotations": [{"image_id": 1, "category_id": 0}]}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": [{"image_id": 1, '
    '"category_id": 123456789012345678901234567890}]}',
    '\ufeff{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": [{"image_id": 1, "category_id": 0}]}',
    '{"images": [{"id": "\\ud800", "latitude": 1, "longitude": 2}], "annotations": [{"image_id": "\\ud800", '
    '"category_id": 0}]}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": [{"image_id": 1, '
    '"category_id": "\\udc00x"}]}',
    # the images' path, twice or otherwise
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": [{"image_id": 1, "category_id": 0}], '
    '"images": [{"id": 1, "latitude": 3, "longitude": 4}]}',
    '{"images": {"item": {"id": 1, "latitude": 1, "longitude": 2}}, "annotations": [{"image_id": 1, '
    '"category_id": 0}]}',
    '{"images.item": {"id": 1, "latitude": 1, "longitude": 2}, "annotations": [{"image_id": 1, "category_id": 0}]}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": {"item": {"image_id": 1, '
    '"category_id": 0}}}',
    '[{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": [{"image_id": 1, "category_id": 0}]}]',
    '{"images": [], "annotations": [{"image_id": 1, "category_id": 0}]}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": []}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": {}}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": 5}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}]}',
    '{"images": 3, "annotations": [{"image_id": 1, "category_id": 0}]}',
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2, "tags": {"item": 1}}], "annotations": [{"image_id": 1, '
    '"category_id": 0}]}',
    # malformed: json.loads's message (line and column) for a file this small
    '{"images": [{"id": 1, "latitude": 1, "longitude": 2}], "annotations": [{"image_id": 1, "category_id": 0}]',
    '{"images": [{"id": 1, "latitude": 1,, "longitude": 2}], "annotations": []}',
    '{"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 0}]} []',
    '{"images": [{"id": 1, "date": "\t"}], "annotations": [{"image_id": 1, "category_id": 0}]}',
    '',
])
def test_what_the_streaming_path_hands_to_json_loads(tmp_path, text):
    path = tmp_path / "train.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check(path, streams=False)


def test_nesting_deeper_than_json_loads_reads(tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    text = json.dumps(doc([image(1)], [(1, 0)]))
    path.write_text(text[:-1] + ', "info": ' + "[" * 127 + "]" * 127 + "}")
    assert len(check(path)) == 1
    deep = text[:-1] + ', "info": ' + "[" * 129 + "]" * 129 + "}"
    path.write_text(deep)
    assert check(path, streams=False).endswith(": not a JSON file (nested deeper than 128 levels)")
    monkeypatch.setattr(stream_json, "SMALL", 0)  # a big file: refused as the scan meets the depth
    assert check(path).endswith(": not a JSON file (nested deeper than 128 levels)")
    path.write_text("[" * 100_000 + "]" * 100_000)  # before ijson's paths grow with it
    assert check(path) == f"EnsError: --geo-prior {path}: not a JSON file (nested deeper than 128 levels)"


def test_lone_surrogates_in_bytes(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'{"images": [{"id": "\xed\xa0\x80", "latitude": 1, "longitude": 2}], '
                     b'"annotations": [{"image_id": "\xed\xa0\x80", "category_id": 0}]}')
    check(path, streams=False)
    path.write_bytes(b'{"images": [{"id": 1, "latitude": 1, "longitude": 2, "x": "\xff"}], '
                     b'"annotations": [{"image_id": 1, "category_id": 0}]}')
    assert check(path, streams=False).startswith("EnsError: --geo-prior")


@pytest.mark.parametrize("images, labels", [
    ([image(1), {"file_name": "x"}], [(1, 0)]),  # an image without an id...
    ([image(1), image(2, lat="1")], [(1, 0), (2, 0), (5, 1.5)]),  # ...comes before a latitude of text
    ([image(1, lon="x"), image(2, lat="1")], [(1, 0), (2, 0)]),  # the latitudes before the longitudes
    ([image(1, lon="x"), image(2, date=5), image(3, lat="y")], [(1, 0), (2, 0)]),  # an unlabelled image's is no error
    ([image(1, date=5), image(2, unc=True)], [(1, 0), (2, 0)]),
    ([image(1), image(2)], [(1, 1.5), (2, 0)]),  # a label that is no id...
    ([image(1, lat="x"), image(2)], [(1, 0), (2, [1])]),  # ...comes before the fields
    ([image(1), image(2)], [(1, 0), (2, 1.5), (2, 1.5)]),
    ([image(1, lat=None), image(2, lat=None)], [(1, 0), (2, 0)]),  # no usable place
    ([image(1), image(2)], [(3, 0)]),  # no annotated image
    ([image(True), image(2)], [(2, 0)]),
])
def test_messages_equal_the_json_loads_paths(tmp_path, images, labels):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc(images, labels)))
    result = check(path)
    assert isinstance(result, str) and result.startswith(f"EnsError: --geo-prior {path}: ") and "\n" not in result


def test_an_annotation_without_its_fields_comes_after_the_image_ids(tmp_path):
    path = tmp_path / "train.json"
    text = json.dumps(doc([image(1), image(2)], [(1, 0)]))
    path.write_text(text.replace('"annotations": [', '"annotations": ["x", '))
    assert check(path) == f'EnsError: {path}: annotations[0] lacks "image_id" or "category_id"'
    path.write_text(text.replace('"annotations": [', '"annotations": ["x", ').replace('{"id": 2', '{"id": null'))
    assert 'images[1] has no "id"' in check(path)


def write_big(path: Path, n: int) -> None:
    """A training json of ``n`` images and annotations, written in pieces (the test's memory stays small)."""
    with open(path, "w") as fh:
        fh.write('{"info": {"year": 2021}, "images": [')
        for start in range(0, n, 10_000):
            fh.write(", ".join(json.dumps(image(i, lat=(i % 170) - 85, lon=(i % 350) - 175,
                                                rights_holder="Ken-ichi Ueda", license="http://x/by-nc/4.0/"))
                               for i in range(start, min(n, start + 10_000))) + (", " if start + 10_000 < n else ""))
        fh.write('], "annotations": [')
        fh.write(", ".join(f'{{"id": {i}, "image_id": {i}, "category_id": {i % 1000}}}' for i in range(n)))
        fh.write('], "categories": [' + ", ".join(f'{{"id": {c}}}' for c in range(1000)) + "]}")


@pytest.mark.slow
def test_malformed_big_file_is_one_line_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_json, "SMALL", 0)  # the streaming parser's message, as for a file over 64 MiB
    path = tmp_path / "train.json"
    write_big(path, 2_000)
    text = path.read_text()
    for broken, reason in [(text[:-1], "premature EOF"), (text.replace('"id": 1500,', '"id": 1500,,'), "parse error"),
                           (text + " []", "trailing garbage")]:
        path.write_text(broken)
        with pytest.raises(EnsError) as caught:
            places.read_observations(path)
        message = str(caught.value)
        assert message.startswith(f"--geo-prior {path}: not a JSON file (") and reason in message, message
        assert "bytes before byte" in message and "\n" not in message


SCRIPT = """
import sys
from ensemble.formats import places
obs = places.{function}(sys.argv[1], *{extra})
print(len(obs))
"""


def python() -> Path:
    venv = ROOT / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def peaks(tmp_path: Path, script: str, loaded_script: str, expected: str) -> tuple[int, int, int]:
    """Peak RSS (MB) of ``script`` on training jsons of 25,000 and 100,000 images, and of
    ``loaded_script`` (the json.loads path) on the bigger one, each in a process of its own."""
    result = []
    for n, code in [(25_000, script), (100_000, script), (100_000, loaded_script)]:
        path = tmp_path / f"train{n}.json"
        if not path.exists():
            write_big(path, n)
        run = measure([python(), "-c", code, path], cwd=ROOT)
        assert run.returncode == 0 and run.stdout == expected.format(n=n), run.stderr
        result.append(run.peak_mb)
    return tuple(result)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_images(tmp_path):
    """100,000 images (26 MB of json): json.loads's path holds every record at once (135 MB above
    the interpreter when measured), the streaming one a batch of them (48 MB, 4 MB more than at
    25,000 images: the arrays of the observations)."""
    small, big, loaded = peaks(tmp_path, SCRIPT.format(function="read_observations", extra="()"),
                               SCRIPT.format(function="_loaded_observations", extra="('--geo-prior',)"), "{n}\n")
    assert big - small < 20 and loaded - big > 50, (small, big, loaded)


# --------------------------------------------------------------------------------------------
# Class counts (ens blend --prior, ens report's long tail)


def counts_outcome(path: Path, streams: bool):
    """read_class_counts of ``path``, which the streaming path reads (``streams``) or hands to json.loads."""
    from ensemble.formats import dataset

    label = f"--prior {path}"
    if streams:
        result = outcome(dataset.streamed_coco_counts, path, label, dataset._COUNTS_HINT)
    else:
        with pytest.raises(NeedsLoads):
            dataset.streamed_coco_counts(path, label, dataset._COUNTS_HINT)
        result = outcome(dataset.read_class_counts, path)
    # the json.loads path, as read_class_counts took it before streaming
    try:
        loaded_doc = dataset.read_json(path, label, hint=dataset._COUNTS_HINT)
        if not isinstance(loaded_doc, dict):
            raise EnsError(f"{label}: expected a JSON object (a COCO/iNat json or {{\"category_id\": count}})")
        loaded = dataset.coco_counts(loaded_doc, label)
    except EnsError as exc:
        loaded = f"EnsError: {exc}"
    assert result == loaded and (isinstance(result, str) or list(result.items()) == list(loaded.items())), \
        (result, loaded)
    return result


@pytest.mark.parametrize("annotations, categories", [
    ([{"category_id": 3}, {"category_id": 1}, {"category_id": 3}, {"category_id": " 7 "}, {"category_id": "owl"}],
     [{"id": 5}, {"id": "1"}, {"id": True}, "x", {"id": 1.5}, {"name": "no id"}, {"id": 3}]),
    ([{"category_id": 2}] * 5 + [{"category_id": 9223372036854775807}], None),
    ([{"category_id": "\u00e9t\u00e9"}, {"category_id": "\U0001F600"}, {"category_id": "a\"b\\c"}], []),
    ([{"category_id": 1}, {"category_id": 1.5}], [{"id": 1}]),  # one line naming the annotation
    ([{"category_id": 1}, {"image_id": 1}], [{"id": 1}]),
    ([{"category_id": 1}, ["category_id"]], [{"id": 1}]),
    ([{"category_id": 1}, {"category_id": True}], [{"id": 1}]),
])
@pytest.mark.parametrize("records", [1 << 14, 2])
def test_class_counts_equal_the_json_loads_path(tmp_path, monkeypatch, annotations, categories, records):
    monkeypatch.setattr(stream_json, "RECORDS", records)
    path = tmp_path / "train.json"
    body = {"images": [image(1)], "annotations": annotations}
    if categories is not None:
        body["categories"] = categories
    path.write_text(json.dumps(body))
    counts_outcome(path, streams=True)


@pytest.mark.parametrize("text", [
    '{"3": 10, "4": 0}',  # the other form: {"category_id": count}
    '{"annotations": [], "categories": [{"id": 1}]}',
    '{"annotations": {"item": {"category_id": 1}}}',
    '{"annotations": [{"category_id": 1}], "annotations": [{"category_id": 2}]}',
    '{"annotations": [{"category_id": 1}], "categories": [{"id": 2}], "categories": [{"id": 3}]}',
    '{"annotations": [{"category_id": NaN}]}',
    '{"annotations": [{"category_id": 123456789012345678901234567890}]}',
    '[{"annotations": [{"category_id": 1}]}]',
    '{"annotations": [{"category_id": 1}]',
    '',
])
def test_class_counts_the_streaming_path_hands_to_json_loads(tmp_path, text):
    path = tmp_path / "train.json"
    path.write_text(text)
    from ensemble.formats.dataset import read_class_counts

    if text.startswith('{"3"'):
        assert read_class_counts(path) == {3: 10, 4: 0}
        return
    counts_outcome(path, streams=False)


@pytest.mark.slow
def test_class_counts_of_a_big_file_in_bounded_memory(tmp_path):
    script = ("import sys; from pathlib import Path; from ensemble.formats import dataset; "
              "c = {}; print(len(c), sum(c.values()))")
    small, big, loaded = peaks(tmp_path, script.format("dataset.read_class_counts(Path(sys.argv[1]))"),
                               script.format("dataset.coco_counts(dataset.read_json(Path(sys.argv[1])), 'x')"),
                               "1000 {n}\n")
    assert big - small < 20 and loaded - big > 50, (small, big, loaded)
