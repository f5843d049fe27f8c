"""The metadata `ens export` writes into every ONNX file, and the one function that reads it.

An exported file describes itself: what architecture it is, how many classes it predicts and
which dataset category each output column stands for, how images must be prepared for it, where
its weights came from, and how it was verified. The values live in the ONNX model's
``metadata_props`` (string key/value pairs, visible in tools such as Netron), one key per field,
each prefixed ``ens.`` and JSON-encoded::

    ens.format            1
    ens.architecture      "resnet50"
    ens.num_classes       1010
    ens.input_size        224
    ens.mean              [0.485, 0.456, 0.406]
    ...

The graph itself always takes ``image``: uint8 RGB, NHWC ``(batch, height, width, 3)`` and
returns ``logits``: float32 ``(batch, num_classes)``; normalisation happens inside the graph.
This module needs only ``onnx``, so inference machines without torch can read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ensemble.errors import EnsError

FORMAT_VERSION = 1
PREFIX = "ens."
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

#: How an image of any size becomes the model's square input.
#: ``center-crop``: resize the shorter side to ``input_size / crop_pct``, then take the centred
#: ``input_size`` square (the torchvision / timm evaluation recipe).
#: ``squash``: resize both sides to ``input_size``, ignoring the aspect ratio.
RESIZE_POLICIES = ("center-crop", "squash")


@dataclass(frozen=True)
class Verification:
    """One parity check of the ONNX graph against the torch model it came from."""

    precision: str  #: "fp32" or "fp16": which graph was checked
    size: int  #: input height and width in pixels
    batch: int  #: number of images in the check batch
    max_abs_diff: float  #: max |onnxruntime logit - torch logit| over the batch
    top1_agreement: float  #: fraction of images whose arg-max class agrees


@dataclass(frozen=True)
class ModelMetadata:
    """Everything an exported ONNX file says about itself.

    ``class_ids[i]`` is the dataset category id of output column ``i``; ``None`` means the
    columns are the category ids themselves (0 .. num_classes - 1).
    """

    architecture: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "center-crop"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    dynamic_size: bool = True
    precision: str = "fp32"
    class_ids: tuple[int | str, ...] | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    verification: tuple[Verification, ...] = ()
    exporter: str = ""
    opset: int = 0
    torch_version: str = ""
    onnx_version: str = ""
    format: int = FORMAT_VERSION

    def category_id(self, column: int) -> int | str:
        """The dataset category id predicted by output ``column``."""
        return column if self.class_ids is None else self.class_ids[column]

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries, ``ens.<field>`` -> JSON text."""
        values = dataclasses.asdict(self)
        return {PREFIX + key: json.dumps(value, sort_keys=True) for key, value in values.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> "ModelMetadata":
        """Inverse of :meth:`to_props`; ``source`` names the file in error messages."""
        raw = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if "format" not in raw:
            raise EnsError(f"{source}: no ens metadata (it was not written by `ens export`)")
        try:
            values = {k: json.loads(v) for k, v in raw.items()}
        except json.JSONDecodeError as exc:
            raise EnsError(f"{source}: unreadable ens metadata ({exc})") from None
        if values["format"] > FORMAT_VERSION:
            raise EnsError(
                f"{source}: ens metadata format {values['format']} is newer than this ens "
                f"understands ({FORMAT_VERSION}); upgrade ens"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        if missing:
            raise EnsError(f"{source}: ens metadata lacks {', '.join(missing)}")
        values = {k: v for k, v in values.items() if k in known}
        values["mean"] = tuple(values["mean"])
        values["std"] = tuple(values["std"])
        if values.get("class_ids") is not None:
            values["class_ids"] = tuple(values["class_ids"])
        values["verification"] = tuple(Verification(**v) for v in values.get("verification", ()))
        return cls(**values)


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """Read the metadata of an ONNX file written by `ens export`.

    Raises :class:`EnsError` when the file is missing, is not ONNX, or carries no ens metadata.
    """
    import onnx  # deferred: importing onnx costs ~0.2 s, and --help should not pay it

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EnsError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for foreign bytes
        raise EnsError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=path)
