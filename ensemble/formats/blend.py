"""The blend record, ``blend.json``: what `ens blend` fitted, and everything needed to apply it
again and to check what it is applied to.

Fields: method, members, weights, temperatures, the CV table, the sha256 of every input store,
the label source, each model's provenance (model file sha256, preprocessing, TTA views and
merge) and the long-tail prior correction (the prior file's sha256, the class counts, tau).
`ens blend --weights` re-applies it, to stores made the same way only; `ens report`, `ens
submit` and the ledger read it. This module is its one reader and checker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import weights_search as ws
from ensemble.errors import EnsError
from ensemble.formats.store import LogitStore

BLEND_FILE = "blend.json"


#: 2: per-model provenance, checked against every applied store; 3: the prior correction (an older
#: ens would apply a blend.json without it, silently).
FORMAT_VERSION = 3


#: The fields two stores of one member must share (``manifest.json`` keys), as the error names
#: them. The stored dtype may differ: float16 and float32 stores of one run blend alike.
PROVENANCE_FIELDS = {
    "model_sha256": "model file sha256",
    "input_size": "input size",
    "resize": "resize policy",
    "crop_pct": "crop fraction",
    "mean": "mean",
    "std": "std",
    "interpolation": "interpolation",
    "views": "TTA views",
    "merge": "TTA merge",
    "cam": "cam view settings",
    "pixels": "pixel pipeline version",
}


#: Fields a record of an older ens may lack, and what they read as then (older stores had no
#: cam view, and their pixels were version 1).
_LATER_FIELDS = {"cam": None, "pixels": 1}


def provenance(store: LogitStore) -> dict[str, Any]:
    """What made ``store``'s logits: the model file's sha256, its preprocessing, the version of the
    pixel pipeline, and the TTA views (their names carry the scales) and merge. Two stores blend
    together only when these agree."""
    model, tta = store.manifest["model"], store.manifest["tta"]
    return {"model_sha256": model["sha256"], "input_size": model["input_size"], "resize": model["resize"],
            "crop_pct": model["crop_pct"], "mean": list(model["mean"]), "std": list(model["std"]),
            "interpolation": model.get("interpolation", "bilinear"), "views": list(tta["views"]),
            "merge": tta["merge"], "cam": tta.get("cam"), "pixels": store.manifest.get("pixels", 1)}


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."  # a sha256
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def read_blend_json(path: Path) -> dict:
    """The checked record of the blend.json at ``path`` (given as ``--weights``)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EnsError(f"--weights {path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsError(f"--weights {path}: not a blend.json ({exc})") from None
    check_blend_record(record, f"--weights {path}")
    return record


def check_blend_record(record: Any, source: str) -> None:
    """Every field of a ``blend.json`` that applying it reads, with its type; :class:`EnsError`
    naming ``source`` and the first field that is missing or malformed."""
    if not isinstance(record, dict):
        raise EnsError(f"{source}: not a blend.json (a JSON object is expected)")
    for key in ("method", "fusion", "models", "members", "weights"):
        if key not in record:
            raise EnsError(f"{source}: not a blend.json (no {key!r})")
    fmt = record.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise EnsError(f"{source}: field 'format' is not an integer")
    if fmt > FORMAT_VERSION:
        raise EnsError(f"{source}: blend format {fmt} is newer than this ens understands")
    if not isinstance(record.get("provenance"), dict):
        raise EnsError(f"{source}: records no provenance of its models (an older ens wrote it), so its "
                       "stores cannot be checked against the applied ones; fit it again with --optimize")

    def names(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    members = record["members"] if names(record["members"]) else []
    temps = record.get("temperatures")
    checks = {
        "method": (isinstance(record["method"], str), "a string"),
        "fusion": (record["fusion"] in ws.FUSIONS, f"one of {', '.join(ws.FUSIONS)}"),
        "models": (names(record["models"]) and len(set(record["models"])) == len(record["models"]),
                   "a list of distinct model names"),
        "members": (bool(members) and len(set(members)) == len(members), "a list of distinct member names"),
        "weights": (isinstance(record["weights"], dict) and list(record["weights"]) == members
                    and all(number(w) and w >= 0 for w in record["weights"].values()),
                    "an object member -> weight >= 0, one per member in member order"),
        "temperatures": (temps is None or (isinstance(temps, dict) and list(temps) == members
                                           and all(number(t) and t > 0 for t in temps.values())),
                         "null or an object member -> temperature > 0"),
        "views": (isinstance(record.get("views", False), bool), "true or false"),
        "params": (isinstance(record.get("params", {}), dict), "an object"),
        "class_ids": (record.get("class_ids") is None or isinstance(record["class_ids"], list), "a list"),
        "prior": (_prior_record_ok(record.get("prior"), record.get("class_ids"), number),
                  f"null or an object with counts (one non-negative integer per class id), zero_count > 0 "
                  f"and tau from {ws.TAU_BOUNDS[0]:g} to {ws.TAU_BOUNDS[1]:g}"),
    }
    for key, (valid, expected) in checks.items():
        if not valid:
            raise EnsError(f"{source}: field {key!r} is malformed; expected {expected}")
    for model in record["models"]:
        given = record["provenance"].get(model)
        if not isinstance(given, dict) or any(k not in given for k in PROVENANCE_FIELDS if k not in _LATER_FIELDS):
            raise EnsError(f"{source}: field 'provenance.{model}' lacks some of {', '.join(PROVENANCE_FIELDS)}")


def _prior_record_ok(prior: Any, class_ids: Any, number) -> bool:
    if prior is None:
        return True
    if not isinstance(prior, dict) or not isinstance(class_ids, list):
        return False
    counts = prior.get("counts")
    low, high = ws.TAU_BOUNDS
    return (isinstance(counts, list) and len(counts) == len(class_ids)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            and number(prior.get("zero_count")) and prior["zero_count"] > 0
            and number(prior.get("tau")) and low <= prior["tau"] <= high)


def fitted_from_record(record: Mapping[str, Any]) -> ws.FittedBlend:
    """The blend a checked blend.json records (:func:`check_blend_record`), as
    :mod:`weights_search` applies it: `ens blend --weights` and `ens report` both fuse with this."""
    members = record["members"]
    temps = record.get("temperatures")
    prior = record.get("prior")
    log_prior = None if prior is None else tuple(ws.class_log_prior(prior["counts"], prior["zero_count"]).tolist())
    return ws.FittedBlend(method=record["method"], fusion=record["fusion"],
                          weights=tuple(float(record["weights"][m]) for m in members),
                          temperatures=None if temps is None else tuple(float(temps[m]) for m in members),
                          params=record.get("params", {}), log_prior=log_prior,
                          tau=None if prior is None else float(prior["tau"]))
