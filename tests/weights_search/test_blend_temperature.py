"""Temperature scaling recovers the temperature labels were drawn with."""

import numpy as np
import pytest

from weights_search.temperature import TEMPERATURE_BOUNDS, fit_temperature, fit_temperatures


def _sampled(t_true, seed=0, n_rows=4000, n_classes=10):
    """Logits, and labels drawn from softmax(logits / t_true): t_true is the NLL-optimal temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n_rows, n_classes))
    probs = np.exp(logits / t_true)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) > rng.random((n_rows, 1))).argmax(axis=1)
    return logits.astype(np.float32), labels


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_recovers_the_temperature_labels_were_sampled_with(t_true):
    logits, labels = _sampled(t_true)
    assert fit_temperature(logits, labels) == pytest.approx(t_true, rel=0.06)


def test_is_unchanged_by_a_constant_added_to_a_row():
    logits, labels = _sampled(2.0, seed=1, n_rows=500)
    shifted = logits + np.random.default_rng(2).normal(scale=50.0, size=(500, 1)).astype(np.float32)
    assert fit_temperature(shifted, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-3)


def test_stays_inside_the_bounds():
    logits, labels = _sampled(0.5, seed=3, n_rows=500)
    assert fit_temperature(logits, labels, bounds=(1.0, 4.0)) == pytest.approx(1.0, abs=1e-3)
    assert TEMPERATURE_BOUNDS[0] <= fit_temperature(logits * 0, labels) <= TEMPERATURE_BOUNDS[1]


def test_one_temperature_per_member():
    a, labels = _sampled(0.5, seed=4, n_rows=2000)
    b = a * 4.0  # the same member, four times as confident: four times the temperature
    temps = fit_temperatures(np.stack([a, b]), labels)
    assert temps.shape == (2,)
    assert temps[1] == pytest.approx(4 * temps[0], rel=1e-3)


def test_rejects_bad_arguments():
    logits, labels = _sampled(1.0, n_rows=10)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(logits, labels, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        fit_temperature(logits, labels + 10)
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature(np.full((10, 10), np.nan, dtype=np.float32), labels)
