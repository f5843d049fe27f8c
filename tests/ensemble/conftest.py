"""Helpers for the ensemble tests: tiny ONNX classifiers and small datasets in the iNat layout.

The tiny classifier (:func:`tiny_onnx`) is built with onnx.helper: uint8 NHWC in, normalise,
an asymmetric 3x3 convolution, ReLU, global average pooling, a linear head. It runs at any
size in a millisecond and is not mirror-symmetric, so a wrong flip, crop or scale changes its
logits. :func:`make_inat` writes JPEGs plus ``val2019.json`` / ``test2019.json`` as the
competition ships them. Real exported torchvision models come from :func:`exported_model`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from ensemble.formats.model import ModelMetadata

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLASSES = 5


def tiny_onnx(path: Path, *, size: int = 32, classes: int = CLASSES, dynamic: bool = True,
              metadata: bool = True, float_nchw: bool = False, resize: str = "center-crop",
              crop_pct: float = 0.875, seed: int = 0, class_ids: Sequence[int] | None = None) -> Path:
    """Write a tiny classifier. ``float_nchw``: a foreign-style graph taking normalised float32
    (batch, 3, h, w) and no ens metadata; otherwise the ens contract (uint8 NHWC ``image``)."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32)
    head = rng.normal(0, 1, (8, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    spatial = ["height", "width"] if dynamic else [size, size]
    inits = [numpy_helper.from_array(kernel, "kernel"), numpy_helper.from_array(head, "head"),
             numpy_helper.from_array(bias, "bias")]
    nodes = []
    if float_nchw:
        inp = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, *spatial])
        first = "pixels"
    else:
        inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", *spatial, 3])
        mean = np.asarray(MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(STD, np.float32).reshape(1, 3, 1, 1)
        inits += [numpy_helper.from_array(1 / (255 * std), "scale"),
                  numpy_helper.from_array(-mean / std, "shift")]
        nodes += [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
                  helper.make_node("Cast", ["nchw"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["f", "scale"], ["fs"]),
                  helper.make_node("Add", ["fs", "shift"], ["normalised"])]
        first = "normalised"
    nodes += [helper.make_node("Conv", [first, "kernel"], ["conv"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["conv"], ["relu"]),
              helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"]),
              helper.make_node("Gemm", ["flat", "head", "bias"], ["logits"])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    graph = helper.make_graph(nodes, "tiny", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = None
    if metadata and not float_nchw:
        meta = ModelMetadata(architecture="tiny", num_classes=classes, input_size=size, mean=MEAN,
                             std=STD, resize=resize, crop_pct=crop_pct, dynamic_size=dynamic,
                             class_ids=None if class_ids is None else tuple(class_ids))
    return save_model(model, path, meta)


def save_model(model, path: Path, meta: ModelMetadata | None = None) -> Path:
    """Check the ONNX ``model`` and write it to ``path``, with ``meta`` as its ens metadata."""
    if meta is not None:
        for key, value in meta.to_props().items():
            model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def replace_metadata(path: Path, meta: ModelMetadata) -> Path:
    """Overwrite the ens metadata of the ONNX file at ``path`` with ``meta``: a hand-edited file."""
    graph = onnx.load(str(path))
    props = meta.to_props()
    for prop in graph.metadata_props:
        prop.value = props.get(prop.key, prop.value)
    onnx.save(graph, str(path))
    return path


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """The model's logits for uint8 NHWC ``images``, straight through onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (not white noise, which JPEG mangles)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    noise = rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def write_images(folder: Path, sizes: Sequence[tuple[int, int]], suffix: str = ".jpg",
                 seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img{i:03d}{suffix}"
        photo(w, h, seed + i).save(path, **({"quality": 92} if suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def make_inat(root: Path, n_val: int = 6, n_test: int = 5, categories: int = CLASSES,
              sizes: Sequence[tuple[int, int]] = ((64, 48), (48, 64), (80, 60), (50, 50)),
              seed: int = 0) -> Path:
    """Write a small dataset in the iNat 2019 layout under ``root`` and return ``root``.

    ``train_val2019/Plants/<category>/<md5>.jpg`` for val images (labelled), ``test2019/<md5>.jpg``
    for test images; ``val2019.json`` and ``test2019.json`` with COCO fields, test ids continuing
    after the val ids as the real test set's do.
    """
    root.mkdir(parents=True, exist_ok=True)
    cats = [{"id": c, "name": f"species {c}", "kingdom": "Plantae", "phylum": "", "class": "",
             "order": "", "family": "", "genus": ""} for c in range(categories)]

    def write(split: str, count: int, first_id: int) -> None:
        images, annotations = [], []
        for i in range(count):
            image_id = first_id + i
            w, h = sizes[i % len(sizes)]
            name = hashlib.md5(f"{split}{image_id}".encode()).hexdigest() + ".jpg"
            category = i % categories
            rel = (f"train_val2019/Plants/{category}/{name}" if split == "val" else f"test2019/{name}")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            photo(w, h, seed + image_id).save(root / rel, quality=90)
            images.append({"id": image_id, "width": w, "height": h, "file_name": rel, "license": 0,
                           "rights_holder": ""})
            if split == "val":
                annotations.append({"id": image_id, "image_id": image_id, "category_id": category})
        doc = {"info": {"year": 2019}, "images": images, "categories": cats, "licenses": []}
        if split == "val":
            doc["annotations"] = annotations
        (root / f"{split}2019.json").write_text(json.dumps(doc))

    write("val", n_val, 0)
    write("test", n_test, n_val)
    return root


def store_bytes(folder: Path) -> dict[str, bytes]:
    """The array files of a store, by name (the manifest holds timings, so it is left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "models" / "tiny.onnx")


@pytest.fixture
def inat(tmp_path) -> Path:
    return make_inat(tmp_path / "inat")


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> Path:
    """A real `ens export` of torchvision's resnet18 (5 classes, 32 px, random weights)."""
    torch = pytest.importorskip("torch")
    import torchvision

    from exporters import ExportOptions, export_checkpoint

    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    checkpoint = folder / "resnet18.pth"
    torch.save(model.state_dict(), checkpoint)
    return export_checkpoint(checkpoint, options=ExportOptions(arch="resnet18", input_size=32)).path


# Interrupting a run, and running one under a file-size limit -----------------------------------


class Killed(Exception):
    """Raised from a progress callback to stop a run where a kill would."""


def kill_at_first_chunk(event):
    """A progress callback that stops the run once its first chunk is saved."""
    if event.kind == "chunk":
        raise Killed


def kill_after(chunks: int):
    """A progress callback that stops the run once ``chunks`` chunks are saved."""
    seen = []

    def progress(event):
        if event.kind == "chunk":
            seen.append(event)
            if len(seen) == chunks:
                raise Killed

    return progress


#: Runs `ens ARGS...` under a file-size limit of LIMIT bytes, SIGXFSZ ignored (so a write past
#: the limit fails with EFBIG instead of killing the process): ``limited.py LIMIT ARGS...``.
LIMITED = """
import resource, signal, sys

if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["ens", *sys.argv[2:]]
    from ensemble.cli import main
    main()
"""


# The command line, as the end-to-end tests drive it ------------------------------------------


def ens(*args):
    """Run `ens ARGS...` in this process (typer's CliRunner); arguments may be paths or numbers."""
    from typer.testing import CliRunner

    from ensemble.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *patterns) -> str:
    """The run failed with exit 2 and exactly one `error:` line, the last, holding each pattern;
    that line."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.output, result.output
    for pattern in patterns:
        assert pattern in errors[0], errors[0]
    return errors[0]
    return errors[0]
