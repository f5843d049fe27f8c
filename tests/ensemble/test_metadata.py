"""The metadata contract of exported ONNX files, read without torch."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
from onnx import TensorProto, helper

from ensemble.errors import EnsError
from ensemble.formats.model import CAM_OUTPUT, ModelMetadata, Verification, check_preprocess, read_metadata


def _identity_model(props: dict[str, str]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model


META = ModelMetadata(
    architecture="wide_resnet50_2", num_classes=3, input_size=560, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
    class_ids=(10, 11, 12), arch_kwargs={"dropout": 0.1},
    verification=(Verification("fp32", 560, 4, 1e-5, 1.0), Verification("fp16", 640, 4, 0.01, 0.75)),
)


def test_round_trip_through_a_file(tmp_path):
    onnx.save(_identity_model(META.to_props()), str(tmp_path / "m.onnx"))
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta == META
    assert meta.category_id(1) == 11
    assert ModelMetadata(architecture="a", num_classes=3, input_size=8, mean=(0, 0, 0), std=(1, 1, 1)).category_id(2) == 2


def test_props_are_plain_json_under_the_ens_prefix():
    props = META.to_props()
    assert props["ens.architecture"] == '"wide_resnet50_2"'
    assert props["ens.num_classes"] == "3"
    assert props["ens.class_ids"] == "[10, 11, 12]"
    assert props["ens.format"] == "1"


WITH_CAM = dataclasses.replace(META, cam=CAM_OUTPUT, cam_feature="layer4.2.relu")


def test_cam_round_trip_in_one_key(tmp_path):
    props = WITH_CAM.to_props()
    assert json.loads(props["ens.cam"]) == {"output": "cam", "feature": "layer4.2.relu"}
    assert "ens.cam_feature" not in props
    assert json.loads(META.to_props()["ens.cam"]) is None
    for meta in (WITH_CAM, META):
        onnx.save(_identity_model(meta.to_props()), str(tmp_path / "m.onnx"))
        assert read_metadata(tmp_path / "m.onnx") == meta
    assert read_metadata(tmp_path / "m.onnx").cam is None


def test_a_file_from_before_the_cam_reads_as_no_cam(tmp_path):
    props = {k: v for k, v in WITH_CAM.to_props().items() if k != "ens.cam"}
    onnx.save(_identity_model(props), str(tmp_path / "old.onnx"))
    meta = read_metadata(tmp_path / "old.onnx")
    assert meta.cam is None and meta.cam_feature is None
    assert meta == META


def test_a_stray_cam_feature_key_is_not_read(tmp_path):
    # The feature travels inside ens.cam only; a key of its own is an unknown key, ignored.
    props = META.to_props() | {"ens.cam_feature": '"layer4"'}
    onnx.save(_identity_model(props), str(tmp_path / "m.onnx"))
    assert read_metadata(tmp_path / "m.onnx").cam_feature is None


def test_foreign_onnx_has_no_metadata(tmp_path):
    onnx.save(_identity_model({"producer": "someone"}), str(tmp_path / "other.onnx"))
    with pytest.raises(EnsError, match="other.onnx: no ens metadata"):
        read_metadata(tmp_path / "other.onnx")


def test_newer_format_asks_for_an_upgrade(tmp_path):
    props = META.to_props() | {"ens.format": "99"}
    onnx.save(_identity_model(props), str(tmp_path / "new.onnx"))
    with pytest.raises(EnsError, match="format 99 is newer than this ens understands"):
        read_metadata(tmp_path / "new.onnx")


def test_missing_required_field(tmp_path):
    props = {k: v for k, v in META.to_props().items() if k != "ens.num_classes"}
    onnx.save(_identity_model(props), str(tmp_path / "partial.onnx"))
    with pytest.raises(EnsError, match="partial.onnx: ens metadata lacks num_classes"):
        read_metadata(tmp_path / "partial.onnx")


@pytest.mark.parametrize("given, message", [
    ({"mean": (123.7, 116.3, 103.5)}, "--mean 123.7,116.3,103.5: values are fractions of 255 in [0, 1] "
                                      "(e.g. 0.485,0.456,0.406)"),
    ({"mean": (0.5, 0.5)}, "--mean: expected three values R,G,B, got 2"),
    ({"std": (58.4, 57.1, 57.4)}, "--std 58.4,57.1,57.4: values are fractions of 255 in [0, 1] "
                                  "(e.g. 0.229,0.224,0.225)"),
    ({"std": (0.2, 0.0, 0.2)}, "--std 0.2,0,0.2: every value must be positive"),
    ({"resize": "stretch"}, "--resize stretch: choose one of center-crop, squash"),
    ({"crop_pct": 0.0}, "--crop-pct 0: expected a fraction in (0, 1]"),
    ({"crop_pct": 1.5}, "--crop-pct 1.5: expected a fraction in (0, 1]"),
    ({"crop_pct": float("nan")}, "--crop-pct nan: expected a fraction in (0, 1]"),
    ({"interpolation": "area"}, "--interpolation area: choose one of bilinear, bicubic, nearest, lanczos"),
    ({"interpolation": "BICUBIC"}, "--interpolation BICUBIC: choose one of bilinear, bicubic, nearest, lanczos"),
])
def test_check_preprocess_names_the_option_at_fault(given, message):
    with pytest.raises(EnsError) as info:
        check_preprocess(**given)
    assert str(info.value) == message


@pytest.mark.parametrize("given", [
    {},  # nothing given, nothing to check
    {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},  # the bounds of fractions of 255
    {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize": "squash", "crop_pct": 1.0,
     "interpolation": "bicubic"},
    {"resize": "center-crop", "crop_pct": 1e-3, "interpolation": "bilinear"},
    {"interpolation": "nearest"}, {"interpolation": "lanczos"},  # inference decodes them too
])
def test_check_preprocess_accepts_the_valid_range(given):
    check_preprocess(**given)


CAM = 'expected null or {"output": "cam", "feature": NAME}'
CHECKS = "expected a list of checks, each with precision, size, batch, max_abs_diff, top1_agreement"
#: Hand-edited or foreign values of one ``ens.*`` key of META (3 classes), and what they break.
BAD_PROPS = [
    ("format", '"1"', "expected a positive integer"),
    ("format", "0", "expected a positive integer"),
    ("architecture", "5", "expected a string"),
    ("num_classes", "0", "expected a positive integer"),
    ("num_classes", "-3", "expected a positive integer"),
    ("num_classes", '"3"', "expected a positive integer"),
    ("num_classes", "2.5", "expected a positive integer"),
    ("num_classes", "true", "expected a positive integer"),
    ("input_size", "0", "expected an integer from 16 to 4096 (pixels)"),
    ("input_size", "-224", "expected an integer from 16 to 4096 (pixels)"),
    ("input_size", "1000000", "expected an integer from 16 to 4096 (pixels)"),
    ("dynamic_size", '"yes"', "expected true or false"),
    ("mean", "[0.5, 0.5]", "expected three numbers R,G,B"),
    ("mean", '"0.5,0.5,0.5"', "expected three numbers R,G,B"),
    ("mean", '[0.5, "a", 0.5]', "expected three numbers R,G,B"),
    ("mean", "[123.7, 116.3, 103.5]", "values are fractions of 255 in [0, 1] (e.g. 0.485,0.456,0.406)"),
    ("std", "[0.2, 0, 0.2]", "every value must be positive"),
    ("std", "null", "expected three numbers R,G,B"),
    ("resize", '"stretch"', "choose one of center-crop, squash"),
    ("resize", "1", "choose one of center-crop, squash"),
    ("crop_pct", "0", "expected a fraction in (0, 1]"),
    ("crop_pct", "-0.5", "expected a fraction in (0, 1]"),
    ("crop_pct", '"0.875"', "expected a fraction in (0, 1]"),
    ("interpolation", '"area"', "choose one of bilinear, bicubic, nearest, lanczos"),
    ("precision", '"int8"', "choose one of fp32, fp16"),
    ("class_ids", "[10, 11]", "lists 2 category ids but ens.num_classes is 3"),
    ("class_ids", "[10, 11, 12, 13]", "lists 4 category ids but ens.num_classes is 3"),
    ("class_ids", "[10, 11, 10]", "category id 10 appears twice"),
    ("class_ids", "[10, 11, true]", "category ids must be integers or strings"),
    ("class_ids", '"10,11,12"', "expected a list of category ids or null"),
    ("arch_kwargs", "[]", "expected a JSON object"),
    ("checkpoint_sha256", "null", "expected a string"),
    ("opset", '"17"', "expected a non-negative integer"),
    ("verification", '"none"', CHECKS),
    ("verification", '[{"precision": "fp32"}]', CHECKS),
    ("verification", '[{"precision": "fp32", "size": 0, "batch": 4, "max_abs_diff": 0.0, '
                      '"top1_agreement": 1.0}]', CHECKS),
    ("cam", '"cam"', CAM),
    ("cam", "true", CAM),
    ("cam", '{"output": "cam"}', CAM),
    ("cam", '{"output": "heatmap", "feature": "layer4"}', CAM),
    ("cam", '{"output": "cam", "feature": ""}', CAM),
    ("cam", '{"output": "cam", "feature": 4}', CAM),
    ("cam", '{"output": "cam", "feature": "layer4", "size": 7}', CAM),
]


@pytest.mark.parametrize("field, value, problem", BAD_PROPS, ids=[f"{f}={v}" for f, v, _ in BAD_PROPS])
def test_bad_metadata_values_name_the_file_and_the_key(tmp_path, field, value, problem):
    onnx.save(_identity_model(META.to_props() | {f"ens.{field}": value}), str(tmp_path / "m.onnx"))
    with pytest.raises(EnsError) as info:
        read_metadata(tmp_path / "m.onnx")
    shown = value if len(value) <= 60 else value[:57] + "..."  # a long value is cut to keep one short line
    assert str(info.value) == f"{tmp_path / 'm.onnx'}: ens.{field} {shown}: {problem}"


def test_every_interpolation_metadata_may_name_is_one_inference_decodes():
    from ensemble.inference import decode, tta
    from ensemble.formats.model import INTERPOLATIONS

    assert set(decode.RESAMPLE) == set(decode._SUPPORT) == set(INTERPOLATIONS)
    for name in INTERPOLATIONS:  # tta takes every one (it checks with metadata.check_preprocess)
        assert tta.geometry(tta.Preprocess(32, interpolation=name), tta.View()).interpolation == name
