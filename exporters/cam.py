"""The class activation map (CAM) output: finding a network's pooled feature map and classifier.

A network whose head is global average pooling followed by one linear layer (with only
flatten, dropout or identity between) computes ``logits = W · mean_yx F[:, :, y, x] + b``, so
the classifier's row of a class dotted with the feature map at each position,
``cam[y, x] = W[c] · F[:, y, x]``, says where the evidence for class ``c`` lies (Zhou et al.
2016, "Learning Deep Features for Discriminative Localization"); its mean over positions plus
``b[c]`` is the logit of ``c``.

:func:`find_cam_head` finds that head with ``torch.fx`` symbolic tracing, whatever the network
calls its layers: a pooling module or function, or a spatial ``mean`` (MnasNet, ShuffleNet),
after a functional ReLU (DenseNet) or not. :class:`WithCam` then returns ``(logits, cam)``, the
CAM of each image's top-1 class, so the exported graph hands inference one small map per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from ensemble.formats.common import describe

#: Modules that pass a pooled vector on unchanged in eval mode.
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)


@dataclass(frozen=True)
class CamHead:
    """Where a network's global-average-pooling + linear head is.

    ``model`` returns ``(logits (batch, classes), feature (batch, channels, h, w))``: the
    network retraced with the feature map it pools as a second output; ``weight`` is the
    classifier's ``(classes, channels)`` weight (the parameter itself, shared with ``model``).
    """

    model: fx.GraphModule
    weight: torch.Tensor
    feature: str  #: the module path (``layer4.2.relu``) or fx node name (``relu``) of the feature map
    classifier: str  #: the module path of the linear layer (``fc``, ``classifier.1``)


class WithCam(nn.Module):
    """``x (batch, 3, H, W) -> (logits (batch, classes), cam (batch, h, w))``.

    ``cam[b, y, x] = sum_c W[argmax_b, c] * F[b, c, y, x]``: no bias, no ReLU, no
    normalisation, no upsampling (``h, w``: the feature map's size).
    """

    def __init__(self, head: CamHead):
        super().__init__()
        self.model = head.model
        self.head_weight = head.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = self.model(x)
        return logits, class_activation_map(logits, feature, self.head_weight)


def class_activation_map(logits: torch.Tensor, feature: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The CAM of each image's top-1 class: ``(batch, classes), (batch, channels, h, w),
    (classes, channels) -> (batch, h, w)``."""
    rows = weight[logits.argmax(1)].unsqueeze(1)  # (batch, 1, channels)
    # A matrix product, not a broadcast multiply: no (batch, channels, h, w) temporary.
    cam = torch.matmul(rows, feature.flatten(2))  # (batch, 1, h * w)
    return cam.reshape(feature.shape[0], feature.shape[2], feature.shape[3])


def find_cam_head(model: nn.Module) -> CamHead | str:
    """The network's GAP + linear head, or why it has none (a short reason for a note).

    ``model`` must be in eval mode. Nothing is run here; :func:`check_cam_head` runs it.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript archive cannot be traced to find its feature map"
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, untraceable calls, ...
        return f"torch.fx cannot trace it ({describe(exc, 120)})"
    graph = traced.graph
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        return "it does not return a single logits tensor"
    linear = _linear_weight(traced, result)
    if linear is None:
        return "its output is not a linear layer's"
    weight, classifier = linear
    node = result.args[0]
    while isinstance(node, fx.Node) and _passes_through(traced, node):
        node = node.args[0]
    feature = _pooled(traced, node)
    if feature is None:
        return f"its classifier {classifier} is not one linear layer on a global average pooling"
    output.args = ((result, feature),)
    graph.lint()
    split = fx.GraphModule(traced, graph)
    name = str(feature.target) if feature.op == "call_module" else feature.name
    return CamHead(model=split.eval(), weight=weight, feature=name, classifier=classifier)


def _linear_weight(module: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, str] | None:
    """``(weight, module path)`` when ``node`` is a linear layer applied to one tensor."""
    if node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Linear) and len(node.args) == 1:
        return module.get_submodule(node.target).weight, str(node.target)
    if node.op == "call_function" and node.target is F.linear:
        # A Linear subclass outside torch.nn is traced into: F.linear(x, self.weight, self.bias).
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return module.get_parameter(weight.target), str(weight.target).rpartition(".")[0]
    return None


def _passes_through(module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` leaves a pooled ``(batch, channels[, 1, 1])`` tensor's values as they are."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(module.get_submodule(node.target), _PASS_MODULES)
    if node.op == "call_function" and node.target is F.dropout:
        return True
    if node.op == "call_function" and node.target in (torch.flatten, torch.squeeze):
        return True
    if node.op == "call_method" and node.target in ("flatten", "squeeze"):
        return True
    if node.op == "call_method" and node.target in ("view", "reshape"):
        # x.view(x.size(0), -1): the batch axis kept, the rest flattened.
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and shape[1] == -1
    return False


def _pooled(module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` averages over its two spatial axes, if it does."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        pool = module.get_submodule(node.target)
        if isinstance(pool, nn.AdaptiveAvgPool2d) and _is_one(pool.output_size):
            return node.args[0]
        return None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return node.args[0] if _is_one(size) else None
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                 and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, (tuple, list)) and len(dims) == 2 and all(isinstance(d, int) for d in dims):
            if {d % 4 for d in dims} == {2, 3}:
                return node.args[0]
    return None


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))


def check_cam_head(head: CamHead, images: torch.Tensor, logits: torch.Tensor) -> str | None:
    """Run the split network on ``images`` (normalised NCHW); why it cannot serve, or ``None``.

    ``logits``: the original network's on the same images. The traced copy must give them, and
    its feature map must be ``(batch, channels, h, w)`` with the classifier's channel count.
    """
    try:
        with torch.inference_mode():
            got, feature = head.model(images)
    except Exception as exc:
        return f"the traced network does not run ({type(exc).__name__})"
    if feature.ndim != 4 or feature.shape[1] != head.weight.shape[1] or feature.shape[0] != images.shape[0]:
        return (f"its pooled tensor {head.feature} has shape {tuple(feature.shape)}, not (batch, "
                f"{head.weight.shape[1]}, h, w)")
    if got.shape != logits.shape or not torch.allclose(got, logits, rtol=1e-4, atol=1e-5):
        return "the traced network's logits differ from the network's"
    return None


__all__ = ["CamHead", "WithCam", "class_activation_map", "find_cam_head", "check_cam_head"]
