"""The shared small rules: JSON reader, exception describer, value checks (golden values)."""

from __future__ import annotations

import math

import pytest

from ensemble.errors import EnsError
from ensemble.formats.common import (describe, first_line, is_count, is_finite, is_id, is_int, is_name,
                                     is_names, is_number, read_json)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("check, accepted, refused", [
    (is_int, [0, -3, 10**20], [True, False, 1.0, "1", None, [1]]),
    (is_count, [0, 1, 10**20], [-1, True, False, 0.0, 1.5, "2", None]),
    (is_number, [0, -2, 1.5, NAN, INF, -INF], [True, False, "1", None, [1.0]]),
    (is_finite, [0, -2, 1.5, 1e308], [NAN, INF, -INF, True, False, "1", None]),
    (is_id, [0, -4, "a", "", "17"], [True, False, 1.0, None, ["a"]]),
    (is_name, ["a", " "], ["", None, 1, True, ["a"]]),
    (is_names, [[], ["a"], ["a", ""]], ["a", ("a",), ["a", 1], ["a", None], None, {"a": 1}]),
])
def test_each_check_accepts_and_refuses_exactly(check, accepted, refused):
    assert [check(v) for v in accepted] == [True] * len(accepted)
    assert [check(v) for v in refused] == [False] * len(refused)


def test_count_and_names_bounds():
    assert is_count(1, 1) and not is_count(0, 1) and is_count(-1, -1)
    assert is_names(["a"], 1) and not is_names([], 1)


def test_read_json_values(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"a": [1, 2.5, true, null]}\n')
    assert read_json(path) == {"a": [1, 2.5, True, None]}
    path.write_bytes(b"\xef\xbb\xbf[1]")  # a UTF-8 byte order mark is allowed
    assert read_json(path) == [1]
    path.write_text("NaN")
    assert math.isnan(read_json(path))


@pytest.mark.parametrize("content, reason", [
    (None, "[Errno 2] No such file or directory"),
    (b'{"name": "caf\xe9"}', "'utf-8' codec can't decode byte 0xe9 in position 13"),
    (b'{"a": }', "Expecting value: line 1 column 7 (char 6)"),
    (b"", "Expecting value: line 1 column 1 (char 0)"),
])
def test_read_json_names_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EnsError) as info:
        read_json(path)
    assert str(info.value).startswith(f"{path}: not a JSON file (")
    assert reason in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None  # one line, no chained traceback
    with pytest.raises(EnsError, match=r"^--x \S+: unreadable \(.*\); give one$"):
        read_json(path, "--x " + str(path), problem="unreadable", hint="give one")


def test_read_json_a_folder_is_refused(tmp_path):
    with pytest.raises(EnsError, match=r"^\S+: a folder, not a regular file$"):
        read_json(tmp_path)


def test_read_json_missing_message(tmp_path):
    with pytest.raises(EnsError, match=r"^--weights \S+/no.json: no such file$"):
        read_json(tmp_path / "no.json", f"--weights {tmp_path / 'no.json'}", missing="no such file")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(EnsError, match=r"^--weights \S+: not a blend.json \(Expecting"):
        read_json(tmp_path / "bad.json", f"--weights {tmp_path / 'bad.json'}", problem="not a blend.json",
                  missing="no such file")


@pytest.mark.parametrize("exc, limit, whole, expected", [
    (ValueError("bad value"), None, False, "ValueError: bad value"),
    (ValueError("first\nsecond"), None, False, "ValueError: first"),
    (ValueError("\n  first\nsecond"), None, False, "ValueError: first"),
    (ValueError(""), None, False, "ValueError"),
    (ValueError("  \n "), None, False, "ValueError"),
    (RuntimeError("abcdef"), 3, False, "RuntimeError: abc"),
    (OSError("a\n  b\tc "), None, True, "OSError: a b c"),
    (OSError("a\n  b\tc "), 3, True, "OSError: a b"),
    (OSError(""), None, True, "OSError"),
    (KeyError("k"), None, False, "KeyError: 'k'"),
])
def test_describe(exc, limit, whole, expected):
    assert describe(exc, limit, whole=whole) == expected


def test_first_line():
    assert first_line(ValueError("  one\ntwo ")) == "one"
    assert first_line(ValueError("abcdef"), 2) == "ab"
    assert first_line(ValueError("")) == ""
