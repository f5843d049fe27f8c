"""``ens blend --prior``: the notes on the training class counts (mapped to the output columns by
:func:`ensemble.formats.blend.prior_counts`), and ``--prior-tau``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

import weights_search as ws
from ensemble.formats.blend import counted, shown_ids
from ensemble.formats.common import auto_or_number
from ensemble.formats.dataset import find_split


def prior_notes(counts: np.ndarray, class_ids: Sequence[int | str], path: Path) -> list[str]:
    """A note naming the categories without a training image, and how they are counted."""
    zero = [c for c, n in zip(class_ids, counts) if n == 0]
    if not zero:
        return []
    have = "has" if len(zero) == 1 else "have"
    return [f"--prior {path}: {len(zero)} of the {counted(len(counts), 'category', 'categories')} {have} no training "
            f"image ({shown_ids(zero)}); "
            f"each is counted as {ws.ZERO_COUNT:g} images (half the rarest possible count), so that its "
            "log-prior stays finite"]


def prior_hint(data: Path | None, given: bool) -> list[str]:
    """When ``--data`` holds a training json and no ``--prior`` was given, the flag to try."""
    if data is None or given:
        return []
    train = find_split(data, "train", folders=False, required=False)
    if train is None:
        return []
    return [f"{train} holds the training labels: add --prior {train} to correct the blend for the models' "
            "long-tailed training prior (logit adjustment, tau fitted on validation)"]


def prior_tau(text: str | None) -> float | None:
    """``--prior-tau``: None to fit tau (``auto``, the default), else the number given."""
    low, high = ws.TAU_BOUNDS
    return auto_or_number(text, ws.TAU_BOUNDS, f"--prior-tau {text}: expected auto or a number from {low:g} to "
                          f"{high:g} (0: no correction, 1: divide by the prior once)")


def prior_cv_note(report: Any, method: str) -> list[str]:
    """A note when the blend corrected for the prior does not beat it uncorrected on CV."""
    kind = "uniform" if method == "uniform" else "method"
    corrected, plain = report.row(kind, True), report.row(kind, False)
    if (corrected.top1, -corrected.nll) > (plain.top1, -plain.nll):
        return []
    return [f"{corrected.name} does not beat {plain.name} on {report.n_folds}-fold CV (top-1 {corrected.top1:.4f} "
            f"vs {plain.top1:.4f}); the correction is applied as --prior asks: leave --prior out to blend without it"]
