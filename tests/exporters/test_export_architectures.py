"""Every architecture the competition's users bring: parity at two sizes, fp16, metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ensemble.formats.model import read_metadata
from exporters import ExportOptions, export_checkpoint
from exporters.onnx_export import second_size

from tests.exporters.helpers import (NUM_CLASSES, build, onnx_logits, reference_logits, random_images,
                                     run_outputs, torch_cam)

pytestmark = pytest.mark.slow

# (architecture, small test input size): random weights and small inputs keep it fast.
ARCHS = [
    ("mnasnet1_0", 64),
    ("inception_v3", 80),  # Inception v3 needs at least 75 px
    ("wide_resnet50_2", 64),
    ("resnet50", 64),
    ("efficientnet_b0", 64),
    ("mobilenet_v3_large", 64),
    ("convnext_tiny", 64),
]
#: This test's own bounds for the written graphs against torch on fresh images (not the
#: exporter's: a test that reused its constants would pass whatever they were set to).
FP32_ATOL, FP32_RTOL = 1e-3, 1e-4
FP16_MAX_DIFF_FRACTION = 0.05  #: of the largest |logit| (at least 1)
#: Where each architecture's CAM comes from, read through a hook on the network's own module:
#: (feature-map module, classifier). MobileNetV3 and ConvNeXt have none (an MLP head; a
#: LayerNorm between the pooling and the linear layer).
CAM_SOURCES = {
    "mnasnet1_0": (lambda m: m.layers, lambda m: m.classifier[1]),
    "inception_v3": (lambda m: m.Mixed_7c, lambda m: m.fc),
    "wide_resnet50_2": (lambda m: m.layer4, lambda m: m.fc),
    "resnet50": (lambda m: m.layer4, lambda m: m.fc),
    "efficientnet_b0": (lambda m: m.features, lambda m: m.classifier[1]),
}


@pytest.fixture(scope="module", params=ARCHS, ids=[a for a, _ in ARCHS])
def exported(request, tmp_path_factory):
    arch, size = request.param
    model = build(arch, size)
    folder = tmp_path_factory.mktemp(arch)
    ckpt = folder / f"{arch}.pth"
    torch.save(model.state_dict(), ckpt)
    result = export_checkpoint(ckpt, options=ExportOptions(arch=arch, input_size=size))
    return arch, size, model, ckpt, result


def test_parity_at_two_sizes(exported):
    arch, size, model, ckpt, result = exported
    assert result.path == ckpt.with_suffix(".onnx") and result.path.is_file()
    checks = result.metadata.verification
    assert [(c.precision, c.size) for c in checks] == [("fp32", size), ("fp32", second_size(size))]
    # Not the exporter's check batch, not its bound: the written graph equals the model fed with
    # images normalised outside the graph, at the default size and at a size never verified.
    for s in (size, size + 24):
        images = random_images(3, s)
        got = onnx_logits(result.path, images)
        want = reference_logits(model, images)
        assert got.shape == (3, NUM_CLASSES) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_metadata_round_trip(exported):
    arch, size, _, ckpt, result = exported
    meta = read_metadata(result.path)
    assert meta == result.metadata
    assert (meta.architecture, meta.num_classes, meta.input_size) == (arch, NUM_CLASSES, size)
    assert meta.dynamic_size and meta.precision == "fp32"
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert (meta.resize, meta.crop_pct, meta.interpolation) == ("center-crop", 0.875, "bilinear")
    assert meta.checkpoint == ckpt.name
    import hashlib

    assert meta.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta.opset == 17 and meta.torch_version == torch.__version__
    assert meta.exporter.startswith("ens ")


def test_fp16(exported):
    arch, size, model, ckpt, _ = exported
    result = export_checkpoint(ckpt, options=ExportOptions(arch=arch, input_size=size, fp16=True))
    assert result.path == ckpt.with_suffix(".fp16.onnx")
    meta = read_metadata(result.path)
    assert meta.precision == "fp16"
    fp16_checks = [c for c in meta.verification if c.precision == "fp16"]
    assert [c.size for c in fp16_checks] == [size, second_size(size)]

    import onnx

    graph = onnx.load(str(result.path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    images = random_images(4, size, seed=3)
    got = onnx_logits(result.path, images)
    want = reference_logits(model, images)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < FP16_MAX_DIFF_FRACTION * max(1.0, np.abs(want).max())


def test_cam_output(exported):
    arch, size, model, _, result = exported
    outputs = [o.name for o in onnx.load(str(result.path)).graph.output]
    if arch not in CAM_SOURCES:
        assert outputs == ["logits"] and result.metadata.cam is None
        assert any(n.startswith("no cam output: ") for n in result.notes)
        return
    assert outputs == ["logits", "cam"] and read_metadata(result.path).cam == "cam"
    feature_of, head_of = CAM_SOURCES[arch]
    for s in (size, size + 24):
        images = random_images(2, s, seed=s)
        _, want = torch_cam(model, images, feature_of, None, head_of)
        got = run_outputs(result.path, images)["cam"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
