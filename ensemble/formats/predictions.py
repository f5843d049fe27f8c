"""``predictions.csv``: the fused top-k of every image of the applied split.

``id,category_1..category_K,prob_1..prob_K``: one row per image, real dataset category ids,
most probable first. `ens blend` writes it; `ens submit` reads it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PREDICTIONS_FILE = "predictions.csv"


def write_predictions(path: Path, ids: np.ndarray, class_ids: Sequence[int | str],
                      blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], k: int) -> int:
    """Write predictions.csv to ``path`` (a temporary file: the caller renames it into place).

    ``blocks`` yields ``(start, top, probs)``: for the rows from ``start``, the ``(rows, k)``
    column indices of the most probable classes and their probabilities. Returns the rows written.
    """
    columns = np.asarray(class_ids, dtype=object)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id"] + [f"category_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)])
        for start, top, probs in blocks:
            cats = columns[top]
            for row in range(top.shape[0]):
                writer.writerow([ids[start + row], *cats[row], *(f"{p:.6g}" for p in probs[row])])
    return int(ids.size)
