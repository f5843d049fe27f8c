"""File-system failures at the command-line boundary: one line, exit 2, nothing half-written."""

from __future__ import annotations

import errno
import json

import numpy as np
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.formats import store as store_module

from tests.ensemble.conftest import make_inat, one_line_error, tiny_onnx

runner = CliRunner()


def test_a_full_disk_during_infer_is_one_line_and_keeps_finished_chunks(tmp_path, monkeypatch):
    data = make_inat(tmp_path / "inat", n_val=6, n_test=1)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    real_savez, calls = np.savez, []

    def savez(fh, **arrays):
        calls.append(fh)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(getattr(fh, "name", fh)))
        return real_savez(fh, **arrays)

    monkeypatch.setattr(store_module.np, "savez", savez)
    args = ["infer", str(model), "--data", str(data), "--split", "val", "--batch-size", "2", "--chunk-size", "2",
            "--workers", "0", "--out", str(tmp_path / "runs")]
    one_line_error(runner.invoke(app, args), "No space left on device; the disk is full: free space and run the same "
                                        "command again")
    partial = tmp_path / "runs" / "tiny" / "val" / ".partial"
    assert sorted(p.name for p in partial.iterdir()) == ["chunk-000000.npz", "chunk-000001.npz", "key.json"]
    monkeypatch.setattr(store_module.np, "savez", real_savez)
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "resuming, 4 of 6 images done" in result.output, result.output


def test_a_file_where_the_out_folder_should_be(tmp_path):
    data = make_inat(tmp_path / "inat", n_val=2, n_test=1)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "runs").write_text("not a folder")
    one_line_error(runner.invoke(app, ["infer", str(model), "--data", str(data), "--split", "val", "--workers", "0",
                                  "--out", str(tmp_path / "runs")]),
              str(tmp_path / "runs" / "tiny" / "val"))


def test_a_full_disk_while_blending_leaves_no_partial_files(tmp_path, monkeypatch):
    data = make_inat(tmp_path / "inat", n_val=10, n_test=4)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["infer", str(model), "--data", str(data), "--workers", "0",
                               "--out", str(runs)]).exit_code == 0
    import pathlib

    real = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".blend.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    out = tmp_path / "blend"
    one_line_error(runner.invoke(app, ["blend", "--runs", str(runs), "--optimize", "val", "--cv", "2", "--out", str(out)]),
              "No space left on device; the disk is full")
    assert not out.exists() or list(out.iterdir()) == []
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert runner.invoke(app, ["blend", "--runs", str(runs), "--optimize", "val", "--cv", "2",
                               "--out", str(out)]).exit_code == 0
    assert json.loads((out / "blend.json").read_text())["models"] == ["tiny"]
