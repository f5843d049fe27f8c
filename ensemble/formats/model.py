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
A network whose head is global average pooling + one linear layer has a second output,
``cam``: float32 ``(batch, h, w)``, the class activation map of each image's top-1 class on the
last feature map's grid (``ens.cam`` says whether there is one, and from which feature map).
This module needs only ``onnx``, so inference machines without torch can read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ensemble.errors import EnsError
from ensemble.formats.common import is_count, is_id, is_name, is_number, parse_json

FORMAT_VERSION = 1
PREFIX = "ens."
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: The optional second output: ``cam[b, y, x] = W[argmax_b] · F[b, :, y, x]``, float32 (batch, h, w).
CAM_OUTPUT = "cam"

#: How an image of any size becomes the model's square input.
#: ``center-crop``: resize the shorter side to ``input_size / crop_pct``, then take the centred
#: ``input_size`` square (the torchvision / timm evaluation recipe).
#: ``squash``: resize both sides to ``input_size``, ignoring the aspect ratio.
RESIZE_POLICIES = ("center-crop", "squash")
#: Resampling filters an export may ask inference to resize with (``ens export
#: --interpolation``), as Pillow and torchvision's ``Resize`` on images name them: torchvision's
#: default, the bicubic of timm's pretrained models, and the two others both offer. The one
#: list: what export accepts, what metadata may say, and what inference decodes.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
PRECISIONS = ("fp32", "fp16")
#: Input sizes, in pixels, an export may have.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 4096
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
    for ``ens export`` and for the foreign models of ``ens infer``; :meth:`ModelMetadata.from_props`
    applies the same rules to the ``ens.*`` keys of a file."""
    values = {"mean": mean, "std": std, "resize": resize, "crop_pct": crop_pct, "interpolation": interpolation}
    found = _preprocess_problem(values)
    if found is None:
        return
    name, shown, problem = found
    value = values[name]
    text = rgb_text(value) if name in ("mean", "std") else f"{value:g}" if name == "crop_pct" else value
    raise EnsError(f"--{name.replace('_', '-')}{f' {text}' if shown else ''}: {problem}")


def _preprocess_problem(values: Mapping[str, Any]) -> tuple[str, bool, str] | None:
    """The first value out of range as ``(field, whether the message shows it, problem)``."""
    for name, example in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        rgb = values.get(name)
        if rgb is None:
            continue
        if len(rgb) != 3:
            return name, False, f"expected three values R,G,B, got {len(rgb)}"
        if any(not (0.0 <= v <= 1.0) for v in rgb):
            return name, True, f"values are fractions of 255 in [0, 1] (e.g. {rgb_text(example)})"
        if name == "std" and any(v <= 0 for v in rgb):
            return name, True, "every value must be positive"
    if values.get("resize") is not None and values["resize"] not in RESIZE_POLICIES:
        return "resize", True, f"choose one of {', '.join(RESIZE_POLICIES)}"
    if values.get("crop_pct") is not None and not 0.0 < values["crop_pct"] <= 1.0:
        return "crop_pct", True, "expected a fraction in (0, 1]"
    if values.get("interpolation") is not None and values["interpolation"] not in INTERPOLATIONS:
        return "interpolation", True, f"choose one of {', '.join(INTERPOLATIONS)}"
    return None


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

    ``cam`` is the name of the graph's class-activation-map output (:data:`CAM_OUTPUT`), or
    ``None`` when it has none; ``cam_feature`` names the feature map it is computed from. Both
    travel in the one key ``ens.cam``: ``null`` or ``{"output": "cam", "feature": NAME}``
    (files written before it existed read as no CAM).
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
    cam: str | None = None
    cam_feature: str | None = None
    #: Where each preprocessing value came from (timm exports: ``{"input_size": "the checkpoint's
    #: args", "mean": "timm's config of resnet18.a1_in1k", ...}``); None: not recorded (other
    #: exports, and files written before it existed).
    preprocess_from: Mapping[str, str] | None = None
    format: int = FORMAT_VERSION

    def category_id(self, column: int) -> int | str:
        """The dataset category id predicted by output ``column``."""
        return column if self.class_ids is None else self.class_ids[column]

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries, ``ens.<field>`` -> JSON text."""
        values = dataclasses.asdict(self)
        feature = values.pop("cam_feature")
        if values["cam"] is not None:
            values["cam"] = {"output": values["cam"], "feature": feature}
        return {PREFIX + key: json.dumps(value, sort_keys=True) for key, value in values.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> "ModelMetadata":
        """Inverse of :meth:`to_props`; ``source`` names the file in error messages.

        Every field is checked here, for `ens info` and `ens infer` alike: a hand-edited or
        foreign value gets one line naming the file and the key (``ens.num_classes 0: ...``).
        Keys this version does not know (from a newer ens of the same format) are ignored.
        """
        raw = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if "format" not in raw:
            raise EnsError(f"{source}: no ens metadata (it was not written by `ens export`)")
        values = {}
        for key, text in raw.items():
            values[key] = parse_json(text, f"{source}: {PREFIX}{key} {_shown(text)}", where=False)

        def bad(key: str, problem: str) -> EnsError:
            return EnsError(f"{source}: {PREFIX}{key} {_shown(raw[key])}: {problem}")

        if not is_count(values["format"], 1):
            raise bad("format", _POSITIVE)
        if values["format"] > FORMAT_VERSION:
            raise EnsError(
                f"{source}: ens metadata format {values['format']} is newer than this ens "
                f"understands ({FORMAT_VERSION}); upgrade ens"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [name for name, f in fields.items()
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and name not in values]
        if missing:
            raise EnsError(f"{source}: ens metadata lacks {', '.join(missing)}")
        # cam_feature has no key of its own: it travels inside ens.cam.
        values = {k: v for k, v in values.items() if k in fields and k != "cam_feature"}
        for key, value in values.items():
            for ok, problem in _FIELD_CHECKS[key]:
                if not ok(value):
                    raise bad(key, problem)
        found = _preprocess_problem(values)
        if found is not None:
            raise bad(found[0], found[2])
        ids = values.get("class_ids")
        if ids is not None:
            if len(ids) != values["num_classes"]:
                raise bad("class_ids", f"lists {len(ids)} category ids but {PREFIX}num_classes is "
                                       f"{values['num_classes']}")
            seen: set[int | str] = set()
            for category in ids:
                if category in seen:
                    raise bad("class_ids", f"category id {category!r} appears twice")
                seen.add(category)
            values["class_ids"] = tuple(ids)
        values["mean"] = tuple(values["mean"])
        values["std"] = tuple(values["std"])
        values["verification"] = tuple(Verification(**v) for v in values.get("verification", ()))
        cam = values.pop("cam", None)
        if cam is not None:
            values["cam"], values["cam_feature"] = cam["output"], cam["feature"]
        return cls(**values)


def _shown(text: str, limit: int = 60) -> str:
    """A metadata value as the file holds it, shortened for a one-line message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_check(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {f.name for f in dataclasses.fields(Verification)}
            and value["precision"] in PRECISIONS and is_count(value["size"], 1) and is_count(value["batch"], 1)
            and is_number(value["max_abs_diff"]) and is_number(value["top1_agreement"]))


def _is_cam(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and set(value) == {"output", "feature"}
                             and value["output"] == CAM_OUTPUT and is_name(value["feature"]))


_POSITIVE = "expected a positive integer"
_STRING = [(lambda v: isinstance(v, str), "expected a string")]
_THREE_NUMBERS = [(lambda v: isinstance(v, list) and len(v) == 3 and all(map(is_number, v)),
                   "expected three numbers R,G,B")]
#: The type and range of each field's JSON value, as (passes, problem) pairs tried in order; the
#: preprocessing ranges are :func:`_preprocess_problem`'s, shared with the command-line options.
_FIELD_CHECKS: dict[str, list[tuple[Callable[[Any], bool], str]]] = {
    "format": [(lambda v: is_count(v, 1), _POSITIVE)],
    "architecture": _STRING,
    "num_classes": [(lambda v: is_count(v, 1), _POSITIVE)],
    "input_size": [(lambda v: is_count(v, MIN_INPUT_SIZE) and v <= MAX_INPUT_SIZE,
                    f"expected an integer from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} (pixels)")],
    "mean": _THREE_NUMBERS,
    "std": _THREE_NUMBERS,
    "resize": [(lambda v: v in RESIZE_POLICIES, f"choose one of {', '.join(RESIZE_POLICIES)}")],
    "crop_pct": [(lambda v: is_number(v) and 0.0 < v <= 1.0, "expected a fraction in (0, 1]")],
    "interpolation": [(lambda v: v in INTERPOLATIONS, f"choose one of {', '.join(INTERPOLATIONS)}")],
    "dynamic_size": [(lambda v: isinstance(v, bool), "expected true or false")],
    "precision": [(lambda v: v in PRECISIONS, f"choose one of {', '.join(PRECISIONS)}")],
    "class_ids": [(lambda v: v is None or isinstance(v, list), "expected a list of category ids or null"),
                  (lambda v: v is None or all(map(is_id, v)), "category ids must be integers or strings")],
    "arch_kwargs": [(lambda v: isinstance(v, dict), "expected a JSON object")],
    "checkpoint": _STRING,
    "checkpoint_sha256": _STRING,
    "verification": [(lambda v: isinstance(v, list) and all(map(_is_check, v)),
                      "expected a list of checks, each with precision, size, batch, max_abs_diff, "
                      "top1_agreement")],
    "exporter": _STRING,
    "opset": [(is_count, "expected a non-negative integer")],
    "torch_version": _STRING,
    "onnx_version": _STRING,
    "cam": [(_is_cam, f'expected null or {{"output": "{CAM_OUTPUT}", "feature": NAME}}')],
    "preprocess_from": [(lambda v: v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
                         "expected null or a JSON object of strings")],
}


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
