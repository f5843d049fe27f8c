"""The ``cam`` output: found for global-average-pooling + linear heads, equal to a CAM computed in
torch from the network's own feature map and classifier weights, left out by ``--no-cam`` and for
heads that have no such map."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ensemble.errors import EnsError
from ensemble.formats.model import read_metadata
from exporters import ExportOptions, export_checkpoint
from exporters import cam as cam_module
from exporters.cam import class_activation_map, find_cam_head
from exporters.onnx_export import CHECK_BATCH, second_size

from tests.conftest import copy_checkpoint
from tests.exporters.helpers import NUM_CLASSES, build, random_images, run_outputs as run, torch_cam

#: (architecture, test input size, the feature map the CAM must be computed from, the classifier).
#: Each reads the tensor in its own way, as the network's code does: a module's output through a
#: hook (and DenseNet's functional ReLU after it), never through the exporter's fx search.
ARCHS = [
    ("resnet18", 64, lambda m: m.layer4, None, lambda m: m.fc),
    ("densenet121", 64, lambda m: m.features, F.relu, lambda m: m.classifier),
    ("shufflenet_v2_x0_5", 64, lambda m: m.conv5, None, lambda m: m.fc),
    ("mobilenet_v2", 64, lambda m: m.features, None, lambda m: m.classifier[1]),
    ("regnet_y_400mf", 64, lambda m: m.trunk_output, None, lambda m: m.fc),
    ("googlenet", 64, lambda m: m.inception5b, None, lambda m: m.fc),
]
#: This test's own bound for the graph's CAM against torch, of the largest |CAM value|.
CAM_RTOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS, ids=[a[0] for a in ARCHS])
def exported(request, tmp_path_factory):
    arch, size, *_ = request.param
    if (arch, size) == ("resnet18", 64):  # the session's, exported with the same options
        return request.param, request.getfixturevalue("resnet18_64")[0], request.getfixturevalue("resnet18_64_export")
    model = build(arch, size)
    ckpt = tmp_path_factory.mktemp(arch) / f"{arch}.pth"
    torch.save(model.state_dict(), ckpt)
    return request.param, model, export_checkpoint(ckpt, options=ExportOptions(arch=arch, input_size=size))


@pytest.mark.slow
def test_the_graphs_cam_is_the_top1_class_map_of_the_pooled_feature(exported):
    (arch, size, feature_of, after, head_of), model, result = exported
    meta = read_metadata(result.path)
    assert meta.cam == "cam" and meta.cam_feature
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits", "cam"]
    # At the export size and at a size the exporter never verified.
    for s in (size, size + 40):
        images = random_images(3, s, seed=s)
        got = run(result.path, images)
        logits, want = torch_cam(model, images, feature_of, after, head_of)
        assert got["cam"].dtype == np.float32
        assert got["cam"].shape == want.shape and want.shape[0] == 3 and want.ndim == 3
        assert (got["logits"].argmax(1) == logits.argmax(1)).all()
        np.testing.assert_allclose(got["cam"], want, atol=CAM_RTOL * np.abs(want).max())


@pytest.mark.slow
def test_cam_averages_to_the_logit_less_its_bias(exported):
    # GAP + linear: logit[c] = mean over positions of W[c] . F + b[c], so the map of the top-1 class
    # averages to its logit minus the bias: the map is of the class the logits chose.
    (arch, size, _, _, head_of), model, result = exported
    got = run(result.path, random_images(4, size, seed=7))
    top1 = got["logits"].argmax(1)
    bias = head_of(model).bias.detach().numpy()
    np.testing.assert_allclose(got["cam"].mean((1, 2)), got["logits"][np.arange(4), top1] - bias[top1],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_note_names_the_feature_and_the_check(exported):
    (arch, size, *_), _, result = exported
    [note] = [n for n in result.notes if n.startswith("cam output:")]
    assert result.metadata.cam_feature in note
    assert f"verified against torch at {size} px and {second_size(size)} px: max |cam diff| " in note


@pytest.fixture(scope="module")
def resnet(resnet18_64, tmp_path_factory):
    """The session's resnet18 and a copy of its checkpoint, beside which these tests export."""
    model, path = resnet18_64
    return model, copy_checkpoint(path, tmp_path_factory.mktemp("r18"), "r18.pth")


@pytest.mark.slow
def test_no_cam_leaves_the_output_out(resnet):
    _, ckpt = resnet
    result = export_checkpoint(ckpt, ckpt.parent / "nocam.onnx",
                               ExportOptions(arch="resnet18", input_size=64, cam=False))
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits"]
    meta = read_metadata(result.path)
    assert meta.cam is None and meta.cam_feature is None
    assert not any("cam" in n for n in result.notes)


@pytest.mark.slow
def test_fp16_keeps_the_cam_float32(resnet):
    model, ckpt = resnet
    result = export_checkpoint(ckpt, options=ExportOptions(arch="resnet18", input_size=64, fp16=True))
    graph = onnx.load(str(result.path)).graph
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [
        ("logits", onnx.TensorProto.FLOAT), ("cam", onnx.TensorProto.FLOAT)]
    assert read_metadata(result.path).cam == "cam"
    images = random_images(4, 64, seed=5)
    got = run(result.path, images)
    logits, want = torch_cam(model, images, lambda m: m.layer4, None, lambda m: m.fc)
    assert got["cam"].dtype == np.float32
    top1 = got["logits"].argmax(1) == logits.argmax(1)
    assert top1.all()
    assert np.abs(got["cam"] - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.slow
def test_a_wrong_in_graph_cam_fails_the_verification(resnet, monkeypatch):
    # The exporter's reference is computed apart from the graph's CAM: a graph that maps the
    # wrong class (the least likely one) is caught, and nothing is written.
    _, ckpt = resnet
    real = cam_module.class_activation_map
    monkeypatch.setattr(cam_module, "class_activation_map", lambda logits, feature, weight:
                        real(-logits, feature, weight))
    out = ckpt.parent / "wrong.onnx"
    with pytest.raises(EnsError, match=r"^fp32 verification failed: onnxruntime's cam differs from torch's at 64 px: "
                                       r"max \|cam difference\| .*; export with --no-cam$"):
        export_checkpoint(ckpt, out, ExportOptions(arch="resnet18", input_size=64))
    assert not out.exists()


class _MlpHead(nn.Module):
    """GAP, then two linear layers: the logits are no linear function of the feature map."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(8, 16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(self.pool(self.body(x)).flatten(1))))


def test_a_head_that_is_not_gap_and_one_linear_exports_without_cam(tmp_path):
    torch.save(_MlpHead().eval(), tmp_path / "mlp.pt")
    result = export_checkpoint(tmp_path / "mlp.pt", options=ExportOptions(input_size=32, trust_pickle=True))
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits"]
    assert read_metadata(result.path).cam is None
    assert "no cam output: its classifier fc is not one linear layer on a global average pooling" in result.notes


def test_a_torchscript_archive_exports_without_cam_and_says_so(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    torch.jit.trace(net, torch.randn(2, 3, 32, 32)).save(str(tmp_path / "net.pt"))
    result = export_checkpoint(tmp_path / "net.pt", options=ExportOptions(input_size=32))
    assert read_metadata(result.path).cam is None
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits"]
    assert [n for n in result.notes if "cam" in n] == [
        "no cam output: a TorchScript archive cannot be traced to find its feature map"]


THIRD_PARTY = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.nn import functional as F


    class Linear(nn.Linear):
        '''A classifier class of its own, as libraries define them (traced into: F.linear).'''


    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.block = nn.Conv2d(6, 12, 3, stride=2, padding=1)
            self.drop = nn.Dropout(0.2)
            self.head = Linear(12, num_classes)

        def forward(self, x):
            x = F.relu(self.block(F.relu(self.stem(x))))
            x = torch.mean(x, dim=(-2, -1), keepdim=True)
            x = x.view(x.size(0), -1)
            return self.head(self.drop(x))


    def build(num_classes=10):
        return Net(num_classes)
""")


def test_a_third_party_network_with_such_a_head_gets_a_cam(tmp_path, monkeypatch):
    (tmp_path / "camnet_pkg.py").write_text(THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import camnet_pkg

    torch.manual_seed(0)
    model = camnet_pkg.build(num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "net.pth")
    result = export_checkpoint(tmp_path / "net.pth", options=ExportOptions(arch="camnet_pkg:build", input_size=48))
    sys.modules.pop("camnet_pkg", None)
    meta = read_metadata(result.path)
    assert meta.cam == "cam" and meta.cam_feature == "relu_1"
    images = random_images(2, 48)
    got = run(result.path, images)
    _, want = torch_cam(model, images, lambda m: m.block, F.relu, lambda m: m.head)
    assert got["cam"].shape == (2, 12, 12)
    np.testing.assert_allclose(got["cam"], want, atol=CAM_RTOL * np.abs(want).max())


@pytest.mark.parametrize("pool, found", [
    (lambda x: F.adaptive_avg_pool2d(x, (1, 1)), True),
    (lambda x: x.mean([2, 3]), True),
    (lambda x: x.mean(3), False),  # one axis: a (batch, channels, h) tensor, no map
    (lambda x: F.adaptive_avg_pool2d(x, 2), False),  # 2x2 cells: the classifier sees positions
    (lambda x: F.adaptive_max_pool2d(x, 1), False),
    (lambda x: x.amax((2, 3)), False),
])
def test_only_global_average_pooling_qualifies(pool, found):
    inputs = torch.flatten(pool(torch.zeros(1, 4, 8, 8)), 1).shape[1]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(inputs, 3)

        def forward(self, x):
            return self.fc(torch.flatten(pool(self.conv(x)), 1))

    head = find_cam_head(Net().eval())
    assert isinstance(head, str) != found, head


def test_class_activation_map_golden():
    feature = torch.tensor([[[[1., 2.], [3., 4.]], [[0., 1.], [0., -1.]]],
                            [[[1., 1.], [1., 1.]], [[2., 0.], [0., 2.]]]])  # (2, 2 channels, 2, 2)
    weight = torch.tensor([[1., 10.], [-1., 0.5], [0., 1.]])  # (3 classes, 2 channels)
    logits = torch.tensor([[5., 1., 0.], [0., 0., 3.]])  # top-1: class 0, class 2
    cam = class_activation_map(logits, feature, weight)
    assert cam.tolist() == [[[1., 12.], [3., -6.]], [[2., 0.], [0., 2.]]]


@pytest.mark.slow
def test_plain_inference_asks_for_the_logits_alone(resnet18_64_export):
    from ensemble.inference.runtime import Runner, load_model

    path = resnet18_64_export.path  # resnet18 at 64 px with the cam output
    runner = Runner(load_model(path), "cpu")
    requested = []
    session_run = runner.session.run
    runner.session.run = lambda names, feeds: requested.append(names) or session_run(names, feeds)
    images = random_images(2, 64)
    logits = runner(images)
    assert requested == [["logits"]]
    np.testing.assert_array_equal(logits, run(path, images)["logits"])


class _OneMapOrAList(nn.Module):
    """A stem that takes one feature map or a list of them to concatenate, as DenseNet's layers do.
    torch.fx traces with a Proxy, which is not a tensor: its graph concatenates the one map it is
    given, which torch refuses when the traced copy runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        features = x if isinstance(x, torch.Tensor) else torch.cat(x, 1)
        return self.fc(self.pool(F.relu(self.conv(features))).flatten(1))


class _GroupedMaps(nn.Module):
    """Eight channels read as ``groups`` groups: the spatial mean of a ``(batch, groups, 8 // groups,
    h, w)`` tensor, flattened to eight features. Its pooled tensor has five axes: no
    ``(batch, 8, h, w)`` map, whether its second axis counts 8 (``groups=8``) or not."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x.view(x.size(0), self.groups, 8 // self.groups, x.size(2), x.size(3))
        return self.fc(x.mean((-2, -1)).flatten(1))


class _ScaledOnTensors(nn.Module):
    """A feature map doubled only when it is a tensor: torch.fx's Proxy is not, so the traced copy
    runs without the doubling and gives other logits than the network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if isinstance(x, torch.Tensor):
            x = x * 2
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.parametrize("net, why", [
    (_OneMapOrAList, "the traced network does not run (TypeError)"),
    # The check batch's images, the groups and their channels, 15 x 15 positions at 32 px.
    (lambda: _GroupedMaps(2), f"its pooled tensor view has shape ({CHECK_BATCH}, 2, 4, 15, 15), not (batch, 8, h, w)"),
    (lambda: _GroupedMaps(8), f"its pooled tensor view has shape ({CHECK_BATCH}, 8, 1, 15, 15), not (batch, 8, h, w)"),
    (_ScaledOnTensors, "the traced network's logits differ from the network's"),
], ids=["does-not-run", "wrong-channels", "five-axes", "logits-differ"])
def test_a_head_found_but_failing_its_check_exports_without_cam_and_says_why(tmp_path, net, why):
    # Each network has a GAP + linear head that find_cam_head accepts; running the traced copy
    # (check_cam_head) is what refuses it, and the export goes on without the cam output.
    torch.manual_seed(0)
    model = net().eval()
    assert not isinstance(find_cam_head(model), str)
    torch.save(model, tmp_path / "net.pt")
    result = export_checkpoint(tmp_path / "net.pt", options=ExportOptions(input_size=32, trust_pickle=True))
    assert [n for n in result.notes if "cam" in n] == [f"no cam output: {why}"]
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits"]
    meta = read_metadata(result.path)
    assert meta.cam is None and meta.cam_feature is None
    assert run(result.path, random_images(2, 32))["logits"].shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("feature, logits, why", [
    ((3, 8, 2, 2), (3, 5), None),
    ((3, 4, 2, 2), (3, 5), "its pooled tensor f has shape (3, 4, 2, 2), not (batch, 8, h, w)"),
    ((6, 8, 2, 2), (3, 5), "its pooled tensor f has shape (6, 8, 2, 2), not (batch, 8, h, w)"),
    ((3, 8, 2, 2), (3, 6), "the traced network's logits differ from the network's"),
])
def test_check_cam_head_wants_the_classifiers_channels_and_the_batch(feature, logits, why):
    # A head's flatten carries the pooled tensor's channels and batch into the classifier, so an
    # exported network cannot bring a four-axis map of other counts here: a stand-in head does.
    images, want = torch.zeros(3, 3, 8, 8), torch.ones(3, 5)
    head = cam_module.CamHead(model=lambda x: (torch.ones(logits), torch.zeros(feature)), weight=torch.zeros(5, 8),
                              feature="f", classifier="fc")
    assert cam_module.check_cam_head(head, images, want) == why
