"""The metadata contract of exported ONNX files, read without torch."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from ensemble.errors import EnsError
from ensemble.metadata import ModelMetadata, Verification, read_metadata


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
