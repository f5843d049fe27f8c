"""The run's options in one place: the command line's defaults are InferOptions' (and the cam
and foreign settings'), every option's flag is its field's name, and a store's finishing
command repeats exactly the options that differ from those defaults."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import typer

from ensemble.cli import app
from ensemble.formats.dataset import load_split
from ensemble.inference.cam import CamSettings
from ensemble.inference.engine import CAM_OPTIONS, cam_settings
from ensemble.inference.foreign import DEFAULT_CROP_PCT, DEFAULT_RESIZE, ForeignPreprocess
from ensemble.inference.options import InferOptions, option_flag
from ensemble.inference.run import REPEATED_OPTIONS, finishing_command
from ensemble.inference.runtime import load_model

from tests.ensemble.conftest import tiny_onnx, write_images


def _infer_params() -> dict:
    command = typer.main.get_command(app).commands["infer"]
    return {param.name: param for param in command.params}


def test_every_option_is_a_flag_named_after_its_field():
    params = _infer_params()
    fields = [f.name for f in dataclasses.fields(InferOptions) if f.name != "foreign"]
    fields += [f.name for f in dataclasses.fields(ForeignPreprocess)]
    for name in fields:
        assert option_flag(name) in params[name].opts, name
    assert set(REPEATED_OPTIONS) <= set(fields) and set(CAM_OPTIONS) <= set(fields)


def test_the_command_lines_defaults_are_the_dataclasses():
    params, defaults = _infer_params(), InferOptions()
    shown = {"tta": ",".join(defaults.tta), "scales": ",".join(f"{s:g}" for s in defaults.scales)}
    for field in dataclasses.fields(InferOptions):
        if field.name in ("foreign", "cudnn_search"):
            continue
        assert params[field.name].default == shown.get(field.name, getattr(defaults, field.name)), field.name
    # None on the command line: the setting's own default, which --help shows.
    assert (params["cudnn_search"].default, params["cudnn_search"].show_default) == (None, defaults.cudnn_search)
    cam = CamSettings()
    for name, setting in CAM_OPTIONS.items():
        assert params[name].default is None and params[name].show_default == f"{getattr(cam, setting):g}", name
    assert params["resize"].show_default == DEFAULT_RESIZE == "center-crop"
    assert params["crop_pct"].show_default == f"{DEFAULT_CROP_PCT:g}" == "0.875"
    assert cam_settings(InferOptions()) == cam and cam_settings(InferOptions(cam_pad=0.3)).pad == 0.3


def test_a_finishing_command_repeats_what_differs_from_the_defaults(tmp_path):
    model = load_model(tiny_onnx(tmp_path / "m.onnx"))
    write_images(tmp_path / "imgs", [(40, 30)])
    split = load_split(tmp_path / "imgs")
    head = f"ens infer {tmp_path / 'm.onnx'} --index {tmp_path / 'imgs'}"
    assert finishing_command(model, split, InferOptions(), "cpu") == f"{head} --device cpu --out runs"
    options = InferOptions(tta=("flip", "scale", "cam"), scales=(0.9, 1.1), merge="gmean", batch_size=8,
                           chunk_size=16, dtype="float32", on_bad_image="skip", keep_views=True,
                           cam_threshold=0.5, cam_min=0.25, engine="ray", ray_address="auto", out=Path("o d"))
    assert finishing_command(model, split, options, "cuda") == (
        f"{head} --tta flip,scale,cam --scales 0.9,1.1 --merge gmean --batch-size 8 --chunk-size 16 "
        "--dtype float32 --on-bad-image skip --keep-views --cam-threshold 0.5 --engine ray --ray-address auto "
        "--device cuda --out 'o d'")  # --cam-min 0.25 is the default: left out
    # Options for another view or engine are not repeated.
    quiet = InferOptions(tta=("flip",), scales=(0.9, 1.1), ray_address=None, cam_threshold=None)
    assert shlex.split(finishing_command(model, split, quiet, "cpu"))[5:] == [
        "--tta", "flip", "--device", "cpu", "--out", "runs"]


def test_a_foreign_models_command_gives_the_preprocessing_it_ran_with(tmp_path):
    path = tiny_onnx(tmp_path / "f.onnx", float_nchw=True, size=32, dynamic=False)
    given = ForeignPreprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.9)
    model = load_model(path, given)
    write_images(tmp_path / "imgs", [(40, 30)])
    command = finishing_command(model, load_split(tmp_path / "imgs"), InferOptions(foreign=given), "cpu")
    assert command.endswith("--device cpu --out runs --input-size 32 --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25 "
                            "--crop-pct 0.9")
