"""`ens infer` checks, before decoding a split, that the disk under --out has room for the
stores it will write (issue 24, Disk): one line naming the size, nothing decoded; a run with
nothing to write, or a resumed one, asks only for what is left."""

from __future__ import annotations

from collections import namedtuple

import pytest

from ensemble.errors import EnsError
from ensemble.formats.dataset import load_split
from ensemble.inference import run as run_module
from ensemble.inference.run import InferOptions, infer

from tests.ensemble.conftest import CLASSES, Killed, kill_after, make_inat, tiny_onnx

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int, asked: list | None = None):
    def disk_usage(path):
        if asked is not None:
            asked.append(path)
        return Usage(10 ** 12, 10 ** 12 - free, free)

    monkeypatch.setattr(run_module.shutil, "disk_usage", disk_usage)


@pytest.fixture
def setup(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=8, n_test=2)
    models = [tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "b.onnx", seed=1)]
    return models, load_split(data / "val2019.json")


def _options(tmp_path, **kw):
    return InferOptions(**{"tta": ("flip",), "workers": 0, "batch_size": 2, "chunk_size": 2, "dtype": "float32",
                           "out": tmp_path / "runs", **kw})


def test_a_disk_without_room_is_one_line_naming_the_size_before_any_decoding(setup, tmp_path, monkeypatch):
    models, val = setup
    # Two models' float32 chunks (8 rows x (5 classes x 4 bytes + 16)) and the larger store again.
    need = 2 * 8 * (CLASSES * 4 + 16) + 8 * (CLASSES * 4 + 16)
    asked = []
    _free(monkeypatch, need - 1, asked)
    events = []
    with pytest.raises(EnsError) as info:
        infer(models, [val], _options(tmp_path), progress=events.append)
    message = str(info.value)
    assert f"the val stores (2 models, 8 images) need about {need} bytes there" in message, message
    assert f"{need - 1} bytes free" in message and "give --out on another disk" in message, message
    assert "--dtype float16" in message and "--keep-views" not in message, message
    assert not [e for e in events if e.kind == "chunk"], "no image may be decoded"
    assert asked and str(tmp_path / "runs") in str(asked[0])
    _free(monkeypatch, need)
    assert len(infer(models, [val], _options(tmp_path)).stores) == 2  # exactly enough is enough


def test_kept_views_are_counted_and_named(setup, tmp_path, monkeypatch):
    models, val = setup
    views = 2  # identity and flip
    need = 3 * 8 * (CLASSES * 4 * (1 + views) + 16)
    _free(monkeypatch, need - 1)
    with pytest.raises(EnsError, match="leave out --keep-views"):
        infer(models, [val], _options(tmp_path, keep_views=True))
    _free(monkeypatch, need)
    infer(models, [val], _options(tmp_path, keep_views=True))


def test_complete_stores_need_no_room_and_a_resume_only_what_is_left(setup, tmp_path, monkeypatch):
    models, val = setup
    infer(models, [val], _options(tmp_path))
    _free(monkeypatch, 0)
    result = infer(models, [val], _options(tmp_path))  # both kept: nothing to write, no check
    assert [s.computed for s in result.stores] == [False, False]

    _free(monkeypatch, 10 ** 12)
    with pytest.raises(Killed):
        infer(models, [val], _options(tmp_path, out=tmp_path / "half"), progress=kill_after(2))
    row = CLASSES * 4 + 16
    left = 2 * (8 - 4) * row + 8 * row  # chunks 0 and 1 (4 rows) are saved for both models
    _free(monkeypatch, left - 1)
    with pytest.raises(EnsError, match=f"need about {left} bytes"):
        infer(models, [val], _options(tmp_path, out=tmp_path / "half"))
    _free(monkeypatch, left)
    assert all(s.computed for s in infer(models, [val], _options(tmp_path, out=tmp_path / "half")).stores)
