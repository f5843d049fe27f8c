"""The ``cam`` output of timm networks (issue 25): found for heads that are an average
``SelectAdaptivePool2d`` + one ``Linear`` (the map from ``forward_features``, only
``forward_head`` traced), equal to the CAM computed by hand from the network's own feature map
and classifier, and refused, with the reason, for the heads that are not (ConvNeXt's norm after
the pooling, a ViT's tokens, MobileNetV3's hidden layers, max pooling)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from ensemble.cli import app
from exporters.cam import WithCam, check_cam_head, find_cam_head

from tests.exporters.helpers import random_images, run_outputs

NUM_CLASSES = 6

#: (timm model, its kwargs, input size, the module whose output is the map the head pools, that
#: map's layout). Each map is read with a forward hook, as the network computes it, never through
#: the exporter's split.
FOUND = [
    ("resnet18", {}, 64, lambda m: m.layer4, "NCHW"),
    ("efficientnet_b0", {}, 64, lambda m: m.bn2, "NCHW"),  # BatchNormAct2d: conv_head's norm + SiLU
    # TF "same" padding computes its pads from the input's size: torch.fx cannot trace the body,
    # only the head is traced.
    ("tf_efficientnetv2_b0", {}, 64, lambda m: m.bn2, "NCHW"),
    # Swin's forward_features ends in a LayerNorm over channels of an NHWC map; its head pools
    # that NHWC map (SelectAdaptivePool2d with input_fmt NHWC). Narrow and shallow to be quick.
    ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=112,
                                          window_size=7), 112, lambda m: m.norm, "NHWC"),
]


def _model(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()


def _by_hand(model, x, feature_of, layout):
    """``(logits, cam)``: ``cam[b] = W[argmax_b] · F[b]`` from the hooked map and the classifier."""
    seen = []
    hook = feature_of(model).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        hook.remove()
    feature = seen[-1].double()
    if layout == "NHWC":
        feature = feature.permute(0, 3, 1, 2)
    weight = model.get_classifier().weight.detach().double()
    cam = torch.stack([torch.tensordot(weight[c], feature[i], dims=([0], [0]))
                       for i, c in enumerate(logits.argmax(1).tolist())])
    return logits, cam


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size, feature_of, layout", FOUND, ids=[f[0] for f in FOUND])
def test_a_pooling_and_linear_head_gives_the_cam_by_hand(name, kwargs, size, feature_of, layout):
    model = _model(name, kwargs)
    head = find_cam_head(model)
    assert not isinstance(head, str), head
    assert head.feature == "forward_features"
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    want_logits, want = _by_hand(model, x, feature_of, layout)
    assert check_cam_head(head, x, want_logits) is None
    with torch.no_grad():
        logits, cam = WithCam(head)(x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert cam.shape == want.shape and cam.ndim == 3
    np.testing.assert_allclose(cam.numpy(), want.numpy(), atol=1e-4 * float(want.abs().max()))
    # GAP + linear: the map of the top-1 class averages to its logit less the bias.
    top1 = logits.argmax(1)
    bias = model.get_classifier().bias.detach()[top1]
    np.testing.assert_allclose(cam.mean((1, 2)).numpy(), (logits[torch.arange(3), top1] - bias).numpy(),
                               rtol=1e-4, atol=1e-4)


NORM_REASON = ("its head normalises the pooled features (LayerNorm2d head.norm) before its linear layer head.fc: "
               "the norm divides by statistics of the whole image, so W[c] · F[:, y, x] is not a position's share "
               "of the logit")
TOKENS_REASON = ("its head classifies transformer tokens (a class token or a token average), not a pooled spatial "
                 "feature map: attention mixes every patch into them")


@pytest.mark.parametrize("name, kwargs, why", [
    ("convnext_atto", {}, NORM_REASON),
    ("vit_tiny_patch16_224", {}, TOKENS_REASON),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, TOKENS_REASON),  # a token average, then fc_norm
    ("mobilenetv3_small_050", {}, "its head has layers between the pooling and its linear layer classifier "
                                  "(conv_head, act2): not one linear layer"),
    ("resnet18", {"global_pool": "max"}, "its global pooling global_pool is 'max' (timm's SelectAdaptivePool2d), "
                                         "not an average: its logits are no mean over positions"),
    ("resnet18", {"global_pool": "avgmax"}, "its global pooling global_pool is 'avgmax' (timm's "
                                            "SelectAdaptivePool2d), not an average: its logits are no mean over "
                                            "positions"),
    ("deit_tiny_distilled_patch16_224", {}, "its forward_head does not end in one linear layer (it ends in truediv)"),
], ids=["convnext-norm", "vit-token", "vit-avg", "mobilenetv3-mlp", "max-pool", "avgmax-pool", "deit-two-heads"])
def test_other_heads_are_refused_with_their_reason(name, kwargs, why):
    assert find_cam_head(_model(name, kwargs)) == why


@pytest.mark.slow
@pytest.mark.parametrize("name, cam", [("resnet18", True), ("convnext_atto", False)])
def test_ens_export_of_a_timm_checkpoint_writes_the_cam_or_says_why_not(tmp_path, name, cam):
    # Through the command line, with timm's preprocessing: the graph's CAM equals the one by hand
    # (resnet18 at --input-size 64, to be quick: a 2x2 map); ConvNeXt's export says why it has none.
    model = _model(name, {})
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    out = tmp_path / f"{name}.onnx"
    result = CliRunner().invoke(app, ["export", str(tmp_path / f"{name}.pth"), "--arch", f"timm/{name}",
                                        "--input-size", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(CliRunner().invoke(app, ["info", "--json", str(out)]).stdout)
    if not cam:
        assert info["cam"] is None and info["cam_feature"] is None
        assert f"  note: no cam output: {NORM_REASON}" in result.stdout.splitlines()
        return
    assert info["cam"] == "cam" and info["cam_feature"] == "forward_features"
    assert any(line.startswith("  note: cam output: the top-1 class's activation map on forward_features (2x2 at 64 px)")
               for line in result.stdout.splitlines()), result.stdout
    images = random_images(2, 64, seed=3)
    got = run_outputs(out, images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    mean, std = (torch.tensor(info[k], dtype=torch.float64).view(1, 3, 1, 1) for k in ("mean", "std"))
    logits, want = _by_hand(model, ((x - mean) / std).float(), lambda m: m.layer4, "NCHW")
    assert (got["logits"].argmax(1) == logits.numpy().argmax(1)).all()
    np.testing.assert_allclose(got["cam"], want.numpy(), atol=1e-4 * float(want.abs().max()))
