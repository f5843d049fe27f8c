"""Dataset splits: which images to run, in which order, under which ids.

Two sources:

* a COCO / iNaturalist json (``val2019.json``, ``test2019.json``): ``images`` give ``id`` and
  ``file_name`` relative to the json's folder; ``annotations`` (when labelled) give each image's
  ``category_id``. ``--data DIR --split val,test`` finds each split's file with
  :func:`find_split`, the one rule every command uses: ``val2019.json``, ``val2018.json``,
  ``val2017.json``, then iNat 2021's ``val.json`` (whose test split is ``public_test.json``),
  then an image folder ``DIR/val``;
* a plain folder of images: every image file below it, sorted, its id the path relative to the
  folder (``/``-separated).

Rows keep the json's image order (a folder's sorted order); that order is the row order of every
logit store made from the split. Validation happens here: a split without images or with a
repeated id is an :class:`EnsError` naming the file and the id.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.formats.common import is_count, is_id, read_json

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Years whose iNat layout puts the year in the split's file name (``val2019.json``), newest first;
#: iNat 2021 does not (``val.json``, ``train_mini.json``, ``public_test.json``).
_YEARS = (2019, 2018, 2017)
#: Other names a split goes by in some layout.
_ALIASES = {"test": ("public_test.json",)}


@dataclass(frozen=True)
class Split:
    """The images of one dataset split, in row order.

    ``ids[i]`` (int for a json, relative path for a folder) names the image at ``paths[i]``;
    ``labels[i]`` is its category id, or ``None`` where the json has no annotation for it;
    ``labels`` is ``None`` for an unlabelled split. ``sha256`` identifies the source: the json
    file's bytes, or for a folder the sorted relative paths and file sizes.
    """

    name: str
    source: Path
    ids: tuple[int | str, ...]
    paths: tuple[Path, ...]
    sha256: str
    labels: tuple[int | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def split_name(source: str | os.PathLike) -> str:
    """The store name of a split: ``val2019.json`` -> ``val``; a folder keeps its whole name
    (``test2019/`` -> ``test2019``), so its store never replaces that of ``test2019.json``."""
    path = Path(source)
    if path.suffix != ".json":
        return path.name
    return re.sub(r"(?<=[A-Za-z_])(19|20)\d\d$", "", path.stem) or path.stem


def split_candidates(name: str, year: int | None = None, folders: bool = True) -> list[str]:
    """The names :func:`find_split` tries for split ``name``, first match wins.

    ``year`` (a competition's, e.g. 2021 for ``--format inat2021``) puts that layout's name
    first; ``folders`` adds the image folder ``name`` last.
    """
    generic = [f"{name}{y}.json" for y in _YEARS] + [f"{name}.json", *_ALIASES.get(name, ())]
    if year is not None:
        own = [f"{name}.json", *_ALIASES.get(name, ())] if year not in _YEARS else [f"{name}{year}.json"]
        generic = own + [c for c in generic if c not in own]
    return generic + ([name] if folders else [])


def find_split(data: str | os.PathLike, name: str, *, year: int | None = None, folders: bool = True,
               required: bool = True, option: str = "--data") -> Path | None:
    """The file (or image folder) of split ``name`` under ``data``, in any iNat layout.

    ``None`` when there is none and not ``required``; otherwise an :class:`EnsError` that lists
    every name tried. ``option`` names the command-line option that gave ``data``.
    """
    data = Path(data)
    if not data.is_dir():
        raise EnsError(f"{option} {data}: no such folder")
    candidates = split_candidates(name, year, folders)
    for candidate in candidates:
        path = data / candidate
        if path.is_file() or (folders and path.is_dir() and candidate == name):
            return path
    if not required:
        return None
    raise EnsError(f"{option} {data}: no {name} split (looked for {', '.join(candidates)})")


def resolve_splits(data: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """``--data DIR --split a,b``: the json file (or image folder) of each split name."""
    return [find_split(data, check_store_name(name, "--split")) for name in names]


def check_regular_file(path: str | os.PathLike, option: str = "") -> Path:
    """``path`` when it is a regular file; :class:`EnsError` when it is missing, or is a FIFO,
    device or socket (reading one could block forever, so it is never opened)."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    if not path.exists():
        raise EnsError(f"{label}: no such file or folder")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, device or socket)"
        raise EnsError(f"{label}: {kind}; expected a file")
    return path


def check_store_name(name: str, what: str) -> str:
    """``name`` when it is one plain folder name that a store may be called; else EnsError.

    Stores live at ``<out>/<model>/<split>``: a name with a separator, ``.``/``..`` or a
    leading dot (``.partial``, ``.trt-cache``) would write outside its folder or over ens's own.
    """
    if (not name or name.startswith(".") or any(c in name for c in "/\\\0")
            or Path(name).is_absolute() or len(name) > 200):
        raise EnsError(f"{what} {name!r}: a store is named after it, so it must be one plain folder name "
                       "(no '/', not starting with '.')")
    return name


def load_split(source: str | os.PathLike, name: str | None = None) -> Split:
    """The split held by a COCO/iNat json file or an image folder."""
    source = Path(source)
    name = check_store_name(name or split_name(source.resolve() if source.name in ("", ".", "..") else source),
                            "split" if name is None else "--split")
    if source.is_dir():
        return _load_folder(source, name)
    check_regular_file(source)
    return _load_json(source, name)


def _load_json(path: Path, name: str) -> Split:
    doc = read_json(path)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise EnsError(f"{path}: no \"images\" list (expected a COCO / iNaturalist json)")
    if not images:
        raise EnsError(f"{path}: no images")
    root = path.parent
    ids, paths, seen = [], [], set()
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise EnsError(f"{path}: images[{i}] lacks \"id\" or \"file_name\"")
        image_id = image["id"]
        if not is_id(image_id):
            raise EnsError(f"{path}: images[{i}] has id {image_id!r}; expected an integer or a string")
        if image_id in seen:
            raise EnsError(f"{path}: duplicate image id {image_id!r}")
        seen.add(image_id)
        ids.append(image_id)
        paths.append(root / image["file_name"])
    if len({type(i) for i in ids}) > 1:
        raise EnsError(f"{path}: image ids mix integers and strings")
    return Split(name=name, source=path, ids=tuple(ids), paths=tuple(paths),
                 sha256=sha256_file(path), labels=_labels(doc, ids, path))


def _labels(doc: dict, ids: list, path: Path) -> tuple[int | None, ...] | None:
    annotations = doc.get("annotations")
    if not annotations:
        return None
    if not isinstance(annotations, list):
        raise EnsError(f"{path}: \"annotations\" is not a list")
    by_image = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise EnsError(f"{path}: annotations[{i}] lacks \"image_id\" or \"category_id\"")
        by_image[ann["image_id"]] = ann["category_id"]
    return tuple(by_image.get(i) for i in ids)


def _load_folder(folder: Path, name: str) -> Split:
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise EnsError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    ids = tuple(p.relative_to(folder).as_posix() for p in files)
    # Hashing every image would cost a read of the whole set; names and sizes catch the changes
    # that matter (files added, removed, replaced by a re-encode).
    digest = hashlib.sha256()
    for image_id, path in zip(ids, files):
        digest.update(f"{image_id}\t{path.stat().st_size}\n".encode())
    return Split(name=name, source=folder, ids=ids, paths=tuple(files), sha256=digest.hexdigest())


# --------------------------------------------------------------------------------------------
# Labels and training class counts


def load_labels(path: Path, ids: np.ndarray, class_ids: Sequence[int | str]) -> np.ndarray:
    """Column index of each image's true category, ``(rows,)`` int64, in the order of ``ids``
    (a store's image ids): the split json at ``path`` is read and checked as :func:`load_split`
    reads it, and every label must be a category id of ``class_ids`` (the models' columns)."""
    split = _load_json(check_regular_file(path), split_name(path))
    if split.labels is None:
        raise EnsError(f"{path}: no annotations, so no labels to fit blend weights on")
    truth = {image: label for image, label in zip(split.ids, split.labels) if label is not None}
    for image, label in truth.items():
        if not is_id(label):
            raise EnsError(f"{path}: image {image} is labelled {label!r}; expected an integer or a string "
                           "category id")
    column = {c: j for j, c in enumerate(class_ids)}
    missing = [i for i in ids.tolist() if i not in truth]
    if missing:
        raise EnsError(f"{path}: {len(missing)} images have no label, first ids {', '.join(map(str, missing[:5]))}")
    unknown = [(i, truth[i]) for i in ids.tolist() if truth[i] not in column]
    if unknown:
        image, category = unknown[0]
        raise EnsError(f"{path}: image {image} is labelled {category!r}, a category the models do not predict "
                       f"({len(unknown)} such images)")
    return np.fromiter((column[truth[i]] for i in ids.tolist()), dtype=np.int64, count=ids.size)


def read_class_counts(path: Path) -> dict[int | str, int]:
    """The training images per category id in ``path``, in any of three forms:

    - a COCO/iNat json (``train2019.json``): the number of ``annotations`` of each
      ``category_id``; the categories listed under ``categories`` that no annotation names count 0;
    - a JSON object ``{"category_id": count, ...}``;
    - a CSV of lines ``category_id,count`` (``.csv``; a header line ``category_id,count`` is allowed).

    Ids that spell integers become integers, as the models' class ids do. A count must be a
    non-negative integer; an id may appear once. Anything else is an :class:`EnsError` naming
    the file and the entry.
    """
    check_regular_file(path, "--prior")
    label = f"--prior {path}"
    if path.suffix.lower() == ".csv":
        return _csv_counts(path, label)
    doc = read_json(path, label, hint="give a COCO/iNat json, a JSON object {\"category_id\": count} or a CSV "
                                      "category_id,count")
    if not isinstance(doc, dict):
        raise EnsError(f"{label}: expected a JSON object (a COCO/iNat json or {{\"category_id\": count}})")
    if "annotations" in doc or "images" in doc or "categories" in doc:
        return coco_counts(doc, label)
    counts: dict[int | str, int] = {}
    for key, value in doc.items():
        category = _category(key)
        if category in counts:
            raise EnsError(f"{label}: counts category {category} twice")
        counts[category] = _count(value, f"{label}: the count of category {key!r}")
    if not counts:
        raise EnsError(f"{label}: no categories")
    return counts


def coco_counts(doc: dict, label: str) -> dict[int | str, int]:
    """The annotations of each ``category_id`` of a COCO/iNat json ``doc`` (its ``categories``
    that no annotation names count 0); :class:`EnsError` starting with ``label`` when it has no
    annotations or one lacks its category. The one counter of training images: ``ens blend
    --prior`` and ``ens submit --missing prior`` both count with it."""
    annotations = doc.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise EnsError(f"{label}: a COCO json without annotations (a test split?); give the training json, "
                       "whose annotations are counted")
    counts: dict[int | str, int] = {}
    for category in doc.get("categories") or []:
        if isinstance(category, dict) and is_id(category.get("id")):
            counts.setdefault(_category(category["id"]), 0)
    for i, annotation in enumerate(annotations):
        category = annotation.get("category_id") if isinstance(annotation, dict) else None
        if not is_id(category):
            raise EnsError(f"{label}: annotations[{i}] has no category_id")
        category = _category(category)
        counts[category] = counts.get(category, 0) + 1
    return counts


def _csv_counts(path: Path, label: str) -> dict[int | str, int]:
    counts: dict[int | str, int] = {}
    lines: dict[int | str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EnsError(f"{label}: not a readable CSV ({exc})") from None
    for number, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if number == 1 and [cell.strip() for cell in row] == ["category_id", "count"]:
            continue
        if len(row) != 2:
            raise EnsError(f"{label}: line {number} has {len(row)} fields; expected category_id,count")
        category = _category(row[0].strip())
        if category in lines:
            raise EnsError(f"{label}: line {number} counts category {row[0].strip()} again (first on line "
                           f"{lines[category]})")
        text = row[1].strip()
        counts[category] = _count(int(text) if re.fullmatch(r"[+-]?\d+", text) else text,
                                  f"{label}: line {number}: the count {text!r}")
        lines[category] = number
    if not counts:
        raise EnsError(f"{label}: no lines category_id,count")
    return counts


def _category(value: int | str) -> int | str:
    """A category id as the models' class ids hold it: a string that spells an integer is one."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def _count(value: Any, what: str) -> int:
    if not is_count(value):
        raise EnsError(f"{what} is not a non-negative integer")
    return value
