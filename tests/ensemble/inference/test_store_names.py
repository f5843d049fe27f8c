"""Store names: two model files with one stem (``fold0/model.onnx``, ``fold1/model.onnx``) never
replace each other's stores; ``--name`` keeps both, blendable from one runs folder."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.dataset import load_split
from ensemble.formats.store import MANIFEST, read_store
from ensemble.inference.run import InferOptions, finishing_command, infer
from ensemble.inference.runtime import load_model

from tests.ensemble.conftest import Killed, kill_at_first_chunk, make_inat, one_line_error, store_bytes, tiny_onnx


def ens(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def folds(tmp_path):
    """Two different models saved under one file name in two folders, and a dataset."""
    data = make_inat(tmp_path / "inat", n_val=6, n_test=4)
    fold0 = tiny_onnx(tmp_path / "fold0" / "model.onnx", seed=0)
    fold1 = tiny_onnx(tmp_path / "fold1" / "model.onnx", seed=1)
    assert sha256_file(fold0) != sha256_file(fold1)
    return data, fold0, fold1


def _options(out, **kw):
    return InferOptions(**{"workers": 0, "batch_size": 2, "chunk_size": 2, "out": out, **kw})


def test_another_model_file_with_the_same_stem_is_refused_naming_the_store_and_the_fix(tmp_path, folds):
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    assert ens("infer", fold0, "--data", data, "--out", out, "--workers", 0).exit_code == 0
    before = {s: store_bytes(out / "model" / s) for s in ("val", "test")}
    line = one_line_error(ens("infer", fold1, "--data", data, "--out", out, "--workers", 0))
    assert str(out / "model" / "val") in line  # the store folder
    assert repr(str(fold0)) in line  # the model file it holds
    assert "--name fold1-model" in line  # what keeps both
    # Nothing was replaced, not even the manifest.
    assert {s: store_bytes(out / "model" / s) for s in ("val", "test")} == before
    assert read_store(out / "model" / "val").manifest["model"]["sha256"] == sha256_file(fold0)


def test_name_keeps_both_folds_and_blend_reads_them_from_one_runs_folder(tmp_path, folds):
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    assert ens("infer", fold0, "--data", data, "--out", out, "--workers", 0).exit_code == 0
    result = ens("infer", fold1, "--data", data, "--out", out, "--workers", 0, "--name", "fold1")
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'fold1' / 'val'}" in result.stdout
    for split in ("val", "test"):
        assert read_store(out / "model" / split).manifest["model"]["sha256"] == sha256_file(fold0)
        named = read_store(out / "fold1" / split).manifest
        assert named["model"]["sha256"] == sha256_file(fold1) and named["model"]["file"] == str(fold1)
        assert "--name fold1" in named["command"]
    blended = ens("blend", "--runs", out, "--optimize", "val", "--method", "uniform", "--cv", 2,
                  "--out", tmp_path / "blend")
    assert blended.exit_code == 0, blended.output
    assert "weights: fold1 0.500, model 0.500" in blended.stdout


def test_the_same_model_file_with_other_arguments_still_replaces_its_store(tmp_path, folds):
    data, fold0, _ = folds
    out = tmp_path / "runs"
    val = load_split(data / "val2019.json")
    infer([fold0], [val], _options(out))
    infer([fold0], [val], _options(out, tta=("flip",)))
    assert read_store(out / "model" / "val").view_names == ("identity", "flip")
    # The same bytes under another folder are the same model (same sha256).
    copy = tmp_path / "copy" / "model.onnx"
    copy.parent.mkdir()
    shutil.copyfile(fold0, copy)
    infer([copy], [val], _options(out))
    assert read_store(out / "model" / "val").view_names == ("identity",)


def test_a_file_exported_again_to_the_same_path_replaces_its_store(tmp_path, folds):
    data, fold0, _ = folds
    out = tmp_path / "runs"
    val = load_split(data / "val2019.json")
    infer([fold0], [val], _options(out))
    tiny_onnx(fold0, seed=7)  # retrained and exported over the old file
    infer([fold0], [val], _options(out))
    assert read_store(out / "model" / "val").manifest["model"]["sha256"] == sha256_file(fold0)


def test_an_interrupted_store_of_another_model_is_not_replaced_either(tmp_path, folds):
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    val = load_split(data / "val2019.json")
    with pytest.raises(Killed):
        infer([fold0], [val], _options(out), progress=kill_at_first_chunk)
    manifest = (out / "model" / "val" / MANIFEST).read_bytes()
    partial = sorted(p.name for p in (out / "model" / "val" / ".partial").iterdir())
    with pytest.raises(EnsError, match=r"--name fold1-model"):
        infer([fold1], [val], _options(out))
    assert (out / "model" / "val" / MANIFEST).read_bytes() == manifest
    assert sorted(p.name for p in (out / "model" / "val" / ".partial").iterdir()) == partial


def test_the_refusal_comes_before_any_store_is_written(tmp_path, folds):
    """Only the test store of fold0 exists: fold1's val store is not computed before the
    refusal on test."""
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    infer([fold0], [load_split(data / "test2019.json")], _options(out))
    splits = [load_split(data / "val2019.json"), load_split(data / "test2019.json")]
    with pytest.raises(EnsError, match=r"runs/model/test"):
        infer([fold1], splits, _options(out))
    assert not (out / "model" / "val").exists()


def test_name_checks(tmp_path, folds):
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    line = one_line_error(ens("infer", fold0, fold1, "--data", data, "--out", out, "--name", "x"))
    assert "--name" in line and "one model" in line
    line = one_line_error(ens("infer", fold0, "--data", data, "--out", out, "--name", "../x"))
    assert "--name '../x'" in line
    assert not out.exists()


def test_the_same_stem_twice_in_one_run_names_the_option(tmp_path, folds):
    data, fold0, fold1 = folds
    line = one_line_error(ens("infer", fold0, fold1, "--data", data, "--out", tmp_path / "runs"))
    assert "'model'" in line and "--name" in line


def test_a_named_store_finishes_with_its_name(tmp_path, folds):
    data, _, fold1 = folds
    out = tmp_path / "runs"
    val = load_split(data / "val2019.json")
    command = finishing_command(load_model(fold1), val, _options(out, name="fold1"), "cpu")
    assert shlex.split(command)[-2:] == ["--name", "fold1"]
    with pytest.raises(Killed):
        infer([fold1], [val], _options(out, name="fold1"), progress=kill_at_first_chunk)
    with pytest.raises(EnsError) as info:
        read_store(out / "fold1" / "val")
    args = shlex.split(str(info.value).split("finish it with: ", 1)[1])
    assert args[args.index("--name") + 1] == "fold1"
    result = CliRunner().invoke(app, args[1:] + ["--workers", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "fold1" / "val" / MANIFEST).read_text())["complete"] is True
    assert not (out / "model").exists()


def test_each_model_run_from_its_own_folder_is_refused_too(tmp_path, folds, monkeypatch):
    """``cd fold0 && ens infer model.onnx ...``, then the same from fold1: the manifest's relative
    ``model.onnx`` names fold0's file only from fold0; from fold1 it is fold1's own."""
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    monkeypatch.chdir(fold0.parent)
    assert ens("infer", "model.onnx", "--data", "../inat", "--split", "val", "--out", "../runs",
               "--workers", 0).exit_code == 0
    before = store_bytes(out / "model" / "val")
    monkeypatch.chdir(fold1.parent)
    line = one_line_error(ens("infer", "model.onnx", "--data", "../inat", "--split", "val", "--out", "../runs",
                           "--workers", 0))
    assert "runs/model/val" in line and "--name fold1-model" in line, line
    assert store_bytes(out / "model" / "val") == before
    manifest = read_store(out / "model" / "val").manifest
    assert manifest["model"]["sha256"] == sha256_file(fold0)
    assert manifest["model"]["realpath"] == str(fold0.resolve())


def test_a_store_of_an_older_ens_is_replaced_only_by_the_same_sha256(tmp_path, folds, monkeypatch):
    """A manifest without ``model.realpath`` (an older ens) cannot say which file it meant."""
    data, fold0, fold1 = folds
    out = tmp_path / "runs"
    val = load_split(data / "val2019.json")
    monkeypatch.chdir(fold0.parent)
    infer([fold0.name], [val], _options(out))
    path = out / "model" / "val" / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["model"]["realpath"]
    path.write_text(json.dumps(manifest))
    monkeypatch.chdir(fold1.parent)
    with pytest.raises(EnsError, match=r"--name fold1-model"):
        infer([fold1.name], [val], _options(out))
    monkeypatch.chdir(fold0.parent)
    tiny_onnx(fold0, seed=7)  # even the same path: the older manifest's relative file is not trusted
    with pytest.raises(EnsError, match=r"another sha256"):
        infer([fold0.name], [val], _options(out))
    infer([fold1], [val], _options(out, name="fold1"))  # and --name keeps both


@pytest.mark.parametrize("name, reason", [("p,q", "','"), ("a\nb", "control"), ("a\tb", "control"),
                                          ("a\x1bb", "control"), ("a\x85b", "control")],
                         ids=["comma", "newline", "tab", "escape", "c1"])
def test_a_name_ens_blend_could_not_choose_or_a_line_could_not_show_is_refused(tmp_path, folds, name, reason):
    data, fold0, _ = folds
    out = tmp_path / "runs"
    line = one_line_error(ens("infer", fold0, "--data", data, "--out", out, "--name", name))
    assert "--name" in line and reason in line, line
    assert not out.exists()


def test_a_name_too_long_says_so(tmp_path, folds):
    data, fold0, _ = folds
    out = tmp_path / "runs"
    line = one_line_error(ens("infer", fold0, "--data", data, "--out", out, "--name", "n" * 255))
    assert "255 characters" in line and "at most 200" in line, line
    assert "no '/'" not in line
    assert ens("infer", fold0, "--data", data, "--out", out, "--name", "n" * 200, "--workers", 0).exit_code == 0


def test_a_model_file_whose_stem_cannot_name_a_store_names_the_option_that_can(tmp_path, folds):
    data, fold0, _ = folds
    odd = tmp_path / "a,b.onnx"
    shutil.copyfile(fold0, odd)
    line = one_line_error(ens("infer", odd, "--data", data, "--out", tmp_path / "runs", "--workers", 0))
    assert "','" in line and "--name NAME" in line, line
    result = ens("infer", odd, "--data", data, "--out", tmp_path / "runs", "--workers", 0, "--name", "ab")
    assert result.exit_code == 0, result.output
