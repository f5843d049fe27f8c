"""What ens prints holds text from files (file names, metadata fields, notes): control
characters in it are shown as escapes, never sent to the terminal, and a newline in it never
starts a line that reads like ens's own output."""

from __future__ import annotations

import io
import json
import re

import pytest

from ensemble.errors import printable
from ensemble.formats.model import ModelMetadata

from tests.ensemble.conftest import MEAN, STD, ens, make_inat, one_line_error, replace_metadata, tiny_onnx

HOSTILE = "a\x1b[2J\rb\nwrote evil.csv\x07\x9b31m\x7f\x00c"
SHOWN = "a\\x1b[2J\\rb\\nwrote evil.csv\\x07\\x9b31m\\x7f\\x00c"
#: A file name can hold all of these but NUL.
NAME, NAME_SHOWN = HOSTILE.replace("\x00", ""), SHOWN.replace("\\x00", "")
#: What must never reach the terminal: C0 (but the line ends ens writes), DEL, C1.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.mark.parametrize("text, shown", [
    (HOSTILE, SHOWN),
    ("plain text, ünïcode, 日本 and a \\ stay", "plain text, ünïcode, 日本 and a \\ stay"),
    ("\t", "\\t"),
    ("\x85", "\\x85"),  # NEL, a C1 line break
    ("x\u2028y\u2029z", "x\\u2028y\\u2029z"),  # Unicode line and paragraph separators
    ("\u202eevil\u202c\u2066\u200f", "\\u202eevil\\u202c\\u2066\\u200f"),  # bidi overrides reorder what is seen
    ("caf\udce9.json", "caf\\xe9.json"),  # a byte of a non-UTF-8 file name (surrogateescape)
    ("\ud800", "\\ud800"),
])
def test_printable_escapes_each_control_character(text, shown):
    assert printable(text) == shown
    printable(text).encode("utf-8")  # never a lone surrogate that the terminal's encoding refuses


def test_printable_escapes_every_c0_and_c1_character_and_del():
    controls = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))
    shown = printable(controls)
    assert not RAW.search(shown) and "\n" not in shown
    assert shown == "".join(f"\\x{c:02x}" if c not in (9, 10, 13) else {9: "\\t", 10: "\\n", 13: "\\r"}[c]
                            for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)])


def _no_raw(output: str) -> None:
    assert not RAW.search(output.replace("\n", "")), repr(output)


def test_an_error_naming_a_hostile_file_name_is_escaped(tmp_path):
    missing = tmp_path / f"x{NAME}.json"
    result = ens("blend", "--weights", missing, "--runs", tmp_path)
    one_line_error(result, f"x{NAME_SHOWN}.json")
    _no_raw(result.output)
    assert not any(line.startswith("wrote") for line in result.output.splitlines()), result.output


def test_a_metadata_field_printed_by_ens_info_is_escaped(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    replace_metadata(model, ModelMetadata(architecture=HOSTILE, num_classes=5, input_size=32, mean=MEAN, std=STD))
    result = ens("info", model)
    assert result.exit_code == 0, result.output
    _no_raw(result.output)
    assert re.search(rf"^architecture +{re.escape(SHOWN)}$", result.output, re.MULTILINE), result.output
    assert not any(line.startswith("wrote") for line in result.output.splitlines()), result.output
    as_json = ens("info", model, "--json")
    assert as_json.exit_code == 0 and '"architecture": "a\\u001b[2J\\rb\\nwrote evil.csv' in as_json.output
    _no_raw(as_json.output)


def test_a_file_name_from_a_split_json_in_an_error_is_escaped(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=2, n_test=1)
    doc = json.loads((data / "val2019.json").read_text())
    doc["images"][1]["file_name"] = f"{NAME}.jpg"
    (data / "val2019.json").write_text(json.dumps(doc))
    result = ens("infer", tiny_onnx(tmp_path / "tiny.onnx"), "--data", data, "--split", "val", "--workers", "0",
                 "--out", tmp_path / "runs")
    one_line_error(result, f"({data / NAME_SHOWN}.jpg): missing file")
    _no_raw(result.output)
    assert not any(line.startswith("wrote") for line in result.output.splitlines()), result.output


def test_infer_progress_notes_and_lines_are_escaped():
    from ensemble.cli_progress import InferProgress
    from ensemble.inference.engine import Event

    stream = io.StringIO()
    with InferProgress(stream, interval=0) as progress:
        progress(Event("note", message=f"image {HOSTILE} skipped"))
        progress(Event("start", split=f"v{HOSTILE}", total=2, done=0))
    _no_raw(stream.getvalue())
    assert stream.getvalue().splitlines() == [f"image {SHOWN} skipped", f"v{SHOWN}: 2 images, 0 done before"]


def test_the_progress_bar_shows_split_names_and_notes_as_text():
    from ensemble.cli_progress import InferProgress
    from ensemble.inference.engine import Event

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with InferProgress(stream) as progress:
        progress(Event("start", split="v[bold]x\x1b[2J", total=2, done=0))
        progress(Event("note", message="[red]image\rgone"))
    shown = stream.getvalue()
    # rich draws the bar with escapes of its own; the split's and the note's are shown as text
    assert "v[bold]x\\x1b[2J" in shown and "[red]image\\rgone" in shown, repr(shown)
