"""``predictions.csv``: the fused top-k of every image of the applied split.

``id,category_1..category_K,prob_1..prob_K``: one row per image, real dataset category ids,
most probable first. `ens blend` writes it (:func:`write_predictions`); `ens submit` reads it
as text (its rows go through the submission's checks) and takes K from the header
(:func:`header_top_k`).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PREDICTIONS_FILE = "predictions.csv"


def header(k: int) -> list[str]:
    """The header of a predictions.csv of the top ``k``."""
    return ["id"] + [f"category_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)]


def header_top_k(columns: Sequence[str]) -> int | None:
    """K of a predictions.csv header: ``id`` first, then ``category_1`` to ``category_K`` with no
    number missing (in any order; the ``prob_`` columns are not needed to submit); None when
    ``columns`` is not such a header."""
    numbered = sorted(int(c.split("_")[1]) for c in columns if re.fullmatch(r"category_[0-9]+", c))
    if not columns or columns[0] != "id" or not numbered or numbered != list(range(1, len(numbered) + 1)):
        return None
    return len(numbered)


def write_predictions(path: Path, ids: np.ndarray, class_ids: Sequence[int | str],
                      blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], k: int) -> int:
    """Write predictions.csv to ``path`` (a temporary file: the caller renames it into place).

    ``blocks`` yields ``(start, top, probs)``: for the rows from ``start``, the ``(rows, k)``
    column indices of the most probable classes and their probabilities. Returns the rows written.
    """
    columns = np.asarray(class_ids, dtype=object)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header(k))
        for start, top, probs in blocks:
            cats = columns[top]
            for row in range(top.shape[0]):
                writer.writerow([ids[start + row], *cats[row], *(f"{p:.6g}" for p in probs[row])])
    return int(ids.size)
