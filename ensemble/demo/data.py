"""A small competition in the exact iNat 2019 layout, from real images shipped with scikit-learn.

scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 10 classes) are each
drawn at a random place and scale (their box 60-85% of the side), in a random colour, on a
larger textured colour canvas and saved as JPEG, so that localisation and scale matter as they do for iNat photos::

    DIR/train_val2019/Digits/<category id>/<md5>.jpg     train and validation images
    DIR/test2019/<md5>.jpg                              test images
    DIR/train2019.json, val2019.json, test2019.json     COCO-style annotation files
    DIR/kaggle_sample_submission.csv                    id,predicted for every test image
    DIR_answers.csv (beside DIR, not in it)             id,category_id of the test images

Splits are by original digit image (no digit appears in two splits; each training digit is
drawn ``train_copies`` times, on different canvases); test labels go only to
the answers file, which only the demo's scoring reads. Category ids are ``CATEGORY_OFFSET +
digit`` rather than the bare output index, so the class mapping is exercised end to end.

Validation and test hold the same number of images of every digit, as iNat 2019's do; the
training split is long-tailed like iNat's (``DemoSpec.long_tail``): the digits, in a random
order, keep ever fewer training images, so models trained on it over-predict the common ones,
which ``ens blend --prior data/train2019.json`` corrects.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ensemble.fileio import atomic_path, write_json_atomic

CATEGORY_OFFSET = 100
ICONIC = "Digits"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the generated competition; the defaults make the demo, tests shrink them."""

    canvas: int = 96  #: side of the square canvas, pixels (real iNat photos: up to 800)
    val_per_class: int = 25
    test_per_class: int = 50
    train_per_class: int | None = None  #: None: every remaining digit (~100 per class)
    #: Photos per training digit, each on its own canvas: with one, a network memorises the
    #: backgrounds instead of learning the digits (iNat too has several photos per individual).
    train_copies: int = 3
    #: Side of the digit's 8x8 box, as a fraction of the canvas side: drawn at a random scale in
    #: this range (the strokes fill about three quarters of the box).
    digit_scale: tuple[float, float] = (0.6, 0.85)
    #: The training split's long tail: the k-th digit of a random order keeps ``long_tail ** k``
    #: of its training digits (at least one); 0.7 gives about 100 down to 4. None: balanced.
    long_tail: float | None = 0.7
    seed: int = 0


@dataclass(frozen=True)
class Competition:
    root: Path  #: the data folder (``--data DIR``)
    answers: Path  #: id,category_id of the test images
    counts: dict[str, int]  #: images per split


def _split(labels: np.ndarray, spec: DemoSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Indices of the original digits per split, disjoint; val and test stratified by class, train
    long-tailed when ``spec.long_tail`` says so."""
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    digits = np.unique(labels)
    if spec.long_tail is not None and not 0 < spec.long_tail <= 1:
        raise ValueError(f"long_tail {spec.long_tail}: want a fraction in (0, 1]")
    rank = dict(zip(rng.permutation(digits).tolist(), range(digits.size)))
    for digit in digits:
        idx = rng.permutation(np.flatnonzero(labels == digit))
        val, test = idx[:spec.val_per_class], idx[spec.val_per_class:spec.val_per_class + spec.test_per_class]
        train = idx[spec.val_per_class + spec.test_per_class:]
        if spec.train_per_class is not None:
            train = train[:spec.train_per_class]
        if len(train) == 0:
            raise ValueError(f"digit {digit}: no images left for training; lower val/test per class")
        if spec.long_tail is not None:
            train = train[:max(1, round(len(train) * spec.long_tail ** rank[int(digit)]))]
        parts["val"] += val.tolist()
        parts["test"] += test.tolist()
        parts["train"] += train.tolist()
    return {name: np.sort(np.asarray(idx)) for name, idx in parts.items()}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colourful, blotchy background with some fine grain: float32 (size, size, 3) in 0..255."""
    coarse = rng.uniform(50, 205, (2, 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    blobs = rng.normal(0, 5, (size // 14, size // 14, 3))
    blobs = np.asarray(Image.fromarray(np.clip(blobs + 128, 0, 255).astype(np.uint8))
                       .resize((size, size), Image.BILINEAR), np.float32) - 128
    grain = rng.normal(0, 4, (size, size, 3))
    return np.clip(base + blobs + grain, 0, 255).astype(np.float32)


def render(digit: np.ndarray, rng: np.random.Generator, canvas: int,
           scale: tuple[float, float] = DemoSpec.digit_scale) -> Image.Image:
    """Draw one 8x8 digit (values 0..16) at a random place and scale on a textured canvas.

    ``scale`` bounds the side of the digit's box as a fraction of the canvas side.
    """
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"digit scale {scale}: want 0 < low <= high <= 1")
    side = int(rng.integers(round(canvas * low), round(canvas * high) + 1))
    mask = Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    mask = np.asarray(mask.filter(ImageFilter.GaussianBlur(side / 40)), np.float32)[..., None] / 255.0
    background = _texture(rng, canvas)
    y, x = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    patch = background[y:y + side, x:x + side]
    # Dark ink on a light patch, light ink on a dark one, tinted: visible, as a photo's subject is.
    light = patch.mean() < 128
    ink = np.clip((rng.uniform(200, 255) if light else rng.uniform(0, 55)) + rng.normal(0, 30, 3), 0, 255)
    background[y:y + side, x:x + side] = patch * (1 - mask) + ink * mask
    return Image.fromarray(background.round().astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _categories() -> list[dict]:
    return [{"id": CATEGORY_OFFSET + d, "name": f"digit {d}", "kingdom": "Digits", "phylum": "Arabic",
             "class": "Numeral", "order": "Decimal", "family": "Handwritten", "genus": "Digit"}
            for d in range(10)]


def make_competition(root: str | Path, spec: DemoSpec = DemoSpec()) -> Competition:
    """Write the competition under ``root`` (and ``answers.csv`` beside it); return where."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(spec.seed)
    splits = _split(digits.target, spec, rng)
    info = {"description": "ens demo: scikit-learn digits drawn on textured canvases, iNat 2019 layout",
            "year": 2019}
    next_id = 0
    files: dict[str, list[tuple[dict, int]]] = {}
    for split in ("train", "val", "test"):
        rows = []
        copies = spec.train_copies if split == "train" else 1
        for index in np.repeat(splits[split], copies):
            label = int(digits.target[index])
            data = _jpeg(render(digits.images[index], rng, spec.canvas, spec.digit_scale))
            name = hashlib.md5(data).hexdigest() + ".jpg"
            rel = (f"test2019/{name}" if split == "test"
                   else f"train_val2019/{ICONIC}/{CATEGORY_OFFSET + label}/{name}")
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            image = {"id": next_id, "width": spec.canvas, "height": spec.canvas, "file_name": rel,
                     "license": 0, "rights_holder": "scikit-learn digits (UCI ML hand-written digits)"}
            rows.append((image, CATEGORY_OFFSET + label))
            next_id += 1
        files[split] = rows

    licenses = [{"id": 0, "name": "BSD-3-Clause (scikit-learn)", "url": ""}]
    for split in ("train", "val"):
        write_json_atomic(root / f"{split}2019.json", {
            "info": info, "licenses": licenses, "categories": _categories(),
            "images": [image for image, _ in files[split]],
            "annotations": [{"id": image["id"], "image_id": image["id"], "category_id": cat}
                            for image, cat in files[split]],
        })
    write_json_atomic(root / "test2019.json", {"info": info, "licenses": licenses,
                                         "images": [image for image, _ in files["test"]]})
    with atomic_path(root / "kaggle_sample_submission.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "predicted"])
            for image, _ in files["test"]:
                writer.writerow([image["id"], " ".join(str(CATEGORY_OFFSET + d) for d in range(5))])
    answers = root.parent / f"{root.name}_answers.csv"
    with atomic_path(answers) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "category_id"])
            for image, cat in files["test"]:
                writer.writerow([image["id"], cat])
    return Competition(root=root, answers=answers, counts={k: len(v) for k, v in files.items()})
