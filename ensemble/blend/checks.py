"""Warnings on the fitted split: labels from another json than the stores', and models that
score near chance while the best does not (a class order trap)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ensemble.blend.stores import BlendSplit
from ensemble.fileio import sha256_file


def label_warnings(split: BlendSplit, labels_path: Path) -> list[str]:
    """A note when the label file is not the json the stores were made from (its sha256 differs
    from the one the stores record): the same ids may then carry other labels."""
    recorded = split.stores[0].manifest.dataset
    if not str(recorded.source or "").endswith(".json") or recorded.sha256 is None:
        return []  # the stores came from an image folder: there is no json to compare with
    actual = sha256_file(labels_path)
    if actual == recorded.sha256:
        return []
    return [f"the labels in {labels_path} (sha256 {actual[:12]}...) are not from the json the {split.name} stores "
            f"were made from, {recorded.source} (sha256 {recorded.sha256[:12]}...); check that they "
            "label the same images"]


#: A model below this many times chance top-1 ...
CHANCE_FACTOR = 3


#: ... while the best model reaches this top-1 (and twice the first bound) is likely mis-mapped.
STRONG_TOP1 = 0.5


def class_order_warnings(split: str, classes: int, scores: Mapping[str, float]) -> list[str]:
    """Notes for models that score near chance on the fitted ``split`` (``scores``: each
    model's top-1 there, of ``classes`` classes) while the best is far above.

    The usual cause is a class order trap: a model trained on torchvision's ``ImageFolder``
    (folders sorted as strings: "10" before "2") exported with ``--classes train2019.json``
    (categories sorted as numbers) predicts the right thing in the wrong columns.
    """
    best = max(scores, key=scores.get)
    bound = CHANCE_FACTOR / classes
    if scores[best] < max(STRONG_TOP1, 2 * bound):
        return []
    return [f"{model} scores top-1 {score:.3f} on {split}, under {CHANCE_FACTOR}x chance (1/{classes}), while "
            f"{best} scores {scores[best]:.3f}: its output columns are likely in another order than its "
            "--classes says; if it was trained on a torchvision ImageFolder, re-export it with "
            "`ens export --classes TRAIN_FOLDER` (ImageFolder's order)"
            for model, score in scores.items() if score < bound]
