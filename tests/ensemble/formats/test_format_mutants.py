"""Golden values that kill the mutants `make mutate` found surviving in the format checks
(ensemble/formats/common.py and model.py): defaults, exact messages, boundaries."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from ensemble.errors import EnsError
from ensemble.formats.common import describe, read_json
from ensemble.formats.model import ModelMetadata, Verification, check_preprocess, read_metadata

META = ModelMetadata(architecture="a", num_classes=2, input_size=16, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def _refusal(props: dict[str, str], **kwargs) -> str:
    with pytest.raises(EnsError) as info:
        ModelMetadata.from_props(props, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------
# common.py


def test_read_json_without_a_hint_ends_at_the_reason(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(EnsError) as info:
        read_json(tmp_path / "bad.json")
    assert str(info.value) == (f"{tmp_path / 'bad.json'}: not a JSON file "
                               "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")


def test_describe_keeps_the_first_line_by_default():
    assert describe(ValueError("first\nsecond")) == "ValueError: first"


# ------------------------------------------------------------------------------------------
# model.py


def test_props_keys_inside_a_value_are_sorted():
    props = META.to_props()
    assert props["ens.arch_kwargs"] == "{}"
    meta = ModelMetadata(**{**META.__dict__, "arch_kwargs": {"b": 1, "a": 2}})
    assert meta.to_props()["ens.arch_kwargs"] == '{"a": 2, "b": 1}'
    checked = ModelMetadata(**{**META.__dict__, "verification": (Verification("fp32", 16, 2, 0.5, 1.0),)})
    assert checked.to_props()["ens.verification"] == (
        '[{"batch": 2, "max_abs_diff": 0.5, "precision": "fp32", "size": 16, "top1_agreement": 1.0}]')
    assert set(props) == {"ens." + name for name in META.__dict__ if name != "cam_feature"}


def test_from_props_names_the_source_model_by_default():
    assert _refusal({}) == "model: no ens metadata (it was not written by `ens export`)"
    props = META.to_props() | {"ens.input_size": "{"}
    assert _refusal(props, source="f.onnx") == (
        "f.onnx: ens.input_size {: not JSON (Expecting property name enclosed in double quotes)")


def test_format_zero_is_not_a_format():
    assert _refusal(META.to_props() | {"ens.format": "0"}) == "model: ens.format 0: expected a positive integer"


def test_every_missing_field_is_listed():
    props = {k: v for k, v in META.to_props().items() if k not in ("ens.num_classes", "ens.mean")}
    assert _refusal(props) == "model: ens metadata lacks num_classes, mean"


def test_a_file_without_verification_reads_as_none():
    props = {k: v for k, v in META.to_props().items() if k != "ens.verification"}
    assert ModelMetadata.from_props(props).verification == ()


@pytest.mark.parametrize("check, accepted", [
    ({"precision": "fp32", "size": 1, "batch": 1, "max_abs_diff": 0, "top1_agreement": 1}, True),
    ({"precision": "fp32", "size": 0, "batch": 1, "max_abs_diff": 0, "top1_agreement": 1}, False),
    ({"precision": "fp32", "size": 1, "batch": 0, "max_abs_diff": 0, "top1_agreement": 1}, False),
    ({"precision": "fp32", "size": 1, "batch": True, "max_abs_diff": 0, "top1_agreement": 1}, False),
])
def test_a_verification_of_size_and_batch_one_is_valid(check, accepted):
    props = META.to_props() | {"ens.verification": json.dumps([check])}
    if accepted:
        assert ModelMetadata.from_props(props).verification == (Verification("fp32", 1, 1, 0, 1),)
    else:
        assert _refusal(props).startswith("model: ens.verification [{")


def test_a_long_value_is_shortened_to_sixty_characters():
    longer = "[" + ",".join(["1"] * 40) + "]"
    assert _refusal(META.to_props() | {"ens.mean": longer}) == (
        f"model: ens.mean {longer[:57]}...: expected three numbers R,G,B")
    sixty = "[" + ",".join(["0"] * 28) + ",10]"
    assert len(sixty) == 60
    assert _refusal(META.to_props() | {"ens.mean": sixty}) == f"model: ens.mean {sixty}: expected three numbers R,G,B"


def test_a_mean_above_one_is_refused():
    with pytest.raises(EnsError, match=r"^--mean 0.5,1.5,0.5: values are fractions of 255 in \[0, 1\]"):
        check_preprocess(mean=(0.5, 1.5, 0.5))
    check_preprocess(mean=(0.0, 1.0, 0.5))


def test_read_metadata_names_a_missing_file_and_a_folder(tmp_path):
    with pytest.raises(EnsError) as info:
        read_metadata(tmp_path / "no.onnx")
    assert str(info.value) == f"{tmp_path / 'no.onnx'}: no such file"
    with pytest.raises(EnsError) as info:
        read_metadata(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a regular file"


def test_read_metadata_names_foreign_bytes(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\xff" * 10)
    with pytest.raises(EnsError) as info:
        read_metadata(tmp_path / "x.onnx")
    assert str(info.value) == f"{tmp_path / 'x.onnx'}: not an ONNX model (DecodeError)"
    assert info.value.__cause__ is None


def test_read_metadata_does_not_load_external_weights(tmp_path):
    """A graph whose weights live in a side file reads without it: only the metadata is wanted."""
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [4], b"\0" * 16, raw=True)])
    model = helper.make_model(graph)
    for key, value in META.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    (tmp_path / "m.data").unlink()
    assert read_metadata(tmp_path / "m.onnx") == META
