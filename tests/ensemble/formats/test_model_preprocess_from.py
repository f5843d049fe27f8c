"""ens.preprocess_from: where each preprocessing value of a timm export came from (issue 25
review, item 9). Optional: files written before it, and non-timm exports, read as None."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ensemble.errors import EnsError
from ensemble.formats.model import ModelMetadata

META = ModelMetadata(architecture="timm/resnet18", num_classes=2, input_size=224, mean=(0.5, 0.5, 0.5),
                     std=(0.2, 0.2, 0.2))
SOURCES = {"input_size": "the checkpoint's args", "mean": "timm's config of resnet18.a1_in1k",
           "std": "timm's config of resnet18.a1_in1k", "interpolation": "--interpolation",
           "resize": "timm's config of resnet18.a1_in1k", "crop_pct": "timm's defaults"}


def test_the_sources_round_trip():
    meta = dataclasses.replace(META, preprocess_from=SOURCES)
    props = meta.to_props()
    assert json.loads(props["ens.preprocess_from"]) == SOURCES
    assert ModelMetadata.from_props(props).preprocess_from == SOURCES


def test_a_file_written_before_it_reads_as_not_recorded():
    props = {k: v for k, v in META.to_props().items() if k != "ens.preprocess_from"}
    assert ModelMetadata.from_props(props).preprocess_from is None
    assert META.to_props()["ens.preprocess_from"] == "null"


@pytest.mark.parametrize("value", ['"args"', '{"mean": 3}', "[1]"])
def test_a_wrong_value_is_one_line(value):
    with pytest.raises(EnsError, match=f"^f.onnx: ens.preprocess_from {value.replace('[', '.')}: expected null or a "
                                       "JSON object of strings$"):
        ModelMetadata.from_props(META.to_props() | {"ens.preprocess_from": value}, source="f.onnx")
