"""Blend methods: invariants over every registered method, golden weights on hand-made members,
analytic gradients against finite differences, and the registry's errors."""

import itertools

import numpy as np
import pytest
from scipy.optimize import check_grad
from scipy.special import logsumexp

from weights_search.base import Blender
from weights_search.functional import MIXTURE, log_softmax
from weights_search.mixture import NllBlend, mixture_nll, mixture_nll_and_grad
from weights_search.pooling import LogitBlend, pooled_nll_and_grad, relative_log_probs
from weights_search.temperature import fit_temperature
from weights_search.registry import DEFAULT_METHOD, METHODS, get_method

N_CLASSES = 10
LABELS = np.arange(40) % N_CLASSES


def _member(p_true: float, shift: int = 0) -> np.ndarray:
    """Log-probs ``(N, C)`` putting ``p_true`` on class ``label + shift`` and the rest evenly."""
    probs = np.full((LABELS.size, N_CLASSES), (1 - p_true) / (N_CLASSES - 1))
    probs[np.arange(LABELS.size), (LABELS + shift) % N_CLASSES] = p_true
    return np.log(probs).astype(np.float32)


PERFECT = _member(0.999)
GOOD = _member(0.7)
UNIFORM = _member(1 / N_CLASSES)
WRONG = _member(0.9, shift=1)
#: Right (0.7) on even rows, wrong (0.7 on another class) on odd rows.
NOISY = np.where((np.arange(LABELS.size) % 2 == 0)[:, None], GOOD, _member(0.7, shift=3))


def _random_problem(seed=0, n_members=3, n_rows=60, n_classes=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_rows)
    logits = rng.normal(scale=2.0, size=(n_members, n_rows, n_classes))
    logits[:, np.arange(n_rows), labels] += np.linspace(2.0, 0.5, n_members)[:, None]
    return logits.astype(np.float32), labels


# --- the registry ---------------------------------------------------------------------------

def test_registry_names_every_method_and_nll_is_the_default():
    assert list(METHODS) == ["uniform", "nll", "logit", "greedy", "accuracy"]
    assert DEFAULT_METHOD == "nll"
    assert all(issubclass(cls, Blender) for cls in METHODS.values())


def test_unknown_method_error_names_the_choices():
    with pytest.raises(ValueError, match="'mean'; choose from: uniform, nll, logit, greedy, accuracy"):
        get_method("mean")


def test_unknown_parameter_error_names_the_valid_parameters():
    with pytest.raises(ValueError, match="no parameter rounds; its parameters: n_rounds, n_init, score"):
        get_method("greedy", rounds=3)
    with pytest.raises(ValueError, match="its parameters: none"):
        get_method("uniform", seed=1)


def test_bad_parameter_values_name_the_choices():
    with pytest.raises(ValueError, match="choose from: nll, accuracy"):
        get_method("greedy", score="auc")
    with pytest.raises(ValueError, match="bag_fraction"):
        get_method("greedy", bag_fraction=0.0)


# --- invariants over every registered method --------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_fits_valid_deterministic_weights(name):
    logits, labels = _random_problem()
    lp = log_softmax(logits)
    method = get_method(name)
    assert method.fit(lp, labels) is method
    w = method.weights_
    assert w.shape == (3,) and np.isfinite(w).all() and (w >= 0).all()
    if method.fusion == MIXTURE:
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(method.train_score_)
    fused = method.predict_log_proba(lp)
    np.testing.assert_allclose(logsumexp(fused, axis=1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(get_method(name).fit(lp, labels).weights_, w)
    assert get_method(name, **method.params).params == method.params


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_takes_members_that_rule_classes_out(name):
    logits, labels = _random_problem(1)
    logits[0, :, 1] = -np.inf  # member 0 never predicts class 1, labelled or not
    logits[1, :, 4] = -np.inf
    lp = log_softmax(logits)
    method = get_method(name).fit(lp, labels)
    assert np.isfinite(method.weights_).all()
    assert not np.isnan(method.predict_log_proba(lp)).any()


@pytest.mark.parametrize("name", ["uniform", "nll", "logit", "greedy"])
def test_reordering_members_reorders_the_weights(name):
    # Not for `accuracy`: its search visits members in order, so ties between equally good
    # moves may resolve differently.
    logits, labels = _random_problem(2, n_members=4)
    lp = log_softmax(logits)
    order = np.array([2, 0, 3, 1])
    w = get_method(name).fit(lp, labels).weights_
    np.testing.assert_allclose(get_method(name).fit(lp[order], labels).weights_, w[order], atol=1e-5)


def test_unfitted_method_cannot_predict():
    with pytest.raises(ValueError, match="not fitted"):
        NllBlend().predict_log_proba(log_softmax(_random_problem()[0]))


# --- golden weights on hand-made members ------------------------------------------------------

@pytest.mark.parametrize("name", ["nll", "greedy"])
def test_a_perfect_member_gets_all_the_weight(name):
    # Not for `logit`: pooling a member that is always right with weight -> inf drives the NLL
    # to 0, and any finite weight of another member is then a (harmless) optimum as well.
    w = get_method(name).fit(np.stack([NOISY, PERFECT, WRONG]), LABELS).weights_
    assert w[1] / w.sum() > 0.999


def test_accuracy_finds_the_blend_that_is_always_right():
    lp = np.stack([NOISY, PERFECT, WRONG])
    method = get_method("accuracy").fit(lp, LABELS)
    assert method.train_score_ == 0.0
    assert (method.predict_log_proba(lp).argmax(axis=1) == LABELS).all()


@pytest.mark.parametrize("name", ["nll", "logit", "greedy"])
def test_useless_members_get_no_weight(name):
    w = get_method(name).fit(np.stack([UNIFORM, GOOD, WRONG]), LABELS).weights_
    assert w[0] / w.sum() < 1e-4 and w[2] / w.sum() < 1e-4
    assert w[1] / w.sum() > 0.999


@pytest.mark.parametrize("name", ["nll", "logit"])
def test_identical_members_split_their_weight_evenly(name):
    logits, labels = _random_problem(3, n_members=2)
    lp = log_softmax(logits[[0, 0, 1]])
    w = get_method(name).fit(lp, labels).weights_
    assert w[0] > 0.05
    assert w[0] == pytest.approx(w[1], rel=1e-6)


def test_nll_weights_reach_the_best_mixture_on_a_simplex_grid():
    logits, labels = _random_problem(4, n_rows=200)
    lp = log_softmax(logits)
    true_lp = lp[:, np.arange(labels.size), labels].astype(np.float64)
    fitted = NllBlend().fit(lp, labels)
    steps = np.linspace(0, 1, 101)
    grid = np.array([(a, b, max(1 - a - b, 0.0)) for a, b in itertools.product(steps, steps) if a + b <= 1 + 1e-12])
    scores = -np.log(grid @ np.exp(true_lp)).mean(axis=1)
    assert fitted.train_score_ <= scores.min() + 1e-9
    assert fitted.train_score_ == pytest.approx(mixture_nll(true_lp, fitted.weights_))
    np.testing.assert_allclose(fitted.weights_, grid[scores.argmin()], atol=0.011)


def test_logit_weight_of_a_lone_member_is_its_inverse_temperature():
    # Pooling one member with weight w is that member at temperature 1 / w, so the fitted weight
    # must match an independent temperature fit; a member without information keeps exactly 0.
    rng = np.random.default_rng(7)
    timid = log_softmax(rng.normal(size=LABELS.shape + (N_CLASSES,)) + 2.0 * np.eye(N_CLASSES)[LABELS])
    w = LogitBlend().fit(np.stack([timid, UNIFORM]), LABELS).weights_
    assert w[0] == pytest.approx(1 / fit_temperature(timid, LABELS), rel=1e-3)
    assert w[0] > 1  # not normalised: the timid member is sharpened
    assert w[1] == 0.0


# --- analytic gradients against finite differences ---------------------------------------------

def test_mixture_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    true_lp = np.log(rng.dirichlet(np.ones(6), size=(4, 30))[..., 0])
    true_lp[2, :5] = -np.inf  # member 2 rules the true class out on some rows
    for theta in rng.normal(size=(3, 4)):
        def f(t):
            return mixture_nll_and_grad(t, true_lp)[0]

        def g(t):
            return mixture_nll_and_grad(t, true_lp)[1]

        assert check_grad(f, g, theta) < 1e-6


def test_pooled_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    lp = log_softmax(rng.normal(scale=2.0, size=(4, 30, 6)))
    lp[1, :, 0] = -np.inf
    labels = rng.integers(0, 6, 30)
    relative = relative_log_probs(lp, labels).astype(np.float64)
    for w in rng.uniform(0.0, 2.0, size=(3, 4)):
        def f(x):
            return pooled_nll_and_grad(x, relative)[0]

        def g(x):
            return pooled_nll_and_grad(x, relative)[1]

        assert check_grad(f, g, w) < 1e-6
