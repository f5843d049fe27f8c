"""timm checkpoints export with no flags (issue 25): the three forms (train.py checkpoint, --arch
timm/NAME[.TAG] for bare weights, Hugging Face-style folder), the preprocessing's precedence and
its notes, crop modes, EMA weights and --weights-key, and one-line errors for bad args/configs."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ensemble.cli import app
from ensemble.errors import EnsError
from ensemble.formats.model import read_metadata
from exporters import ExportOptions, export_checkpoint, timm_models
from exporters.checkpoints import load_checkpoint
from exporters.onnx_export import default_output_path
from exporters.timm_models import Source, resolve_preprocessing

from tests.exporters.helpers import onnx_logits, random_images, reference_logits

runner = CliRunner()
SIZE = 64


def train_args(**values) -> argparse.Namespace:
    """An args Namespace as timm's train.py saves it: every data option unset unless given."""
    base = dict(model="resnet18", num_classes=None, img_size=None, input_size=None, crop_pct=None, mean=None,
                std=None, interpolation="", gp=None, bn_eps=None, model_kwargs={}, lr=0.1, epochs=3)
    base.update(values)
    return argparse.Namespace(**base)


def train_checkpoint(model, args, ema=None) -> dict:
    """The dict timm's CheckpointSaver writes."""
    state = {"epoch": 2, "arch": args.model, "state_dict": model.state_dict(), "optimizer": {"state": {}},
             "version": 2, "args": args, "metric": 0.5}
    if ema is not None:
        state["state_dict_ema"] = ema.state_dict()
    return state


def timm_model(name: str, num_classes: int, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


# ------------------------------------------------------------------------------------------
# Preprocessing: precedence and notes (no export)

REGISTRY = Source("timm's config of m.tag", {"input_size": 299, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                             "interpolation": "bicubic", "crop_mode": "center", "crop_pct": 0.95,
                                             "test_input_size": 320, "test_crop_pct": 1.0})
GIVEN = Source("the checkpoint's args", {"input_size": 128, "mean": (0.1, 0.2, 0.3), "crop_pct": 0.8})
NO_CLI = {"input_size": None, "mean": None, "std": None, "interpolation": None, "resize": None, "crop_pct": None}


def test_precedence_command_line_then_args_then_timm_config():
    cli = dict(NO_CLI, mean=(0.4, 0.4, 0.4), interpolation="bilinear")
    pre, notes = resolve_preprocessing(cli, GIVEN, REGISTRY)
    assert (pre.input_size, pre.mean, pre.std, pre.interpolation, pre.resize, pre.crop_pct) == (
        128, (0.4, 0.4, 0.4), (0.5, 0.5, 0.5), "bilinear", "center-crop", 0.8)
    assert notes == [
        "input_size 128 from the checkpoint's args",
        "mean 0.4,0.4,0.4 from --mean",
        "std 0.5,0.5,0.5 from timm's config of m.tag",
        "interpolation bilinear from --interpolation",
        "resize center-crop from timm's config of m.tag (crop_mode center)",
        "crop_pct 0.8 from the checkpoint's args",
    ]


def test_timm_config_then_timm_defaults():
    pre, notes = resolve_preprocessing(NO_CLI, None, Source("timm's config of x", {"mean": (0.5, 0.5, 0.5)}))
    assert (pre.input_size, pre.std, pre.interpolation, pre.crop_pct) == (224, (0.229, 0.224, 0.225), "bicubic", 0.875)
    assert notes[0] == "input_size 224 from timm's defaults"
    assert notes[1] == "mean 0.5,0.5,0.5 from timm's config of x"


def test_test_input_size_is_named_not_taken():
    pre, notes = resolve_preprocessing(NO_CLI, None, REGISTRY)
    assert pre.input_size == 299
    assert notes[0] == ("input_size 299 from timm's config of m.tag (timm's validate.py evaluates at its "
                        "test_input_size 320: --input-size 320 --crop-pct 1)")


@pytest.mark.parametrize("mode, crop, resize", [("center", 0.9, "center-crop"), ("squash", 1.0, "squash")])
def test_crop_modes_map_to_resize_policies(mode, crop, resize):
    pre, notes = resolve_preprocessing(NO_CLI, Source("args", {"crop_mode": mode, "crop_pct": crop}), REGISTRY)
    assert (pre.resize, pre.crop_pct) == (resize, crop)
    assert f"resize {resize} from args (crop_mode {mode})" in notes


@pytest.mark.parametrize("values, message", [
    ({"crop_mode": "border"}, "args: crop_mode 'border' is not supported (it pads the image to a square"),
    ({"crop_mode": "squash", "crop_pct": 0.9}, "args: crop_mode 'squash' with crop_pct 0.9 (from args: crop_pct) "
                                               "is not supported"),
    ({"interpolation": "box"}, "args: interpolation 'box' is not one ens resizes with"),
])
def test_unsupported_timm_preprocessing_is_one_line(values, message):
    with pytest.raises(EnsError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        resolve_preprocessing(NO_CLI, Source("args", values), REGISTRY)


def test_command_line_resize_overrides_an_unsupported_crop_mode():
    pre, notes = resolve_preprocessing(dict(NO_CLI, resize="squash"), Source("args", {"crop_mode": "border"}),
                                       REGISTRY)
    assert pre.resize == "squash" and "resize squash from --resize" in notes


def test_registry_config_of_model_and_tag():
    inception, _ = timm_models.registry_source(timm_models.spec_from_arch("timm/inception_v4"))
    assert inception.label == "timm's config of inception_v4.tf_in1k"
    assert inception.values["input_size"] == 299 and inception.values["mean"] == (0.5, 0.5, 0.5)
    # The tag selects its own config: resnet18's default (a1_in1k) is bicubic at crop 0.95, tv_in1k bilinear 0.875.
    default, _ = timm_models.registry_source(timm_models.spec_from_arch("timm/resnet18"))
    tv, _ = timm_models.registry_source(timm_models.spec_from_arch("timm/resnet18.tv_in1k"))
    assert (default.values["interpolation"], default.values["crop_pct"]) == ("bicubic", 0.95)
    assert (tv.values["interpolation"], tv.values["crop_pct"]) == ("bilinear", 0.875)
    assert tv.label == "timm's config of resnet18.tv_in1k"


@pytest.mark.parametrize("arch, message", [
    ("timm/", "--arch timm/: name the timm model"),
    ("timm/resnet_18", "--arch timm/resnet_18: timm .* has no model 'resnet_18'; did you mean resnet18"),
    ("timm/../x", r"--arch timm/../x: the model name before its '.' is empty; expected timm/NAME or timm/NAME.TAG"),
    ("timm/resnet18/x", r"--arch timm/resnet18/x: 'resnet18/x' contains '/'; expected timm/NAME"),
])
def test_unknown_timm_names(arch, message):
    with pytest.raises(EnsError, match="^" + message):
        timm_models.spec_from_arch(arch)


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(EnsError, match=r"^timm/resnet18.nope: timm .* has no pretrained tag 'nope' for resnet18 "
                                       r"\(it has a1_in1k, "):
        timm_models.registry_source(timm_models.spec_from_arch("timm/resnet18.nope"))


# ------------------------------------------------------------------------------------------
# Checkpoint args and config.json are data

def test_train_checkpoint_detection():
    args = train_args()
    assert timm_models.train_args({"state_dict": {}, "args": args}) is args
    # torchvision's reference train.py saves "model" and args.model: not timm's.
    assert timm_models.train_args({"model": {}, "args": args}) is None
    assert timm_models.train_args({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}) is None
    assert timm_models.train_args(None) is None


@pytest.mark.parametrize("values, message", [
    ({"model": 3}, "args.model 3: expected the name of a timm model"),
    ({"model": "resnet_18"}, "args.model 'resnet_18': timm .* has no model 'resnet_18'; did you mean resnet18"),
    ({"img_size": "big"}, "args.img_size 'big': expected a size in pixels"),
    ({"input_size": [3, 224, 320]}, r"args.input_size \[3, 224, 320\]: ens exports square inputs, this is 224x320"),
    ({"input_size": [1, 224, 224]}, r"args.input_size \[1, 224, 224\]: ens exports models of RGB images"),
    ({"mean": [0.5, 0.5]}, r"args.mean \[0.5, 0.5\]: expected 3 numbers"),
    ({"std": [0.5, 0.0, 0.5]}, r"args.std \[0.5, 0.0, 0.5\]: expected fractions of 255 in \(0, 1\]"),
    ({"crop_pct": 1.5}, r"args.crop_pct 1.5: expected a fraction in \(0, 1\]"),
    ({"crop_pct": "0.9"}, r"args.crop_pct '0.9': expected a fraction in \(0, 1\]"),
    ({"interpolation": 5}, "args.interpolation 5: expected a name such as 'bicubic'"),
    ({"crop_mode": "zoom"}, "args.crop_mode 'zoom': expected one of center, squash, border"),
    ({"num_classes": -1}, "args.num_classes -1: expected a positive integer"),
    ({"model_kwargs": [1]}, r"args.model_kwargs \[1\]: expected a dict of keyword arguments"),
    ({"gp": 5}, "args.gp 5: expected a pooling type"),
])
def test_bad_args_are_one_line_naming_the_key(tmp_path, values, message):
    with pytest.raises(EnsError, match="^" + str(tmp_path / "c.pth").replace(".", r"\.") + ": " + message):
        timm_models.spec_from_train_args(train_args(**values), tmp_path / "c.pth")


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained", "pretrained_cfg_overlay"])
def test_model_kwargs_never_reach_create_models_own_parameters(tmp_path, key):
    # checkpoint_path would load another file, pretrained download: data never sets them.
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 512)},
                "args": train_args(model_kwargs={key: "/etc/passwd"}, img_size=SIZE)}, tmp_path / "c.pth")
    with pytest.raises(EnsError, match=f"^{tmp_path}/c.pth: args.model_kwargs: {key} is not passed to "
                                       r"timm.create_model \(ens builds with pretrained=False"):
        export_checkpoint(tmp_path / "c.pth", tmp_path / "c.onnx")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 512)}, "args": train_args(img_size=SIZE)},
               tmp_path / "d.pth")
    with pytest.raises(EnsError, match=f"^--arch-kwargs: {key} is not passed"):
        export_checkpoint(tmp_path / "d.pth", tmp_path / "d.onnx", ExportOptions(arch_kwargs={key: True}))


def test_args_model_from_timms_hub_repo(tmp_path):
    # train.py --model hf-hub:timm/NAME.TAG fine-tunes timm's own Hub weights: the registry has their config.
    spec = timm_models.spec_from_train_args(train_args(model="hf-hub:timm/resnet18.tv_in1k"), tmp_path / "c.pth")
    assert spec.label == "timm/resnet18.tv_in1k"
    with pytest.raises(EnsError, match=r"args.model 'hf-hub:someone/model': names a model by its Hugging Face "
                                       r"Hub repo or folder, whose config.json ens does not fetch; pass --arch"):
        timm_models.spec_from_train_args(train_args(model="hf-hub:someone/model"), tmp_path / "c.pth")


def test_arch_overrides_args_model_and_keeps_the_runs_preprocessing(tmp_path):
    args = train_args(model="hf-hub:someone/model", gp="avgmax", mean=[0.5], num_classes=4)
    spec = timm_models.spec_from_train_args(args, tmp_path / "c.pth", timm_models.spec_from_arch("timm/resnet18"))
    assert spec.label == "timm/resnet18" and spec.kwargs == {}  # another network's build keywords dropped
    assert spec.given.values == {"mean": (0.5, 0.5, 0.5)} and spec.num_classes == (4, "the checkpoint's args")
    assert spec.notes == ["--arch timm/resnet18 overrides the checkpoint's args.model 'hf-hub:someone/model'"]
    same = timm_models.spec_from_train_args(train_args(gp="avgmax"), tmp_path / "c.pth",
                                            timm_models.spec_from_arch("timm/resnet18.tv_in1k"))
    assert same.label == "timm/resnet18.tv_in1k" and same.kwargs == {"global_pool": "avgmax"} and not same.notes


def test_args_values_in_ens_form(tmp_path):
    spec = timm_models.spec_from_train_args(
        train_args(model="resnet18.tv_in1k", input_size=[3, 96, 96], mean=[0.5], std=[0.25, 0.25, 0.25],
                   crop_pct=0.0, interpolation="bilinear", gp="avgmax", bn_eps=1e-3, num_classes=9,
                   model_kwargs={"zero_init_last": False}), tmp_path / "c.pth")
    assert (spec.name, spec.tag, spec.label) == ("resnet18", "tv_in1k", "timm/resnet18.tv_in1k")
    # crop_pct 0 is "not set" to timm, as an empty interpolation is.
    assert spec.given.values == {"input_size": 96, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                 "interpolation": "bilinear"}
    assert spec.kwargs == {"global_pool": "avgmax", "bn_eps": 1e-3, "zero_init_last": False}
    assert spec.num_classes == (9, "the checkpoint's args")


def _folder(tmp_path, config, weights="model.safetensors"):
    folder = tmp_path / "resnet18.my_tag"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    if weights:
        (folder / weights).write_bytes(b"x")
    return folder


@pytest.mark.parametrize("config, weights, message", [
    ([1, 2], "model.safetensors", "config.json: expected a JSON object with architecture"),
    ({"num_classes": 3, "pretrained_cfg": {}}, "model.safetensors", "config.json: architecture None: expected"),
    ({"architecture": "resnet18", "pretrained_cfg": []}, "model.safetensors", r"config.json: pretrained_cfg \[\]"),
    ({"architecture": "resnet18", "pretrained_cfg": {"mean": "grey"}}, "model.safetensors",
     "config.json: pretrained_cfg.mean 'grey': expected 3 numbers"),
    ({"architecture": "resnet18", "pretrained_cfg": {}, "model_args": {"in_chans": 1}}, "model.safetensors",
     "config.json: model_args.in_chans 1: ens exports models of RGB images"),
    ({"architecture": "resnet18", "num_classes": 0, "pretrained_cfg": {}}, "model.safetensors",
     "config.json: num_classes 0: expected a positive integer"),
    ({"architecture": "resnet18", "pretrained_cfg": {}}, None, "resnet18.my_tag: no weights beside config.json"),
])
def test_bad_folders_are_one_line(tmp_path, config, weights, message):
    folder = _folder(tmp_path, config, weights)
    with pytest.raises(EnsError, match=message):
        timm_models.read_folder(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(EnsError, match="a folder without config.json; name a checkpoint file, or a Hugging Face"):
        export_checkpoint(tmp_path, tmp_path / "x.onnx")


def test_folder_default_output_beside_it(tmp_path):
    folder = tmp_path / "convnext_atto.d2_in1k"
    folder.mkdir()
    assert default_output_path(folder, fp16=False) == tmp_path / "convnext_atto.d2_in1k.onnx"
    assert default_output_path(folder, fp16=True) == tmp_path / "convnext_atto.d2_in1k.fp16.onnx"


# ------------------------------------------------------------------------------------------
# Weights keys and EMA (no export)

@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory):
    model, ema = timm_model("resnet18", 5, seed=0), timm_model("resnet18", 5, seed=1)
    path = tmp_path_factory.mktemp("ema") / "model_best.pth.tar"
    torch.save(train_checkpoint(model, train_args(num_classes=5, img_size=SIZE), ema=ema), path)
    return path, model, ema


def test_ema_is_noted_and_plain_weights_taken(ema_checkpoint):
    path, model, _ = ema_checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt.found_under == "state_dict"
    assert torch.equal(ckpt.state_dict["fc.weight"], model.state_dict()["fc.weight"])
    assert ("also holds state_dict_ema (EMA weights): took state_dict, as timm's validate.py does; "
            "--weights-key state_dict_ema takes the EMA") in ckpt.notes


def test_weights_key_takes_the_ema(ema_checkpoint):
    path, _, ema = ema_checkpoint
    ckpt = load_checkpoint(path, weights_key="state_dict_ema")
    assert ckpt.found_under == "state_dict_ema"
    assert torch.equal(ckpt.state_dict["fc.weight"], ema.state_dict()["fc.weight"])
    assert not any("EMA" in note for note in ckpt.notes)


def test_weights_key_errors(ema_checkpoint, tmp_path):
    path, model, _ = ema_checkpoint
    with pytest.raises(EnsError, match=r"^--weights-key ema_weights: .* has no such entry \(it has epoch, arch, "
                                       r"state_dict, optimizer, version, args, metric, state_dict_ema\)"):
        load_checkpoint(path, weights_key="ema_weights")
    with pytest.raises(EnsError, match=r"^--weights-key epoch: .*'epoch' entry holds an int, not weights"):
        load_checkpoint(path, weights_key="epoch")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(EnsError, match="^--weights-key state_dict: .* holds a bare state_dict, not a checkpoint"):
        load_checkpoint(tmp_path / "bare.pt", weights_key="state_dict")
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(EnsError, match="^--weights-key state_dict: .* is a safetensors file"):
        load_checkpoint(tmp_path / "w.safetensors", weights_key="state_dict")


def test_without_timm_one_line_names_the_extra(ema_checkpoint, tmp_path, monkeypatch):
    path, _, _ = ema_checkpoint
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    result = runner.invoke(app, ["export", str(path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: ens export needs timm for this checkpoint (timm/resnet18): "
                                     "pip install 'ens[timm]'")
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------
# End to end: the three forms exported with no preprocessing flags

def _normalised_logits(model, images, mean, std):
    return reference_logits(model, images, mean=mean, std=std)


@pytest.mark.slow
def test_train_checkpoint_exports_with_no_flags(tmp_path):
    model = timm_model("resnet18", 6)
    args = train_args(num_classes=6, img_size=SIZE, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], crop_pct=0.9,
                      interpolation="bilinear")
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save(train_checkpoint(model, args), ckpt)
    result = runner.invoke(app, ["export", str(ckpt), "--no-cam"])  # --no-cam: CAM is test_timm_cam's; quicker
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported timm/resnet18: 6 classes, {SIZE} px (any size), fp32")
    for note in ["num_classes 6 from the checkpoint's args", f"input_size {SIZE} from the checkpoint's args",
                 "mean 0.5,0.5,0.5 from the checkpoint's args", "std 0.25,0.25,0.25 from the checkpoint's args",
                 "interpolation bilinear from the checkpoint's args", "crop_pct 0.9 from the checkpoint's args",
                 "resize center-crop from timm's config of resnet18.a1_in1k (crop_mode center)"]:
        assert f"  note: {note}" in lines
    out = tmp_path / "model_best.pth.onnx"
    meta = read_metadata(out)
    assert (meta.architecture, meta.num_classes, meta.input_size, meta.mean, meta.std, meta.crop_pct,
            meta.interpolation, meta.resize) == ("timm/resnet18", 6, SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                                 0.9, "bilinear", "center-crop")
    images = random_images(2, SIZE, seed=3)
    np.testing.assert_allclose(onnx_logits(out, images),
                               _normalised_logits(model, images, (0.5,) * 3, (0.25,) * 3), atol=1e-3, rtol=1e-4)
    info = runner.invoke(app, ["info", str(out)])
    assert "timm/resnet18" in info.stdout and "bilinear" in info.stdout
    # The values' sources are recorded: the tagless name's config is resnet18.a1_in1k's.
    assert meta.preprocess_from == {"input_size": "the checkpoint's args", "mean": "the checkpoint's args",
                                    "std": "the checkpoint's args", "interpolation": "the checkpoint's args",
                                    "resize": "timm's config of resnet18.a1_in1k",
                                    "crop_pct": "the checkpoint's args"}
    assert "preprocess_from" in info.stdout and "timm's config of resnet18.a1_in1k" in info.stdout


@pytest.mark.slow
def test_command_line_wins_and_ema_by_key(ema_checkpoint, tmp_path):
    path, _, ema = ema_checkpoint
    result = export_checkpoint(path, tmp_path / "ema.onnx", ExportOptions(
        weights_key="state_dict_ema", crop_pct=1.0, interpolation="lanczos", mean=(0.5, 0.5, 0.5), cam=False))
    meta = result.metadata
    assert (meta.crop_pct, meta.interpolation, meta.mean, meta.input_size) == (1.0, "lanczos", (0.5, 0.5, 0.5), SIZE)
    assert "crop_pct 1 from --crop-pct" in result.notes and "mean 0.5,0.5,0.5 from --mean" in result.notes
    assert "std 0.229,0.224,0.225 from timm's config of resnet18.a1_in1k" in result.notes
    assert "weights taken from the checkpoint's 'state_dict_ema' entry" in result.notes
    images = random_images(2, SIZE, seed=4)
    np.testing.assert_allclose(onnx_logits(result.path, images),
                               _normalised_logits(ema, images, (0.5,) * 3, (0.229, 0.224, 0.225)),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_arch_with_tag_for_safetensors(tmp_path):
    model = timm_model("resnet18", 4)
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "r18.safetensors")
    result = runner.invoke(app, ["export", str(tmp_path / "r18.safetensors"), "--arch", "timm/resnet18.tv_in1k",
                                 "--input-size", str(SIZE), "--no-cam"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("exported timm/resnet18.tv_in1k: 4 classes")
    for note in ["num_classes 4 from the classifier weights (fc.weight)", f"input_size {SIZE} from --input-size",
                 "interpolation bilinear from timm's config of resnet18.tv_in1k",
                 "crop_pct 0.875 from timm's config of resnet18.tv_in1k", "removed the key prefix 'module.'"]:
        assert f"  note: {note}" in lines
    meta = read_metadata(tmp_path / "r18.onnx")
    assert (meta.architecture, meta.interpolation, meta.crop_pct) == ("timm/resnet18.tv_in1k", "bilinear", 0.875)


@pytest.mark.slow
def test_hugging_face_folder(tmp_path):
    from timm.models import save_for_hf

    model = timm_model("resnet18", 3, global_pool="avgmax")
    folder = tmp_path / "resnet18.my_finetune"
    save_for_hf(model, str(folder), safe_serialization=True,
                data_config={"input_size": (3, SIZE, SIZE), "crop_pct": 0.8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    result = runner.invoke(app, ["export", str(folder), "--no-cam"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # The folder's config names the model and its tag (timm's default tag when it was created).
    assert lines[0].startswith(f"exported timm/resnet18.a1_in1k: 3 classes, {SIZE} px")
    for note in ["weights from resnet18.my_finetune/model.safetensors", "num_classes 3 from resnet18.my_finetune/config.json",
                 f"input_size {SIZE} from resnet18.my_finetune/config.json", "crop_pct 0.8 from resnet18.my_finetune/config.json",
                 "mean 0.5,0.5,0.5 from resnet18.my_finetune/config.json"]:
        assert f"  note: {note}" in lines
    out = tmp_path / "resnet18.my_finetune.onnx"
    meta = read_metadata(out)
    assert meta.checkpoint == "resnet18.my_finetune/model.safetensors"
    assert meta.arch_kwargs["global_pool"] == "avgmax"  # the folder's model_args built the network
    images = random_images(2, SIZE, seed=5)
    np.testing.assert_allclose(onnx_logits(out, images), _normalised_logits(model, images, (0.5,) * 3, (0.5,) * 3),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_fixed_size_vit_is_built_at_its_size(tmp_path):
    model = timm_model("vit_tiny_patch16_224", 3, img_size=SIZE)
    ckpt = tmp_path / "vit.pth.tar"
    torch.save(train_checkpoint(model, train_args(model="vit_tiny_patch16_224", num_classes=3, img_size=SIZE)), ckpt)
    result = export_checkpoint(ckpt, tmp_path / "vit.onnx")
    meta = result.metadata
    assert (meta.architecture, meta.input_size, meta.dynamic_size) == ("timm/vit_tiny_patch16_224", SIZE, False)
    assert (meta.mean, meta.crop_pct) == ((0.5, 0.5, 0.5), 0.9)  # timm's config of the ViT
    assert meta.arch_kwargs == {"img_size": SIZE}
    images = random_images(2, SIZE, seed=6)
    np.testing.assert_allclose(onnx_logits(result.path, images),
                               _normalised_logits(model, images, (0.5,) * 3, (0.5,) * 3), atol=1e-3, rtol=1e-4)
    with pytest.raises(EnsError, match=r"shape mismatches .*pos_embed \(1, 17, 192\) vs \(1, 37, 192\); its "
                                       "position embeddings fix the size it runs at: export without --input-size"):
        export_checkpoint(ckpt, tmp_path / "vit96.onnx", ExportOptions(input_size=96))


@pytest.mark.slow
def test_contradicting_num_classes_and_wrong_model(tmp_path):
    model = timm_model("resnet18", 4)
    ckpt = tmp_path / "c.pth.tar"
    torch.save(train_checkpoint(model, train_args(num_classes=7, img_size=SIZE)), ckpt)
    with pytest.raises(EnsError, match=r"num_classes 7 \(from the checkpoint's args\) contradicts the classifier "
                                       r"fc.weight, which has 4 rows"):
        export_checkpoint(ckpt, tmp_path / "c.onnx")
    torch.save(train_checkpoint(model, train_args(model="resnet34", img_size=SIZE)), ckpt)
    with pytest.raises(EnsError, match=r"weights do not fit timm/resnet34: missing keys"):
        export_checkpoint(ckpt, tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()


# ------------------------------------------------------------------------------------------
# Review fixes: tags this timm lacks, EMA-only checkpoints, messages naming the file and key

def test_a_files_unknown_tag_falls_back_to_the_models_default_config(tmp_path):
    # A folder from a newer timm may name a tag this one lacks: timm builds it (local-dir:), so does ens.
    folder = _folder(tmp_path, {"architecture": "resnet18", "num_classes": 3,
                                "pretrained_cfg": {"tag": "nosuchtag", "input_size": [3, 96, 96]}})
    spec, _ = timm_models.read_folder(folder)
    registry, _ = timm_models.registry_source(spec)
    assert registry.label == "timm's config of resnet18.a1_in1k" and spec.tag is None
    assert spec.label == "timm/resnet18"  # built by its name: timm has no config for the tag
    assert spec.notes == [f"timm {timm.__version__} has no tag 'nosuchtag' ({folder}/config.json: pretrained_cfg.tag): "
                          "values from resnet18.my_tag/config.json, the rest from timm's config of resnet18.a1_in1k"]
    args = timm_models.spec_from_train_args(train_args(model="resnet18.nosuchtag"), tmp_path / "c.pth")
    timm_models.registry_source(args)
    assert args.notes == [f"timm {timm.__version__} has no tag 'nosuchtag' ({tmp_path}/c.pth: args.model): values "
                          "from the checkpoint's args, the rest from timm's config of resnet18.a1_in1k"]
    # --arch names the tag itself: still one line listing the known ones (test_unknown_tag_lists_the_known_ones).


def test_a_train_checkpoint_with_only_ema_weights(tmp_path):
    model = timm_model("resnet18", 2)
    state = train_checkpoint(model, train_args(num_classes=2))
    state["state_dict_ema"] = state.pop("state_dict")
    torch.save(state, tmp_path / "ema.pth.tar")
    with pytest.raises(EnsError, match=r"^.*ema.pth.tar: a dict with keys \[.*\] but no weights under any of "
                                       r"state_dict, .*; it holds EMA weights under 'state_dict_ema': pass "
                                       r"--weights-key state_dict_ema to export them$"):
        load_checkpoint(tmp_path / "ema.pth.tar")
    ckpt = load_checkpoint(tmp_path / "ema.pth.tar", weights_key="state_dict_ema")
    assert timm_models.train_args(ckpt.container) == state["args"]  # still timm's train.py dict
    # torchvision's reference train.py: "model" and args.model, none of timm's entries.
    assert timm_models.train_args({"model": {}, "model_ema": {}, "args": train_args()}) is None


def test_preprocessing_errors_name_the_file_and_key(tmp_path):
    spec = timm_models.spec_from_train_args(train_args(interpolation="foo"), tmp_path / "c.pth")
    registry, _ = timm_models.registry_source(spec)
    with pytest.raises(EnsError, match=f"^{tmp_path}/c.pth: args.interpolation 'foo' is not one ens resizes with"):
        resolve_preprocessing(NO_CLI, spec.given, registry)
    spec = timm_models.spec_from_train_args(train_args(crop_mode="squash", crop_pct=0.9), tmp_path / "c.pth")
    with pytest.raises(EnsError, match=f"^{tmp_path}/c.pth: args.crop_mode 'squash' with crop_pct 0.9 \\(from "
                                       f"{tmp_path}/c.pth: args.crop_pct\\) is not supported: .*pass --crop-pct 1"):
        resolve_preprocessing(NO_CLI, spec.given, registry)
    folder = _folder(tmp_path, {"architecture": "resnet18", "pretrained_cfg": {"interpolation": "random"}})
    spec, _ = timm_models.read_folder(folder)
    with pytest.raises(EnsError, match=f"^{folder}/config.json: pretrained_cfg.interpolation 'random' is not one"):
        resolve_preprocessing(NO_CLI, spec.given, registry)


def test_a_folder_with_both_weight_files_says_which_it_took(tmp_path):
    folder = _folder(tmp_path, {"architecture": "resnet18", "pretrained_cfg": {}})
    (folder / "pytorch_model.bin").write_bytes(b"x")
    spec, weights = timm_models.read_folder(folder)
    assert weights.name == "model.safetensors"
    assert spec.notes == ["also holds pytorch_model.bin: took model.safetensors, as timm does"]


def test_wrong_build_keywords_from_a_file_are_named(tmp_path):
    # drop_rate "x" builds, then fails in the first forward pass: the file's model_args are named, not the size.
    folder = tmp_path / "r18"
    save_file(timm_model("resnet18", 2).state_dict(), tmp_path / "w.safetensors")
    folder.mkdir()
    (tmp_path / "w.safetensors").rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 2,
                                                    "model_args": {"drop_rate": "x"},
                                                    "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    with pytest.raises(EnsError, match=f"^{folder}/config.json: model_args {{'drop_rate': 'x'}}: the network built "
                                       "with them does not run on 32 px inputs"):
        export_checkpoint(folder, tmp_path / "m.onnx", ExportOptions(cam=False))
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "model_args": {"nonsense": 1},
                                                    "pretrained_cfg": {}}))
    with pytest.raises(EnsError, match=f"^{folder}/config.json: model_args {{'nonsense': 1}}: timm/resnet18: timm "
                                       "cannot build it"):
        export_checkpoint(folder, tmp_path / "m.onnx", ExportOptions(cam=False))
    assert not (tmp_path / "m.onnx").exists()
