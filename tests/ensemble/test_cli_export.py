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

from tests.exporters.helpers import NUM_CLASSES

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(resnet18_64, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "resnet18_inat.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in resnet18_64[0].state_dict().items()}},
               path)
    return path


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    section = result.stdout.split("Commands")[1]
    # Rows of the commands box start "│ name  help"; wrapped help lines start with more spaces.
    commands = {line.split()[1] for line in section.splitlines() if line.startswith("│ ") and line[2] != " "}
    assert commands == {"export", "info", "infer", "blend", "submit", "submissions", "report", "demo"}


@pytest.mark.parametrize("command, default", [
    (["export"], "[default: 299 for inception_v3, else 224]"),
    (["export"], "[default: 0.485,0.456,0.406 (ImageNet)]"),
    (["blend"], "[default: every model with a store for the split]"),
])
def test_help_shows_computed_defaults(command, default):
    # Rich reads "[...]" as markup and drops it unless escaped; the defaults must reach the user.
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert default in " ".join(line.strip("│ ") for line in result.stdout.splitlines())


@pytest.mark.slow
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
    assert any(line.startswith("  note: cam output: the top-1 class's activation map on layer4.1.relu (2x2 at 64 px), "
                               "verified against torch at 64 px and 73 px: max |cam diff| ") for line in lines)
    assert lines[-1].startswith(f"wrote {out} (")

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0
    assert "architecture       resnet18" in info.stdout
    assert "verified           fp32 at 64 px" in info.stdout
    assert "cam                cam\n" in info.stdout and "cam_feature        layer4.1.relu\n" in info.stdout
    as_json = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert as_json["num_classes"] == NUM_CLASSES and as_json["input_size"] == 64


def test_no_cam(checkpoint, tmp_path):
    out = tmp_path / "plain.onnx"
    result = runner.invoke(app, ["export", str(checkpoint), "--arch", "resnet18", "--input-size", "64", "--no-cam",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "cam" not in result.stdout.replace(str(out), "")
    info = runner.invoke(app, ["info", str(out)])
    assert "cam                None\n" in info.stdout


@pytest.mark.slow
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
        "--interpolation", "bicubic", "--trust-pickle", "--no-cam",
    ])
    assert result.exit_code == 2
    assert seen["out"] == tmp_path / "x.onnx"
    assert str(seen["checkpoint"]) == "ck.pt"
    assert seen["options"] == ExportOptions(
        arch="inception_v3", arch_kwargs={"transform_input": True}, num_classes=1010, input_size=560,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="squash", crop_pct=1.0, interpolation="bicubic",
        classes=seen["options"].classes, fp16=True, trust_pickle=True, cam=False)
    assert str(seen["options"].classes) == "cats.json"


def test_options_left_out_keep_the_librarys_defaults(monkeypatch):
    seen = {}

    def fake_export(checkpoint, out, options):
        seen.update(options=options)
        raise EnsError("stop here")

    monkeypatch.setattr(exporters, "export_checkpoint", fake_export)
    assert runner.invoke(app, ["export", "ck.pt"]).exit_code == 2
    assert seen["options"] == ExportOptions()


@pytest.mark.parametrize("args, message", [
    (["export", "missing.pt", "--arch", "resnet18"], "error: missing.pt: no such file"),
    (["export", "x.pt", "--arch-kwargs", "{bad"], "error: --arch-kwargs: not valid JSON"),
    (["export", "x.pt", "--arch-kwargs", "[1]"], "error: --arch-kwargs: expected a JSON object"),
    (["export", "x.pt", "--mean", "0.5,0.5"], "error: --mean 0.5,0.5: expected three numbers R,G,B, got 2"),
    (["export", "x.pt", "--std", "a,b,c"], "error: --std a,b,c: expected three numbers R,G,B"),
    (["export", "x.pt", "--interpolation", "area"],
     "error: --interpolation area: choose one of bilinear, bicubic, nearest, lanczos"),
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


@pytest.mark.parametrize("option, value", [
    ("--mean", "123.7,116.3,103.5"), ("--std", "0.2,0,0.2"), ("--resize", "stretch"), ("--crop-pct", "1.5"),
])
def test_export_and_infer_share_the_preprocessing_checks(tmp_path, option, value):
    from tests.ensemble.conftest import write_images

    write_images(tmp_path / "images", [(40, 30)], ".png")
    exported = runner.invoke(app, ["export", "x.pt", option, value])
    inferred = runner.invoke(app, ["infer", str(tmp_path / "m.onnx"), "--index", str(tmp_path / "images"),
                                   "--out", str(tmp_path / "runs"), option, value])
    assert exported.exit_code == inferred.exit_code == 2
    assert exported.stderr.startswith(f"error: {option} ")
    assert exported.stderr.strip() == inferred.stderr.strip().splitlines()[-1]


#: Colours of the classes of a tiny ImageFolder training set; folder names are category ids.
COLOURS = {"1": (220, 40, 40), "2": (40, 200, 60), "10": (50, 60, 210), "11": (230, 220, 50)}


def test_class_folder_gives_the_labels_of_imagefolder_training(tmp_path):
    """A model trained on ImageFolder("train") predicts label 1 for folder "10" (the folder names
    sorted as strings). Exported with --classes train, `ens infer` must map its columns back so
    that every image's predicted category is the name of the folder it lies in."""
    import numpy as np
    import torchvision
    from PIL import Image
    from torch import nn

    from ensemble.formats.store import read_store
    from ensemble.formats.model import IMAGENET_MEAN, IMAGENET_STD

    train = tmp_path / "train"
    for name, rgb in COLOURS.items():
        (train / name).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (30, 44)]):
            Image.new("RGB", size, rgb).save(train / name / f"{i}.png")
    folder = torchvision.datasets.ImageFolder(str(train))
    assert folder.classes == ["1", "10", "11", "2"]  # the trap: not 1, 2, 10, 11

    # "Trained": logit k = -|x - colour of class k|^2 + |x|^2 on the normalised mean colour x.
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    protos = torch.stack([(torch.tensor(COLOURS[c], dtype=torch.float32) / 255 - mean) / std for c in folder.classes])
    head = nn.Linear(3, len(protos))
    with torch.no_grad():
        head.weight.copy_(2 * protos)
        head.bias.copy_(-(protos ** 2).sum(1))
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    with torch.no_grad():  # right on ImageFolder's own labels, as after training
        for path, label in folder.samples:
            pixels = torch.tensor(np.asarray(Image.open(path)), dtype=torch.float32).permute(2, 0, 1)[None]
            assert int(model((pixels / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).argmax()) == label
    torch.save(model, tmp_path / "colours.pt")

    result = runner.invoke(app, ["export", str(tmp_path / "colours.pt"), "--input-size", "32", "--classes", str(train),
                                 "--trust-pickle"])
    assert result.exit_code == 0, result.output
    onnx_file = tmp_path / "colours.onnx"
    info = json.loads(runner.invoke(app, ["info", str(onnx_file), "--json"]).stdout)
    assert info["class_ids"] == [1, 10, 11, 2]

    ran = runner.invoke(app, ["infer", str(onnx_file), "--index", str(train), "--out", str(tmp_path / "runs"),
                              "--workers", "0", "--dtype", "float32"])
    assert ran.exit_code == 0, ran.output
    store = read_store(tmp_path / "runs" / "colours" / "train")
    predicted = [store.class_ids[j] for j in np.asarray(store.logits).argmax(1)]
    assert len(predicted) == 8
    assert predicted == [int(image_id.split("/")[0]) for image_id in store.ids.tolist()]


@pytest.mark.slow
def test_interpolation_is_stored_and_used_by_infer(checkpoint, tmp_path):
    """The same network exported with --interpolation bicubic and bilinear: `ens infer` feeds
    each the images resized with its own filter (PIL's, as torchvision's Resize on PIL images)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from ensemble.formats.store import read_store
    from tests.ensemble.conftest import run_onnx, write_images

    models = {}
    for interpolation in ("bilinear", "bicubic"):
        models[interpolation] = tmp_path / f"{interpolation}.onnx"
        # squash: the whole image resized to the input, the one resize whose pixels are exactly
        # torchvision's (a centre crop resizes only its region: within 2 levels, test_infer_tta).
        result = runner.invoke(app, ["export", str(checkpoint), "--arch", "resnet18", "--input-size", "32",
                                     "--resize", "squash", "--interpolation", interpolation,
                                     "-o", str(models[interpolation])])
        assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", str(models["bicubic"]), "--json"]).stdout)
    assert info["interpolation"] == "bicubic"

    # PNGs (exact pixels, no reduced JPEG decode), larger than the 32 px input: a real resize.
    images = tmp_path / "images"
    write_images(images, [(64, 48), (48, 70), (90, 60), (50, 50)], ".png")
    ran = runner.invoke(app, ["infer", *map(str, models.values()), "--index", str(images), "--workers", "0",
                              "--dtype", "float32", "--out", str(tmp_path / "runs")])
    assert ran.exit_code == 0, ran.output
    stores = {name: read_store(tmp_path / "runs" / name / "images") for name in models}

    def expected(name: str, mode: InterpolationMode) -> np.ndarray:
        views = []
        for image_id in stores[name].ids.tolist():
            image = F.resize(Image.open(images / image_id).convert("RGB"), [32, 32], interpolation=mode)
            views.append(np.asarray(image))
        return run_onnx(models[name], np.stack(views))

    bicubic, bilinear = np.asarray(stores["bicubic"].logits), np.asarray(stores["bilinear"].logits)
    np.testing.assert_allclose(bicubic, expected("bicubic", InterpolationMode.BICUBIC), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(bilinear, expected("bilinear", InterpolationMode.BILINEAR), atol=1e-4, rtol=1e-4)
    # ... and the two filters give other logits (here by 1.5e-2), well beyond that tolerance.
    assert np.abs(bicubic - bilinear).max() > 10 * 1e-4


class _RunsAShellCommand:
    """What a malicious checkpoint holds: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path, checkpoint):
    import shlex

    marker = tmp_path / "it-ran"
    weights = torch.load(checkpoint, weights_only=True)
    torch.save({**weights, "callback": _RunsAShellCommand(f"touch {shlex.quote(str(marker))}")}, tmp_path / "evil.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "evil.pt"), "--arch", "resnet18", "--input-size", "64"])
    assert result.exit_code == 2
    assert not marker.exists()
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'evil.pt'}: holds pickled code objects (posix.system); loading it runs code from "
        "the file: pass --trust-pickle only for checkpoints you trust")
    assert result.stdout == "" and not (tmp_path / "evil.onnx").exists()


@pytest.mark.slow
def test_an_output_folder_this_user_cannot_write_is_refused_before_the_checkpoint_is_read(tmp_path):
    """Permissions do not bind root: as root, the command runs after dropping to the user nobody."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import textwrap
    from pathlib import Path

    # Not under tmp_path: pytest keeps that private to its user, and nobody must reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="ens-read-only-"))
    out = folder / "sub" / "m.onnx"
    script = textwrap.dedent(f"""
        import os, sys
        import ensemble.cli, exporters
        from typer.testing import CliRunner
        # Everything the command imports is loaded first: the interpreter's files may be root's only.
        CliRunner().invoke(ensemble.cli.app, ["export", "--help"])
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
        sys.argv = ["ens", "export", "missing.pt", "-o", {str(out)!r}]
        ensemble.cli.main()
    """)
    try:
        folder.chmod(0o555)
        ran = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                             text=True)
        assert ran.returncode == 2, ran.stderr
        assert ran.stderr.strip() == (f"error: -o {out}: cannot write in {folder} (no permission, or a read-only "
                                      "file system); write somewhere else")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


#: One hand-edited ``ens.*`` value per kind of damage, as `ens info` and `ens infer` report it.
EDITS = [
    ("num_classes", "0", "expected a positive integer"),
    ("input_size", "-32", "expected an integer from 16 to 4096 (pixels)"),
    ("crop_pct", "0", "expected a fraction in (0, 1]"),
    ("class_ids", "[1, 2]", "lists 2 category ids but ens.num_classes is 5"),
    ("class_ids", "[1, 2, 3, 4, 1]", "category id 1 appears twice"),
    ("resize", '"stretch"', "choose one of center-crop, squash"),
    ("interpolation", '"area"', "choose one of bilinear, bicubic, nearest, lanczos"),
    ("mean", "[0.5, 0.5]", "expected three numbers R,G,B"),
    ("std", '"0.2"', "expected three numbers R,G,B"),
    ("dynamic_size", "1", "expected true or false"),
    ("cam", '{"output": "cam"}', 'expected null or {"output": "cam", "feature": NAME}'),
]


@pytest.mark.parametrize("field, value, problem", EDITS, ids=[f"{f}={v}" for f, v, _ in EDITS])
def test_hand_edited_metadata_is_one_line_from_info_and_infer_alike(tmp_path, field, value, problem):
    import onnx

    from tests.ensemble.conftest import tiny_onnx, write_images

    path = tiny_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == f"ens.{field}":
            prop.value = value
    onnx.save(model, str(path))
    write_images(tmp_path / "images", [(40, 30)], ".png")

    expected = f"error: {path}: ens.{field} {value}: {problem}"
    shown = runner.invoke(app, ["info", str(path)])
    inferred = runner.invoke(app, ["infer", str(path), "--index", str(tmp_path / "images"), "--workers", "0",
                                   "--out", str(tmp_path / "runs")])
    for result in (shown, inferred):
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == expected
    assert not (tmp_path / "runs").exists()
