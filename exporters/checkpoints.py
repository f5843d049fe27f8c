"""Reading checkpoints in the forms people save them, and fitting state dicts to a network.

Forms: a state dict (bare, or nested in a training-checkpoint dict under ``state_dict``,
``model``, ``model_state_dict``, ``net`` or ``ema``), a whole pickled ``nn.Module``, a
TorchScript archive, and a ``.safetensors`` file.

Unpickling can run any code the file names, so pickles are read with ``torch.load(...,
weights_only=True)``, which builds only tensors and plain containers (and the
``argparse.Namespace`` that training scripts store beside the weights). A file that pickles
anything else (a whole model, ...) is refused before any of it runs, unless the caller trusts
it (``ens export --trust-pickle``). TorchScript archives and safetensors files hold no pickled
Python code and need no trust.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ensemble.formats.common import describe
from ensemble.formats.dataset import check_regular_file
from ensemble.errors import EnsError

#: Keys under which training scripts nest the weights, in the order they are tried.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema")
#: Prefixes that wrappers add to every key: DataParallel/DDP, Lightning-style modules, torch.compile.
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")
#: Classes a checkpoint may pickle beside tensors without being trusted: plain attribute bags
#: whose unpickling runs no code (timm's and torchvision's training scripts save their args so).
SAFE_CLASSES = (argparse.Namespace,)
TRUST_OPTION = "--trust-pickle"


@dataclass
class Checkpoint:
    """What a checkpoint file holds: either tensors by name or a runnable module."""

    path: Path
    kind: str  #: "state_dict", "module" or "torchscript"
    state_dict: Mapping[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    found_under: str | None = None  #: the nesting key the weights came from, if any
    notes: list[str] = field(default_factory=list)
    #: The training-checkpoint dict the weights were nested in (epoch, args, ...), if any.
    container: Mapping[str, object] | None = None


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False,
                    weights_key: str | None = None) -> Checkpoint:
    """Open ``path`` and classify what it holds; raise :class:`EnsError` if it is no checkpoint.

    ``trust_pickle``: also unpickle Python objects beyond tensors (a whole model), which runs
    code named in the file; without it such a file is refused before anything in it runs.
    ``weights_key``: the entry of a checkpoint dict that holds the weights (``state_dict_ema``,
    ...); by default the first of :data:`NESTED_KEYS` present.
    """
    path = check_regular_file(path)  # a FIFO or device is refused, never read (it could block)
    if path.stat().st_size == 0:
        raise EnsError(f"{path}: empty file, not a checkpoint")
    if path.suffix == ".safetensors":
        _no_weights_key(path, weights_key, "a safetensors file, one flat set of weights")
        return Checkpoint(path, "state_dict", state_dict=_load_safetensors(path))
    if _is_torchscript(path):
        _no_weights_key(path, weights_key, "a TorchScript archive")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, still supported in 2.14
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise EnsError(f"{path}: unreadable TorchScript archive ({describe(exc, 200)})") from None
        return Checkpoint(path, "torchscript", module=module.eval())
    obj, notes = _torch_load(path, trust_pickle)
    checkpoint = _classify(path, obj) if weights_key is None else _take_key(path, obj, weights_key)
    checkpoint.notes[:0] = notes
    if isinstance(obj, Mapping) and checkpoint.found_under is not None:
        checkpoint.container = obj
        checkpoint.notes.append(f"weights taken from the checkpoint's {checkpoint.found_under!r} entry")
        if weights_key is None:
            checkpoint.notes.extend(_ema_notes(obj, checkpoint.found_under))
    return checkpoint


def _no_weights_key(path: Path, weights_key: str | None, what: str) -> None:
    if weights_key is not None:
        raise EnsError(f"--weights-key {weights_key}: {path} is {what}, not a dict of entries")


def _take_key(path: Path, obj: object, key: str) -> Checkpoint:
    """The weights under ``obj[key]`` (``--weights-key``)."""
    if not isinstance(obj, Mapping) or _is_state_dict(obj):
        what = "a bare state_dict" if _is_state_dict(obj) else _a(type(obj).__name__)
        raise EnsError(f"--weights-key {key}: {path} holds {what}, not a checkpoint dict of entries")
    if key not in obj:
        keys = ", ".join(map(str, list(obj)[:12]))
        raise EnsError(f"--weights-key {key}: {path} has no such entry (it has {keys})")
    inner = obj[key]
    if isinstance(inner, nn.Module):
        return Checkpoint(path, "module", module=inner.eval(), found_under=key)
    if _is_state_dict(inner):
        return Checkpoint(path, "state_dict", state_dict=inner, found_under=key)
    raise EnsError(f"--weights-key {key}: {path}'s {key!r} entry holds {_a(type(inner).__name__)}, not weights")


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a list"."""
    return f"{'an' if noun[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'} {noun}"


def _ema_notes(obj: Mapping, taken: str) -> list[str]:
    """A note for each other entry of EMA weights (``state_dict_ema``, ``model_ema``) beside the
    ones taken: the plain weights are the default, as timm's validate.py loads them."""
    notes = []
    for key, value in obj.items():
        if key != taken and isinstance(key, str) and "ema" in key.lower().split("_") and (
                _is_state_dict(value) or isinstance(value, nn.Module)):
            notes.append(f"also holds {key} (EMA weights): took {taken}, as timm's validate.py does; "
                         f"--weights-key {key} takes the EMA")
    return notes


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise EnsError(f"{path}: not a safetensors file ({describe(exc, 200)})") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # torch.save archives hold <root>/data.pkl; TorchScript ones add <root>/constants.pkl and code/.
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torch_load(path: Path, trust_pickle: bool) -> tuple[object, list[str]]:
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names each class or function it refuses to import:
        # "Unsupported global: GLOBAL torchvision.models.resnet.ResNet", "... GLOBAL posix.system".
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused is None:
            raise EnsError(f"{path}: not a PyTorch checkpoint ({_unpickler_reason(exc)})") from None
    except Exception as exc:
        raise EnsError(f"{path}: not a PyTorch checkpoint ({describe(exc, 200)})") from None
    # The file pickles more than tensors and plain containers: a whole nn.Module, or objects
    # of other classes. Unpickling it runs code named in the file.
    if not trust_pickle:
        raise EnsError(f"{path}: holds pickled code objects ({_pickled_classes(path, refused.group(1))}); loading "
                       f"it runs code from the file: pass {TRUST_OPTION} only for checkpoints you trust")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise EnsError(
            f"{path}: cannot unpickle it, a class it needs is not importable ({describe(exc, 200)}); "
            "save a state_dict instead and pass --arch"
        ) from None
    except Exception as exc:
        raise EnsError(f"{path}: not a PyTorch checkpoint ({describe(exc, 200)})") from None
    return obj, [f"loaded with {TRUST_OPTION}: unpickling ran code from the file"]


_REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler met, without torch's paragraph about ``weights_only``."""
    _, marker, rest = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if marker else []
    return lines[0][:200] if lines else describe(exc, 200)


def _pickled_classes(path: Path, first: str, shown: int = 3) -> str:
    """What a refused pickle names, read from its opcodes without running any of it:
    ``a whole model: torchvision.models.resnet.ResNet, ...`` or ``posix.system``.
    ``first``: the name the unpickler stopped at (all a legacy, not zip, file tells)."""
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) | {first}
    except Exception:  # the legacy format (before torch 1.6), which it cannot read
        names = {first}
    # The project's own classes first: torch's layers say little about what the file is.
    ordered = sorted(names, key=lambda name: (name.startswith("torch."), name))
    text = ", ".join(ordered[:shown]) + (f", +{len(ordered) - shown} more" if len(ordered) > shown else "")
    if any(name.startswith("torch.nn.modules.") for name in names):
        return f"a whole model: {text}"
    return text


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _classify(path: Path, obj: object) -> Checkpoint:
    if isinstance(obj, nn.Module):
        return Checkpoint(path, "module", module=obj.eval())
    if _is_state_dict(obj):
        return Checkpoint(path, "state_dict", state_dict=obj)
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return Checkpoint(path, "module", module=inner.eval(), found_under=key)
            if _is_state_dict(inner):
                return Checkpoint(path, "state_dict", state_dict=inner, found_under=key)
        keys = ", ".join(map(str, list(obj)[:8]))
        ema = [key for key, value in obj.items() if isinstance(key, str) and "ema" in key.lower().split("_")
               and (_is_state_dict(value) or isinstance(value, nn.Module))]
        hint = (f"; it holds EMA weights under {ema[0]!r}: pass --weights-key {ema[0]} to export them"
                if ema else "")
        raise EnsError(
            f"{path}: a dict with keys [{keys}] but no weights under any of {', '.join(NESTED_KEYS)}{hint}"
        )
    raise EnsError(f"{path}: holds {_a(type(obj).__name__)}, not a state_dict, model or training checkpoint")


def _prefix_variants(keys: list[str]) -> list[tuple[str, ...]]:
    """Successive wrapper prefixes shared by every key, e.g. ('_orig_mod.', 'module.')."""
    variants: list[tuple[str, ...]] = [()]
    current = keys
    while True:
        prefix = next((p for p in KEY_PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if prefix is None:
            return variants
        current = [k[len(prefix):] for k in current]
        variants.append(variants[-1] + (prefix,))


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], target_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove wrapper prefixes so that the keys match ``target_keys`` best.

    Prefixes are stripped only when every key has them, and only as far as it makes more keys
    match the network (a network whose own keys start with ``model.`` keeps them). Returns the
    new dict and the prefix removed ("" when none).
    """
    keys = list(state_dict)
    best, best_overlap = (), -1
    for variant in _prefix_variants(keys):
        n = len("".join(variant))
        overlap = sum(k[n:] in target_keys for k in keys)
        if overlap > best_overlap:
            best, best_overlap = variant, overlap
    prefix = "".join(best)
    stripped = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
    # torch.save keeps per-module versions in the dict's `_metadata` (MNASNet's loader needs
    # them); they are keyed by module path, so strip the same prefix there.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (key[len(prefix):] if key.startswith(prefix) else "", value)
            for key, value in metadata.items()
            if key.startswith(prefix) or key == prefix[:-1] or not prefix)
    return stripped, prefix


def with_module_versions(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Mapping[str, torch.Tensor]:
    """``state_dict`` carrying per-module versions: its own where saved, else the model's.

    Files that lose ``_metadata`` (safetensors, dicts rebuilt by training scripts) would
    otherwise make loaders that check versions (MNASNet) refuse the weights.
    """
    versions = OrderedDict(getattr(model.state_dict(), "_metadata", {}))
    versions.update(getattr(state_dict, "_metadata", {}) or {})
    result = OrderedDict(state_dict)
    result._metadata = versions  # type: ignore[attr-defined]
    return result


def fit_report(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """One line naming the keys and shapes that keep ``state_dict`` from loading strictly, or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (checkpoint vs model)", shapes)):
        if items:
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            parts.append(f"{label}: {', '.join(items[:4])}{more}")
    return "; ".join(parts) or None
