"""timm (PyTorch Image Models) networks: the right model and preprocessing with no flags.

Three forms name a timm network:

- a checkpoint of timm's ``train.py``: a dict with ``state_dict`` (and ``state_dict_ema`` with
  ``--model-ema``), ``epoch``, ``arch``, ``version`` and ``args``, the run's
  ``argparse.Namespace``, whose ``model`` names the network (:func:`train_args`);
- ``--arch timm/NAME`` or ``--arch timm/NAME.TAG`` for a bare state dict or ``.safetensors``
  file: the tag selects that pretrained configuration (:func:`spec_from_arch`);
- a Hugging Face-style folder, as timm's ``save_for_hf`` / ``push_to_hub`` write it:
  ``config.json`` (``architecture``, ``num_classes``, ``pretrained_cfg``, ``model_args``) beside
  ``model.safetensors`` or ``pytorch_model.bin`` (:func:`read_folder`).

Each preprocessing value (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_mode``
-> ``resize``, ``crop_pct``) is taken from the first of: the command line, the checkpoint's
``args`` (or the folder's ``pretrained_cfg``), timm's pretrained config for the model or tag,
timm's defaults (what ``timm.data.resolve_data_config`` falls back to); one note per value names
its source (:func:`resolve_preprocessing`). The train size is taken, as timm's model cards and
``resolve_model_data_config`` do; a ``test_input_size`` of the config is named in the note.

The checkpoint's ``args`` and the folder's ``config.json`` are data: every value used is
checked for its type and range, and a wrong one is one line naming the file and the key.
Models are always built with ``pretrained=False``: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensemble.errors import EnsError
from ensemble.formats.common import describe, is_count, is_finite, read_json
from ensemble.formats.model import (IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, MAX_INPUT_SIZE,
                                    MIN_INPUT_SIZE, rgb_text)

#: ``--arch timm/NAME[.TAG]``.
ARCH_PREFIX = "timm/"
INSTALL_HINT = "pip install 'ens[timm]'"
#: Weight files of a Hugging Face-style folder, in the order timm itself prefers them.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FOLDER_CONFIG = "config.json"
#: timm's crop modes -> ens's resize policies; ``border`` (pad to a square) has none.
CROP_MODES = {"center": "center-crop", "squash": "squash", "border": None}
#: The preprocessing values resolved, in the order their notes are printed.
KEYS = ("input_size", "mean", "std", "interpolation", "resize", "crop_pct")
#: ``train.py`` options that change the network's structure or numerics, -> create_model keywords.
_STRUCTURE_ARGS = {"gp": "global_pool", "bn_eps": "bn_eps"}
#: create_model's own parameters: where the weights come from and how layers are configured. Keywords
#: read from a file never set them (``checkpoint_path`` would load another file, ``pretrained``
#: download); ens sets ``pretrained=False, exportable=True`` itself.
RESERVED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                   "scriptable", "exportable", "no_jit")


def import_timm(label: str):
    """The timm module, or the one line saying which extra installs it."""
    try:
        import timm
        import timm.data  # noqa: F401
        import timm.models  # noqa: F401
    except ImportError:
        raise EnsError(f"ens export needs timm for this checkpoint ({label}): {INSTALL_HINT}") from None
    return timm


def is_timm_arch(arch: str | None) -> bool:
    return arch is not None and arch.startswith(ARCH_PREFIX)


@dataclass(frozen=True)
class Source:
    """Values in ens's form (``input_size`` an int, ``mean`` three floats, ...) and where they came from."""

    label: str  #: for notes: "the checkpoint's args", "--mean", "timm's config of resnet18.a1_in1k"
    values: Mapping[str, Any]
    #: Prefix naming the file and key in messages ("c.pth: args.", "m/config.json: pretrained_cfg."):
    #: the key is appended. Empty: "LABEL: ".
    where: str = ""

    def at(self, key: str) -> str:
        """``where`` + ``key``: "c.pth: args.interpolation"; a command-line option names itself."""
        if self.label.startswith("--"):
            return self.label
        return f"{self.where or self.label + ': '}{key}"


@dataclass
class TimmSpec:
    """A timm network to build, and what its checkpoint or folder says about it."""

    name: str  #: the model's name in timm's registry, without tag
    tag: str | None  #: the pretrained tag whose config applies (None: timm's default tag)
    kwargs: dict[str, Any] = field(default_factory=dict)  #: further create_model keywords
    kwargs_from: str = ""  #: where ``kwargs`` were read, for messages ("c.pth: args.model_kwargs")
    given: Source | None = None  #: the checkpoint's args or the folder's pretrained_cfg
    num_classes: tuple[int, str] | None = None  #: (value, source) from args / config.json
    notes: list[str] = field(default_factory=list)
    #: Where a file named the tag ("c.pth: args.model"); empty: --arch named it. A file's tag that
    #: this timm lacks falls back to the model's default config (timm loads such a folder too).
    tag_from: str = ""

    @property
    def label(self) -> str:
        return f"{ARCH_PREFIX}{self.name}" + (f".{self.tag}" if self.tag else "")


# ------------------------------------------------------------------------------------------
# The three forms

#: Entries only timm's ``CheckpointSaver`` writes (torchvision's reference script: ``model``, ``args``).
TRAIN_KEYS = ("state_dict", "state_dict_ema", "arch")


def train_args(container: Mapping[str, Any] | None) -> argparse.Namespace | None:
    """The ``args`` of a timm ``train.py`` checkpoint dict, or None when it is not one.

    timm's ``CheckpointSaver`` writes ``state_dict`` (``state_dict_ema`` with ``--model-ema``),
    ``arch`` (= ``args.model``) and ``args``; torchvision's reference script writes ``model`` and
    ``args`` instead, so one of :data:`TRAIN_KEYS` beside an ``args`` naming a ``model`` is what
    tells them apart, whichever entry the weights were taken from (``--weights-key``).
    """
    if not isinstance(container, Mapping) or not any(key in container for key in TRAIN_KEYS):
        return None
    args = container.get("args")
    if isinstance(args, argparse.Namespace) and "model" in vars(args):
        return args
    return None


def spec_from_arch(arch: str) -> TimmSpec:
    """``timm/NAME`` or ``timm/NAME.TAG`` -> the spec; the name is checked against timm's registry."""
    text = arch[len(ARCH_PREFIX):]
    if not text:
        raise EnsError(f"--arch {arch}: name the timm model, e.g. --arch timm/resnet50 or "
                       "--arch timm/convnext_tiny.fb_in22k_ft_in1k")
    name, tag = _split_tag(text)
    if not name or "/" in text:
        problem = "the model name before its '.' is empty" if not name else f"{text!r} contains '/'"
        raise EnsError(f"--arch {arch}: {problem}; expected timm/NAME or timm/NAME.TAG, e.g. timm/resnet50 "
                       "or timm/convnext_tiny.fb_in22k_ft_in1k")
    return TimmSpec(name=_check_name(name, f"--arch {arch}"), tag=tag)


def spec_from_train_args(args: argparse.Namespace, path: Path, named: TimmSpec | None = None) -> TimmSpec:
    """What a timm ``train.py`` run's ``args`` say: the model, the structure keywords, the
    preprocessing and the number of classes it was trained with. ``named``: the network
    ``--arch timm/...`` names instead of ``args.model`` (which is then not read)."""
    values = vars(args)
    where = f"{path}: args."
    model = values.get("model")
    if named is not None:
        spec = TimmSpec(name=named.name, tag=named.tag)
        if model != named.name and (not isinstance(model, str) or model.partition(".")[0] != named.name):
            spec.notes.append(f"--arch {named.label} overrides the checkpoint's args.model {shown(model)}")
            _structure_args(spec, {}, where)  # another network's build keywords do not apply
            spec.given, spec.num_classes = _data_args(values, where)
            return spec
    else:
        if not isinstance(model, str) or not model.strip():
            raise EnsError(f"{where}model {shown(model)}: expected the name of a timm model")
        name, tag = _split_tag(_registry_name(model.strip(), f"{where}model {model!r}"))
        spec = TimmSpec(name=_check_name(name, f"{where}model {model!r}"), tag=tag, tag_from=f"{where}model")
    _structure_args(spec, values, where)
    spec.given, spec.num_classes = _data_args(values, where)
    return spec


def _structure_args(spec: TimmSpec, values: Mapping[str, Any], where: str) -> None:
    """The build keywords of train.py's args (``gp``, ``bn_eps``, ``model_kwargs``) into ``spec``."""
    for key, keyword in _STRUCTURE_ARGS.items():
        value = values.get(key)
        if value is None or value == "":
            continue
        if keyword == "global_pool" and not isinstance(value, str):
            raise EnsError(f"{where}{key} {shown(value)}: expected a pooling type such as 'avg'")
        if keyword == "bn_eps" and not (is_finite(value) and value > 0):
            raise EnsError(f"{where}{key} {shown(value)}: expected a positive number")
        spec.kwargs[keyword] = value
    extra = values.get("model_kwargs")
    if extra:
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise EnsError(f"{where}model_kwargs {shown(extra)}: expected a dict of keyword arguments")
        spec.kwargs.update(extra)
    spec.kwargs_from = f"{where}model_kwargs"


def _data_args(values: Mapping[str, Any], where: str) -> tuple[Source, tuple[int, str] | None]:
    """The preprocessing and number of classes train.py's args were set to."""
    given = Source("the checkpoint's args", _preprocess_values(values, where, _channels(values, where),
                                                               from_args=True), where)
    num_classes = values.get("num_classes")
    if num_classes is None:
        return given, None
    if not is_count(num_classes, 1):
        raise EnsError(f"{where}num_classes {shown(num_classes)}: expected a positive integer")
    return given, (num_classes, "the checkpoint's args")


def read_folder(folder: Path) -> tuple[TimmSpec, Path]:
    """A Hugging Face-style folder -> the spec its ``config.json`` describes, and its weights file."""
    config_path = folder / FOLDER_CONFIG
    if not config_path.exists():
        raise EnsError(f"{folder}: a folder without {FOLDER_CONFIG}; name a checkpoint file, or a Hugging "
                       f"Face-style folder ({FOLDER_CONFIG} beside {' or '.join(FOLDER_WEIGHTS)}) as timm's "
                       "save_for_hf writes it")
    label = f"{folder.resolve().name}/{FOLDER_CONFIG}"  # "." names the folder it stands for
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise EnsError(f"{config_path}: expected a JSON object with architecture, num_classes, pretrained_cfg")
    config = dict(config)
    if "pretrained_cfg" not in config:  # timm's legacy layout: one flat dict (timm reads it so too)
        pretrained_cfg: Any = {k: v for k, v in config.items() if k not in ("num_classes", "model_args")}
        key_prefix = ""
    else:
        pretrained_cfg, key_prefix = config["pretrained_cfg"], "pretrained_cfg."
        if not isinstance(pretrained_cfg, dict):
            raise EnsError(f"{config_path}: pretrained_cfg {shown(pretrained_cfg)}: expected a JSON object")
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture.strip():
        raise EnsError(f"{config_path}: architecture {shown(architecture)}: expected the name of a timm model")
    name, tag = _split_tag(architecture.strip())
    tag_from = f"{config_path}: architecture"
    cfg_tag = pretrained_cfg.get("tag")
    if tag is None and cfg_tag is not None:
        if not isinstance(cfg_tag, str):
            raise EnsError(f"{config_path}: {key_prefix}tag {shown(cfg_tag)}: expected a string")
        tag, tag_from = cfg_tag or None, f"{config_path}: {key_prefix}tag"
    spec = TimmSpec(name=_check_name(name, f"{config_path}: architecture {architecture!r}"), tag=tag,
                    tag_from=tag_from)
    model_args = config.get("model_args")
    if model_args is not None:
        if not isinstance(model_args, dict):
            raise EnsError(f"{config_path}: model_args {shown(model_args)}: expected a JSON object")
        _channels(model_args, f"{config_path}: model_args.")
        spec.kwargs.update(model_args)
        spec.kwargs_from = f"{config_path}: model_args"
    where = f"{config_path}: {key_prefix}"
    spec.given = Source(label, _preprocess_values(pretrained_cfg, where, _channels(pretrained_cfg, where)), where)
    num_classes = config.get("num_classes", spec.kwargs.get("num_classes", pretrained_cfg.get("num_classes")))
    if num_classes is not None:
        if not is_count(num_classes, 1):
            raise EnsError(f"{config_path}: num_classes {shown(num_classes)}: expected a positive integer")
        spec.num_classes = (num_classes, label)
    present = [folder / n for n in FOLDER_WEIGHTS if (folder / n).exists()]
    if not present:
        raise EnsError(f"{folder}: no weights beside {FOLDER_CONFIG} (expected {' or '.join(FOLDER_WEIGHTS)})")
    for other in present[1:]:
        spec.notes.append(f"also holds {other.name}: took {present[0].name}, as timm does")
    return spec, present[0]


def _registry_name(model: str, where: str) -> str:
    """train.py's ``--model`` as timm's registry names it: ``hf-hub:timm/NAME.TAG`` (a run
    fine-tuned from timm's own Hub weights) is ``NAME.TAG``, whose config timm's registry holds;
    any other Hub repo or local folder needs its config.json, which ens does not download."""
    source, colon, rest = model.partition(":")
    if not colon:
        return model
    if source.lower() in ("hf-hub", "hf_hub"):
        org, slash, name = rest.partition("/")
        if slash and org == "timm" and name:
            return name.partition("@")[0]
    raise EnsError(f"{where}: names a model by its Hugging Face Hub repo or folder, whose config.json ens "
                   "does not fetch; pass --arch timm/NAME[.TAG] with its config.json's architecture, or "
                   "export the downloaded folder")


def _split_tag(text: str) -> tuple[str, str | None]:
    name, dot, tag = text.partition(".")
    return name, (tag if dot and tag else None)


def _check_name(name: str, where: str) -> str:
    timm = import_timm(f"{ARCH_PREFIX}{name}")
    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name.lower().replace("-", "_"), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EnsError(f"{where}: timm {timm.__version__} has no model {name!r}{hint}")
    return name


def shown(value: Any, limit: int = 60) -> str:
    """A value from a file as messages show it: its repr, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------
# Reading timm's data-config values (checkpoint args, config.json, timm's own configs)

def _channels(values: Mapping[str, Any], where: str) -> int:
    """The input channels the values describe (``input_size[0]``, else ``in_chans``); ens's
    graphs take RGB images, so anything but 3 is refused."""
    size = values.get("input_size")
    key = "input_size" if isinstance(size, (list, tuple)) and len(size) == 3 else "in_chans"
    channels = size[0] if key == "input_size" else values.get("in_chans")
    if channels is None:
        return 3
    if channels != 3 or not is_count(channels):
        raise EnsError(f"{where}{key} {shown(values.get(key))}: ens exports models of RGB images (3 channels)")
    return 3


def _preprocess_values(values: Mapping[str, Any], where: str, channels: int, from_args: bool = False) -> dict:
    """timm's data-config values (as ``train.py``'s args or a pretrained_cfg hold them) in ens's
    form, keeping only those that are set; ``where`` + key names a wrong one."""
    out: dict[str, Any] = {}
    size = values.get("input_size")
    if size is not None:
        out["input_size"] = _square(size[1:] if isinstance(size, (list, tuple)) and len(size) == 3 else None,
                                    size, f"{where}input_size", "(channels, height, width)")
    elif from_args and values.get("img_size") is not None:
        image = values["img_size"]
        out["input_size"] = _square(image if isinstance(image, (list, tuple)) else (image, image), image,
                                    f"{where}img_size", "a size in pixels")
    if values.get("test_input_size") is not None and not from_args:
        test = values["test_input_size"]
        out["test_input_size"] = _square(test[1:] if isinstance(test, (list, tuple)) and len(test) == 3 else None,
                                         test, f"{where}test_input_size", "(channels, height, width)")
    for key in ("mean", "std"):
        if values.get(key) is not None:
            out[key] = _rgb(values[key], f"{where}{key}", key, channels)
    # timm reads an empty interpolation or crop mode, and a crop_pct of 0, as not set.
    if values.get("interpolation"):
        value = values["interpolation"]
        if not isinstance(value, str):
            raise EnsError(f"{where}interpolation {shown(value)}: expected a name such as 'bicubic'")
        out["interpolation"] = value
    if values.get("crop_mode"):
        value = values["crop_mode"]
        if value not in CROP_MODES:
            raise EnsError(f"{where}crop_mode {shown(value)}: expected one of {', '.join(CROP_MODES)}")
        out["crop_mode"] = value
    for key in ("crop_pct",) if from_args else ("crop_pct", "test_crop_pct"):
        value = values.get(key)
        if value is None or value == 0:
            continue
        if not (is_finite(value) and 0 < value <= 1):
            raise EnsError(f"{where}{key} {shown(value)}: expected a fraction in (0, 1]")
        out[key] = float(value)
    return out


def _square(pair: Any, value: Any, where: str, expected: str) -> int:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(is_count(v, 1) for v in pair)):
        raise EnsError(f"{where} {shown(value)}: expected {expected}")
    height, width = pair
    if height != width:
        raise EnsError(f"{where} {shown(value)}: ens exports square inputs, this is {height}x{width}; "
                       "pass --input-size")
    if not MIN_INPUT_SIZE <= height <= MAX_INPUT_SIZE:
        raise EnsError(f"{where} {shown(value)}: expected {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} pixels")
    return int(height)


def _rgb(value: Any, where: str, key: str, channels: int) -> tuple[float, float, float]:
    if not (isinstance(value, (list, tuple)) and all(is_finite(v) for v in value) and len(value) in (1, channels)):
        raise EnsError(f"{where} {shown(value)}: expected {channels} numbers (or one for all channels)")
    rgb = tuple(float(v) for v in value) * (channels if len(value) == 1 else 1)
    if any(not 0 <= v <= 1 for v in rgb) or (key == "std" and any(v <= 0 for v in rgb)):
        raise EnsError(f"{where} {shown(value)}: expected fractions of 255 in {'(0, 1]' if key == 'std' else '[0, 1]'}")
    return rgb  # type: ignore[return-value]


def registry_source(spec: TimmSpec) -> tuple[Source, dict]:
    """timm's pretrained config for the model (its default tag) or the spec's tag, in ens's form,
    and the raw config. An unknown tag named by ``--arch`` is one line naming the known ones; one
    named by a file (a folder or train.py's args, perhaps from a newer timm) falls back to the
    model's default config, with a note, as timm itself builds such a folder: the spec's tag is
    then dropped (the network is built by its name)."""
    timm = import_timm(spec.label)
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(f"{spec.name}.{spec.tag}" if spec.tag else spec.name)
    except RuntimeError:  # an unknown tag
        if not spec.tag_from:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{spec.name}.*")]
            raise EnsError(f"{spec.label}: timm {timm.__version__} has no pretrained tag {spec.tag!r} for "
                           f"{spec.name} (it has {', '.join(tags[:8]) or 'none'}"
                           f"{', ...' if len(tags) > 8 else ''})") from None
        cfg = get_pretrained_cfg(spec.name)
        default = f"{spec.name}.{cfg.tag}" if cfg is not None and cfg.tag else spec.name
        given = spec.given.label if spec.given is not None else "the file"
        spec.notes.append(f"timm {timm.__version__} has no tag {spec.tag!r} ({spec.tag_from}): values from "
                          f"{given}, the rest from timm's config of {default}")
        spec.tag = None
    if cfg is None:  # a model without any pretrained config: timm's defaults apply
        return Source("timm's defaults", {}), {}
    raw = cfg.to_dict()
    label = f"timm's config of {cfg.architecture or spec.name}" + (f".{cfg.tag}" if cfg.tag else "")
    return Source(label, _preprocess_values(raw, f"{label}: ", 3)), raw


# ------------------------------------------------------------------------------------------
# Preprocessing

@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    crop_pct: float
    interpolation: str
    #: Each value's source, as the notes name it (timm networks); None: not resolved by sources.
    sources: Mapping[str, str] | None = None


def timm_defaults() -> Source:
    """What ``timm.data.resolve_data_config`` uses when nothing else says."""
    from timm.data.constants import DEFAULT_CROP_MODE, DEFAULT_CROP_PCT

    return Source("timm's defaults", {"input_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                      "interpolation": "bicubic", "crop_mode": DEFAULT_CROP_MODE,
                                      "crop_pct": DEFAULT_CROP_PCT})


def resolve_preprocessing(command_line: Mapping[str, Any], given: Source | None,
                          registry: Source) -> tuple[Preprocessing, list[str]]:
    """Each value from the first source that sets it: the command line (``--mean``, ...), the
    checkpoint's args or folder's config, timm's config for the model, timm's defaults.
    Returns the values and one note per value naming its source."""
    cli = {key: Source(f"--{key.replace('_', '-')}", {key: value})
           for key, value in command_line.items() if value is not None}
    sources = [s for s in (given, registry, timm_defaults()) if s is not None]

    def pick(key: str) -> tuple[Any, Source]:
        if key in cli:
            return cli[key].values[key], cli[key]
        return next((s.values[key], s) for s in sources if key in s.values)

    chosen = {key: pick(key) for key in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    interpolation, source = chosen["interpolation"]
    if interpolation not in INTERPOLATIONS:
        raise EnsError(f"{source.at('interpolation')} {shown(interpolation)} is not one ens resizes with "
                       f"({', '.join(INTERPOLATIONS)}); pass --interpolation")
    crop_pct, crop_source = chosen["crop_pct"]
    if "resize" in cli:
        chosen["resize"] = (cli["resize"].values["resize"], cli["resize"])
        resize_note = f"resize {chosen['resize'][0]} from --resize"
    else:
        mode, source = pick("crop_mode")
        resize = CROP_MODES[mode]
        if resize is None:
            raise EnsError(f"{source.at('crop_mode')} {mode!r} is not supported (it pads the image to a square, "
                           "which ens's resize policies do not); pass --resize center-crop or --resize squash")
        if resize == "squash" and crop_pct != 1.0:
            raise EnsError(f"{source.at('crop_mode')} 'squash' with crop_pct {crop_pct:g} "
                           f"(from {crop_source.at('crop_pct')}) is not supported: ens's squash resizes the whole image "
                           "to the input size, as timm's does at crop_pct 1; pass --crop-pct 1, or --resize "
                           "center-crop (docs/export.md: timm)")
        chosen["resize"] = (resize, source)
        resize_note = f"resize {resize} from {source.label} (crop_mode {mode})"
    notes = []
    for key in KEYS:
        value, source = chosen[key]
        text = rgb_text(value) if key in ("mean", "std") else f"{value:g}" if key == "crop_pct" else value
        note = resize_note if key == "resize" else f"{key} {text} from {source.label}"
        test = source.values.get("test_input_size")
        if key == "input_size" and source is not cli.get(key) and test is not None and test != value:
            test_crop = source.values.get("test_crop_pct")
            flags = f"--input-size {test}" + (f" --crop-pct {test_crop:g}" if test_crop else "")
            note += f" (timm's validate.py evaluates at its test_input_size {test}: {flags})"
        notes.append(note)
    values = {key: chosen[key][0] for key in KEYS}
    values["mean"] = tuple(float(v) for v in values["mean"])
    values["std"] = tuple(float(v) for v in values["std"])
    values["crop_pct"] = float(values["crop_pct"])
    sources = {key: chosen[key][1].label for key in KEYS}
    return Preprocessing(**values, sources=sources), notes


# ------------------------------------------------------------------------------------------
# Building the network

def build(spec: TimmSpec, state_dict: Mapping[str, torch.Tensor], source: Path, *, num_classes: int | None,
          input_size: int, registry_cfg: Mapping[str, Any], extra_kwargs: Mapping[str, Any],
          notes: list[str]) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Build ``spec`` with ``timm.create_model(pretrained=False, exportable=True)`` for the
    classes of its weights and the input size resolved; return the network, the weights fitted
    to it (prefixes removed) and the keywords it was built with (for the metadata)."""
    from exporters.checkpoints import strip_prefixes

    timm = import_timm(spec.label)
    for origin, given in ((spec.kwargs_from, spec.kwargs), ("--arch-kwargs", extra_kwargs)):
        reserved = [k for k in RESERVED_KWARGS if k in given]
        if reserved:
            raise EnsError(f"{origin}: {reserved[0]} is not passed to timm.create_model (ens builds with "
                           "pretrained=False, exportable=True and loads the checkpoint's own weights)")
    kwargs = {**spec.kwargs, **extra_kwargs}  # --arch-kwargs over the checkpoint's own
    kwargs.pop("num_classes", None)  # settled below, from the weights and what the files claim
    cfg_size = registry_cfg.get("input_size")
    fixed = (registry_cfg.get("fixed_input_size", False) and not kwargs.get("dynamic_img_size", False)
             and kwargs.get("strict_img_size", True))
    if fixed and "img_size" not in kwargs and cfg_size is not None and tuple(cfg_size[1:]) != (input_size, input_size):
        # A fixed-size network (a ViT's position embeddings) is built for the size it runs at, as
        # timm's train.py does for --img-size.
        kwargs["img_size"] = input_size
    name = f"{spec.name}.{spec.tag}" if spec.tag else spec.name

    def create(classes: int | None) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, exportable=True, num_classes=classes, **kwargs)
        except Exception as exc:  # timm's builders check their arguments with TypeError, AssertionError, ...
            listed = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            where = f"{spec.kwargs_from} {shown(spec.kwargs)}: " if spec.kwargs and spec.kwargs_from else ""
            raise EnsError(f"{where}{spec.label}: timm cannot build it{f' with {listed}' if listed else ''} "
                           f"({describe(exc, 200)})") from None

    try:
        with torch.device("meta"):  # key names and the head only: no memory, no init
            probe = create(None)
    except EnsError:
        probe = create(None)
    target = probe.state_dict()
    state_dict, prefix = strip_prefixes(state_dict, set(target))
    if prefix:
        notes.append(f"removed the key prefix {prefix!r}")
    head_key = _head_key(probe, registry_cfg)
    head = state_dict.get(head_key) if head_key else None
    found = None
    if head is not None and head.ndim >= 1 and head_key in target:
        expected = tuple(target[head_key].shape[1:])
        if tuple(head.shape[1:]) != expected:
            raise EnsError(f"{source}: {head_key} has shape {tuple(head.shape)}, but {spec.label}'s classifier "
                           f"takes {expected[0] if expected else 0} inputs: is it the right model?")
        found = int(head.shape[0])
    claims = [(n, s) for n, s in ((num_classes, "--num-classes"),
                                  spec.num_classes or (None, "")) if n is not None]
    for claimed, where in claims:
        if found is not None and claimed != found:
            raise EnsError(f"{source}: num_classes {claimed} (from {where}) contradicts the classifier "
                           f"{head_key}, which has {found} rows")
    if claims:
        classes, where = claims[0]
    elif found is not None:
        classes, where = found, f"the classifier weights ({head_key})"
    else:
        classes, where = registry_cfg.get("num_classes") or 1000, "timm's config"
    from exporters.onnx_export import MAX_CLASSES

    if classes > MAX_CLASSES:
        raise EnsError(f"{source}: {classes:,} classes is implausible (ens exports at most {MAX_CLASSES:,}); "
                       "is it the right file?")
    notes.insert(0, f"num_classes {classes} from {where}")
    return create(classes), state_dict, kwargs


def _head_key(probe: nn.Module, registry_cfg: Mapping[str, Any]) -> str | None:
    """The classifier's weight key: timm's config names the layer (a tuple for distilled
    heads: the first is the class head)."""
    classifier = getattr(probe, "pretrained_cfg", {}).get("classifier") or registry_cfg.get("classifier")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0] if classifier else None
    if not isinstance(classifier, str):
        return None
    return f"{classifier}.weight"


def json_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The build keywords as the metadata stores them (JSON: tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            return value
        return repr(value)
    return {str(k): plain(v) for k, v in kwargs.items()}


__all__ = ["ARCH_PREFIX", "INSTALL_HINT", "Preprocessing", "Source", "TimmSpec", "build", "import_timm",
           "is_timm_arch", "read_folder", "registry_source", "resolve_preprocessing", "spec_from_arch",
           "spec_from_train_args", "train_args", "json_kwargs"]
