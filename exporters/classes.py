"""The ``--classes`` file: which dataset category id each output column stands for."""

from __future__ import annotations

import json
from pathlib import Path

from ensemble.errors import EnsError


def load_class_ids(path: str | Path, num_classes: int) -> tuple[int | str, ...]:
    """Read the mapping from output index to category id.

    Accepted: a JSON list (``ids[i]`` is the category id of output ``i``), or a COCO / iNat
    annotation file, whose ``categories`` sorted by ``id`` give the order (the order of
    ``sorted(category ids)``, as a training script that enumerates them would use). Strings
    that spell integers become integers, so folder names from ``ImageFolder`` work.
    """
    path = Path(path)
    if not path.is_file():
        raise EnsError(f"--classes {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnsError(f"--classes {path}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        categories = data.get("categories")
        if not isinstance(categories, list) or not categories:
            raise EnsError(f"--classes {path}: a JSON object without a 'categories' list")
        try:
            ids = sorted(c["id"] for c in categories)
        except (KeyError, TypeError):
            raise EnsError(f"--classes {path}: every category needs an 'id'") from None
    elif isinstance(data, list):
        ids = data
    else:
        raise EnsError(f"--classes {path}: expected a JSON list of category ids or a COCO json")
    ids = [_as_id(v, path) for v in ids]
    if len(ids) != num_classes:
        raise EnsError(f"--classes {path}: lists {len(ids)} categories but the model predicts {num_classes}")
    seen: set[int | str] = set()
    for i, v in enumerate(ids):
        if v in seen:
            raise EnsError(f"--classes {path}: category id {v!r} appears twice (again at index {i})")
        seen.add(v)
    return tuple(ids)


def _as_id(value: object, path: Path) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EnsError(f"--classes {path}: category ids must be integers or strings, got {value!r}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value
