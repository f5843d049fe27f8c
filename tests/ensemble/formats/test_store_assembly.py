"""Assembling a store from its chunks checks each chunk's shape: a chunk of another shape (a
damaged or foreign file under .partial) is one line naming it, never a store whose header and
bytes disagree."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.errors import EnsError
from ensemble.formats.dataset import load_split
from ensemble.formats.store import PARTIAL, read_store
from ensemble.inference.run import InferOptions, infer

from tests.ensemble.conftest import Killed, kill_after, make_inat, tiny_onnx


@pytest.mark.parametrize("keep_views", [False, True])
def test_a_chunk_of_another_shape_is_one_line_naming_it(tmp_path, keep_views):
    data = make_inat(tmp_path / "inat", n_val=6, n_test=2)
    model = tiny_onnx(tmp_path / "m.onnx")
    options = InferOptions(tta=("flip",), keep_views=keep_views, workers=0, batch_size=2, chunk_size=2,
                           dtype="float32", out=tmp_path / "runs")
    val = load_split(data / "val2019.json")
    with pytest.raises(Killed):
        infer([model], [val], options, progress=kill_after(2))
    chunk = tmp_path / "runs" / "m" / "val" / PARTIAL / "chunk-000001.npz"
    with np.load(chunk) as saved:
        arrays = dict(saved)
    arrays["logits"] = np.concatenate([arrays["logits"], arrays["logits"][:, :1]], axis=1)  # a class more
    if keep_views:
        arrays["views"] = arrays["views"][:1]  # a view less
        arrays["logits"] = arrays["logits"][:, :-1]
    np.savez(chunk, **arrays)
    with pytest.raises(EnsError) as info:
        infer([model], [val], options)
    message = str(info.value)
    assert "chunk-000001.npz" in message and "run the same `ens infer` again" in message, message
    with pytest.raises(EnsError, match="incomplete"):  # never read as a store
        read_store(tmp_path / "runs" / "m" / "val")
