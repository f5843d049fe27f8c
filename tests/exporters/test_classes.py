"""``--classes``: output index -> category id, from a JSON file or an image folder tree."""

from __future__ import annotations

import pytest

from ensemble.errors import EnsError
from exporters.classes import load_class_ids


def image_folder(root, names, images=2):
    """An ImageFolder tree: one subfolder per class name, each with a few (empty) image files."""
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(images):
            (root / name / f"{i}.jpg").write_bytes(b"")
    return root


def test_image_folder_order_is_imagefolders_string_order(tmp_path):
    # Created in numeric order; ImageFolder labels them in string order, "10" before "2".
    root = image_folder(tmp_path / "train", ["1", "2", "10", "11", "20", "3"])
    (root / "labels.txt").write_text("a file beside the class folders is no class")
    assert load_class_ids(root, 6) == (1, 10, 11, 2, 20, 3)


def test_image_folder_names_that_are_not_numbers_stay_strings(tmp_path):
    # Upper case sorts before lower case, as in torchvision's find_classes.
    root = image_folder(tmp_path / "train", ["zebra", "Aardvark", "07", "mole"])
    assert load_class_ids(root, 4) == (7, "Aardvark", "mole", "zebra")


def test_an_empty_class_folder_is_still_a_class(tmp_path):
    # find_classes lists folders, not images: the label order counts this one.
    root = image_folder(tmp_path / "train", ["1", "2", "10"])
    (root / "15").mkdir()
    assert load_class_ids(root, 4) == (1, 10, 15, 2)


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(EnsError) as info:
        load_class_ids(tmp_path / "flat", 3)
    assert str(info.value) == (f"--classes {tmp_path / 'flat'}: a folder without class subfolders (expected "
                               "the training images' ImageFolder root, one subfolder per class)")


def test_folder_with_another_number_of_classes(tmp_path):
    root = image_folder(tmp_path / "train", ["1", "2", "10"])
    with pytest.raises(EnsError, match=r"train: holds 3 class folders but the model predicts 4$"):
        load_class_ids(root, 4)


def test_folder_names_that_spell_the_same_id(tmp_path):
    root = image_folder(tmp_path / "train", ["1", "01", "2"])
    with pytest.raises(EnsError, match=r"train: category id 1 appears twice \(again at index 1\)"):
        load_class_ids(root, 3)
