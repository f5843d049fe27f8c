"""fit_blend, Blend and blend_chunks: the two calls the command line makes."""

import numpy as np
import pytest

from weights_search.fitted import FittedBlend, blend_chunks, fit_blend
from weights_search.functional import GEOMETRIC, MIXTURE, fuse, log_softmax
from weights_search.registry import get_method
from weights_search.temperature import fit_temperatures


def _problem(seed=0, n_members=3, n_rows=90, n_classes=12):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_rows)
    logits = rng.normal(scale=2.0, size=(n_members, n_rows, n_classes))
    logits[:, np.arange(n_rows), labels] += np.linspace(3.0, 1.0, n_members)[:, None]
    return logits.astype(np.float16), labels


def test_fit_blend_records_what_the_method_fitted():
    logits, labels = _problem()
    blend = fit_blend(logits, labels, "greedy", {"n_rounds": 7})
    method = get_method("greedy", n_rounds=7).fit(log_softmax(logits), labels)
    assert blend.method == "greedy" and blend.fusion == MIXTURE and blend.temperatures is None
    np.testing.assert_array_equal(blend.weights, method.weights_)
    assert blend.params == method.params
    assert blend.train_score == method.train_score_


def test_fit_blend_with_temperatures_fits_them_first():
    logits, labels = _problem(1)
    blend = fit_blend(logits, labels, "logit", temperature=True)
    # Streamed temperature statistics fit within 1e-3 of the exact in-memory fit (issue 24).
    np.testing.assert_allclose(blend.temperatures, fit_temperatures(logits, labels), rtol=1e-3)
    method = get_method("logit").fit(log_softmax(logits, blend.temperatures), labels)
    np.testing.assert_allclose(blend.weights, method.weights_, rtol=1e-6)
    assert blend.fusion == GEOMETRIC


def test_blend_applies_temperatures_then_fuses():
    logits, _ = _problem(2)
    blend = FittedBlend("nll", MIXTURE, (0.2, 0.5, 0.3), (1.5, 0.7, 1.0))
    expected = fuse(log_softmax(logits, np.array([1.5, 0.7, 1.0])), np.array([0.2, 0.5, 0.3]), MIXTURE)
    # A mixture is fused from the logits with one exponential per value (issue 24): float32 rounding.
    np.testing.assert_allclose(blend.log_proba(logits), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("fusion", [MIXTURE, GEOMETRIC])
def test_chunks_from_memory_mapped_float16_stores_equal_one_pass(tmp_path, fusion):
    logits, _ = _problem(3, n_rows=1000)
    paths = []
    for m, member in enumerate(logits):
        paths.append(tmp_path / f"member{m}.npy")
        np.save(paths[-1], member)
    stores = [np.load(p, mmap_mode="r") for p in paths]
    blend = FittedBlend("x", fusion, (0.2, 0.0, 1.3), (1.2, 1.0, 0.8))
    starts, parts = zip(*blend_chunks(stores, blend, chunk_rows=300))
    assert starts == (0, 300, 600, 900)
    np.testing.assert_array_equal(np.concatenate(parts), blend.log_proba(logits))


def test_bad_blends_and_members_are_refused():
    with pytest.raises(ValueError, match="choose from: mixture, geometric"):
        FittedBlend("nll", "mean", (1.0,))
    with pytest.raises(ValueError, match="2 temperatures for 1 weights"):
        FittedBlend("nll", MIXTURE, (1.0,), (1.0, 2.0))
    blend = FittedBlend("nll", MIXTURE, (0.5, 0.5))
    with pytest.raises(ValueError, match="1 members for a blend of 2"):
        next(blend_chunks([np.zeros((3, 4))], blend))
    with pytest.raises(ValueError, match="one shape"):
        next(blend_chunks([np.zeros((3, 4)), np.zeros((3, 5))], blend))
