"""`ens export --fp16` fails, naming the layer, when an activation comes near float16's limit.

On the CPU the fp16 graph's logits cannot show an overflow (onnxruntime computes its
convolutions in float32), so the check reads the float32 graph's activations instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ensemble.errors import EnsError
from exporters import ExportOptions, export_checkpoint
from exporters.onnx_export import FP16_HEADROOM


def _net(conv_scale: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.copy_(net[0].weight.abs() * conv_scale)  # every output the same sign: large
        net[0].bias.zero_()
        net[4].weight.mul_(1 / conv_scale)  # logits of ordinary size: only the activation is large
    return net.eval()


def _export(net: nn.Module, folder):
    scripted = torch.jit.trace(net, torch.randn(2, 3, 32, 32))
    scripted.save(str(folder / "net.pt"))
    return export_checkpoint(folder / "net.pt", folder / "net.fp16.onnx", ExportOptions(input_size=32, fp16=True))


def test_an_activation_near_the_float16_limit_fails_naming_the_layer(tmp_path):
    # About 27 inputs of |x| up to 2.6 times weights near 0.2 x 20000: some 1e5, past 65504 / 4.
    with pytest.raises(EnsError, match=r"--fp16: layer \S*Conv\S* \(Conv\) reaches [0-9.e+]+ on the check images, "
                                       rf"within {FP16_HEADROOM:g}x of float16's largest value \(65504\); .*"
                                       "export without --fp16"):
        _export(_net(20000.0), tmp_path)
    assert not (tmp_path / "net.fp16.onnx").exists()


def test_ordinary_activations_pass_and_the_margin_is_noted(tmp_path):
    result = _export(_net(1.0), tmp_path)
    [note] = [n for n in result.notes if n.startswith("fp16: largest activation")]
    assert "below float16's limit" in note
    assert result.metadata.precision == "fp16"
