"""How stores are read (issue 24 review): Members opens each store file once and reads every
block from that file, the one read_store mapped, even when a run renames a new file into place;
`ens report` reads each store once (its sha256 taken in the pass), and a store changed since the
blend is still refused in one line before anything is written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.members import Members
from tests.ensemble.formats.test_members import _store


# ------------------------------------------------------------ Members: one file, kept open

@pytest.mark.parametrize("views", [False, True])
def test_a_store_replaced_during_a_pass_is_read_from_the_file_it_started_on(tmp_path, views):
    a = _store(tmp_path / "a", dtype="float16", views=True)
    _store(tmp_path / "other", dtype="float16", views=True, seed=5)
    want = np.asarray(a.views if views else a.logits[None], dtype=np.float32).copy()
    members = Members(["a"], [a], views)
    first = members.block(0, 3)
    for name in ("logits.npy", "views.npy"):  # `ens infer` renames new arrays into place
        os.replace(tmp_path / "other" / name, tmp_path / "a" / name)
    rest = members.block(3, 7)
    np.testing.assert_array_equal(np.concatenate([first, rest], axis=1), want)
    members.close()


def test_a_store_file_replaced_after_it_was_opened_is_one_line_naming_it(tmp_path):
    a = _store(tmp_path / "a", dtype="float16", views=True)
    _store(tmp_path / "other", dtype="float16", views=True, seed=5)
    os.replace(tmp_path / "other" / "logits.npy", tmp_path / "a" / "logits.npy")
    with pytest.raises(EnsError) as info:
        Members(["a"], [a], False)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'a' / 'logits.npy'}: ") and "replaced" in message and "\n" not in message
    Members(["a"], [a], True).close()  # views.npy is still the one mapped


def test_members_close_their_files(tmp_path):
    a = _store(tmp_path / "a", dtype="float16", views=True)
    opened = len(os.listdir("/proc/self/fd"))
    with Members(["a", "b"], [a, a], True) as members:
        members.block(0, 7)
        assert len(os.listdir("/proc/self/fd")) == opened + 1  # views.npy, once for all four members
    assert len(os.listdir("/proc/self/fd")) == opened


# ------------------------------------------------------------ ens report: each store read once

def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def _store_bytes(blend, views: bool) -> tuple[int, int]:
    """The bytes of the val stores' ids.npy and logits.npy, and of their views.npy."""
    runs = blend.parent.parent / "runs"
    arrays = sum(f.stat().st_size for name in ("ids.npy", "logits.npy") for f in runs.glob(f"*/val/{name}"))
    return arrays, sum(f.stat().st_size for f in runs.glob("*/val/views.npy")) if views else 0


@pytest.mark.parametrize("views", [False, True])
def test_report_reads_each_store_once(tmp_path, views):
    """The report takes each store's sha256 from its one pass over them (it ran store_digest over
    every store first, then read them again: 2.74x the stores' bytes measured). With views the
    pass reads logits.npy and views.npy; views.npy is read a second time for its sha256 (it
    follows logits.npy in the digest, and a pass reads views a block of every view at a time)."""
    from ensemble.report.build import build_report
    from tests.ensemble.report.test_report_scale import make_blend

    blend = make_blend(tmp_path, models=3, rows=3000, classes=1000, views=views, prior=False)
    arrays, view_bytes = _store_bytes(blend, views)
    before = _rchar()
    build_report(blend, memory=1 << 28)
    read = _rchar() - before
    assert read < 1.15 * arrays + 2.05 * view_bytes, (read, arrays, view_bytes)  # and the labels json, blend.json


@pytest.mark.parametrize("change", ["a value", "the last row", "an id"])
def test_a_store_changed_since_the_blend_is_refused_in_one_line_before_anything_is_written(tmp_path, change):
    from tests.ensemble.conftest import ens, one_line_error
    from tests.ensemble.report.test_report_scale import make_blend

    blend = make_blend(tmp_path, models=2, rows=500, classes=50, prior=False)
    store = tmp_path / "runs" / "m1" / "val"
    name = "ids.npy" if change == "an id" else "logits.npy"
    data = bytearray((store / name).read_bytes())
    at = len(data) - 1 if change != "a value" else len(data) // 2
    data[at] ^= 0x01
    with open(store / name, "r+b") as fh:  # in place: the same file, size and manifest
        fh.write(data)
    out = tmp_path / "page" / "r.html"
    one_line_error(ens("report", blend, "-o", out), f"{blend / 'blend.json'}: the val stores it was fitted on are not found",
                   f"{store} (the folder recorded in blend.json) is not the store the blend was fitted on (its sha256 "
                   "differs)")
    assert not (tmp_path / "page").exists()


def test_a_store_file_cut_short_after_it_was_opened_is_one_line_naming_it(tmp_path):
    a = _store(tmp_path / "a", dtype="float16", views=True)
    size = (tmp_path / "a" / "views.npy").stat().st_size
    os.truncate(tmp_path / "a" / "views.npy", size - 10)  # in place: the same file, mapped whole before
    Members(["a"], [a], False).close()
    with pytest.raises(EnsError) as info:
        Members(["a"], [a], True)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'a' / 'views.npy'}: {size - 10} bytes, fewer than the {size}")
    assert "\n" not in message
