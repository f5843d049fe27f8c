"""Forward, the compute of one decoded batch, against the model run by hand: each view one pass
of the whole padded batch (its mirror image for a flipped view), merged by the merge's formula;
and the plan every engine opens (view groups, what the decode must produce)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from ensemble.inference.decode import decode_batch
from ensemble.inference.forward import Forward, decode_needs, open_passes, view_groups
from ensemble.inference.options import InferOptions
from ensemble.inference.runtime import GpuOptions, load_model
from ensemble.inference.tta import geometries, plan_views, view_size

from tests.ensemble.conftest import CLASSES, run_onnx, tiny_onnx, write_images

SCALES = (0.875, 1.143)


def _by_hand(path, model, views, decoded) -> np.ndarray:
    """``(views, count, classes)``: each view's logits, the model run on the view's pixels."""
    geos = geometries(model.preprocess, views)
    out = []
    for view, geo in zip(views, geos):
        pixels = decoded.arrays[geo]
        if view.flip:
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        out.append(run_onnx(path, pixels)[:decoded.count])
    return np.stack(out)


MERGED = {
    "mean-logits": lambda v: v.astype(np.float64).mean(axis=0),
    "mean-probs": lambda v: logsumexp(log_softmax(v.astype(np.float64), axis=-1), axis=0) - np.log(len(v)),
    "gmean": lambda v: log_softmax(v.astype(np.float64), axis=-1).mean(axis=0),
}


@pytest.mark.parametrize("merge", list(MERGED))
def test_forward_is_the_model_run_by_hand_on_every_view_then_merged(tmp_path, merge):
    path = tiny_onnx(tmp_path / "m.onnx")
    model = load_model(path)
    views = plan_views(("flip", "scale"), SCALES)
    assert len(views) == 6  # identity, flip, two scales and their mirrors
    options = InferOptions(tta=("flip", "scale"), scales=SCALES, merge=merge, batch_size=4)
    passes = open_passes([model], views, options, "cpu", GpuOptions())
    images = write_images(tmp_path / "imgs", [(60, 45), (45, 70), (50, 50)])
    decoded = decode_batch(8, [str(p) for p in images], 4, **decode_needs([model], views, options))

    with Forward(merge) as forward:
        out = forward(decoded, passes)
    assert (out.start, out.count, out.bad, out.decodes) == (8, 3, (), 3)  # padded batch, one decode an image
    [(name, result)] = out.models.items()
    assert name == "m" and result.boxes is None and result.seconds > 0
    want = _by_hand(path, model, views, decoded)
    assert result.views.shape == (6, 3, CLASSES)
    np.testing.assert_allclose(result.views, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.scores, MERGED[merge](want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(result.views[0], result.views[1])  # the flip is another view


def test_a_bad_image_is_reported_and_its_row_is_the_model_on_zeros(tmp_path):
    path = tiny_onnx(tmp_path / "m.onnx", seed=2)
    model = load_model(path)
    views = plan_views(("flip",))
    options = InferOptions(tta=("flip",), batch_size=2)
    images = write_images(tmp_path / "imgs", [(40, 30), (30, 40)])
    images[1].write_bytes(b"not an image")
    decoded = decode_batch(0, [str(p) for p in images], 2, **decode_needs([model], views, options))
    out = Forward("mean-logits", threads=1)(decoded, open_passes([model], views, options, "cpu", GpuOptions()))
    assert out.bad == ((1, "not an image Pillow can read"),)
    zeros = run_onnx(path, np.zeros((1, 32, 32, 3), np.uint8))[0]
    np.testing.assert_allclose(out.models["m"].views[:, 1], [zeros, zeros], rtol=1e-5, atol=1e-5)


def test_only_the_models_given_run(tmp_path):
    a, b = load_model(tiny_onnx(tmp_path / "a.onnx", seed=1)), load_model(tiny_onnx(tmp_path / "b.onnx", seed=2))
    views = plan_views(())
    options = InferOptions(batch_size=2)
    passes = open_passes([a, b], views, options, "cpu", GpuOptions())
    images = write_images(tmp_path / "imgs", [(40, 30)])
    decoded = decode_batch(0, [str(p) for p in images], 2, **decode_needs([a, b], views, options))
    forward = Forward("mean-logits", threads=1)
    assert set(forward(decoded, passes[1:]).models) == {"b"}
    assert forward(decoded, []).models == {}


def test_view_groups_cover_every_view_once_by_input_size(tmp_path):
    model = load_model(tiny_onnx(tmp_path / "m.onnx"))
    views = plan_views(("flip", "scale", "cam"), SCALES)
    groups = view_groups(model, views)
    plain = [i for i, v in enumerate(views) if not v.cam]
    assert sorted(i for g in groups for i in g.rows) == plain  # cam views run after the identity pass
    assert [g.size for g in groups] == [32, 28, 37]  # the views' order: identity's size first
    for group in groups:
        assert {view_size(model.preprocess, views[i]) for i in group.rows} == {group.size}
        assert [flipped for _, flipped in group.members] == [views[i].flip for i in group.rows]


def test_the_decode_makes_each_geometry_once_for_models_that_share_it(tmp_path):
    a, b = load_model(tiny_onnx(tmp_path / "a.onnx", seed=1)), load_model(tiny_onnx(tmp_path / "b.onnx", seed=2))
    bigger = load_model(tiny_onnx(tmp_path / "c.onnx", size=48))
    views = plan_views(("flip",))
    options = InferOptions(tta=("flip",))
    assert len(decode_needs([a], views, options)["geometries"]) == 1  # a flip is the same pixels mirrored
    assert decode_needs([a, b], views, options)["geometries"] == decode_needs([a], views, options)["geometries"]
    assert len(decode_needs([a, bigger], views, options)["geometries"]) == 2
    assert decode_needs([a], views, options)["sources"] == ()  # no cam view: no crop sources
