"""A model's identity (``Model.sha256``, the store manifests' ``model.sha256``) covers every file
the model loads: the .onnx and the external-data files its tensors name. A plain file's identity
stays the sha256 of its bytes, as older stores, blend.json provenance and ledgers hold it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from ensemble.errors import EnsError
from ensemble.formats.dataset import load_split
from ensemble.formats.store import read_store
from ensemble.inference.foreign import ForeignPreprocess
from ensemble.inference.run import InferOptions, infer
from ensemble.inference.runtime import load_model

from tests.ensemble.conftest import MEAN, STD, ens, one_line_error, tiny_onnx, write_images


def _external(path: Path, *, seed: int = 0, float_nchw: bool = False, location: str | None = None,
              one_file: bool = True) -> Path:
    """A tiny model whose weights live beside it (``location``, default ``<name>.data``)."""
    tiny_onnx(path, seed=seed, float_nchw=float_nchw)
    graph = onnx.load(str(path))
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location=location or path.name + ".data", size_threshold=0)
    return path


def _weights_of(seed: int, tmp_path: Path, name: str) -> bytes:
    """The external-data bytes of the same graph with other weights (same layout and size)."""
    other = _external(tmp_path / f"other{seed}" / name, seed=seed)
    return (other.parent / (name + ".data")).read_bytes()


def _locations(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False)
    return [e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"]


def test_a_plain_model_keeps_the_sha256_of_its_bytes(tiny):
    assert load_model(tiny).sha256 == hashlib.sha256(tiny.read_bytes()).hexdigest()


def test_other_external_weights_are_another_model(tmp_path):
    model = _external(tmp_path / "models" / "m.onnx")
    data = model.parent / "m.onnx.data"
    before = load_model(model).sha256
    assert before != hashlib.sha256(model.read_bytes()).hexdigest()  # not the .onnx's bytes alone
    assert load_model(model).sha256 == before  # stable
    data.write_bytes(_weights_of(5, tmp_path, "m.onnx"))
    assert load_model(model).sha256 != before


def test_every_external_file_is_covered_each_once(tmp_path):
    model = _external(tmp_path / "models" / "m.onnx", one_file=False)  # a file per tensor
    files = sorted(set(_locations(model)))
    assert len(files) > 1
    first = load_model(model).sha256
    seen = {first}
    for name in files:
        path = model.parent / name
        original = path.read_bytes()
        path.write_bytes(bytes(b ^ 1 for b in original))
        seen.add(load_model(model).sha256)
        path.write_bytes(original)
    assert len(seen) == len(files) + 1
    assert load_model(model).sha256 == first


def test_a_rerun_with_replaced_external_weights_recomputes(tmp_path):
    model = _external(tmp_path / "models" / "m.onnx")
    write_images(tmp_path / "imgs", [(40, 30), (30, 40), (50, 50)])
    split = load_split(tmp_path / "imgs")
    options = InferOptions(workers=0, out=tmp_path / "runs")
    first = infer([model], [split], options)
    store = first.stores[0].path
    logits = read_store(store).logits.copy()
    sha = read_store(store).manifest["model"]["sha256"]

    (model.parent / "m.onnx.data").write_bytes(_weights_of(7, tmp_path, "m.onnx"))
    events = []
    infer([model], [split], options, events.append)
    assert not any("same arguments; kept" in e.message for e in events)
    again = read_store(store)
    assert again.manifest["model"]["sha256"] != sha
    assert not np.allclose(again.logits, logits)

    # Unchanged, it is kept.
    events.clear()
    infer([model], [split], options, events.append)
    assert any("same arguments; kept" in e.message for e in events)


@pytest.mark.parametrize("foreign", [False, True], ids=["ens", "foreign"])
@pytest.mark.parametrize("case", ["escapes", "absolute", "missing", "link-out"])
def test_external_data_outside_the_models_folder_is_one_line(tmp_path, foreign, case):
    model = _external(tmp_path / "models" / "m.onnx", float_nchw=foreign)
    data = model.parent / "m.onnx.data"
    outside = tmp_path / "outside.data"
    outside.write_bytes(data.read_bytes())
    location = {"escapes": "../outside.data", "absolute": str(outside), "missing": "gone.data",
                "link-out": "link.data"}[case]
    if case == "link-out":
        os.symlink(outside, model.parent / "link.data")
    graph = onnx.load(str(model), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(graph, str(model))
    write_images(tmp_path / "imgs", [(40, 30)])
    args = ["--input-size", 32, "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))] if foreign else []
    result = ens("infer", model, "--index", tmp_path / "imgs", "--out", tmp_path / "runs", "--workers", 0, *args)
    line = one_line_error(result, str(model), location)
    assert not (tmp_path / "runs" / "m").exists(), line
    with pytest.raises(EnsError):
        load_model(model, ForeignPreprocess(input_size=32, mean=MEAN, std=STD) if foreign else None)


def test_a_link_inside_the_folder_is_followed(tmp_path):
    """onnxruntime opens a link whose target lies in the model's folder; the identity is the target's."""
    model = _external(tmp_path / "models" / "m.onnx")
    data = model.parent / "m.onnx.data"
    before = load_model(model).sha256
    data.rename(model.parent / "weights.bin")
    os.symlink("weights.bin", data)
    assert load_model(model).sha256 == before


def test_onnx_refusing_a_foreign_models_data_is_one_line(tmp_path):
    """onnx (which loads a foreign model's weights) refuses links that onnxruntime follows."""
    model = _external(tmp_path / "models" / "m.onnx", float_nchw=True)
    data = model.parent / "m.onnx.data"
    data.rename(model.parent / "weights.bin")
    os.symlink("weights.bin", data)
    write_images(tmp_path / "imgs", [(40, 30)])
    result = ens("infer", model, "--index", tmp_path / "imgs", "--out", tmp_path / "runs", "--workers", 0,
                 "--input-size", 32, "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)))
    one_line_error(result, str(model), "external data", "symbolic link")
