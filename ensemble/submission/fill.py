"""Rows for the test ids the predictions lack: ``ens submit --missing prior``.

``ens infer --on-bad-image skip`` leaves unreadable test images out of the stores, so the
blend's ``predictions.csv`` lacks their ids, and a file must hold every test id. With
``--missing prior`` every such id gets the same row, a ranking of classes made without the
image (:class:`Fill`), from the first source that has one:

* ``train-prior``: the classes most frequent among the ``annotations[].category_id`` of the
  train json under ``--data`` (found by :func:`ensemble.formats.dataset.find_split`; iNat 2021's
  ``train_mini.json`` is not used, it holds the same number of images of every class). The
  best guess for an image one knows nothing of, under the usual assumption that test and
  train share the class frequencies.
* ``blend-prior``, when there is no train json or it has no annotations: the classes the blend
  ranks first most often (``category_1`` of the rows present); a tie goes to the class that
  appears more often anywhere in the rows' top-k.

In both, a remaining tie goes to the smaller category id, and known categories never counted
rank after all counted ones, so a row always holds its width of distinct known category ids
(the format's ``top_k``, or every category of a dataset that knows fewer).

"prior" here is the option's and the ledger's word (``--missing prior``, ``train-prior``,
``blend-prior``: other tools read them); inside the code this is the *fill*, kept apart by
name from the blend's long-tail prior correction (``ens blend --prior``), another thing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.errors import EnsError
from ensemble.formats.common import read_json
from ensemble.formats.dataset import coco_counts, find_split, streamed_coco_counts
from ensemble.formats.ledger import BLEND_PRIOR, TRAIN_PRIOR
from ensemble.formats.stream_json import NeedsLoads
from ensemble.submission.kaggle_csv import Reference, Submission, SubmissionFormat, row_width

#: ``--missing`` choices: what happens to test ids the predictions lack.
MISSING = {
    "fail": "stop with an error naming them (the default)",
    "prior": "fill each with the most frequent classes: of the train json, else of the blend's predictions",
}
DEFAULT_MISSING = "fail"
#: What ``--missing fail`` adds to the message that names the missing ids.
MISSING_HINT = ("; --missing prior fills them with the most frequent classes (of the train json, else of "
        "these predictions)")


def check_missing(name: str) -> str:
    """``name`` if it is a ``--missing`` choice."""
    if name not in MISSING:
        raise EnsError(f"--missing {name}: choose one of {', '.join(MISSING)}")
    return name


@dataclass(frozen=True)
class Fill:
    """The row every missing id gets: ``categories`` ``(width,)`` int64, most likely first.
    ``source``: ``train-prior`` or ``blend-prior``; ``origin``: the file that was counted."""

    source: str
    origin: Path
    categories: np.ndarray


def rank(categories: np.ndarray, *counts: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of ``categories`` ``(n,)`` ordered by ``counts[0]`` ``(n,)`` descending,
    ties by ``counts[1]`` descending and so on, last ties by the smaller category id."""
    order = np.lexsort((categories, *(-c for c in reversed(counts))))
    return categories[order[:k]]


def train_fill(path: Path, reference: Reference, k: int) -> Fill | None:
    """The ``k`` classes most frequent among the annotations of the train json at ``path``
    (counted by :func:`ensemble.formats.dataset.coco_counts`, as ``ens blend --prior`` counts them);
    ``None`` when it has none. Read streaming (:func:`~ensemble.formats.dataset.streamed_coco_counts`:
    iNat 2021's train json, 2.7 M annotations, in memory bounded by its categories), else whole
    (a json without annotations, or one the streaming parser could read otherwise: the same counts)."""
    try:
        counted = streamed_coco_counts(path, str(path))
    except NeedsLoads:
        counted = None
    if counted is None:  # read whole outside the handler: its errors carry no NeedsLoads context
        doc = read_json(path)
        if not isinstance(doc, dict) or not doc.get("annotations"):
            return None
        if not isinstance(doc["annotations"], list):
            raise EnsError(f"{path}: 'annotations' is not a list") from None
        counted = coco_counts(doc, str(path))
    known = set(reference.categories.tolist())
    unknown = sorted((c for c, n in counted.items() if n and c not in known), key=lambda c: (isinstance(c, str), c))
    if unknown:
        raise EnsError(f"{path}: annotations name category ids {', '.join(map(str, unknown[:5]))}"
                       f"{' and more' if len(unknown) > 5 else ''}, not among the {reference.categories.size} "
                       "categories of the dataset")
    counts = np.array([counted.get(int(c), 0) for c in reference.categories], np.int64)
    return Fill(TRAIN_PRIOR, path, rank(reference.categories, counts, k=k))


def blend_fill(submission: Submission, origin: Path, reference: Reference) -> Fill:
    """The classes ``submission`` (checked rows of the predictions) ranks first most often."""
    if submission.ids.size == 0:
        raise EnsError(f"{origin}: no rows to count the most frequent classes from, and --data has no train json "
                       "with annotations: --missing prior has nothing to fill with")
    positions = np.searchsorted(reference.categories, submission.categories)
    first = np.bincount(positions[:, 0], minlength=reference.categories.size)
    anywhere = np.bincount(positions.ravel(), minlength=reference.categories.size)
    return Fill(BLEND_PRIOR, origin, rank(reference.categories, first, anywhere, k=submission.categories.shape[1]))


def find_fill(data: str | os.PathLike, fmt: SubmissionFormat, reference: Reference, submission: Submission,
              origin: Path) -> Fill:
    """The train json's fill (``train-prior``) when ``data`` has a train json with annotations,
    else the fill of ``submission``, the checked rows read from ``origin`` (``blend-prior``)."""
    train = find_split(data, "train", year=fmt.year, folders=False, required=False)
    fill = train_fill(train, reference, row_width(fmt, reference)) if train is not None else None
    return fill or blend_fill(submission, origin, reference)


def fill_missing(submission: Submission, ids: np.ndarray, fill: Fill) -> Submission:
    """``submission`` with a row of ``fill`` for each of ``ids`` ``(n,)`` (ids it lacks), ids ascending."""
    ids = np.concatenate([submission.ids, ids.astype(np.int64)])
    rows = np.broadcast_to(fill.categories, (ids.size - submission.ids.size, fill.categories.size))
    categories = np.concatenate([submission.categories.reshape(-1, fill.categories.size), rows])
    order = np.argsort(ids, kind="stable")
    return Submission(format=submission.format, ids=ids[order], categories=categories[order])
