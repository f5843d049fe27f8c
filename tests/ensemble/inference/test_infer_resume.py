"""Interrupted runs: a rerun with the same arguments resumes and ends byte-identical."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.formats import store as store_module
from ensemble.formats.dataset import load_split
from ensemble.errors import EnsError
from ensemble.inference.run import InferOptions, infer
from ensemble.formats.store import MANIFEST, PARTIAL, VIEWS, read_store

from tests.ensemble.conftest import Killed, kill_after, make_inat, store_bytes, tiny_onnx

MODELS = ("a", "b")


@pytest.fixture
def setup(tmp_path, inat):
    models = [tiny_onnx(tmp_path / "a.onnx", size=32), tiny_onnx(tmp_path / "b.onnx", size=40, seed=1)]
    splits = [load_split(inat / "val2019.json"), load_split(inat / "test2019.json")]
    return models, splits


def _options(out, **kw):
    return InferOptions(**{"tta": ("flip", "scale"), "keep_views": True, "workers": 0, "batch_size": 2,
                           "chunk_size": 2, "out": out, **kw})


def _all_bytes(out):
    return {(m, s): store_bytes(out / m / s) for m in MODELS for s in ("val", "test")}


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_resume_after_an_interruption_is_byte_identical(setup, tmp_path, chunks):
    models, splits = setup
    infer(models, splits, _options(tmp_path / "whole"))

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        infer(models, splits, _options(out), progress=kill_after(chunks))
    if chunks < 3:  # val (6 images = 3 chunks) is not finished
        for m in MODELS:
            assert json.loads((out / m / "val" / MANIFEST).read_text())["complete"] is False
            with pytest.raises(EnsError, match="incomplete"):
                read_store(out / m / "val")
    result = infer(models, splits, _options(out))
    # Only the images of chunks not yet saved are decoded again.
    assert result.decodes == 11 - 2 * chunks
    assert _all_bytes(out) == _all_bytes(tmp_path / "whole")
    assert not any((out / m / s / PARTIAL).exists() for m in MODELS for s in ("val", "test"))


def test_a_kill_while_assembling_the_store_resumes(setup, tmp_path, monkeypatch):
    models, splits = setup
    infer(models, splits, _options(tmp_path / "whole"))
    out = tmp_path / "resumed"
    original = store_module.StoreWriter._concatenate

    def dies_on_views(self, name, *args, **kw):
        if name == VIEWS:
            raise Killed  # logits.npy is already replaced; the manifest still says incomplete
        return original(self, name, *args, **kw)

    monkeypatch.setattr(store_module.StoreWriter, "_concatenate", dies_on_views)
    with pytest.raises(Killed):
        infer(models, splits, _options(out))
    with pytest.raises(EnsError, match="incomplete"):
        read_store(out / "a" / "val")
    monkeypatch.setattr(store_module.StoreWriter, "_concatenate", original)
    assert infer(models, splits, _options(out)).decodes == 5  # test's; val's chunks were all saved
    assert _all_bytes(out) == _all_bytes(tmp_path / "whole")


def test_same_arguments_keep_a_complete_store_and_others_recompute(setup, tmp_path):
    models, splits = setup
    out = tmp_path / "runs"
    infer(models, splits, _options(out))
    again = infer(models, splits, _options(out))
    assert again.decodes == 0 and not any(s.computed for s in again.stores)
    changed = infer(models, splits, _options(out, tta=("flip",)))
    assert changed.decodes == 11 and all(s.computed for s in changed.stores)
    assert read_store(out / "a" / "val").view_names == ("identity", "flip")


def test_a_complete_store_is_reused_whatever_else_is_in_the_run(setup, tmp_path):
    models, splits = setup
    out = tmp_path / "runs"
    infer(models[:1], splits, _options(out))
    before = {s: store_bytes(out / "a" / s) for s in ("val", "test")}
    # b has a larger canvas than a: the run's decodes differ, a's own inputs do not.
    both = infer(models, splits, _options(out))
    assert {(s.path.parent.name, s.computed) for s in both.stores} == {("a", False), ("b", True)}
    assert {s: store_bytes(out / "a" / s) for s in ("val", "test")} == before


def test_an_interrupted_run_with_other_arguments_leaves_the_complete_store_readable(setup, tmp_path):
    models, splits = setup
    out = tmp_path / "runs"
    infer(models, splits, _options(out))
    before = _all_bytes(out)

    def killed_before_first_chunk(event):
        if event.kind == "batch":
            raise Killed

    with pytest.raises(Killed):
        infer(models, splits, _options(out, tta=("flip",), chunk_size=4), progress=killed_before_first_chunk)
    assert _all_bytes(out) == before
    assert read_store(out / "a" / "val").view_names == read_store(tmp_path / "runs" / "b" / "val").view_names
    assert len(read_store(out / "a" / "val").view_names) == 6  # identity, flip x three scales


def test_the_incomplete_store_error_gives_the_command_that_finishes_it(tmp_path, inat):
    model = tiny_onnx(tmp_path / "a.onnx", size=32)
    val = load_split(inat / "val2019.json")
    options = _options(tmp_path / "runs", merge="gmean")
    infer([model], [val], _options(tmp_path / "whole", merge="gmean"))
    with pytest.raises(Killed):
        infer([model], [val], options, progress=kill_after(1))
    with pytest.raises(EnsError) as info:
        read_store(tmp_path / "runs" / "a" / "val")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'runs' / 'a' / 'val'}: incomplete logit store (its run was "
                              "interrupted); finish it with: ens infer ")
    command = shlex.split(message.split("finish it with: ", 1)[1])
    assert command[:3] == ["ens", "infer", str(model)]
    result = CliRunner().invoke(app, command[1:] + ["--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 stores (1 computed)" in result.output
    assert store_bytes(tmp_path / "runs" / "a" / "val") == store_bytes(tmp_path / "whole" / "a" / "val")


def test_sigkilled_cli_run_resumes_byte_identical(tmp_path):
    """A real kill: `ens infer` hangs opening image 4 (tests/ensemble/inference/hang), is
    SIGKILLed with its decoding processes once chunks 0-3 are saved, and the rerun finishes."""
    data = make_inat(tmp_path / "inat", n_val=8, n_test=1)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    val = load_split(data / "val2019.json")
    args = [sys.executable, "-m", "ensemble", "infer", str(model), "--data", str(data), "--split", "val",
            "--tta", "flip", "--batch-size", "1", "--chunk-size", "1", "--workers", "1"]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, capture_output=True, timeout=120)

    out = tmp_path / "killed"
    hang = os.path.join(os.path.dirname(__file__), "hang")
    env = {**os.environ, "ENS_TEST_HANG": str(val.paths[4]),
           "PYTHONPATH": os.pathsep.join(filter(None, [hang, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([*args, "--out", str(out)], start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "tiny" / "val" / PARTIAL
    try:
        deadline = time.monotonic() + 60
        while len(list(partial.glob("chunk-*.npz"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # had it not hung at image 4, chunk 4 would appear now
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the run and its decoding processes
        proc.wait(timeout=30)
    assert sorted(p.name for p in partial.glob("chunk-*.npz")) == [f"chunk-{i:06d}.npz" for i in range(4)]
    assert json.loads((out / "tiny" / "val" / MANIFEST).read_text())["complete"] is False

    done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming, 4 of 8 images done" in done.stderr
    assert store_bytes(out / "tiny" / "val") == store_bytes(tmp_path / "whole" / "tiny" / "val")
    # The killed run could not unlink its shared-memory blocks: the rerun did.
    assert not list(Path("/dev/shm").glob(f"ens-{proc.pid}-*"))


def test_a_fifo_in_place_of_an_image_is_refused_not_waited_on(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=3, n_test=1)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    val = load_split(data / "val2019.json")
    val.paths[1].unlink()
    os.mkfifo(val.paths[1])  # opening it for reading would wait for a writer forever
    args = [sys.executable, "-m", "ensemble", "infer", str(model), "--data", str(data), "--split", "val",
            "--workers", "1", "--out", str(tmp_path / "runs")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: image 1 ({val.paths[1]}): not a regular file (a FIFO, device or socket); --on-bad-image skip "
        "leaves such images out")
