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
from typing import Any, Mapping, Sequence

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
#: Resampling filters an export may ask inference to resize with (``ens export
#: --interpolation``): torchvision's default, and the bicubic of timm's pretrained models.
INTERPOLATIONS = ("bilinear", "bicubic")
#: The ImageNet normalisation (fractions of 255) of torchvision's and timm's pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rgb_text(values: Sequence[float]) -> str:
    """``R,G,B`` as the command line takes it: ``(0.485, 0.456, 0.406)`` -> ``0.485,0.456,0.406``."""
    return ",".join(f"{v:g}" for v in values)


def check_preprocess(*, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     resize: str | None = None, crop_pct: float | None = None,
                     interpolation: str | None = None) -> None:
    """Raise :class:`EnsError` naming the option (``--mean``, ``--crop-pct``, ...) of the first
    preprocessing value out of range; ``None`` means not given. The one check of these values,
    for ``ens export`` and for the foreign models of ``ens infer``."""
    for name, values, example in (("--mean", mean, IMAGENET_MEAN), ("--std", std, IMAGENET_STD)):
        if values is None:
            continue
        if len(values) != 3:
            raise EnsError(f"{name}: expected three values R,G,B, got {len(values)}")
        if any(not (0.0 <= v <= 1.0) for v in values):
            raise EnsError(f"{name} {rgb_text(values)}: values are fractions of 255 in [0, 1] "
                           f"(e.g. {rgb_text(example)})")
    if std is not None and any(v <= 0 for v in std):
        raise EnsError(f"--std {rgb_text(std)}: every value must be positive")
    if resize is not None and resize not in RESIZE_POLICIES:
        raise EnsError(f"--resize {resize}: choose one of {', '.join(RESIZE_POLICIES)}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise EnsError(f"--crop-pct {crop_pct:g}: expected a fraction in (0, 1]")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise EnsError(f"--interpolation {interpolation}: choose one of {', '.join(INTERPOLATIONS)}")


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

    if not os.path.isfile(path):
        kind = "no such file" if not os.path.exists(path) else "not a regular file"
        raise EnsError(f"{os.fspath(path)}: {kind}")
    path = os.fspath(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for foreign bytes
        raise EnsError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=path)
