"""Blend methods by name: one dict, one lookup that names the valid choices."""

from __future__ import annotations

import inspect
from typing import Any

from weights_search.accuracy import AccuracyBlend
from weights_search.base import Blender
from weights_search.greedy import GreedyBlend
from weights_search.mixture import NllBlend, UniformBlend
from weights_search.pooling import LogitBlend

METHODS: dict[str, type[Blender]] = {
    "uniform": UniformBlend,
    "nll": NllBlend,
    "logit": LogitBlend,
    "greedy": GreedyBlend,
    "accuracy": AccuracyBlend,
}
DEFAULT_METHOD = "nll"


def get_method(name: str, **params: Any) -> Blender:
    """A new, unfitted blend method ``name`` built with ``params``.

    Raises ValueError naming the valid methods for an unknown name, and the method's valid
    parameters for an unknown parameter.
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown blend method {name!r}; choose from: {', '.join(METHODS)}") from None
    valid = inspect.signature(cls).parameters
    unknown = sorted(set(params) - set(valid))
    if unknown:
        choices = ", ".join(valid) or "none"
        raise ValueError(f"blend method {name!r} has no parameter {', '.join(unknown)}; its parameters: {choices}")
    return cls(**params)
