"""`ens report` on hostile and careless inputs (issue 23): an image file that is a FIFO or a
decompression bomb, a dataset folder whose name is not UTF-8, model names with ``$`` (text,
never matplotlib's mathtext), and a blend made with ``--runs DIR`` reported from elsewhere."""

from __future__ import annotations

import html
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from ensemble.report import plots, write_report
from ensemble.report.build import build_report
from ensemble.report.images import thumbnail
from ensemble.report.page import hardest

from tests.ensemble.conftest import ens, ok
from tests.ensemble.report.conftest import copy_work


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty folder: nothing is found through ./runs or ./submissions by accident."""
    monkeypatch.chdir(tmp_path)


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG of a few bytes whose header declares ``side`` x ``side`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, side, side)  # IHDR's width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # and its CRC
    path.write_bytes(bytes(data))
    return path


def hardest_copy(work, tmp_path: Path) -> tuple[Path, Path, list]:
    """The ``full`` blend and its data copied under ``tmp_path``; the blend folder, the data
    copy and the hardest images as the report finds them there."""
    blend = copy_work(work, tmp_path)
    data = Path(shutil.copytree(work.data, tmp_path / "data"))
    return blend, data, list(build_report(blend, data).hardest)


def card(page: str, image_id) -> str:
    """The hardest image's figure of ``image_id`` on the page."""
    found = re.search(rf'<figure class="thumb" data-id="{image_id}".*?</figure>', page, re.S)
    assert found, f"no card for image {image_id}"
    return found.group(0)


def run_within(seconds: float, fifo: Path, call):
    """``call()``'s result; fails if it is still running after ``seconds`` (then the FIFO gets a
    writer, which ends a read blocked on it, so the test's thread does not hang the session)."""
    out: dict = {}

    def target():
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"still reading {fifo} after {seconds} s: a FIFO was opened")
    if "error" in out:
        raise out["error"]
    return out["value"]


# Item 9: the hardest images' files are read with the checks `ens infer` makes.

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_among_the_hardest_images_is_shown_not_readable(work, tmp_path):
    blend, data, images = hardest_copy(work, tmp_path)
    first = images[0]
    fifo = first.path
    assert fifo.is_relative_to(data)
    fifo.unlink()
    os.mkfifo(fifo)
    result = run_within(60, fifo, lambda: write_report(blend, data))
    page = result.path.read_text(encoding="utf-8")
    shown = card(page, first.id)
    assert "<img" not in shown and "not readable" in shown and "not a regular file" in shown
    assert page.count("<img ") == len(images) - 1  # every other thumbnail is drawn


def test_a_decompression_bomb_among_the_hardest_images_is_shown_not_readable(work, tmp_path):
    blend, data, images = hardest_copy(work, tmp_path)
    first = images[0]
    bomb_png(first.path)
    page = write_report(blend, data).path.read_text(encoding="utf-8")
    shown = card(page, first.id)
    assert "<img" not in shown and "not readable" in shown
    assert "900000000 pixels" in shown and "decompression" in shown
    assert page.count("<img ") == len(images) - 1


def test_thumbnail_never_opens_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(OSError, match="a folder"):
        thumbnail(tmp_path)
    with pytest.raises(OSError, match="missing file"):
        thumbnail(tmp_path / "missing.jpg")
    with pytest.raises(OSError, match="not a regular file"):
        thumbnail(Path("/dev/zero"))  # a device: reading it never ends
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(OSError, match="empty file"):
        thumbnail(tmp_path / "empty.jpg")
    with pytest.raises(OSError, match="decompression-bomb"):
        thumbnail(bomb_png(tmp_path / "bomb.png"))


def test_an_image_over_pillows_warning_limit_says_nothing_on_stderr(tmp_path, recwarn):
    # Between Pillow's limit and twice it, Pillow warns and decodes: the truncated data ends it here.
    with pytest.raises(OSError):
        thumbnail(bomb_png(tmp_path / "big.png", side=10000))
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_16_bit_grayscale_image_is_drawn_as_ens_infer_sees_it(tmp_path):
    import base64

    import numpy as np

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 60), 0x8040, np.uint16)).save(path)  # 16-bit grayscale, mid-gray
    uri = thumbnail(path)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=int)
    assert abs(pixels - 0x80).max() <= 2  # the high byte, not white (Pillow's own conversion clips)


def test_an_unreadable_card_shows_its_reason_as_text(work, tmp_path):
    data = build_report(work.full)
    images = data.hardest
    sneaky = tmp_path / "<b>x<i>.jpg"
    sneaky.write_bytes(b"<script>alert(1)</script>")
    data = replace(data, hardest=(replace(images[0], path=sneaky),))
    shown = card(hardest(data), images[0].id)
    assert "not readable" in shown and "<script>" not in shown and "<b>x<i>" not in shown
    assert "not an image Pillow can read" in shown


# Item 11: a dataset folder whose name is not UTF-8.

@pytest.mark.skipif(sys.platform == "win32" or sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"),
                    reason="needs a POSIX file system with UTF-8 names")
def test_a_data_folder_named_in_no_utf8_is_reported_with_its_name_escaped(work, tmp_path):
    shutil.copytree(work.runs, tmp_path / "runs")
    data = Path(shutil.copytree(work.data, tmp_path / os.fsdecode(b"dat\xff<i>")))
    blend = tmp_path / "blends" / "b"
    # (`ens blend` echoes the name as the terminal's encoding allows: a POSIX locale's surrogateescape.)
    made = subprocess.run([sys.executable, "-m", "ensemble", "blend", "--runs", "runs", "--optimize", "val", "--cv",
                           "3", "--data", os.fsencode(data), "--out", os.fsencode(blend)], capture_output=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"})
    assert made.returncode == 0, made.stderr.decode("utf-8", "replace")
    # As a user runs it: a real process, whose stdout is strict UTF-8.
    for extra in ([], ["--data", os.fsencode(data)]):
        run = subprocess.run([sys.executable, "-m", "ensemble", "report", os.fsencode(blend), *extra],
                             capture_output=True, cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
        page = (blend / "report.html").read_bytes().decode("utf-8")  # strictly UTF-8
        assert html.escape("dat\\xff<i>") in page and "<i>" not in page
        assert page.count("<img ") > 0  # the thumbnails were found under that folder


# Item 13: names are text, never mathtext.

UNPARSABLE = "m_$5_vs_$^"
PARSABLE = "a_$x^2$"


def svg_texts(svg: str) -> list[str]:
    """Every ``<text>`` element's content in a figure (text is kept as text: svg.fonttype none)."""
    return [html.unescape(t) for t in re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)]


@pytest.mark.parametrize("name, shown", [(UNPARSABLE, UNPARSABLE), (PARSABLE, PARSABLE),
                                         (os.fsdecode(b"m\xff"), "m\\xff")])
def test_names_are_drawn_as_written_in_every_figure(name, shown):
    import numpy as np

    from ensemble.formats.blend import CvRow
    from weights_search import calibration as cal

    names = [name, "plain", "b"]
    rows = [CvRow(name=n, kind="member", top1=0.5, top1_low=0.4, top1_high=0.6, topk=0.9, nll=1.0) for n in names]
    diagram = cal.reliability(np.array([0.9, 0.6, 0.3]), np.array([True, False, True]))
    figures = {
        "cv": plots.cv_chart(rows, "uniform", names),
        "weights": plots.weights_chart(dict.fromkeys(names, 1 / 3), names),
        "reliability": plots.reliability_chart([(n, diagram, None) for n in names]),
        "heatmap": plots.heatmap(np.eye(3), names, "error correlation", -1.0, 1.0, "RdBu_r"),
        "buckets": plots.bucket_chart(np.full((3, 3), 0.5), names, ["head", "middle", "tail"]),
    }
    for figure, svg in figures.items():
        texts = svg_texts(svg)
        for drawn in [shown] + names[1:]:
            assert drawn in texts, (figure, drawn, texts)


def test_a_blend_of_dollar_named_models_is_reported(work, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    onnx = []
    for source, name in (("m0", UNPARSABLE), ("m1", PARSABLE)):
        onnx.append(Path(shutil.copy(work.root / "models" / f"{source}.onnx", models / f"{name}.onnx")))
    runs = tmp_path / "runs"
    ok(ens("infer", *onnx, "--data", work.data, "--split", "val", "--workers", 0, "--out", runs))
    blend = tmp_path / "blends" / "b"
    ok(ens("blend", "--runs", runs, "--optimize", "val", "--cv", 3, "--data", work.data, "--out", blend))
    result = ok(ens("report", blend))
    page = (blend / "report.html").read_text(encoding="utf-8")
    texts = [t for svg in re.findall(r"<svg\b.*?</svg>", page, re.S) for t in svg_texts(svg)]
    for name in (UNPARSABLE, PARSABLE):
        assert texts.count(name) >= 3, (name, texts)  # weights, reliability, heatmaps
    assert "wrote" in result.output


# Item 18: the stores are where blend.json records them.

def test_a_blend_made_with_runs_elsewhere_is_reported_from_anywhere(work, tmp_path):
    stores = Path(shutil.copytree(work.runs, tmp_path / "elsewhere" / "stores"))
    blend = tmp_path / "work" / "blends" / "b"
    ok(ens("blend", "--runs", stores, "--optimize", "val", "--cv", 3, "--data", work.data, "--out", blend))
    result = ok(ens("report", blend))  # from tmp_path: neither ./runs nor <work>/runs exists
    page = (blend / "report.html").read_text(encoding="utf-8")
    assert f"stores under {html.escape(str(stores.resolve()))}" in page, result.output
    # Gone from there: the line names the folder blend.json records, and the others looked in.
    stores.rename(tmp_path / "elsewhere" / "moved")
    from tests.ensemble.conftest import one_line_error

    one_line_error(ens("report", blend), f"no store at {stores / 'm0' / 'val'}", "recorded in blend.json",
                   str(tmp_path / "work" / "runs"))


def test_stores_blend_json_records_but_changed_are_passed_over_for_the_work_folders(work, tmp_path):
    blend = copy_work(work, tmp_path / "w")  # w/runs and w/blends/full, as `ens blend` lays them out
    record = (blend / "blend.json").read_text()
    other = Path(shutil.copytree(work.runs, tmp_path / "other"))
    (other / "m0" / "val" / "logits.npy").write_bytes((other / "m1" / "val" / "logits.npy").read_bytes())
    import json

    doc = json.loads(record)
    doc["runs"] = str(other.resolve())
    (blend / "blend.json").write_text(json.dumps(doc))
    report = build_report(blend)
    assert report.runs.resolve() == (tmp_path / "w" / "runs").resolve()


# Item 18, second round: a recorded runs folder the OS cannot take is passed over.

@pytest.mark.parametrize("runs", ["/" + "x" * 5000, "/" + "x" * 300])
def test_a_recorded_runs_the_os_cannot_take_is_passed_over(work, tmp_path, runs):
    import json

    blend = copy_work(work, tmp_path / "w")
    doc = json.loads((blend / "blend.json").read_text())
    doc["runs"] = runs
    (blend / "blend.json").write_text(json.dumps(doc))
    report = build_report(blend)
    assert report.runs.resolve() == (tmp_path / "w" / "runs").resolve()
    # Nowhere else to look: one line, without the unusable name.
    shutil.rmtree(tmp_path / "w" / "runs")
    from tests.ensemble.conftest import one_line_error

    line = one_line_error(ens("report", blend), "the val stores it was fitted on are not found")
    assert "x" * 200 not in line


# Item 15 for report: a file-size limit names the page, and leaves no folder the run made.

@pytest.mark.slow  # a fresh interpreter that imports matplotlib
def test_a_file_size_limit_names_the_page_and_leaves_no_folder(work, tmp_path):
    from tests.ensemble.blend.test_blend_hostile import limited

    blend = copy_work(work, tmp_path / "w")
    page = tmp_path / "pages" / "deeper" / "r.html"
    result = limited(tmp_path, 4096, "report", blend, "-o", page)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {page}: File too large; "), result.stderr
    assert "give -o FILE on another file system" in lines[0] and lines[0].endswith("nothing was written")
    assert not (tmp_path / "pages").exists()


# -o never replaces what is not a regular file.

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("kind", ["fifo", "link to fifo", "folder"])
def test_report_output_that_is_not_a_regular_file_is_refused(work, tmp_path, kind):
    from tests.ensemble.conftest import one_line_error

    blend = copy_work(work, tmp_path / "w")
    target = tmp_path / "page"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "link to fifo":
        os.mkfifo(tmp_path / "fifo")
        target.symlink_to(tmp_path / "fifo")
    else:
        target.mkdir()
    before = os.lstat(target)
    one_line_error(ens("report", blend, "-o", target), f"-o {target}: is not a regular file",
                   "give the name of a new file or of a regular one")
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


# Item 18, second round: stores moved since the blend are found with --runs DIR.

def test_report_runs_points_at_stores_moved_since_the_blend(work, tmp_path):
    from tests.ensemble.conftest import one_line_error

    r1 = Path(shutil.copytree(work.runs, tmp_path / "stores" / "r1"))
    blend = tmp_path / "blends" / "nll"
    ok(ens("blend", "--runs", r1, "--optimize", "val", "--cv", 3, "--data", work.data, "--out", blend))
    r2 = r1.rename(tmp_path / "stores" / "r2")
    one_line_error(ens("report", blend), "the val stores it was fitted on are not found",
                   "give --runs DIR (the folder of the stores `ens blend` read)")
    ok(ens("report", blend, "--runs", r2))
    page = (blend / "report.html").read_text(encoding="utf-8")
    assert f"stores under {html.escape(str(r2))}" in page
    # --runs is tried first, and named where it does not hold them.
    one_line_error(ens("report", blend, "--runs", tmp_path / "stores"),
                   f"no store at {tmp_path / 'stores' / 'm0' / 'val'} (--runs)")


# A damaged ledger costs the leaderboard section only.

@pytest.mark.parametrize("damage", ["garbage", "fifo", "truncated"])
def test_a_damaged_ledger_is_drawn_as_not_readable_and_the_rest_built(work, tmp_path, damage):
    from tests.ensemble.report.conftest import add_ledger

    root = tmp_path / "w"
    blend = copy_work(work, root)
    add_ledger(root, "blends/full", (0.8, 0.7, 0.9), 0.25, None)
    ledger = root / "submissions" / "ledger.sqlite"
    if damage == "garbage":
        ledger.write_bytes(b"this is not a database\n" * 200)
    elif damage == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        ledger.unlink()
        os.mkfifo(ledger)
    else:
        data = ledger.read_bytes()
        ledger.write_bytes(data[:len(data) // 3])
    result = ok(ens("report", blend))
    line = next(x for x in result.stdout.splitlines() if x.startswith("leaderboard: not shown: "))
    assert line.startswith(f"leaderboard: not shown: ledger not readable: {ledger}"), line
    page = (blend / "report.html").read_text(encoding="utf-8")
    assert "Not shown: ledger not readable: " in page
    assert 'data-section="calibration"' in page and 'data-section="hardest"' in page
    assert "Traceback" not in result.output


# Issue 24's prober: --runs whose stores changed is passed over, and the report says so.

def test_report_runs_with_changed_stores_says_which_stores_it_read(work, tmp_path):
    blend = copy_work(work, tmp_path / "w")  # w/runs: the stores the blend was fitted on
    changed = Path(shutil.copytree(work.runs, tmp_path / "changed"))
    (changed / "m0" / "val" / "logits.npy").write_bytes((changed / "m1" / "val" / "logits.npy").read_bytes())
    result = ok(ens("report", blend, "--runs", changed))
    assert (f"--runs {changed}: passed over ({changed / 'm0' / 'val'} (--runs) is not the store the blend was "
            f"fitted on (its sha256 differs)); read the stores under ") in result.output, result.output
    report = build_report(blend, runs=changed)
    assert report.runs.resolve() != changed.resolve()
    assert f"read the stores under {report.runs}" in result.output
    assert not any("passed over" in n for n in build_report(blend, runs=tmp_path / "w" / "runs").notes)
