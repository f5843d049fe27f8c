"""`ens export` and `ens info` through the command line (typer's CliRunner)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import exporters
from ensemble.cli import app
from ensemble.errors import EnsError
from exporters import ExportOptions

from tests.exporters.helpers import NUM_CLASSES, build

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "resnet18_inat.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in build("resnet18", 64).state_dict().items()}},
               path)
    return path


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    section = result.stdout.split("Commands")[1]
    # Rows of the commands box start "│ name  help"; wrapped help lines start with more spaces.
    commands = {line.split()[1] for line in section.splitlines() if line.startswith("│ ") and line[2] != " "}
    assert commands == {"export", "info", "infer", "blend", "submit", "submissions", "demo"}


@pytest.mark.parametrize("command, default", [
    (["export"], "[default: 299 for inception_v3, else 224]"),
    (["blend"], "[default: every model with a store for the split]"),
])
def test_help_shows_computed_defaults(command, default):
    # Rich reads "[...]" as markup and drops it unless escaped; the defaults must reach the user.
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert default in " ".join(line.strip("│ ") for line in result.stdout.splitlines())


def test_export_end_to_end(checkpoint):
    result = runner.invoke(app, ["export", str(checkpoint), "--arch", "resnet18", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    out = checkpoint.with_suffix(".onnx")
    assert out.is_file()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported resnet18: {NUM_CLASSES} classes, 64 px (any size), fp32")
    assert "  note: removed the key prefix 'module.'" in lines
    assert any(line.startswith("  verified fp32 at 64 px: max |logit diff|") and line.endswith("top-1 agrees on 4/4")
               for line in lines)
    assert any(line.startswith("  verified fp32 at 73 px") for line in lines)
    assert lines[-1].startswith(f"wrote {out} (")

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0
    assert "architecture       resnet18" in info.stdout
    assert "verified           fp32 at 64 px" in info.stdout
    as_json = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert as_json["num_classes"] == NUM_CLASSES and as_json["input_size"] == 64


def test_fp16_default_name(checkpoint):
    result = runner.invoke(app, ["export", str(checkpoint), "--arch", "resnet18", "--input-size", "64", "--fp16"])
    assert result.exit_code == 0, result.output
    assert checkpoint.with_suffix(".fp16.onnx").is_file()
    assert "verified fp16 at 64 px" in result.stdout


def test_options_reach_the_library(monkeypatch, tmp_path):
    seen = {}

    def fake_export(checkpoint, out, options):
        seen.update(checkpoint=checkpoint, out=out, options=options)
        raise EnsError("stop here")

    monkeypatch.setattr(exporters, "export_checkpoint", fake_export)
    result = runner.invoke(app, [
        "export", "ck.pt", "--arch", "inception_v3", "--arch-kwargs", '{"transform_input": true}',
        "--num-classes", "1010", "--input-size", "560", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
        "--classes", "cats.json", "--fp16", "-o", str(tmp_path / "x.onnx"), "--resize", "squash", "--crop-pct", "1",
    ])
    assert result.exit_code == 2
    assert seen["out"] == tmp_path / "x.onnx"
    assert str(seen["checkpoint"]) == "ck.pt"
    assert seen["options"] == ExportOptions(
        arch="inception_v3", arch_kwargs={"transform_input": True}, num_classes=1010, input_size=560,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="squash", crop_pct=1.0,
        classes=seen["options"].classes, fp16=True)
    assert str(seen["options"].classes) == "cats.json"


@pytest.mark.parametrize("args, message", [
    (["export", "missing.pt", "--arch", "resnet18"], "error: missing.pt: no such file"),
    (["export", "x.pt", "--arch-kwargs", "{bad"], "error: --arch-kwargs: not valid JSON"),
    (["export", "x.pt", "--arch-kwargs", "[1]"], "error: --arch-kwargs: expected a JSON object"),
    (["export", "x.pt", "--mean", "0.5,0.5"], "error: --mean 0.5,0.5: expected three numbers R,G,B, got 2"),
    (["export", "x.pt", "--std", "a,b,c"], "error: --std a,b,c: expected three numbers R,G,B"),
    (["info", "nothing.onnx"], "error: nothing.onnx: no such file"),
])
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == message or result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_bad_architecture_from_the_cli(checkpoint):
    result = runner.invoke(app, ["export", str(checkpoint), "--arch", "wide_resnet50"])
    assert result.exit_code == 2
    assert "unknown architecture; did you mean wide_resnet50_2" in result.stderr


def test_info_on_a_foreign_file(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not onnx at all")
    result = runner.invoke(app, ["info", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "not an ONNX model" in result.stderr


def test_debug_shows_the_traceback():
    result = runner.invoke(app, ["--debug", "export", "missing.pt", "--arch", "resnet18"])
    assert result.exit_code != 2
    assert isinstance(result.exception, EnsError)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("ens ")
