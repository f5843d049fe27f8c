"""Dataset splits: which images to run, in which order, under which ids.

Two sources:

* a COCO / iNaturalist json (``val2019.json``, ``test2019.json``): ``images`` give ``id`` and
  ``file_name`` relative to the json's folder; ``annotations`` (when labelled) give each image's
  ``category_id``. ``--data DIR --split val,test`` finds each split's file with
  :func:`find_split`, the one rule every command uses: ``val2019.json``, ``val2018.json``,
  ``val2017.json``, then iNat 2021's ``val.json`` (whose test split is ``public_test.json``),
  then an image folder ``DIR/val``;
* a plain folder of images: every image file below it, sorted, its id the path relative to the
  folder (``/``-separated); links are followed as torchvision's ``ImageFolder`` follows them,
  a loop of links is refused (:func:`image_files`).

Rows keep the json's image order (a folder's sorted order); that order is the row order of every
logit store made from the split. Validation happens here: a split without images or with a
repeated id is an :class:`EnsError` naming the file and the id. Category ids, wherever ens reads
them (val labels, ``--prior`` counts, ``ens export --classes``), follow one rule: :func:`category_id`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.common import check_regular, is_count, is_id, is_int, read_json, read_json_bytes
from ensemble.formats.stream_json import NeedsLoads, records, trusted

#: The image ids a store's ``ids.npy`` (int64) holds.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
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
    ``labels[i]`` is its category id (:func:`category_id`), or ``None`` where the json has no
    annotation for it or annotations of several categories (:func:`load_labels` refuses those);
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
        if folders and candidate == name and path.is_dir():
            return path
        if os.path.exists(path):  # a FIFO, a device or a folder is named, never taken for a missing split
            check_regular(path)
            return path
    if not required:
        return None
    raise EnsError(f"{option} {data}: no {name} split (looked for {', '.join(candidates)})")


def resolve_splits(data: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """``--data DIR --split a,b``: the json file (or image folder) of each split name."""
    return [find_split(data, check_store_name(name, "--split")) for name in names]


def check_regular_file(path: str | os.PathLike, option: str = "") -> Path:
    """``path`` when it is a regular file (or a link to one); :class:`EnsError` when it is missing
    (``<option> <path>: no such file or folder``), or a folder, FIFO, device or socket, in the
    words of the one rule, :func:`ensemble.formats.common.check_regular` (reading a FIFO could
    block forever, so it is never opened)."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    try:
        check_regular(path, label)
    except FileNotFoundError:
        raise EnsError(f"{label}: no such file or folder") from None
    except OSError as exc:  # a loop of links, a folder on the way it may not search
        raise EnsError(f"{label}: cannot read it ({exc.strerror or exc})") from None
    return path


def shown(value: Any, limit: int = 80) -> str:
    """A JSON value of a dataset (an id, a label) as a message shows it: as JSON (``true``,
    ``null``, ``"x"``, ``""``), so what the file holds is what the line says; cut at ``limit``."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_store_name(name: str, what: str) -> str:
    """``name`` when it is one plain folder name that a store may be called; else EnsError.

    Stores live at ``<out>/<model>/<split>``: a name with a separator, ``.``/``..`` or a
    leading dot (``.partial``, ``.trt-cache``) would write outside its folder or over ens's own.
    A ``,`` could never be chosen (``ens blend --models a,b``, ``--split a,b`` list names with
    it); a control character (newline, tab, escape) or line separator would break the lines
    that name the store.
    """
    if len(name) > 200:
        raise EnsError(f"{what} {name[:40]!r}... ({len(name)} characters): a store is named after it, "
                       "so it must be at most 200 characters")
    if "," in name:
        raise EnsError(f"{what} {name!r}: a store is named after it, and `ens blend --models`/`--split` list "
                       "names separated by ',', so it must have no ','")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise EnsError(f"{what} {name!r}: a store is named after it, so it must have no control character "
                       "(newline, tab, escape) or line separator")
    if (not name or name.startswith(".") or any(c in name for c in "/\\\0")
            or Path(name).is_absolute()):
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


def _load_json(path: Path, name: str, single: bool = False) -> Split:
    doc, data = read_json_bytes(path)  # the bytes give the sha256: a 100 MB json is read once
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
            raise EnsError(f"{path}: images[{i}] has id {shown(image_id)}; expected an integer or a string")
        if isinstance(image_id, int) and not INT64_MIN <= image_id <= INT64_MAX:
            raise EnsError(f"{path}: images[{i}] has id {image_id}, beyond the 64-bit integers a store holds "
                           f"({INT64_MIN}..{INT64_MAX})")
        if image_id in seen:
            raise EnsError(f"{path}: duplicate image id {shown(image_id)}")
        seen.add(image_id)
        ids.append(image_id)
        paths.append(root / image["file_name"])
    if len({type(i) for i in ids}) > 1:
        raise EnsError(f"{path}: image ids mix integers and strings")
    return Split(name=name, source=path, ids=tuple(ids), paths=tuple(paths),
                 sha256=hashlib.sha256(data).hexdigest(), labels=_labels(doc, ids, path, single))


def _labels(doc: dict, ids: list, path: Path, single: bool) -> tuple[int | str | None, ...] | None:
    """Each image's category (:func:`category_id`; a value that is no id is kept for the caller
    to name). ``single``: an image with annotations of two categories is an :class:`EnsError`
    (a label to fit on must be one); otherwise it has none (a COCO detection json, many
    categories per image, is still a split to run). Two annotations of one category are one label."""
    annotations = doc.get("annotations")
    if not annotations:
        return None
    if not isinstance(annotations, list):
        raise EnsError(f"{path}: \"annotations\" is not a list")
    by_image: dict = {}
    first: dict = {}
    several = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise EnsError(f"{path}: annotations[{i}] lacks \"image_id\" or \"category_id\"")
        image, raw = ann["image_id"], ann["category_id"]
        category = category_id(raw)
        category = raw if category is None else category
        if not is_id(image):
            continue  # no image of the split has it: an id is an integer or a string
        if image in by_image and by_image[image] != category:
            if single:
                raise EnsError(f"{path}: image {shown(image)} has annotations of two categories, "
                               f"{shown(by_image[image])} (annotations[{first[image]}]) and {shown(category)} "
                               f"(annotations[{i}]); a val image "
                               "needs one label")
            several.add(image)
        by_image.setdefault(image, category)
        first.setdefault(image, i)
    return tuple(None if i in several else by_image.get(i) for i in ids)


def _load_folder(folder: Path, name: str) -> Split:
    files = sorted(image_files(folder))
    if not files:
        raise EnsError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    ids = tuple(p.relative_to(folder).as_posix() for p in files)
    # Hashing every image would cost a read of the whole set; names and sizes catch the changes
    # that matter (files added, removed, replaced by a re-encode).
    digest = hashlib.sha256()
    for image_id, path in zip(ids, files):
        try:
            size = path.stat().st_size
        except OSError as exc:  # gone since it was listed
            raise EnsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        # File names are bytes: one that is not UTF-8 is kept (Python's surrogate escapes) and hashed as it is.
        digest.update(os.fsencode(image_id) + f"\t{size}\n".encode())
    return Split(name=name, source=folder, ids=ids, paths=tuple(files), sha256=digest.hexdigest())


def image_files(folder: Path) -> list[Path]:
    """Every file with an image suffix below ``folder``, hidden files and folders (a name
    starting with ``.``) left out, in no particular order.

    Links are followed, as torchvision's ``ImageFolder`` follows them (``os.walk(followlinks=True)``):
    a linked file or folder is listed under the link's path. Each real folder is listed once: a
    link to a folder that holds it (directly or through other links) would be followed forever,
    and a folder reached by two paths (two links to it, or a link and its own path) would list
    its images twice under two ids, and links that fan out (each level linking twice to the
    next) would list an exponential number of paths; each is an :class:`EnsError` naming the
    paths, as is a link whose target is gone or cannot be read, never skipped. (Two paths to one
    file are two images, as in ``ImageFolder``.) A non-regular file with an image name (a FIFO,
    a socket) is listed: ``ens infer`` reports it as an image it cannot read. Each folder on the
    way is listed by ``os.scandir``; one that cannot be is an :class:`EnsError` naming it.

    A linked file costs one ``stat``; folders are told apart by device and inode, so no path is
    resolved but in a message.
    """
    try:
        root = os.stat(folder)
    except OSError as exc:
        raise EnsError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    seen = {(root.st_dev, root.st_ino): folder}  # each real folder listed, by the first path to it
    files = []
    stack = [(folder, ((root.st_dev, root.st_ino),))]  # a folder, and the real folders above it
    while stack:
        current, above = stack.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            raise EnsError(f"{current}: cannot list the folder ({exc.strerror or exc})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = current / entry.name
            if entry.is_symlink():
                try:
                    info = os.stat(path)
                except FileNotFoundError:
                    raise EnsError(f"{path}: a link to {os.readlink(path)}, which does not exist; remove the link "
                                   "or restore its target") from None
                except OSError as exc:  # a loop of links, a target it may not read
                    raise EnsError(f"{path}: a link that cannot be followed ({exc.strerror or exc})") from None
                is_folder = stat.S_ISDIR(info.st_mode)
            else:
                is_folder = entry.is_dir(follow_symlinks=False)
                if is_folder:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError as exc:  # gone since it was listed
                        raise EnsError(f"{path}: cannot list the folder ({exc.strerror or exc})") from None
            if is_folder:
                key = (info.st_dev, info.st_ino)
                if key in above:
                    raise EnsError(f"{path}: a link to {os.path.realpath(path)}, a folder that holds it: following "
                                   "it would never end; remove the link or point it outside that folder")
                if key in seen:
                    first, second = sorted((seen[key], path))
                    raise EnsError(f"{first} and {second}: two paths to one folder ({os.path.realpath(path)}), whose "
                                   "images would be listed twice under two ids; remove one of the links")
                seen[key] = path
                stack.append((path, above + (key,)))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                files.append(path)
    return files


# --------------------------------------------------------------------------------------------
# Labels and training class counts


def load_labels(path: Path, ids: np.ndarray, class_ids: Sequence[int | str]) -> np.ndarray:
    """Column index of each image's true category, ``(rows,)`` int64, in the order of ``ids``
    (a store's image ids): the split json at ``path`` is read and checked as :func:`load_split`
    reads it, and every label must be a category id of ``class_ids`` (the models' columns)."""
    split = _load_json(check_regular_file(path), split_name(path), single=True)
    if split.labels is None:
        raise EnsError(f"{path}: no annotations, so no labels to fit blend weights on")
    truth = {image: label for image, label in zip(split.ids, split.labels) if label is not None}
    for image, label in truth.items():
        if not is_id(label):
            raise EnsError(f"{path}: image {shown(image)} is labelled {shown(label)}; expected an integer or a "
                           "string category id")
    column = {category_id(c): j for j, c in enumerate(class_ids)}
    missing = [i for i in ids.tolist() if i not in truth]
    if missing:
        listed = ", ".join(shown(i) for i in missing[:5])
        raise EnsError(f"{path}: 1 image has no label, id {listed}" if len(missing) == 1 else
                       f"{path}: {len(missing)} images have no label, first ids {listed}")
    unknown = [(i, truth[i]) for i in ids.tolist() if truth[i] not in column]
    if unknown:
        image, category = unknown[0]
        raise EnsError(f"{path}: image {shown(image)} is labelled {shown(category)}, a category the models do not "
                       f"predict ({len(unknown)} such image{'' if len(unknown) == 1 else 's'})")
    return np.fromiter((column[truth[i]] for i in ids.tolist()), dtype=np.int64, count=ids.size)


def read_class_counts(path: Path) -> dict[int | str, int]:
    """The training images per category id in ``path``, in any of three forms:

    - a COCO/iNat json (``train2019.json``): the number of ``annotations`` of each
      ``category_id``; the categories listed under ``categories`` that no annotation names count 0;
    - a JSON object ``{"category_id": count, ...}``;
    - a CSV of lines ``category_id,count`` (``.csv``; a header line ``category_id,count`` is allowed).

    Ids are read by :func:`category_id`, as the models' class ids are. A count must be a
    non-negative integer; an id may appear once. Anything else is an :class:`EnsError` naming
    the file and the entry.
    """
    check_regular_file(path, "--prior")
    label = f"--prior {path}"
    if path.suffix.lower() == ".csv":
        return _csv_counts(path, label)
    try:
        return streamed_coco_counts(path, label, hint=_COUNTS_HINT)
    except NeedsLoads:  # not a COCO json with annotations, or one only json.loads reads as ens reads JSON
        pass
    doc = read_json(path, label, hint=_COUNTS_HINT)
    if not isinstance(doc, dict):
        raise EnsError(f"{label}: expected a JSON object (a COCO/iNat json or {{\"category_id\": count}})")
    if "annotations" in doc or "images" in doc or "categories" in doc:
        return coco_counts(doc, label)
    counts: dict[int | str, int] = {}
    for key, value in doc.items():
        category = category_id(key)
        if category in counts:
            raise EnsError(f"{label}: counts category {shown(category)} twice")
        counts[category] = _count(value, f"{label}: the count of category {key!r}")
    if not counts:
        raise EnsError(f"{label}: no categories")
    return counts


#: What a --prior file may be, for the message of one that is not JSON.
_COUNTS_HINT = "give a COCO/iNat json, a JSON object {\"category_id\": count} or a CSV category_id,count"


def streamed_coco_counts(path: Path, label: str, hint: str = "") -> dict[int | str, int]:
    """:func:`coco_counts` of the COCO/iNat json at ``path``, read streaming
    (:mod:`ensemble.formats.stream_json`: its annotations, then its categories; memory bounded
    by the number of categories, not of annotations). :class:`~ensemble.formats.stream_json.NeedsLoads`
    when the file is to be read whole (no non-empty ``annotations`` list streamed, or a file the
    streaming parser could read otherwise); :class:`EnsError` as :func:`coco_counts` and
    :func:`~ensemble.formats.common.read_json` word them, ``hint`` after a refusal of the file."""
    annotations = records(path, "annotations.item", label, scan=True, hint=hint)
    scan = next(annotations)
    counted: Counter = Counter()  # first-seen order, as coco_counts adds them
    n = 0
    problem = None
    for batch in annotations:
        if problem is None:
            values = [a.get("category_id") if a.__class__ is dict else None for a in batch]
            if set(map(type, values)) <= {int}:  # category_id's rule for integers (a bool is none)
                counted.update(values)
            else:
                for i, value in enumerate(values, n):
                    category = category_id(value)
                    if category is None:
                        problem = f"{label}: annotations[{i}] has no category_id"
                        break
                    counted[category] += 1
        n += len(batch)
    if n == 0 or not trusted(scan, "annotations", "categories"):
        raise NeedsLoads
    counts: dict[int | str, int] = {}
    if scan.keys[b'"categories"']:
        for batch in records(path, "categories.item", label, hint=hint):
            for category in batch:
                if isinstance(category, dict) and category_id(category.get("id")) is not None:
                    counts.setdefault(category_id(category["id"]), 0)
    if problem is not None:
        raise EnsError(problem)
    for category, number in counted.items():
        counts[category] = counts.get(category, 0) + number
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
        if isinstance(category, dict) and category_id(category.get("id")) is not None:
            counts.setdefault(category_id(category["id"]), 0)
    for i, annotation in enumerate(annotations):
        category = category_id(annotation.get("category_id")) if isinstance(annotation, dict) else None
        if category is None:
            raise EnsError(f"{label}: annotations[{i}] has no category_id")
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
        category = category_id(row[0])
        if category in lines:
            raise EnsError(f"{label}: line {number} counts category {shown(category)} again (first on line "
                           f"{lines[category]})")
        text = row[1].strip()
        number_text = _INTEGER.fullmatch(text)  # ASCII digits, as a category id's
        counts[category] = _count(int(number_text.group(1)) if number_text else text,
                                  f"{label}: line {number}: the count {text!r}")
        lines[category] = number
    if not counts:
        raise EnsError(f"{label}: no lines category_id,count")
    return counts


#: A string that spells a category id as an integer: ASCII digits (at most Python's default
#: limit for parsing a string into an int), an optional sign, blanks around.
_INTEGER = re.compile(r"\s*([+-]?[0-9]{1,4300})\s*", re.ASCII)


def category_id(value: Any) -> int | str | None:
    """A dataset's category id as ens reads it, wherever it comes from (a val json's labels,
    ``--prior`` counts, ``--classes`` lists, folder names and COCO categories): the one rule.

    An integer (not a bool) is itself; a string that spells a decimal integer in ASCII digits,
    with an optional sign and blanks around (``"0"``, ``" 7 "``, ``"-3"``, ``"+4"``, ``"007"``),
    is that integer, as folder names of a torchvision ``ImageFolder`` are read; any other string
    (``"a1"``, ``"1.0"``, ``"\u0663"``) is itself. ``None`` for what is no id (a bool, a float,
    ``null``, a list): the caller names the file and the entry.
    """
    if isinstance(value, str):
        match = _INTEGER.fullmatch(value)
        return int(match.group(1)) if match else value
    return value if is_int(value) else None


def _count(value: Any, what: str) -> int:
    if not is_count(value):
        raise EnsError(f"{what} is not a non-negative integer")
    return value
