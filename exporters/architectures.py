"""Architectures by name: torchvision builders and ``package.module:callable`` factories.

One lookup (:func:`resolve`) turns the ``--arch`` text into an :class:`Architecture`, which
builds the network for a number of classes. Unknown names get the closest valid names in the
error message.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torchvision
from torch import nn

from ensemble.errors import EnsError
from ensemble.formats.common import describe

DEFAULT_INPUT_SIZE = 224
#: Architectures trained at another resolution than 224 px.
INPUT_SIZES = {"inception_v3": 299}


def torchvision_names() -> list[str]:
    """Every torchvision image-classification builder name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class Architecture:
    """A named way to build a classification network."""

    name: str  #: as given: "resnet50" or "package.module:callable"
    builder: Callable[..., nn.Module]
    is_torchvision: bool

    @property
    def default_input_size(self) -> int:
        return INPUT_SIZES.get(self.name, DEFAULT_INPUT_SIZE)

    def build(self, num_classes: int | None, kwargs: Mapping[str, Any]) -> nn.Module:
        """Build with random weights and a head of ``num_classes`` outputs (None: the default).

        torchvision builders take ``num_classes`` directly; for other factories it is passed
        when their signature names it, otherwise the caller replaces the head
        (:func:`replace_head`).
        """
        given, kwargs = dict(kwargs), dict(kwargs)
        if self.is_torchvision:
            kwargs["weights"] = None
            if self.name == "inception_v3":
                # The auxiliary head only exists for training; it is dropped for inference.
                kwargs["aux_logits"] = False
                # Random init through scipy's truncnorm is slow and the weights are replaced.
                kwargs.setdefault("init_weights", False)
            if self.name == "googlenet":
                kwargs["aux_logits"] = False
                kwargs.setdefault("init_weights", False)
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
        elif num_classes is not None and "num_classes" not in kwargs and _accepts(self.builder, "num_classes"):
            kwargs["num_classes"] = num_classes
        try:
            model = self.builder(**kwargs)
        except Exception as exc:  # builders check their arguments with TypeError, ValueError, assert, ...
            classes = f" and num_classes={num_classes}" if "num_classes" in kwargs and "num_classes" not in given else ""
            raise EnsError(f"--arch {self.name}: cannot build it with --arch-kwargs {kwargs_text(given)}{classes} "
                           f"({describe(exc, 200)})") from None
        if not isinstance(model, nn.Module):
            raise EnsError(f"--arch {self.name}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model


def kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "weights") + "}"


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def resolve(name: str) -> Architecture:
    """Look up ``--arch NAME``: a torchvision builder name or ``package.module:callable``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EnsError(f"--arch {name}: cannot import {module_name!r} ({exc})") from None
        builder = module
        for part in attr.split("."):
            builder = getattr(builder, part, None)
            if builder is None:
                raise EnsError(f"--arch {name}: {module_name!r} has no attribute {attr!r}")
        if not callable(builder):
            raise EnsError(f"--arch {name}: {attr!r} is not callable")
        return Architecture(name=name, builder=builder, is_torchvision=False)
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EnsError(
            f"--arch {name}: unknown architecture{hint} (use a torchvision classification "
            "model name or package.module:callable)"
        )
    return Architecture(name=name, builder=torchvision.models.get_model_builder(name), is_torchvision=True)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier layer: the last ``Linear`` in module order, else the last 1x1 ``Conv2d``.

    (SqueezeNet classifies with a 1x1 convolution; every other torchvision model ends in a
    Linear layer, auxiliary heads of Inception / GoogLeNet being defined before the main one.)
    """
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if convs:
        return convs[-1]
    raise EnsError(f"{type(model).__name__}: no Linear or 1x1 Conv2d classifier layer found")


def head_size(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    """Swap the layer ``name`` for a fresh one of the same kind with ``num_classes`` outputs."""
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size,
                        stride=old.stride, padding=old.padding, bias=old.bias is not None)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_inception(model: nn.Module) -> bool:
    return isinstance(model, torchvision.models.Inception3)


def default_size_for_module(model: nn.Module) -> int:
    return INPUT_SIZES["inception_v3"] if is_inception(model) else DEFAULT_INPUT_SIZE


def strip_aux_heads(model: nn.Module) -> bool:
    """Remove Inception v3 / GoogLeNet auxiliary heads from a loaded module; True if any."""
    removed = False
    for attr in ("AuxLogits", "aux1", "aux2"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
            removed = True
    if hasattr(model, "aux_logits") and isinstance(getattr(model, "aux_logits"), bool):
        model.aux_logits = False
    return removed

