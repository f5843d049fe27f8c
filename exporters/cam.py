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

A timm model is split where timm splits it: ``forward_features`` gives the feature map and only
``forward_head`` is traced, with timm's ``SelectAdaptivePool2d`` and the norm layers kept whole,
so a body fx cannot trace (the TF "same" padding of ``tf_efficientnet*``) does not matter. Its
head qualifies when it is an average ``SelectAdaptivePool2d`` (NCHW, or NHWC as Swin's: the map
is permuted to NCHW) + ``Linear``, with only flatten, dropout or identity around them (ResNet,
EfficientNet, RegNet's ``ClassifierHead``, Inception, DenseNet...). The others are refused with
their reason (:func:`_timm_reason`): a norm on the pooled vector (ConvNeXt's
``NormMlpClassifierHead``, a ViT's ``fc_norm``) divides it by statistics of the whole image, so
``W[c] · F[:, y, x]`` is not a position's share of the logit; a transformer's class token (or
token average) is mixed by attention from every patch, not a pooled spatial map; hidden layers
(MobileNetV3's ``conv_head``, an MLP head) are not linear; a max pooling picks one position.
"""

from __future__ import annotations

import operator
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

    model: nn.Module
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
    if _is_timm(model):
        return _timm_cam_head(model)
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, untraceable calls, ...
        return f"torch.fx cannot trace it ({describe(exc, 120)})"
    split = _split(traced)
    if isinstance(split, str):
        return split
    graph_module, weight, classifier, feature = split
    return CamHead(model=graph_module, weight=weight, feature=feature, classifier=classifier)


def _split(traced: fx.GraphModule) -> tuple[fx.GraphModule, torch.Tensor, str, str] | str:
    """``traced`` retraced to return ``(logits, pooled feature map NCHW)``, with the classifier's
    weight and path and the feature map's name; or why its output is no linear layer on a global
    average pooling. The feature map is ``"input"`` when the pooling takes the graph's input."""
    graph = traced.graph
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        return "it does not return a single logits tensor"
    node = result
    while _passes_through(traced, node):  # timm's ClassifierHead flattens after its fc
        node = node.args[0]
    linear = _linear_weight(traced, node)
    if linear is None:
        return "its output is not a linear layer's"
    weight, classifier = linear
    node = node.args[0]
    while isinstance(node, fx.Node) and _passes_through(traced, node):
        node = node.args[0]
    pooled = _pooled(traced, node)
    if pooled is None:
        return f"its classifier {classifier} is not one linear layer on a global average pooling"
    feature, layout = pooled
    name = ("input" if feature.op == "placeholder" else
            str(feature.target) if feature.op == "call_module" else feature.name)
    if layout == "NHWC":
        with graph.inserting_after(feature):
            feature = graph.call_method("permute", (feature, 0, 3, 1, 2))
    output.args = ((result, feature),)
    graph.lint()
    return fx.GraphModule(traced, graph).eval(), weight, classifier, name


def _is_timm(model: nn.Module) -> bool:
    """Whether ``model`` is a timm network, split by timm into forward_features + forward_head."""
    return (type(model).__module__.split(".")[0] == "timm" and callable(getattr(model, "forward_features", None))
            and callable(getattr(model, "forward_head", None)))


class _ForwardHead(nn.Module):
    """A timm network's ``forward_head`` as a module of its own, for fx to trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)


class _TimmCam(nn.Module):
    """``x -> (logits, feature map NCHW)``: timm's ``forward_features``, then its split head."""

    def __init__(self, model: nn.Module, head: fx.GraphModule):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.model.forward_features(x))


def _is_norm(module: nn.Module) -> bool:
    """A norm layer of torch or timm (``LayerNorm2d``, ``BatchNormAct2d``, ``RmsNorm``...), not a
    head named after one (``NormMlpClassifierHead``)."""
    name = type(module).__name__
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return isinstance(module, norms) or ("Norm" in name and not name.endswith(("Head", "Classifier")))


def _per_image_norm(module: nn.Module) -> bool:
    """A norm that divides by statistics of each image (layer, group, RMS, instance norms), unlike
    batch norm in eval mode, a fixed per-channel scale and shift."""
    batch_like = isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__
    return _is_norm(module) and not batch_like


class _HeadTracer(fx.Tracer):
    """Keeps timm's global pooling and every norm layer as one node each: the pooling's type and
    layout decide whether the head qualifies; a norm's name says why it does not."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from timm.layers import SelectAdaptivePool2d

        return isinstance(m, SelectAdaptivePool2d) or _is_norm(m) or super().is_leaf_module(m, qualname)


def _timm_cam_head(model: nn.Module) -> CamHead | str:
    root = _ForwardHead(model)
    try:
        traced = fx.GraphModule(root, _HeadTracer().trace(root))
    except Exception as exc:
        return f"torch.fx cannot trace its forward_head ({describe(exc, 120)})"
    reason = _timm_reason(traced)
    if reason:
        return reason
    split = _split(traced)
    if isinstance(split, str):  # not reached for the heads _timm_reason passes; kept as the last word
        return split
    head, weight, classifier, feature = split
    return CamHead(model=_TimmCam(model, head).eval(), weight=weight,
                   feature="forward_features" if feature == "input" else feature.removeprefix("model."),
                   classifier=classifier.removeprefix("model."))


def _timm_reason(traced: fx.GraphModule) -> str | None:
    """Why a timm ``forward_head`` (traced by :class:`_HeadTracer`) is no global average pooling +
    one linear layer, or ``None`` when it is. The chain from the output back to the feature map
    (each node's first tensor input) is read whole, the most telling reason first."""
    from timm.layers import SelectAdaptivePool2d

    chain, node = [], next(n for n in traced.graph.nodes if n.op == "output").args[0]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        chain.append(node)
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    if node is None:
        return "its forward_head does not compute its logits from the feature map alone"
    modules = {n: traced.get_submodule(n.target) for n in chain if n.op == "call_module"}

    def name(n: fx.Node) -> str:
        return str(n.target).removeprefix("model.") if n in modules else n.name

    chain = [n for n in chain if not _passes_through(traced, n)]  # flatten, dropout, identity
    if not chain or _linear_weight(traced, chain[0]) is None:
        ends = f"{type(modules[chain[0]]).__name__} {name(chain[0])}" if chain and chain[0] in modules else (
            chain[0].name if chain else "the feature map itself")
        return f"its forward_head does not end in one linear layer (it ends in {ends})"
    classifier, between = _linear_weight(traced, chain[0])[1].removeprefix("model."), chain[1:]
    if any((n.op == "call_function" and n.target is operator.getitem)
           or (n.target == "mean" or n.target is torch.mean) and _dims(n) in ((1,), 1) for n in between):
        return ("its head classifies transformer tokens (a class token or a token average), not a "
                "pooled spatial feature map: attention mixes every patch into them")
    pool = next((i for i, n in enumerate(between)
                 if isinstance(modules.get(n), SelectAdaptivePool2d) or _pooled(traced, n)), None)
    if pool is None:
        return f"its linear layer {classifier} does not take a global pooling of the feature map"
    after = between[:pool]  # between the pooling and the linear layer, last first
    if after and all(n in modules and _per_image_norm(modules[n]) for n in after):
        norm = after[-1]
        return (f"its head normalises the pooled features ({type(modules[norm]).__name__} {name(norm)}) "
                f"before its linear layer {classifier}: the norm divides by statistics of the whole "
                "image, so W[c] · F[:, y, x] is not a position's share of the logit")
    if after:
        names = ", ".join(name(n) for n in reversed(after[-3:]))  # in forward order
        return (f"its head has layers between the pooling and its linear layer {classifier} ({names}): "
                "not one linear layer")
    if isinstance(modules.get(between[pool]), SelectAdaptivePool2d) and _pooled(traced, between[pool]) is None:
        return (f"its global pooling {name(between[pool])} is '{modules[between[pool]].pool_type}' (timm's "
                "SelectAdaptivePool2d), not an average: its logits are no mean over positions")
    return None


def _dims(node: fx.Node):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return tuple(dims) if isinstance(dims, (tuple, list)) else dims


def _timm_pool_layout(pool: nn.Module) -> str | None:
    """``"NCHW"`` or ``"NHWC"`` for an averaging timm ``SelectAdaptivePool2d`` to one value per
    channel, else ``None`` (max, avg+max, no pooling)."""
    inner = pool.pool
    if isinstance(inner, nn.AdaptiveAvgPool2d):
        return "NCHW" if _is_one(inner.output_size) else None
    if type(inner).__name__ == "FastAdaptiveAvgPool":
        return {(2, 3): "NCHW", (1, 2): "NHWC"}.get(tuple(inner.dim))
    return None


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


def _pooled(module: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str] | None:
    """``(the tensor that node averages over its two spatial axes, its layout)``, if it does."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        pool = module.get_submodule(node.target)
        if isinstance(pool, nn.AdaptiveAvgPool2d) and _is_one(pool.output_size):
            return node.args[0], "NCHW"
        if type(pool).__name__ == "SelectAdaptivePool2d" and type(pool).__module__.startswith("timm."):
            layout = _timm_pool_layout(pool)
            return (node.args[0], layout) if layout else None
        return None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return (node.args[0], "NCHW") if _is_one(size) else None
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                 and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, (tuple, list)) and len(dims) == 2 and all(isinstance(d, int) for d in dims):
            if {d % 4 for d in dims} == {2, 3}:
                return node.args[0], "NCHW"
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
