"""TTA view maths and merge modes: invariants over the registries, golden values by hand."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_softmax as scipy_log_softmax
import pytest

from ensemble.errors import EnsError
from ensemble.inference.tta import (MERGES, POSITIONS, TTA, Geometry, Preprocess, View, canvas_shape, crop,
                          crop_box, geometry, hflip, merge, plan_views, view_size)


def log_softmax(x):
    return scipy_log_softmax(np.asarray(x, np.float64), axis=-1)


@pytest.mark.parametrize("name", sorted(TTA))
def test_every_tta_mode_keeps_identity_first_and_views_unique(name):
    views = plan_views([name], (0.875, 1.0, 1.143))
    assert views[0] == View() and views[0].name == "identity"
    assert len(set(views)) == len(views)
    assert len({v.name for v in views}) == len(views)


def test_views_combine_as_a_product():
    assert [v.name for v in plan_views([])] == ["identity"]
    assert [v.name for v in plan_views(["flip"])] == ["identity", "flip"]
    assert [v.name for v in plan_views(["scale"], (0.8, 1.25))] == ["identity", "scale0.8", "scale1.25"]
    assert [v.name for v in plan_views(["flip", "scale"], (0.875, 1, 1.143))] == [
        "identity", "flip", "scale0.875", "scale0.875+flip", "scale1.143", "scale1.143+flip"]
    assert [v.name for v in plan_views(["crop5"])] == [
        "identity", "crop-tl", "crop-tr", "crop-bl", "crop-br"]
    crop10 = plan_views(["crop10"])
    assert len(crop10) == 10 and crop10 == plan_views(["crop5", "flip"])
    assert len(plan_views(["crop10", "scale"], (0.875, 1.143))) == 30


def test_unknown_names_list_the_choices():
    with pytest.raises(EnsError, match="--tta rotate: choose from identity, flip, scale, crop5, crop10"):
        plan_views(["rotate"])
    with pytest.raises(EnsError, match="--merge median: choose from mean-logits, mean-probs, gmean"):
        merge(np.zeros((1, 1, 2)), "median")
    with pytest.raises(EnsError, match="--scales"):
        plan_views(["scale"], (0.0,))


def test_geometry_follows_the_imagenet_recipe():
    pre = Preprocess(224, "center-crop", 0.875)
    assert geometry(pre, View()) == Geometry("short", 256, 224, "center", "bilinear")
    assert geometry(pre, View(flip=True)) == geometry(pre, View())  # flips are applied to batches
    assert geometry(pre, View(position="top-left")) == Geometry("short", 256, 224, "top-left", "bilinear")
    assert view_size(pre, View(scale=1.143)) == 256
    assert geometry(pre, View(scale=1.143)) == Geometry("short", 292, 256, "center", "bilinear")
    assert geometry(pre, View(scale=0.875)) == Geometry("short", 224, 196, "center", "bilinear")
    squash = Preprocess(224, "squash", 0.875)
    assert geometry(squash, View()) == Geometry("square", 224, 224, "center", "bilinear")
    assert geometry(squash, View(position="bottom-right")) == Geometry("square", 256, 224, "bottom-right", "bilinear")


def test_geometry_refuses_a_policy_or_filter_ens_does_not_know():
    """A hand-made Preprocess meets the rules metadata and options are checked by: an unknown
    resize policy is never taken for a squash."""
    with pytest.raises(EnsError, match="--resize stretch: choose one of center-crop, squash"):
        geometry(Preprocess(224, "stretch"), View())
    with pytest.raises(EnsError, match="--interpolation box: choose one of bilinear, bicubic, nearest, lanczos"):
        geometry(Preprocess(224, interpolation="box"), View())


def test_canvas_and_crop_boxes():
    assert canvas_shape(600, 800, "short", 256) == (256, 341)
    assert canvas_shape(800, 600, "short", 256) == (341, 256)
    assert canvas_shape(600, 800, "square", 224) == (224, 224)
    assert crop_box(256, 341, 224, "center") == (16, 58)
    assert crop_box(256, 341, 224, "top-left") == (0, 0)
    assert crop_box(256, 341, 224, "top-right") == (0, 117)
    assert crop_box(256, 341, 224, "bottom-left") == (32, 0)
    assert crop_box(256, 341, 224, "bottom-right") == (32, 117)


@pytest.mark.parametrize("position", POSITIONS)
def test_crop_cuts_the_square_at_its_box(position):
    image = np.arange(7 * 9 * 3, dtype=np.int32).reshape(7, 9, 3)
    top, left = crop_box(7, 9, 5, position)
    np.testing.assert_array_equal(crop(image, 5, position), image[top:top + 5, left:left + 5])
    with pytest.raises(ValueError):
        crop(image, 8, position)


def test_hflip_mirrors_width_and_is_an_involution():
    batch = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    np.testing.assert_array_equal(hflip(batch)[:, :, 0], batch[:, :, 3])
    np.testing.assert_array_equal(hflip(hflip(batch)), batch)


def test_merge_golden_values():
    # Two views of one image over two classes: softmax gives (1/2, 1/2) and (3/4, 1/4).
    views = np.array([[[0.0, 0.0]], [[math.log(3), 0.0]]])
    np.testing.assert_allclose(merge(views, "mean-logits"), [[math.log(3) / 2, 0.0]])
    np.testing.assert_allclose(merge(views, "mean-probs"), [[math.log(0.625), math.log(0.375)]])
    np.testing.assert_allclose(merge(views, "gmean"),
                               [[math.log(0.375) / 2, math.log(0.125) / 2]])
    gmean = np.exp(log_softmax(merge(views, "gmean")))
    expected = np.sqrt([0.375, 0.125]) / np.sqrt([0.375, 0.125]).sum()
    np.testing.assert_allclose(gmean, [expected])


@pytest.mark.parametrize("mode", sorted(MERGES))
def test_merges_of_views_certain_of_other_classes_stay_finite(mode):
    # Each view is certain of another class: probabilities underflow to 0 in float64.
    views = np.array([[[1000.0, -1000.0, 0.0]], [[-1000.0, 1000.0, 0.0]]], np.float32)
    merged = merge(views, mode)
    assert merged.shape == (1, 3) and np.isfinite(merged).all()
    probs = np.exp(log_softmax(merged))
    assert probs[0, 0] == pytest.approx(probs[0, 1])  # the views disagree symmetrically
    if mode == "mean-probs":
        np.testing.assert_allclose(probs[0], [0.5, 0.5, 0.0], atol=1e-12)


@pytest.mark.parametrize("mode", sorted(MERGES))
def test_merge_of_one_view_keeps_the_ranking(mode):
    rng = np.random.default_rng(0)
    views = rng.normal(0, 3, (1, 4, 6))
    np.testing.assert_allclose(log_softmax(merge(views, mode)), log_softmax(views[0]), atol=1e-12)


def test_merges_of_extreme_logits_stay_finite_and_normalise():
    views = np.array([[[1e4, 0.0, -1e4]], [[-1e4, 0.0, 1e4]]])
    for mode in MERGES:
        out = log_softmax(merge(views, mode))
        assert np.isfinite(out).all(), mode
        np.testing.assert_allclose(np.exp(out).sum(), 1.0)
