"""The long-tail prior correction: golden values on hand-made arrays, tau recovered on generated
long-tailed members for every method, a balanced prior that changes nothing, the nll joint fit
against a brute-force profile, gradients, and honest cross-validation of tau."""

import numpy as np
import pytest
from scipy.optimize import check_grad

import weights_search.prior as prior_module
from weights_search.cv import PRIOR_SUFFIX, cross_val_log_probs, cross_validate, stratified_folds
from weights_search.fitted import FittedBlend, blend_chunks, fit_blend
from weights_search.functional import MIXTURE, log_softmax
from weights_search.metrics import mean_nll, top1
from weights_search.mixture import prior_nll_and_grad
from weights_search.prior import (MAX_ROUNDS, TAU_BOUNDS, LogitAdjustment, MixturePrior, adjust, class_log_prior,
                                  fit_tau)
from weights_search.registry import METHODS, get_method

# --- golden values ------------------------------------------------------------------------------


def test_class_log_prior_normalises_counts_and_counts_a_zero_as_half():
    np.testing.assert_allclose(class_log_prior([3, 1, 0, 4]), np.log(np.array([3, 1, 0.5, 4]) / 8.5))
    np.testing.assert_allclose(class_log_prior([0, 2], zero_count=2.0), np.log([0.5, 0.5]))
    for bad in ([1, -1], [1, np.nan], []):
        with pytest.raises(ValueError, match="class counts"):
            class_log_prior(bad)


def test_adjust_divides_by_the_prior_and_renormalises():
    log_probs = np.log(np.array([[0.8, 0.2], [0.5, 0.5]], dtype=np.float32))
    log_prior = np.log([0.8, 0.2])
    # tau = 1 removes the prior: (0.8, 0.2) / (0.8, 0.2) is uniform; (0.5, 0.5) becomes (0.2, 0.8).
    np.testing.assert_allclose(np.exp(adjust(log_probs, log_prior, 1.0)), [[0.5, 0.5], [0.2, 0.8]], rtol=1e-6)
    # tau = 0.5: (0.8 / sqrt(0.8), 0.2 / sqrt(0.2)) = (sqrt(0.8), sqrt(0.2)), renormalised.
    half = np.sqrt([0.8, 0.2]) / np.sqrt([0.8, 0.2]).sum()
    np.testing.assert_allclose(np.exp(adjust(log_probs, log_prior, 0.5))[0], half, rtol=1e-6)
    np.testing.assert_array_equal(adjust(log_probs, log_prior, 0.0), log_probs)


def test_adjust_keeps_minus_inf_and_works_chunk_by_chunk():
    with np.errstate(divide="ignore"):
        log_probs = np.log(np.array([[0.0, 0.3, 0.7]], dtype=np.float32))
    out = adjust(log_probs, np.log([0.2, 0.3, 0.7]), 1.0)
    assert out[0, 0] == -np.inf and not np.isnan(out).any()
    np.testing.assert_allclose(np.exp(out[0, 1:]), [0.5, 0.5], rtol=1e-6)
    rng = np.random.default_rng(0)
    lp = log_softmax(rng.normal(size=(50, 7)))
    log_prior = class_log_prior(rng.integers(1, 100, 7))
    whole = adjust(lp, log_prior, 0.8)
    np.testing.assert_array_equal(np.concatenate([adjust(lp[s:s + 9], log_prior, 0.8) for s in range(0, 50, 9)]),
                                  whole)
    with pytest.raises(ValueError, match="does not match"):
        adjust(lp, log_prior[:6], 1.0)


# Two classes with prior (0.9, 0.1); every row predicts exactly the prior. Corrected with tau,
# a row predicts (0.9^(1-tau), 0.1^(1-tau)) renormalised, so the NLL is lowest where that equals
# the label frequencies: (1/2, 1/2) at tau = 1; (3/4, 1/4) where 9^(1-tau) = 3, at tau = 1/2.
PRIOR_2 = np.log([0.9, 0.1])
PROBS_2 = np.tile([0.9, 0.1], (8, 1))


@pytest.mark.parametrize(("labels", "tau"), [
    ([0, 1] * 4, 1.0), ([0, 0, 0, 1] * 2, 0.5), ([0] * 8, TAU_BOUNDS[0]), ([1] * 8, TAU_BOUNDS[1])])
def test_fit_tau_finds_the_hand_worked_optimum(labels, tau):
    for start in (0.0, 1.0, 2.9):
        assert fit_tau(PROBS_2, np.array(labels), PRIOR_2, start=start) == pytest.approx(tau, abs=1e-6)


def test_fit_tau_leaves_out_rows_whose_true_class_has_probability_zero():
    probs = np.vstack([PROBS_2, [[1.0, 0.0]] * 3])
    labels = np.array([0, 1] * 4 + [1] * 3)
    assert fit_tau(probs, labels, PRIOR_2) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="probability 0 on every row"):
        fit_tau(probs[8:], labels[8:], PRIOR_2)


def test_logit_adjustment_checks_its_arguments():
    with pytest.raises(ValueError, match="tau must lie in"):
        LogitAdjustment(PRIOR_2, tau=3.5)
    with pytest.raises(ValueError, match="finite"):
        LogitAdjustment(np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="a prior of 2 classes for members of 3 classes"):
        get_method("nll").fit(np.zeros((2, 4, 3)), np.zeros(4, dtype=int), LogitAdjustment(PRIOR_2))


# --- generated long-tailed members ----------------------------------------------------------------

N_CLASSES = 10
COUNTS = np.array([400, 200, 120, 80, 50, 30, 20, 10, 5, 2])


def _long_tailed(n_rows=3000, tau=1.0, seed=0, members=(1.2, 1.6, 2.2)):
    """Balanced labels; each member sees the class through its own Gaussian noise of scale ``s``
    and outputs the exact posterior under a training prior ``pi ** tau``: its balanced
    log-likelihood plus ``tau * log pi``. Calibrated members: a blend needs ``tau`` back."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_rows) % N_CLASSES)
    means = rng.normal(size=(N_CLASSES, 4)) * 1.5
    log_prior = class_log_prior(COUNTS)
    logits = []
    for s in members:
        x = means[labels] + rng.normal(scale=s, size=(n_rows, 4))
        balanced = -((x[:, None, :] - means[None]) ** 2).sum(axis=2) / (2 * s * s)
        logits.append(balanced + tau * log_prior)
    return np.stack(logits).astype(np.float32), labels, log_prior


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("truth", [0.6, 1.0])
def test_the_fitted_tau_lands_near_the_truth(method, truth):
    logits, labels, log_prior = _long_tailed(tau=truth)
    blend = fit_blend(logits, labels, method, prior=LogitAdjustment(log_prior))
    if method == "logit":
        # Pooled logits hold (sum of the weights) * truth * log pi: tau is on their scale.
        assert blend.tau / (truth * sum(blend.weights)) == pytest.approx(1.0, abs=0.1)
    else:
        assert blend.tau == pytest.approx(truth, abs=0.1)
    # ... and the corrected blend is better on new balanced rows than the plain one.
    test_logits, test_labels, _ = _long_tailed(tau=truth, seed=1)
    plain = fit_blend(logits, labels, method)
    assert top1(blend.log_proba(test_logits), test_labels) > top1(plain.log_proba(test_logits), test_labels) + 0.02


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("tau", [None, 0.7])
def test_a_balanced_prior_changes_nothing(method, tau):
    """Equal counts: the log-prior is a constant, which no correction can see; whatever tau is,
    the weights, the predictions and the cross-validated rows are those of the plain blend."""
    logits, labels, _ = _long_tailed(n_rows=600)
    balanced = LogitAdjustment(class_log_prior(np.full(N_CLASSES, 37)), tau)
    plain, corrected = fit_blend(logits, labels, method), fit_blend(logits, labels, method, prior=balanced)
    np.testing.assert_allclose(corrected.weights, plain.weights, atol=1e-5)
    np.testing.assert_allclose(corrected.log_proba(logits), plain.log_proba(logits), atol=1e-5)
    # A given tau is kept. A fitted one has nothing to move it (the NLL is flat in tau), so it stays
    # where its fit starts: 0 for logit (L-BFGS-B's start), 1 for the mixtures (fit_tau's start).
    assert corrected.tau == (tau if tau is not None else 0.0 if method == "logit" else 1.0)
    report = cross_validate(logits, labels, method, n_folds=3, prior=balanced)
    rows = {r.name: r for r in report.rows}
    for name in {"uniform", method}:
        assert rows[name + PRIOR_SUFFIX].top1 == rows[name].top1
        assert rows[name + PRIOR_SUFFIX].nll == pytest.approx(rows[name].nll, abs=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_given_tau_is_kept_and_a_zero_tau_is_the_plain_blend(method):
    logits, labels, log_prior = _long_tailed(n_rows=600)
    fixed = fit_blend(logits, labels, method, prior=LogitAdjustment(log_prior, 0.4))
    assert fixed.tau == 0.4
    zero = fit_blend(logits, labels, method, prior=LogitAdjustment(log_prior, 0.0))
    plain = fit_blend(logits, labels, method)
    # (L-BFGS-B, with tau as a fixed variable, stops a step apart within its float32 floor.)
    np.testing.assert_allclose(zero.weights, plain.weights, atol=1e-3 if method == "logit" else 1e-5)
    np.testing.assert_array_equal(zero.log_proba(logits).argmax(axis=1), plain.log_proba(logits).argmax(axis=1))


def test_nll_fits_weights_and_tau_jointly():
    """The joint fit against a brute-force profile: for each tau on a grid, the best weights at
    that fixed tau; the joint NLL is no worse than the profile's minimum and its tau is that
    minimum's (the profile is smooth: a parabola through the three best points locates it)."""
    logits, labels, log_prior = _long_tailed(n_rows=2000, tau=0.8)
    lp = log_softmax(logits)
    joint = get_method("nll").fit(lp, labels, LogitAdjustment(log_prior))
    grid = np.linspace(0.5, 1.1, 13)
    profile = np.array([get_method("nll").fit(lp, labels, LogitAdjustment(log_prior, t)).train_score_ for t in grid])
    assert joint.train_score_ <= profile.min() + 1e-7
    best = profile.argmin()
    a, b, _ = np.polyfit(grid[best - 1:best + 2], profile[best - 1:best + 2], 2)
    assert joint.tau_ == pytest.approx(-b / (2 * a), abs=2e-3)
    # The weights are those of a fixed-tau fit at the joint tau.
    at_tau = get_method("nll").fit(lp, labels, LogitAdjustment(log_prior, joint.tau_))
    np.testing.assert_allclose(joint.weights_, at_tau.weights_, atol=2e-3)
    assert joint.train_score_ == pytest.approx(at_tau.train_score_, abs=1e-7)


def test_nll_keeps_tau_at_a_bound_when_the_optimum_lies_beyond():
    # Members that learned no prior, on rows as long-tailed as the prior: the best tau is below 0.
    rng = np.random.default_rng(3)
    log_prior = class_log_prior(COUNTS)
    labels = rng.choice(N_CLASSES, size=1500, p=COUNTS / COUNTS.sum())
    logits = rng.normal(size=(2, labels.size, N_CLASSES)).astype(np.float32)
    logits[:, np.arange(labels.size), labels] += 1.0
    blend = get_method("nll").fit(log_softmax(logits), labels, LogitAdjustment(log_prior))
    assert blend.tau_ == TAU_BOUNDS[0]
    plain = get_method("nll").fit(log_softmax(logits), labels)
    np.testing.assert_allclose(blend.weights_, plain.weights_, atol=1e-5)


@pytest.mark.parametrize("method", ["uniform", "greedy", "accuracy"])
def test_other_mixtures_end_with_the_best_tau_for_their_weights(method):
    logits, labels, log_prior = _long_tailed(n_rows=1200)
    lp = log_softmax(logits)
    fitted = get_method(method).fit(lp, labels, LogitAdjustment(log_prior))
    problem = MixturePrior(lp, labels, log_prior)
    assert problem.fit_tau(fitted.weights_) == pytest.approx(fitted.tau_, abs=prior_module.TAU_TOL)
    # The weights are those the method fits at that tau.
    np.testing.assert_allclose(get_method(method).fit(lp, labels, LogitAdjustment(log_prior, fitted.tau_)).weights_,
                               fitted.weights_)


def test_alternating_fits_stop_after_max_rounds(monkeypatch):
    logits, labels, log_prior = _long_tailed(n_rows=300)
    taus = iter(np.linspace(0.1, 2.9, 50))
    monkeypatch.setattr(MixturePrior, "fit_tau", lambda self, weights, start=1.0: float(next(taus)))
    seen = []
    method = get_method("greedy", n_rounds=3)
    original = method._fit_scores
    monkeypatch.setattr(method, "_fit_scores", lambda scores, start: seen.append(scores.tau) or original(scores, start))
    method.fit(log_softmax(logits), labels, LogitAdjustment(log_prior))
    assert len(seen) == MAX_ROUNDS and method.tau_ == seen[-1]


def test_the_joint_gradient_matches_finite_differences():
    logits, labels, log_prior = _long_tailed(n_rows=200)
    scores = MixturePrior(log_softmax(logits), labels, log_prior).at(0.9, moments=True)
    args = (scores.true_lp, scores.true_shift, scores.log_norm, scores.tilt_mean, scores.tilt_var, 0.9)
    for x in np.random.default_rng(0).normal(size=(3, 4)) * [1, 1, 1, 0.3] + [0, 0, 0, 0.9]:
        error = check_grad(lambda v: prior_nll_and_grad(v, *args)[0], lambda v: prior_nll_and_grad(v, *args)[1], x)
        assert error < 1e-5


def test_the_normaliser_moments_are_exact():
    """``log_norm``, ``tilt_mean`` and ``tilt_var`` against float64 sums over the classes."""
    logits, labels, log_prior = _long_tailed(n_rows=100)
    lp = log_softmax(logits)
    scores = MixturePrior(lp, labels, log_prior).at(0.9, moments=True)
    shift = log_prior - log_prior.min()
    tilted = np.exp(lp.astype(np.float64) - 0.9 * shift)
    total = tilted.sum(axis=2)
    mean = (tilted * shift).sum(axis=2) / total
    np.testing.assert_allclose(scores.log_norm, np.log(total), atol=1e-6)
    np.testing.assert_allclose(scores.tilt_mean, mean, atol=1e-5)
    np.testing.assert_allclose(scores.tilt_var, (tilted * shift ** 2).sum(axis=2) / total - mean ** 2, atol=1e-4)
    np.testing.assert_allclose(scores.true_lp, lp[:, np.arange(100), labels] - 0.9 * shift[labels], atol=1e-6)


# --- applying a fitted correction ------------------------------------------------------------------


def test_a_fitted_blend_applies_the_correction_after_fusion(tmp_path):
    logits, labels, log_prior = _long_tailed(n_rows=500)
    blend = FittedBlend("nll", MIXTURE, (0.2, 0.5, 0.3), log_prior=tuple(log_prior), tau=0.9)
    plain = FittedBlend("nll", MIXTURE, (0.2, 0.5, 0.3))
    np.testing.assert_array_equal(blend.log_proba(logits), adjust(plain.log_proba(logits), log_prior, 0.9))
    paths = []
    for m, member in enumerate(logits.astype(np.float16)):
        paths.append(tmp_path / f"member{m}.npy")
        np.save(paths[-1], member)
    stores = [np.load(p, mmap_mode="r") for p in paths]
    parts = [part for _, part in blend_chunks(stores, blend, chunk_rows=128)]
    np.testing.assert_array_equal(np.concatenate(parts), blend.log_proba(logits.astype(np.float16)))
    with pytest.raises(ValueError, match="both log_prior and tau"):
        FittedBlend("nll", MIXTURE, (1.0,), tau=1.0)
    with pytest.raises(ValueError, match="tau must lie in"):
        FittedBlend("nll", MIXTURE, (1.0,), log_prior=(0.0, 0.0), tau=-0.1)


# --- honest estimates ----------------------------------------------------------------------------------


def test_cv_scores_each_blend_with_and_without_the_prior_tau_refitted_per_fold(monkeypatch):
    logits, labels, log_prior = _long_tailed(n_rows=900)
    built = []
    original = MixturePrior.__init__

    def spy(self, log_probs, fold_labels, prior):
        built.append(fold_labels.size)
        original(self, log_probs, fold_labels, prior)

    monkeypatch.setattr(MixturePrior, "__init__", spy)
    report = cross_validate(logits, labels, "nll", n_folds=3, prior=LogitAdjustment(log_prior), member_names="abc")
    assert [(r.name, r.kind, r.prior) for r in report.rows] == [
        ("a", "member", False), ("b", "member", False), ("c", "member", False), ("uniform", "uniform", False),
        ("uniform+prior", "uniform", True), ("nll", "method", False), ("nll+prior", "method", True)]
    # Every fit of tau saw the training folds only: two corrected blends in each of 3 folds.
    assert built == [600] * 6
    assert report.prior and report.method_row.name == "nll+prior" and report.uniform_row.name == "uniform+prior"
    assert len(report.fold_taus) == 3 and len(set(report.fold_taus)) == 3
    assert all(t == pytest.approx(1.0, abs=0.15) for t in report.fold_taus)
    rows = {r.name: r for r in report.rows}
    assert rows["nll+prior"].top1 > rows["nll"].top1 and rows["uniform+prior"].top1 > rows["uniform"].top1
    # The corrected row is the out-of-fold prediction of a blend refitted (tau too) in each fold.
    folds = stratified_folds(labels, 3, seed=0)
    oof = cross_val_log_probs(logits, labels, lambda: get_method("nll"), folds, prior=LogitAdjustment(log_prior))
    assert rows["nll+prior"].top1 == pytest.approx(top1(oof, labels))
    assert rows["nll+prior"].nll == pytest.approx(mean_nll(oof, labels), rel=1e-6)


def test_cv_of_uniform_with_a_prior_has_both_uniform_rows():
    logits, labels, log_prior = _long_tailed(n_rows=300)
    report = cross_validate(logits, labels, "uniform", n_folds=3, prior=LogitAdjustment(log_prior, 1.0))
    assert [r.name for r in report.rows][-2:] == ["uniform", "uniform+prior"]
    assert report.method_row is report.uniform_row and report.uniform_row.prior
    assert report.fold_taus == (1.0, 1.0, 1.0)
