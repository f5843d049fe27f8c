"""The demo's trainer: brief CPU training of torchvision networks on the demo competition.

This is the one part of the `ensemble` package that needs torch (the demo plays the user, who
arrives with checkpoints). Checkpoints are saved the ways users save them, and cached: a
checkpoint whose recipe (architecture, epochs, input size, data fingerprint, ...) is unchanged
is not trained again.

Training is reproducible: the same recipe and data give the same checkpoint, bit for bit,
whatever the machine's load or the cores the process may use (:func:`reproducible_torch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ensemble.fileio import atomic_path
from ensemble.formats.common import read_json
from ensemble.formats.model import IMAGENET_MEAN, IMAGENET_STD

#: PyTorch threads the demo trains on, on every machine. A convolution's sums split over another
#: number of threads round differently and training amplifies that: when the count followed the
#: cores the process may use (fewer under taskset, pytest-xdist's pinning, a container's
#: limit), two clean runs gave resnet18 CV top-1 0.612 and 0.640. Two: the development
#: machine's cores, where the demo's timings were measured.
TRAIN_THREADS = 2

#: How the demo saves each checkpoint, as users do.
SAVE_FORMS = {
    "ddp-state-dict": "a training checkpoint whose state_dict keys carry DataParallel's 'module.' prefix",
    "whole-model": "a whole pickled model (torch.save(model))",
    "training-checkpoint": "a training-checkpoint dict: model_state_dict, optimizer, epoch",
}


@dataclass(frozen=True)
class Recipe:
    """One model to train: architecture, how to save it, and the training settings."""

    arch: str
    save_as: str
    epochs: int
    input_size: int
    lr: float = 3e-3
    batch_size: int = 48
    seed: int = 0
    #: Train in NHWC memory format: oneDNN's depthwise convolutions run 1.5-2x faster in it on
    #: the CPU, plain ResNets a little slower.
    channels_last: bool = False
    #: Overrides the architecture's classifier dropout (None keeps torchvision's default).
    dropout: float | None = None

    @property
    def needs_arch(self) -> bool:
        """Whether `ens export` must be told the architecture (a state dict does not say)."""
        return self.save_as != "whole-model"


def load_images(data: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(images uint8 (N, size, size, 3), labels (N,) column indices, category ids by column)``.

    Columns follow the categories sorted by id, as `ens export --classes FILE.json` maps them.
    """
    doc = read_json(data / f"{split}2019.json")
    categories = sorted(c["id"] for c in doc["categories"])
    column = {c: j for j, c in enumerate(categories)}
    label = {a["image_id"]: column[a["category_id"]] for a in doc["annotations"]}
    images = np.stack([np.asarray(Image.open(data / im["file_name"]).convert("RGB")
                                  .resize((size, size), Image.BILINEAR)) for im in doc["images"]])
    labels = np.asarray([label[im["id"]] for im in doc["images"]], dtype=np.int64)
    return images, labels, categories


def training_key(data: Path) -> str:
    """What the networks learn from in ``data``: the training images (their file names are the
    md5 of their bytes) with their labels, and the categories; not the places and dates the
    records also carry (the geo prior's, which the networks never see)."""
    doc = read_json(data / "train2019.json")
    label = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    text = json.dumps({"categories": sorted(c["id"] for c in doc["categories"]),
                       "images": [[im["file_name"], label[im["id"]]] for im in doc["images"]]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(recipe: Recipe, data_key: str, threads: int = TRAIN_THREADS) -> str:
    """What a cached checkpoint was trained from: another thread count trains another one."""
    import torch
    import torchvision

    text = json.dumps({"recipe": asdict(recipe), "data": data_key, "threads": threads, "torch": torch.__version__,
                       "torchvision": torchvision.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _augment(x, generator):
    """Random zoom-in (scale 0.85-1), shift and horizontal flip of a normalised NCHW batch."""
    import torch

    n = x.shape[0]
    scale = torch.empty(n).uniform_(0.85, 1.0, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def train(recipe: Recipe, images: np.ndarray, labels: np.ndarray, num_classes: int, log=print):
    """Train ``recipe.arch`` from scratch; returns the model in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    extra = {"aux_logits": False, "init_weights": True} if recipe.arch == "googlenet" else {}
    if recipe.dropout is not None:
        extra["dropout"] = recipe.dropout
    model = torchvision.models.get_model(recipe.arch, weights=None, num_classes=num_classes, **extra)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y_all = torch.from_numpy(labels)
    steps = recipe.epochs * -(-len(x_all) // recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.25)
    loss_fn = torch.nn.CrossEntropyLoss()
    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x_all), generator=generator)
        start, total, correct = time.perf_counter(), 0.0, 0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            logits = model(_augment(x_all[idx], generator).contiguous(memory_format=layout))
            loss = loss_fn(logits, y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        log(f"    {recipe.arch} epoch {epoch + 1}/{recipe.epochs}: loss {total / len(order):.3f}, "
            f"train top-1 {correct / len(order):.3f} ({time.perf_counter() - start:.1f} s)")
    _recalibrate_batchnorm(model, x_all, recipe.batch_size)
    return model.to(memory_format=torch.contiguous_format).eval()


def _recalibrate_batchnorm(model, images, batch_size: int) -> None:
    """Recompute BatchNorm running statistics over the training images.

    MNASNet keeps them with momentum 0.0003 and MobileNetV3 with 0.01, tuned for ImageNet's
    long schedules: after a few hundred steps their running averages are still mostly the
    initial ones, and the model in eval mode predicts one class. An exact average fixes that.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])


def save(model, recipe: Recipe, path: Path) -> None:
    """Write the checkpoint in ``recipe.save_as`` form, atomically."""
    import torch

    if recipe.save_as == "ddp-state-dict":
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        payload = {"epoch": recipe.epochs, "arch": recipe.arch, "state_dict": state}
    elif recipe.save_as == "whole-model":
        payload = model
    elif recipe.save_as == "training-checkpoint":
        payload = {"epoch": recipe.epochs, "model_state_dict": model.state_dict(),
                   "optimizer": {"lr": recipe.lr}}
    else:
        raise ValueError(f"unknown save form {recipe.save_as!r}; choose from {', '.join(SAVE_FORMS)}")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


@contextlib.contextmanager
def reproducible_torch(threads: int = TRAIN_THREADS):
    """PyTorch set to give the same numbers on every run, for the ``with`` block; the caller's
    settings come back after it (the demo trains inside `ens demo`, and inside tests).

    ``threads`` intra-op threads, not the cores this process may use: results depend on the
    thread count, not on the cores or the load (a fixed count on fewer cores is only slower).
    Deterministic algorithms (torch's and oneDNN's) where an operation has several. The same
    instruction set is assumed: oneDNN and MKL choose their kernels by CPU (AVX2, AVX-512), so
    another CPU may give other digits.
    """
    import torch

    if threads < 1:
        raise ValueError(f"threads {threads}: want 1 or more")
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.mkldnn.deterministic)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.deterministic = True
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.mkldnn.deterministic = saved[3]


def train_all(recipes: Sequence[Recipe], data: Path, folder: Path, log=print,
              threads: int = TRAIN_THREADS) -> list[tuple[Recipe, Path, bool]]:
    """Train (or reuse) every recipe on ``threads`` PyTorch threads (:func:`reproducible_torch`);
    returns ``(recipe, checkpoint, trained now)``."""
    with reproducible_torch(threads):
        return _train_all(recipes, data, folder, log, threads)


def _train_all(recipes: Sequence[Recipe], data: Path, folder: Path, log,
               threads: int) -> list[tuple[Recipe, Path, bool]]:
    data_key = training_key(data)
    cache: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}
    results = []
    for recipe in recipes:
        path = folder / f"{recipe.arch}.pt"
        stamp = folder / f"{recipe.arch}.recipe"
        key = fingerprint(recipe, data_key, threads)
        if path.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
            results.append((recipe, path, False))
            continue
        if recipe.input_size not in cache:
            cache[recipe.input_size] = load_images(data, "train", recipe.input_size)
        images, labels, categories = cache[recipe.input_size]
        model = train(recipe, images, labels, len(categories), log)
        folder.mkdir(parents=True, exist_ok=True)
        save(model, recipe, path)
        stamp.write_text(key + "\n")
        results.append((recipe, path, True))
    return results
