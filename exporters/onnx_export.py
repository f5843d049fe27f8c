"""Checkpoint -> verified, self-describing ONNX file.

The exported graph takes uint8 RGB images in NHWC layout and does the cast, scaling and
mean/std normalisation itself, so inference ships bytes, not floats::

    image  uint8   (batch, height, width, 3)
    logits float32 (batch, num_classes)
    cam    float32 (batch, h, w)    only for a global-average-pooling + linear head (exporters.cam)

Every export is verified before it is written: ``onnx.checker`` (full check), then
onnxruntime against torch on the same uint8 batch at the model's size and at a second size,
the logits and the CAM alike. The file appears at its path only when all of that passed.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ensemble import __version__
from ensemble.errors import EnsError
from ensemble.fileio import atomic_path, sha256_file
from ensemble.formats.common import describe, first_line
from ensemble.formats.model import (CAM_OUTPUT, IMAGENET_MEAN, IMAGENET_STD, INPUT_NAME, MAX_INPUT_SIZE,
                               MIN_INPUT_SIZE, OUTPUT_NAME, ModelMetadata, Verification, check_preprocess)
from exporters import architectures
from exporters.cam import CamHead, WithCam, check_cam_head, find_cam_head
from exporters.checkpoints import (Checkpoint, fit_report, load_checkpoint, strip_prefixes,
                                   with_module_versions)
from exporters.classes import load_class_ids

OPSET = 17
#: Bounds of the parity check: fp32 graphs must match torch closely and agree on every top-1;
#: fp16 graphs round every activation, so only their top-1 agreement is bounded.
FP32_MAX_ABS_DIFF = 1e-3
FP16_MIN_TOP1_AGREEMENT = 0.99
#: Bounds of the CAM's check, as fractions of the largest |CAM value| (at least 1): a CAM value
#: sums as many products as the feature map has channels, so its rounding grows with its size.
FP32_CAM_MAX_DIFF = 1e-4
FP16_CAM_MAX_DIFF = 0.05
#: An fp16 graph's activations must stay this many times below float16's largest value (65504)
#: on the check images: other images can go higher, and past it a GPU gives inf logits.
FP16_HEADROOM = 4.0
CHECK_BATCH = 4
#: More classes than any classification dataset has (ImageNet-21k: 21,841; iNat 2021: 10,000):
#: a classifier beyond it is a wrong file or key, and building it would take gigabytes.
MAX_CLASSES = 1_000_000
#: Ops that make up the in-graph preprocessing; kept in float32 by the fp16 conversion.
_PREPROCESS_OPS = {"Transpose", "Cast", "Mul", "Add", "Sub", "Div"}
#: State-dict keys of auxiliary heads (Inception v3, GoogLeNet), dropped for inference.
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")


@dataclass(frozen=True)
class ExportOptions:
    """How to export. ``None`` means "the architecture's or checkpoint's own value".

    Preprocessing left ``None``: a timm network's comes from its checkpoint's args or folder's
    config, else timm's config for the model (:mod:`exporters.timm_models`); any other's is the
    ImageNet recipe and :class:`ModelMetadata`'s own (:data:`ENS_DEFAULTS`).
    """

    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    #: The entry of a checkpoint dict that holds the weights (None: the first of NESTED_KEYS).
    weights_key: str | None = None
    classes: Path | None = None
    fp16: bool = False
    #: Add the ``cam`` output when the network's head allows it (global average pooling + linear).
    cam: bool = True
    #: Unpickle Python objects beyond tensors (a whole model): runs code from the file.
    trust_pickle: bool = False
    opset: int = OPSET
    check_batch: int = CHECK_BATCH


#: The preprocessing of a network that is no timm model, for each value left out.
ENS_DEFAULTS = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": ModelMetadata.resize,
                "crop_pct": ModelMetadata.crop_pct, "interpolation": ModelMetadata.interpolation}


@dataclass
class _Prepared:
    """The eval-mode network and what the export records about it."""

    model: nn.Module
    label: str  #: the metadata's architecture
    default_size: int
    notes: list[str]
    #: The preprocessing resolved with its sources (timm networks); None: options or ENS_DEFAULTS.
    preprocessing: Any = None
    arch_kwargs: Mapping[str, Any] | None = None  #: what it was built with, when not options.arch_kwargs
    #: Build keywords read from a file ("m/config.json: model_args {...}"): named when the network fails.
    kwargs_from: str = ""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ModelMetadata
    notes: tuple[str, ...]
    seconds: float


class UInt8NHWC(nn.Module):
    """Wraps a classifier so it takes uint8 NHWC RGB images and normalises them itself."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalise(image))

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``(batch, height, width, 3)`` -> the network's float32 ``(batch, 3, height, width)``."""
        return image.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift


def default_output_path(checkpoint: Path, fp16: bool) -> Path:
    """``model.pt`` -> ``model.onnx``; a Hugging Face-style folder ``convnext_tiny.fb_in1k/`` ->
    ``convnext_tiny.fb_in1k.onnx`` beside it (its whole name: folder names hold dots)."""
    suffix = ".fp16.onnx" if fp16 else ".onnx"
    if checkpoint.is_dir():
        folder = checkpoint if checkpoint.name else checkpoint.resolve()
        return folder.with_name(folder.name + suffix)
    return checkpoint.with_suffix(suffix)


def second_size(size: int) -> int:
    """The second verification size: one step of the default multi-scale TTA (x 8/7)."""
    return int(round(size * 8 / 7))


def check_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A deterministic uint8 NHWC batch of smooth, photo-like images (not white noise)."""
    gen = torch.Generator().manual_seed(seed + size)
    coarse = torch.rand(batch, 3, 6, 6, generator=gen) * 255
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    noise = torch.randn(batch, 3, size, size, generator=gen) * 12
    return (smooth + noise).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None,
                      options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export ``checkpoint`` to a verified ONNX file at ``out`` and return what was written."""
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    given = out is not None
    out = Path(out) if out is not None else default_output_path(checkpoint, options.fp16)
    _check_options(options, out)
    _check_output(out, given)
    if checkpoint.is_dir():
        ckpt, spec = _open_folder(checkpoint, options)
    else:
        ckpt, spec = load_checkpoint(checkpoint, trust_pickle=options.trust_pickle,
                                     weights_key=options.weights_key), None
    prepared = _prepare_model(ckpt, options, spec)
    model, arch_name, notes = prepared.model, prepared.label, prepared.notes
    pre = prepared.preprocessing
    if pre is None:
        pre = _ens_preprocessing(options, prepared.default_size)
    size, mean, std = pre.input_size, pre.mean, pre.std
    wrapper = UInt8NHWC(model, mean, std).eval()

    # The torch logits of the check batches, computed once: they prove the model runs at its
    # size (in eval mode, before tracing), give the number of classes, tell whether the
    # network takes a second size, and are what the ONNX graph is verified against.
    references = {size: _reference_logits(wrapper, size, options, checkpoint, prepared.kwargs_from)}
    num_classes = int(references[size].shape[1])
    class_ids = load_class_ids(options.classes, num_classes) if options.classes else None

    size2 = second_size(size)
    try:
        references[size2] = _torch_logits(wrapper, check_images(options.check_batch, size2))
    except Exception:
        notes.append(f"{arch_name} only takes {size} px inputs: exported with a fixed height and width")
    head = _cam_head(model, wrapper, references, options.check_batch, notes) if options.cam else None
    cams: dict[int, np.ndarray] = {}
    if head is not None:
        wrapper = UInt8NHWC(WithCam(head), mean, std).eval()
        cams = {s: _reference_cam(head, wrapper, s, references[s], options.check_batch) for s in references}
    dynamic = size2 in references
    graph = _to_onnx(wrapper, size, dynamic, options.opset, cam=head is not None)
    try:
        checks, cam_checks = _verify(graph, references, cams, options.check_batch, "fp32")
    except _SizeMismatch as exc:
        # The trace froze a shape that depends on the input size (a Python int in the model's
        # forward): keep the export, but fixed to the size it was traced at.
        notes.append(f"the traced graph is not size-dynamic ({exc}); exported with a fixed {size} px input")
        dynamic = False
        graph = _to_onnx(wrapper, size, False, options.opset, cam=head is not None)
        references = {size: references[size]}
        cams = {size: cams[size]} if cams else {}
        checks, cam_checks = _verify(graph, references, cams, options.check_batch, "fp32")
    if options.fp16:
        notes.append(_fp16_headroom(graph, sorted(references), options.check_batch))
        graph = _to_fp16(graph)
        fp16_checks, fp16_cam_checks = _verify(graph, references, cams, options.check_batch, "fp16")
        checks += fp16_checks
        cam_checks += fp16_cam_checks
    if head is not None:
        notes.append(_cam_note(head, cams, cam_checks))

    metadata = ModelMetadata(
        architecture=arch_name,
        num_classes=num_classes,
        input_size=size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        resize=pre.resize,
        crop_pct=float(pre.crop_pct),
        interpolation=pre.interpolation,
        dynamic_size=dynamic,
        precision="fp16" if options.fp16 else "fp32",
        class_ids=class_ids,
        arch_kwargs=dict(options.arch_kwargs if prepared.arch_kwargs is None else prepared.arch_kwargs),
        # A folder's weights file is what the hash covers: named with the folder.
        checkpoint=f"{ckpt.path.parent.resolve().name}/{ckpt.path.name}" if checkpoint.is_dir() else checkpoint.name,
        checkpoint_sha256=sha256_file(ckpt.path),
        verification=tuple(checks),
        exporter=f"ens {__version__}",
        opset=options.opset,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        cam=CAM_OUTPUT if head is not None else None,
        cam_feature=head.feature if head is not None else None,
        preprocess_from=dict(pre.sources) if pre.sources is not None else None,
    )
    _write(graph, metadata, out)
    return ExportResult(path=out, metadata=metadata, notes=tuple(notes),
                        seconds=time.perf_counter() - start)


def _check_options(options: ExportOptions, out: Path) -> None:
    if out.suffix != ".onnx":
        raise EnsError(f"-o {out}: the output file must end in .onnx")
    check_preprocess(mean=options.mean, std=options.std, resize=options.resize, crop_pct=options.crop_pct,
                     interpolation=options.interpolation)
    if options.input_size is not None and not MIN_INPUT_SIZE <= options.input_size <= MAX_INPUT_SIZE:
        raise EnsError(f"--input-size {options.input_size}: expected {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} pixels")
    if options.num_classes is not None and options.num_classes < 1:
        raise EnsError(f"--num-classes {options.num_classes}: must be at least 1")
    if options.num_classes is not None and options.num_classes > MAX_CLASSES:
        raise EnsError(f"--num-classes {options.num_classes}: at most {MAX_CLASSES:,}")
    if options.check_batch < 2:
        raise EnsError("the check batch needs at least 2 images")


def _check_output(out: Path, given: bool) -> None:
    """Refuse an output path the file cannot be written to, before any work is done.

    The file goes to a temporary name in ``out``'s folder, created with its parents, then
    renamed onto ``out``: so ``out`` must not be a folder, and the nearest existing folder on
    the way must be a folder this user may write in (``os.access`` also says no for a
    read-only file system). ``given``: whether ``out`` came from ``-o``.
    """
    where = f"-o {out}" if given else str(out)
    hint = "" if given else " with -o"
    if out.is_dir():
        raise EnsError(f"{where}: a folder stands there; name the .onnx file to write{hint}")
    folder = out.parent
    while True:
        try:
            os.lstat(folder)
            break
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or a file on its path
            folder = folder.parent
    if not folder.is_dir():
        raise EnsError(f"{where}: {folder} is a file, not a folder; move it, or write somewhere else{hint}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EnsError(f"{where}: cannot write in {folder} (no permission, or a read-only file system); "
                       f"write somewhere else{hint}")


def _ens_preprocessing(options: ExportOptions, default_size: int):
    """A non-timm network's preprocessing: the options given, ENS_DEFAULTS for the others."""
    from exporters.timm_models import Preprocessing

    values = {k: getattr(options, k) if getattr(options, k) is not None else v for k, v in ENS_DEFAULTS.items()}
    return Preprocessing(input_size=options.input_size or default_size, **values)


def _open_folder(folder: Path, options: ExportOptions):
    """A Hugging Face-style folder: its weights file as a checkpoint, and the timm spec of its config."""
    from exporters import timm_models

    spec, weights = timm_models.read_folder(folder)
    if options.weights_key is not None and weights.suffix == ".safetensors":
        raise EnsError(f"--weights-key {options.weights_key}: {weights} is a safetensors file, one flat set of weights")
    ckpt = load_checkpoint(weights, trust_pickle=options.trust_pickle, weights_key=options.weights_key)
    ckpt.notes.append(f"weights from {folder.resolve().name}/{weights.name}")
    return ckpt, spec


def _timm_spec(ckpt: Checkpoint, options: ExportOptions, spec):
    """The timm network this export builds, if any: ``--arch timm/NAME[.TAG]``, a folder's
    config, or (no ``--arch``) a timm train.py checkpoint's args."""
    from exporters import timm_models

    args = timm_models.train_args(ckpt.container) if options.arch is None or \
        timm_models.is_timm_arch(options.arch) else None
    if timm_models.is_timm_arch(options.arch):
        named = timm_models.spec_from_arch(options.arch)
        if args is not None:  # the command line's network, with the run's preprocessing
            return timm_models.spec_from_train_args(args, ckpt.path, named)
        if spec is not None:  # a folder's config: its preprocessing, and its build keywords for its network
            if (spec.name, spec.tag) != (named.name, named.tag):
                named.notes.append(f"--arch {options.arch} overrides {spec.label} of the folder's config.json")
            named.given, named.num_classes = spec.given, spec.num_classes
            if spec.name == named.name:
                named.kwargs, named.kwargs_from = dict(spec.kwargs), spec.kwargs_from
        return named
    if args is not None:
        timm_models.import_timm(f"{timm_models.ARCH_PREFIX}{vars(args).get('model')}")
        return timm_models.spec_from_train_args(args, ckpt.path)
    if spec is not None and options.arch is not None:
        raise EnsError(f"--arch {options.arch}: a Hugging Face-style folder names its timm model in its "
                       "config.json; --arch takes timm/NAME[.TAG] there")
    return spec


def _prepare_timm(ckpt: Checkpoint, options: ExportOptions, spec, notes: list[str]) -> _Prepared:
    from exporters import timm_models

    registry, registry_cfg = timm_models.registry_source(spec)
    cli = {"input_size": options.input_size, "mean": options.mean, "std": options.std,
           "interpolation": options.interpolation, "resize": options.resize, "crop_pct": options.crop_pct}
    pre, pre_notes = timm_models.resolve_preprocessing(cli, spec.given, registry)
    notes.extend(spec.notes)
    if ckpt.kind != "state_dict":  # a whole model or TorchScript archive: --arch timm/... only names it
        if options.arch_kwargs:
            raise EnsError(f"{ckpt.path}: holds a whole model, so --arch-kwargs {sorted(options.arch_kwargs)} "
                           "cannot apply (they are for building a network from a state_dict)")
        return _Prepared(ckpt.module.float().eval(), spec.label, pre.input_size, notes + pre_notes, pre)
    build_notes: list[str] = []
    model, state_dict, kwargs = timm_models.build(
        spec, ckpt.state_dict, ckpt.path, num_classes=options.num_classes, input_size=pre.input_size,
        registry_cfg=registry_cfg, extra_kwargs=options.arch_kwargs, notes=build_notes)
    problem = fit_report(state_dict, model)
    if problem:
        hint = ""
        if options.input_size is not None and "img_size" in kwargs and "pos_embed" in problem:
            hint = (f"; its position embeddings fix the size it runs at: export without --input-size, "
                    "or at the size it was trained at")
        raise EnsError(f"{ckpt.path}: weights do not fit {spec.label}: {problem}{hint}")
    model.load_state_dict(with_module_versions(state_dict, model), strict=True)
    # The num_classes note first, then the preprocessing's, in the order of the metadata.
    notes.extend(build_notes[1:])
    kwargs_from = f"{spec.kwargs_from} {timm_models.shown(spec.kwargs)}" if spec.kwargs and spec.kwargs_from else ""
    return _Prepared(model.eval(), spec.label, pre.input_size, notes + build_notes[:1] + pre_notes, pre,
                     timm_models.json_kwargs(kwargs), kwargs_from)


def _prepare_model(ckpt: Checkpoint, options: ExportOptions, spec=None) -> _Prepared:
    """The eval-mode network, its architecture label, its default input size, and notes.
    ``spec``: the timm network a Hugging Face-style folder's config names."""
    notes = list(ckpt.notes)
    spec = _timm_spec(ckpt, options, spec)
    if spec is not None:
        return _prepare_timm(ckpt, options, spec, notes)
    if ckpt.kind == "state_dict":
        return _Prepared(*_build_from_state_dict(ckpt, options, notes))

    model = ckpt.module
    assert model is not None
    kwargs = dict(options.arch_kwargs)
    if architectures.is_inception(model) and "transform_input" in kwargs:
        model.transform_input = bool(kwargs.pop("transform_input"))
    if kwargs:
        raise EnsError(f"{ckpt.path}: holds a whole model, so --arch-kwargs {sorted(kwargs)} cannot apply "
                       "(they are for building a network from a state_dict)")
    if ckpt.kind == "module" and architectures.strip_aux_heads(model):
        notes.append("dropped the auxiliary head (it only serves training)")
    if options.arch:
        label = options.arch
        default_size = architectures.INPUT_SIZES.get(options.arch, architectures.DEFAULT_INPUT_SIZE)
    else:
        cls = type(model)
        label = getattr(model, "original_name", None) if ckpt.kind == "torchscript" else None
        label = label or f"{cls.__module__}:{cls.__qualname__}"
        default_size = architectures.default_size_for_module(model)
    # Models saved in half precision (or bfloat16) run in float32 here; the graph's
    # precision is chosen by --fp16, not by how the file was saved.
    return _Prepared(model.float().eval(), label, default_size, notes)


def _build_from_state_dict(ckpt: Checkpoint, options: ExportOptions,
                           notes: list[str]) -> tuple[nn.Module, str, int, list[str]]:
    if not options.arch:
        raise EnsError(f"{ckpt.path}: holds only weights (a state_dict); name the network with --arch, "
                       "e.g. --arch resnet50 or --arch timm/convnext_tiny")
    arch = architectures.resolve(options.arch)
    state_dict = ckpt.state_dict
    assert state_dict is not None
    try:
        with torch.device("meta"):  # only key names and the head are needed here: no memory, no init
            probe = arch.build(None, options.arch_kwargs)
    except EnsError:  # also a factory that cannot build on the meta device: the CPU tells
        probe = arch.build(None, options.arch_kwargs)
    state_dict, prefix = strip_prefixes(state_dict, set(probe.state_dict()))
    if prefix:
        notes.append(f"removed the key prefix {prefix!r}")
    aux = [k for k in state_dict if k.startswith(_AUX_PREFIXES) and k not in probe.state_dict()]
    if aux:
        for key in aux:
            del state_dict[key]
        notes.append(f"dropped {len(aux)} auxiliary-head tensors (they only serve training)")
    if arch.name == "inception_v3" and "transform_input" not in options.arch_kwargs:
        notes.append("inception_v3 with transform_input=False; if it was fine-tuned from torchvision's "
                     "ImageNet weights, pass --arch-kwargs '{\"transform_input\": true}'")

    head_name, head = architectures.find_head(probe)
    head_weight = state_dict.get(f"{head_name}.weight")
    if head_weight is not None:
        _check_head(head_weight, head, f"{head_name}.weight", arch.name, ckpt.path)
    found = int(head_weight.shape[0]) if head_weight is not None else None
    if options.num_classes is not None and found is not None and options.num_classes != found:
        raise EnsError(f"--num-classes {options.num_classes} contradicts {ckpt.path}: its classifier "
                       f"{head_name}.weight has {found} rows")
    num_classes = options.num_classes or found
    model = arch.build(num_classes, options.arch_kwargs)
    if num_classes is not None:
        name, layer = architectures.find_head(model)
        if architectures.head_size(layer) != num_classes:
            architectures.replace_head(model, name, num_classes)
    problem = fit_report(state_dict, model)
    if problem:
        raise EnsError(f"{ckpt.path}: weights do not fit {arch.name}: {problem}")
    model.load_state_dict(with_module_versions(state_dict, model), strict=True)
    return model.eval(), arch.name, arch.default_input_size, notes


def _check_head(weight: torch.Tensor, probe_head: nn.Module, key: str, arch: str, source: Path) -> None:
    """Refuse a classifier weight that the architecture cannot take, or of an implausible
    number of classes, from its shape alone: before a network of that many outputs is built."""
    shape = tuple(weight.shape)
    expected = tuple(probe_head.weight.shape[1:])
    if shape[1:] != expected:
        inputs = expected[0] if expected else 0
        raise EnsError(f"{source}: {key} has shape {shape}, but {arch}'s classifier takes {inputs} inputs: "
                       f"expected (classes, {', '.join(map(str, expected))})")
    if shape[0] > MAX_CLASSES:
        raise EnsError(f"{source}: {key} has shape {shape}: {shape[0]:,} classes is implausible (ens exports at "
                       f"most {MAX_CLASSES:,}); is it the right file?")


def _torch_logits(wrapper: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        out = wrapper(images)
    if not isinstance(out, torch.Tensor):
        raise EnsError(f"the model returns a {type(out).__name__}, expected a (batch, classes) tensor of logits")
    return out.float().numpy()


def _reference_logits(wrapper: nn.Module, size: int, options: ExportOptions, source: Path,
                      kwargs_from: str = "") -> np.ndarray:
    """Torch logits of the check batch at ``size``; user errors when the model cannot make them.
    ``kwargs_from``: build keywords a file gave ("m/config.json: model_args {...}"), named first
    (a wrong-typed one fails here, not when timm builds the network)."""
    try:
        out = _torch_logits(wrapper, check_images(options.check_batch, size))
    except EnsError:
        raise
    except Exception as exc:
        if kwargs_from:
            raise EnsError(f"{kwargs_from}: the network built with them does not run on {size} px inputs "
                           f"({describe(exc, 160)}); check those keywords, or set --input-size") from None
        raise EnsError(f"{source}: the model does not run on {size} px inputs "
                       f"({describe(exc, 160)}); set --input-size") from None
    if out.ndim != 2 or out.shape[0] != options.check_batch:
        raise EnsError(f"{source}: the model returns shape {tuple(out.shape)}, expected (batch, classes)")
    if options.num_classes is not None and out.shape[1] != options.num_classes:
        raise EnsError(f"--num-classes {options.num_classes} contradicts {source}: the model predicts "
                       f"{out.shape[1]} classes")
    return out


def _cam_head(model: nn.Module, wrapper: UInt8NHWC, references: Mapping[int, np.ndarray], batch: int,
              notes: list[str]) -> CamHead | None:
    """The network's GAP + linear head when it gives the network's own logits at every check
    size; else ``None``, with a note saying why there is no CAM output."""
    found = find_cam_head(model)
    if isinstance(found, str):
        notes.append(f"no cam output: {found}")
        return None
    for size, logits in references.items():
        problem = check_cam_head(found, wrapper.normalise(check_images(batch, size)), torch.from_numpy(logits))
        if problem:
            notes.append(f"no cam output: {problem}")
            return None
    return found


def _reference_cam(head: CamHead, wrapper: UInt8NHWC, size: int, logits: np.ndarray, batch: int) -> np.ndarray:
    """The CAM of the check batch at ``size`` computed in torch, in float64, from the feature map
    and the classifier weights: ``(batch, h, w)``; ``logits``: torch's, whose top-1 it maps."""
    with torch.inference_mode():
        _, feature = head.model(wrapper.normalise(check_images(batch, size)))
        rows = head.weight.detach().double()[torch.from_numpy(logits.argmax(1))]
        return torch.einsum("bc,bchw->bhw", rows, feature.double()).numpy()


def _to_onnx(wrapper: UInt8NHWC, size: int, dynamic: bool, opset: int, cam: bool = False) -> onnx.ModelProto:
    axes = {0: "batch", 1: "height", 2: "width"} if dynamic else {0: "batch"}
    outputs = {OUTPUT_NAME: {0: "batch"}}
    if cam:
        outputs[CAM_OUTPUT] = {0: "batch", 1: "cam_height", 2: "cam_width"} if dynamic else {0: "batch"}
    if isinstance(wrapper.model, torch.jit.ScriptModule):
        # A TorchScript archive cannot be traced through as a submodule; scripting the
        # wrapper too hands the exporter one TorchScript graph.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapper = torch.jit.script(wrapper)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated upstream but is what torch 2.14 (pinned)
        # runs fastest and most robustly on torchvision models and TorchScript archives; its
        # tracer warnings are covered by the parity check at a second size.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (check_images(2, size),), buffer,  # batch of 2 keeps the batch axis dynamic
            dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=list(outputs),
            dynamic_axes={INPUT_NAME: axes, **outputs},
        )
    graph = onnx.load_from_string(buffer.getvalue())
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise EnsError(f"the exported graph fails onnx.checker: {first_line(exc)}") from None
    return graph


class _SizeMismatch(Exception):
    pass


def _session(graph: onnx.ModelProto):
    from ensemble.inference.runtime import onnxruntime

    ort = onnxruntime()

    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def _verify(graph: onnx.ModelProto, references: Mapping[int, np.ndarray], cams: Mapping[int, np.ndarray],
            batch: int, precision: str) -> tuple[list[Verification], list[tuple[str, float]]]:
    """Run onnxruntime on the check batches and compare with torch's logits, and with torch's
    CAMs when ``cams`` has them, else fail. Returns the logit checks and, per CAM check,
    ``(precision, max |cam difference|)``."""
    session = _session(graph)
    checks, cam_checks = [], []
    first = min(references)
    names = [OUTPUT_NAME, CAM_OUTPUT] if cams else [OUTPUT_NAME]
    for size, expected in references.items():
        try:
            got, *cam = session.run(names, {INPUT_NAME: check_images(batch, size).numpy()})
        except Exception as exc:
            if size != first:
                raise _SizeMismatch(f"onnxruntime fails at {size} px: {first_line(exc, 120)}") from None
            raise EnsError(f"onnxruntime cannot run the exported {precision} graph: {first_line(exc)}") from None
        check = Verification(
            precision=precision, size=size, batch=batch,
            max_abs_diff=float(np.abs(got.astype(np.float64) - expected).max()),
            top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        )
        if precision == "fp32" and (check.max_abs_diff > FP32_MAX_ABS_DIFF or check.top1_agreement < 1.0):
            message = (f"max |logit difference| {check.max_abs_diff:.2e} (bound {FP32_MAX_ABS_DIFF:g}), "
                       f"top-1 agreement {check.top1_agreement:.0%}")
            if size != first:
                raise _SizeMismatch(f"at {size} px {message}")
            raise EnsError(f"verification failed: onnxruntime differs from torch at {size} px: {message}")
        if precision == "fp16" and check.top1_agreement < FP16_MIN_TOP1_AGREEMENT:
            raise EnsError(f"fp16 verification failed at {size} px: top-1 agreement {check.top1_agreement:.0%} "
                           f"< {FP16_MIN_TOP1_AGREEMENT:.0%} (max |logit difference| {check.max_abs_diff:.2e}); "
                           "export without --fp16")
        checks.append(check)
        if cams:
            cam_checks.append((precision, _verify_cam(cam[0], cams[size], size, size == first, precision)))
    return checks, cam_checks


def _cam_note(head: CamHead, cams: Mapping[int, np.ndarray], checks: Sequence[tuple[str, float]]) -> str:
    """One line: where the CAM comes from, its grid, and its largest difference per precision."""
    size = min(cams)
    h, w = cams[size].shape[1:]
    worst = {precision: max(d for p, d in checks if p == precision) for precision, _ in checks}
    diffs = ", ".join(f"{diff:.2e} {precision}" for precision, diff in worst.items())
    largest = max(float(np.abs(c).max()) for c in cams.values())
    return (f"cam output: the top-1 class's activation map on {head.feature} ({h}x{w} at {size} px), verified "
            f"against torch at {' and '.join(f'{s} px' for s in sorted(cams))}: max |cam diff| {diffs} "
            f"(largest |cam| {largest:.3g})")


def _verify_cam(got: np.ndarray, expected: np.ndarray, size: int, first: bool, precision: str) -> float:
    """Compare onnxruntime's CAM ``(batch, h, w)`` with torch's: the largest difference, else fail."""
    scale = max(1.0, float(np.abs(expected).max()))
    bound = (FP32_CAM_MAX_DIFF if precision == "fp32" else FP16_CAM_MAX_DIFF) * scale
    if got.shape != expected.shape or got.dtype != np.float32:
        problem = f"cam output is {got.dtype} {got.shape}, torch's CAM float32 {expected.shape}"
    else:
        diff = float(np.abs(got.astype(np.float64) - expected).max())
        if diff <= bound:
            return diff
        problem = f"max |cam difference| {diff:.2e} (bound {bound:.2e}, {bound / scale:g} of the largest |cam|)"
    if precision == "fp32" and not first:
        raise _SizeMismatch(f"at {size} px the {problem}")
    raise EnsError(f"{precision} verification failed: onnxruntime's cam differs from torch's at {size} px: "
                   f"{problem}; export with --no-cam{' or without --fp16' if precision == 'fp16' else ''}")


def _fp16_headroom(graph: onnx.ModelProto, sizes: Sequence[int], batch: int) -> str:
    """Check that the float32 graph's activations on the check images stay :data:`FP16_HEADROOM`
    times below float16's largest value; a note with the largest one, else :class:`EnsError`
    naming the first layer that comes nearer.

    The fp16 graph's own check cannot see an overflow: on the CPU provider onnxruntime runs its
    convolutions in float32, so an activation past 65504, inf on a GPU, stays finite here.
    """
    from ensemble.inference.runtime import onnxruntime

    ort = onnxruntime()

    skip = set(_preprocessing_nodes(graph))
    producers = {out: node for node in graph.graph.node if node.name not in skip for out in node.output
                 if node.op_type != "Constant"}
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in producers if name not in outputs)
    options = ort.SessionOptions()
    # Unfused, so each node's output is the graph's own (a fused Conv+Relu hides the Conv's).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name in producers]
    largest = dict.fromkeys(names, 0.0)
    for size in sizes:
        images = check_images(batch, size).numpy()
        for i in range(len(images)):  # one image at a time: every activation of a batch is a lot of memory
            for name, value in zip(names, session.run(names, {INPUT_NAME: images[i:i + 1]})):
                if value.dtype.kind == "f" and value.size:
                    largest[name] = max(largest[name], float(np.abs(value.astype(np.float64)).max()))
    limit = float(np.finfo(np.float16).max)
    for name in names:  # in graph order: the first layer that comes near the limit
        if largest[name] * FP16_HEADROOM > limit:
            node = producers[name]
            raise EnsError(f"--fp16: layer {node.name or name} ({node.op_type}) reaches {largest[name]:.4g} on the "
                           f"check images, within {FP16_HEADROOM:g}x of float16's largest value ({limit:.0f}); "
                           "in float16 it would overflow to inf on a GPU: export without --fp16")
    worst = max(names, key=largest.get)
    return (f"fp16: largest activation {largest[worst]:.4g} (layer {producers[worst].name or worst}), "
            f"{limit / max(largest[worst], 1e-30):.0f}x below float16's limit")


def _preprocessing_nodes(graph: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the uint8 input and the network proper."""
    reached = {INPUT_NAME}
    names = []
    for node in graph.graph.node:  # nodes are stored in topological order
        if node.op_type in _PREPROCESS_OPS and any(i in reached for i in node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


def _to_fp16(graph: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    # The preprocessing stays float32: the converter would otherwise retype the uint8 -> float
    # Cast's output without changing the Cast (an invalid graph), and normalisation is cheap.
    named = onnx.ModelProto()
    named.CopyFrom(graph)
    for i, node in enumerate(named.graph.node):
        if not node.name:
            node.name = f"node_{i}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            named, keep_io_types=True, node_block_list=_preprocessing_nodes(named))
    try:
        onnx.checker.check_model(converted, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise EnsError(f"the fp16 graph fails onnx.checker: {first_line(exc)}") from None
    return converted


def _write(graph: onnx.ModelProto, metadata: ModelMetadata, out: Path) -> None:
    graph.producer_name = "ens"
    graph.producer_version = __version__
    del graph.metadata_props[:]
    for key, value in metadata.to_props().items():
        graph.metadata_props.add(key=key, value=value)
    with atomic_path(out) as tmp:
        onnx.save(graph, str(tmp))


__all__ = ["ExportOptions", "ExportResult", "UInt8NHWC", "export_checkpoint", "default_output_path",
           "check_images", "second_size", "IMAGENET_MEAN", "IMAGENET_STD"]
