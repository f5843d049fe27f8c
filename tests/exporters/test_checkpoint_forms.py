"""Every way users save a checkpoint exports to the same graph."""

from __future__ import annotations

import argparse
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from exporters import ExportOptions, export_checkpoint
from exporters.checkpoints import NESTED_KEYS, strip_prefixes

from tests.exporters.helpers import NUM_CLASSES, build, onnx_logits, random_images, reference_logits

pytestmark = pytest.mark.slow

SIZE = 64


@pytest.fixture(scope="module")
def mnasnet():
    return build("mnasnet1_0", SIZE)


def _export_and_compare(model, ckpt, **options):
    result = export_checkpoint(ckpt, options=ExportOptions(input_size=options.pop("input_size", SIZE), **options))
    images = random_images(2, result.metadata.input_size, seed=5)
    np.testing.assert_allclose(onnx_logits(result.path, images), reference_logits(model, images),
                               atol=1e-3, rtol=1e-4)
    assert result.metadata.num_classes == NUM_CLASSES
    return result


def _prefixed(state_dict, prefix):
    out = OrderedDict((prefix + k, v) for k, v in state_dict.items())
    out._metadata = OrderedDict((prefix + k if k else prefix[:-1], v)  # as torch.save writes it
                                for k, v in state_dict._metadata.items())
    return out


def test_bare_state_dict(mnasnet, tmp_path):
    torch.save(mnasnet.state_dict(), tmp_path / "m.pt")
    result = _export_and_compare(mnasnet, tmp_path / "m.pt", arch="mnasnet1_0")
    # Nothing to note about the checkpoint; the one note is the CAM's (MnasNet pools x.mean([2, 3])).
    assert [n.partition(":")[0] for n in result.notes] == ["cam output"]


@pytest.mark.parametrize("key", NESTED_KEYS)
def test_nested_training_checkpoint(mnasnet, tmp_path, key):
    # Training scripts store more than weights: an optimizer state, an argparse Namespace.
    ckpt = {"epoch": 12, key: mnasnet.state_dict(), "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(lr=0.1)}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    result = _export_and_compare(mnasnet, tmp_path / "ckpt.pth", arch="mnasnet1_0")
    assert f"checkpoint's {key!r} entry" in " ".join(result.notes)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes(mnasnet, tmp_path, prefix):
    torch.save({"state_dict": _prefixed(mnasnet.state_dict(), prefix)}, tmp_path / "p.pt")
    result = _export_and_compare(mnasnet, tmp_path / "p.pt", arch="mnasnet1_0")
    assert f"removed the key prefix {prefix!r}" in result.notes


def test_prefix_kept_when_the_network_has_it():
    weights = {"model.weight": torch.zeros(1), "model.bias": torch.zeros(1)}
    stripped, prefix = strip_prefixes(weights, target_keys={"model.weight", "model.bias"})
    assert prefix == "" and list(stripped) == ["model.weight", "model.bias"]
    stripped, prefix = strip_prefixes(weights, target_keys={"weight", "bias"})
    assert prefix == "model." and list(stripped) == ["weight", "bias"]


def test_whole_pickled_module(mnasnet, tmp_path):
    torch.save(mnasnet, tmp_path / "whole.pt")
    result = _export_and_compare(mnasnet, tmp_path / "whole.pt", trust_pickle=True)
    assert result.metadata.architecture == "torchvision.models.mnasnet:MNASNet"
    assert any("ran code" in note for note in result.notes)


def test_half_precision_files_export_in_float32(mnasnet, tmp_path):
    import copy

    half = copy.deepcopy(mnasnet).half()
    torch.save(half, tmp_path / "half_module.pt")
    torch.save(half.state_dict(), tmp_path / "half_weights.pt")
    reference = copy.deepcopy(half).float()
    for ckpt, arch in ((tmp_path / "half_module.pt", None), (tmp_path / "half_weights.pt", "mnasnet1_0")):
        result = export_checkpoint(ckpt, options=ExportOptions(arch=arch, input_size=SIZE, trust_pickle=arch is None))
        assert result.metadata.precision == "fp32"
        images = random_images(2, SIZE, seed=5)
        np.testing.assert_allclose(onnx_logits(result.path, images), reference_logits(reference, images),
                                   atol=1e-3, rtol=1e-4)


def test_module_inside_a_training_dict(mnasnet, tmp_path):
    torch.save({"epoch": 3, "model": mnasnet}, tmp_path / "whole.pt")
    result = _export_and_compare(mnasnet, tmp_path / "whole.pt", arch="mnasnet1_0", trust_pickle=True)
    assert result.metadata.architecture == "mnasnet1_0"  # --arch labels a whole model


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive(mnasnet, tmp_path, how):
    if how == "script":
        scripted = torch.jit.script(mnasnet)
    else:
        scripted = torch.jit.trace(mnasnet, torch.randn(2, 3, SIZE, SIZE))
    scripted.save(str(tmp_path / "ts.pt"))
    result = export_checkpoint(tmp_path / "ts.pt", options=ExportOptions(input_size=SIZE))
    images = random_images(2, SIZE, seed=5)
    np.testing.assert_allclose(onnx_logits(result.path, images), reference_logits(mnasnet, images),
                               atol=1e-3, rtol=1e-4)
    assert result.metadata.num_classes == NUM_CLASSES
    assert result.metadata.architecture == "MNASNet"


def test_safetensors(mnasnet, tmp_path):
    # safetensors keeps no per-module versions; MNASNet's loader needs them.
    save_file({k: v.contiguous() for k, v in mnasnet.state_dict().items()}, str(tmp_path / "w.safetensors"))
    _export_and_compare(mnasnet, tmp_path / "w.safetensors", arch="mnasnet1_0")


def test_num_classes_given_and_inferred_agree(mnasnet, tmp_path):
    torch.save(mnasnet.state_dict(), tmp_path / "m.pt")
    result = _export_and_compare(mnasnet, tmp_path / "m.pt", arch="mnasnet1_0", num_classes=NUM_CLASSES)
    assert result.metadata.num_classes == NUM_CLASSES


@pytest.fixture(scope="module")
def inception():
    return build("inception_v3", 80)  # with its auxiliary head, as training leaves it


def test_inception_aux_head_dropped_from_state_dict(inception, tmp_path):
    assert any(k.startswith("AuxLogits.") for k in inception.state_dict())
    torch.save({"model_state_dict": inception.state_dict()}, tmp_path / "inc.pth")
    result = _export_and_compare(inception, tmp_path / "inc.pth", arch="inception_v3", input_size=80)
    assert any("auxiliary-head tensors" in note for note in result.notes)
    assert any("transform_input=False" in note for note in result.notes)


def test_inception_default_size_is_299(inception, tmp_path):
    torch.save(inception.state_dict(), tmp_path / "inc.pth")
    result = export_checkpoint(tmp_path / "inc.pth", options=ExportOptions(arch="inception_v3"))
    assert result.metadata.input_size == 299
    assert [c.size for c in result.metadata.verification] == [299, 342]


def test_inception_transform_input(inception, tmp_path):
    torch.save(inception.state_dict(), tmp_path / "inc.pth")
    result = export_checkpoint(tmp_path / "inc.pth", options=ExportOptions(
        arch="inception_v3", input_size=80, arch_kwargs={"transform_input": True}))
    assert result.metadata.arch_kwargs == {"transform_input": True}
    inception.transform_input = True
    try:
        images = random_images(2, 80, seed=6)
        np.testing.assert_allclose(onnx_logits(result.path, images), reference_logits(inception, images),
                                   atol=1e-3, rtol=1e-4)
    finally:
        inception.transform_input = False


def test_inception_whole_module_with_aux_head(inception, tmp_path):
    torch.save(inception, tmp_path / "inc.pt")
    result = _export_and_compare(inception, tmp_path / "inc.pt", input_size=80, trust_pickle=True)
    assert "dropped the auxiliary head (it only serves training)" in result.notes


CUSTOM = textwrap.dedent('''
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, width=8, classes=10):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(self.body(x))

    def tiny(width=8):
        return Tiny(width)  # no num_classes argument: ens replaces the head

    def tiny_with_classes(num_classes=10, width=8):
        return Tiny(width, num_classes)

    class FixedSize(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 4, stride=4)
            self.fc = nn.Linear(2 * 8 * 8, num_classes)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(-1, 2 * 8 * 8))  # only 32 px inputs fit

    class FrozenByTrace(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            x = self.conv(x)
            # a Python int from the input's shape: tracing freezes it at the traced size
            x = torch.nn.functional.avg_pool2d(x, int(x.shape[-1]))
            return self.fc(x.flatten(1))
''')


@pytest.fixture
def custom_package(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("my_nets", None)
    return importlib.import_module("my_nets")


@pytest.mark.parametrize("factory", ["tiny", "tiny_with_classes"])
def test_architecture_from_another_package(custom_package, tmp_path, factory):
    torch.manual_seed(0)
    model = custom_package.Tiny(width=4, classes=5).eval()
    torch.save({"net": model.state_dict()}, tmp_path / "tiny.pt")
    result = export_checkpoint(tmp_path / "tiny.pt", options=ExportOptions(
        arch=f"my_nets:{factory}", arch_kwargs={"width": 4}, input_size=32))
    assert result.metadata.num_classes == 5
    assert result.metadata.architecture == f"my_nets:{factory}"
    assert result.metadata.dynamic_size
    images = random_images(3, 40)
    np.testing.assert_allclose(onnx_logits(result.path, images), reference_logits(model, images), atol=1e-4)


def test_fixed_size_architecture(custom_package, tmp_path):
    torch.save(custom_package.FixedSize().state_dict(), tmp_path / "fixed.pt")
    result = export_checkpoint(tmp_path / "fixed.pt", options=ExportOptions(
        arch="my_nets:FixedSize", input_size=32))
    assert not result.metadata.dynamic_size
    assert [c.size for c in result.metadata.verification] == [32]
    assert any("only takes 32 px" in note for note in result.notes)


def test_graph_frozen_by_the_trace_falls_back_to_fixed_size(custom_package, tmp_path):
    torch.save(custom_package.FrozenByTrace().state_dict(), tmp_path / "frozen.pt")
    result = export_checkpoint(tmp_path / "frozen.pt", options=ExportOptions(
        arch="my_nets:FrozenByTrace", input_size=32))
    assert not result.metadata.dynamic_size
    assert any("not size-dynamic" in note for note in result.notes)
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1:] == [32, 32, 3]
