"""The ``--classes`` file or folder: which dataset category id each output column stands for."""

from __future__ import annotations

import os
from pathlib import Path

from ensemble.formats.common import read_json
from ensemble.formats.dataset import category_id, check_regular_file, shown
from ensemble.errors import EnsError


def load_class_ids(path: str | Path, num_classes: int) -> tuple[int | str, ...]:
    """Read the mapping from output index to category id.

    Accepted: an image folder tree, one subfolder per class, in the order torchvision's
    ``ImageFolder`` gives them (folder names sorted as strings, so "10" comes before "2"); a
    JSON list (``ids[i]`` is the category id of output ``i``); or a COCO / iNat annotation
    file, whose ``categories`` sorted by ``id`` give the order (the order of ``sorted(category
    ids)``, as a training script that enumerates them would use). Ids are read by
    :func:`ensemble.formats.dataset.category_id`, as ``ens blend`` reads val labels and
    ``--prior`` counts: strings that spell integers (``"7"``, ``"007"``) become integers, so
    folder names are category ids.
    """
    path = Path(path)
    if path.is_dir():
        return _checked(image_folder_classes(path), num_classes, path)
    check_regular_file(path, "--classes")
    data = read_json(path, f"--classes {path}", problem="not valid JSON")
    if isinstance(data, dict):
        categories = data.get("categories")
        if not isinstance(categories, list) or not categories:
            raise EnsError(f"--classes {path}: a JSON object without a 'categories' list")
        if not all(isinstance(c, dict) and "id" in c for c in categories):
            raise EnsError(f"--classes {path}: every category needs an 'id'")
        ids = [_as_id(c["id"], path) for c in categories]
        numbers = [i for i in ids if isinstance(i, int)]
        names = [i for i in ids if isinstance(i, str)]
        if numbers and names:
            raise EnsError(f"--classes {path}: the categories mix integer and string ids ({shown(numbers[0])} and "
                           f"{shown(names[0])}), which have no order; give a JSON list of the ids in the model's output order")
        ids = sorted(ids)
    elif isinstance(data, list):
        ids = data
    else:
        raise EnsError(f"--classes {path}: expected a JSON list of category ids or a COCO json")
    return _checked(ids, num_classes, path)


def image_folder_classes(folder: Path) -> list[str]:
    """The class names of an ``ImageFolder`` at ``folder``, in its label order.

    torchvision's ``find_classes``: every subfolder (hidden ones and links to folders too),
    names sorted as strings.
    """
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as exc:
        raise EnsError(f"--classes {folder}: cannot list the folder ({exc.strerror})") from None
    if not names:
        raise EnsError(f"--classes {folder}: a folder without class subfolders (expected the training "
                       "images' ImageFolder root, one subfolder per class)")
    return names


def _checked(values: list, num_classes: int, path: Path) -> tuple[int | str, ...]:
    ids = [_as_id(v, path) for v in values]
    if len(ids) != num_classes:
        count = len(ids)
        found = (f"holds {count} class folder{'' if count == 1 else 's'}" if path.is_dir()
                 else f"lists {count} categor{'y' if count == 1 else 'ies'}")
        raise EnsError(f"--classes {path}: {found} but the model predicts {num_classes}")
    seen: set[int | str] = set()
    for i, v in enumerate(ids):
        if v in seen:
            raise EnsError(f"--classes {path}: category id {shown(v)} appears twice (again at index {i})")
        seen.add(v)
    return tuple(ids)


def _as_id(value: object, path: Path) -> int | str:
    category = category_id(value)
    if category is None:
        raise EnsError(f"--classes {path}: category ids must be integers or strings, got {shown(value)}")
    return category
