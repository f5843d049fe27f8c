"""Folds, out-of-fold predictions that never see their own rows, and the CV report."""

import numpy as np
import pytest

import weights_search.cv as cv
import weights_search.temperature as temperature_module
from weights_search.base import Blender
from weights_search.cv import CvReport, CvRow, cross_val_log_probs, cross_validate, stratified_folds
from weights_search.functional import log_softmax
from weights_search.metrics import mean_nll, top1, topk_accuracy

# --- folds ---------------------------------------------------------------------------------


def test_folds_partition_the_rows_with_balanced_sizes():
    labels = np.random.default_rng(0).integers(0, 7, 103)
    folds = stratified_folds(labels, 5, seed=1)
    assert len(folds) == 5
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(103))
    assert {f.size for f in folds} <= {20, 21}
    assert all((np.diff(f) > 0).all() for f in folds)


def test_classes_with_enough_rows_reach_every_fold_evenly():
    labels = np.repeat(np.arange(4), [10, 12, 5, 7])
    folds = stratified_folds(labels, 5, seed=0)
    for c, size in enumerate([10, 12, 5, 7]):
        per_fold = [int((labels[f] == c).sum()) for f in folds]
        assert min(per_fold) == size // 5 and max(per_fold) <= size // 5 + 1


def test_small_classes_land_in_distinct_folds():
    labels = np.repeat(np.arange(30), 3)  # like iNat 2019 validation: 3 images per class
    folds = stratified_folds(labels, 5, seed=0)
    fold_of = np.empty(labels.size, dtype=int)
    for f, rows in enumerate(folds):
        fold_of[rows] = f
    for c in range(30):
        assert len(set(fold_of[labels == c])) == 3
    assert {f.size for f in folds} == {18}


def test_folds_are_deterministic_per_seed():
    labels = np.repeat(np.arange(20), 3)
    same = stratified_folds(labels, 3, seed=4), stratified_folds(labels, 3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    other = stratified_folds(labels, 3, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(same[0], other))


@pytest.mark.parametrize("k", [1, 11])
def test_fold_count_must_fit_the_rows(k):
    with pytest.raises(ValueError, match=r"2\.\.10"):
        stratified_folds(np.zeros(10, dtype=int), k)


# --- nothing from a fold leaks into its own predictions ------------------------------------

N_ROWS, N_FOLDS = 60, 3


def _encoded_logits():
    """Three members whose logits spell each row's index (class 0 minus class 1, over class 2
    minus class 1, survives log-softmax and temperatures), and differ in class 3."""
    logits = np.zeros((N_FOLDS, N_ROWS, 4), dtype=np.float32)
    logits[:, :, 0] = 0.01 * np.arange(N_ROWS)
    logits[:, :, 2] = 0.01
    logits[:, :, 3] = np.arange(N_FOLDS)[:, None] * 0.7
    return logits


def _rows_of(member_output):
    return np.rint((member_output[:, 0] - member_output[:, 1]) / (member_output[:, 2] - member_output[:, 1])).astype(int)


class FoldSpy(Blender):
    """Records the rows it is fitted on, and puts all weight on member ``f`` when fold ``f`` is missing."""

    def __init__(self, folds, seen):
        self.folds = folds
        self.seen = seen

    def collector(self, labels, n_classes, prior):
        return _Keep()

    def fit_stats(self, stats, prior=None):
        return self.fit(stats.log_probs, stats.labels, prior)

    def fit(self, log_probs, labels, prior=None):
        rows = _rows_of(log_probs[0])
        self.seen.append(rows)
        missing = [f for f, held_out in enumerate(self.folds) if not np.isin(held_out, rows).any()]
        assert len(missing) == 1
        self.weights_ = np.eye(len(self.folds))[missing[0]]
        self.train_score_ = 0.0
        return self


class _Keep:
    """A collector that keeps the log-probabilities (FoldSpy reads its rows off them)."""

    def __init__(self):
        self.blocks = []

    def add(self, start, log_probs):
        self.blocks.append(np.array(log_probs))

    def result(self):
        return _Kept(np.concatenate(self.blocks, axis=1), None)


class _Kept:
    def __init__(self, log_probs, labels):
        self.log_probs, self.labels, self.n_rows = log_probs, labels, log_probs.shape[1]

    def subset(self, rows):
        return _Kept(self.log_probs[:, rows], rows)


@pytest.mark.parametrize("temperature", [False, True])
def test_each_fold_is_predicted_by_weights_fitted_without_it(monkeypatch, temperature):
    logits = _encoded_logits()
    labels = np.random.default_rng(0).integers(0, 4, N_ROWS)
    folds = stratified_folds(labels, N_FOLDS, seed=0)
    seen_by_weights, seen_by_temperatures, fold_temperatures = [], [], []
    collector = temperature_module.TemperatureCollector

    class Spy:  # the temperature statistics, recording the rows each fold's temperatures see
        def __init__(self, labels, n_members):
            self.inner = collector(labels, n_members)

        def add(self, start, block):
            self.inner.add(start, block)

        def result(self):
            stats = self.inner.result()
            return type("SpyStats", (), {"subset": lambda _, rows: record(stats.subset(rows), rows),
                                         "fit": lambda _: stats.fit()})()

    def record(stats, rows):
        seen_by_temperatures.append(rows)
        fold_temperatures.append(stats.fit())
        return type("Fitted", (), {"fit": lambda _: fold_temperatures[-1]})()

    monkeypatch.setattr(temperature_module, "TemperatureCollector", Spy)
    oof = cross_val_log_probs(logits, labels, lambda: FoldSpy(folds, seen_by_weights), folds, temperature=temperature)
    for f, held_out in enumerate(folds):
        training = np.setdiff1d(np.arange(N_ROWS), held_out)
        np.testing.assert_array_equal(np.sort(seen_by_weights[f]), training)
        if temperature:
            np.testing.assert_array_equal(np.sort(seen_by_temperatures[f]), training)
            expected = log_softmax(logits, fold_temperatures[f])[f, held_out]
        else:
            expected = log_softmax(logits)[f, held_out]
        np.testing.assert_allclose(oof[held_out], expected, atol=1e-6)
    assert len(seen_by_temperatures) == (N_FOLDS if temperature else 0)


def test_folds_must_partition_the_rows():
    logits = _encoded_logits()
    labels = np.zeros(N_ROWS, dtype=int)
    with pytest.raises(ValueError, match="partition"):
        cross_val_log_probs(logits, labels, lambda: None, [np.arange(30), np.arange(29, 60)])


# --- the report ------------------------------------------------------------------------------

def _problem(seed=0, n_members=3, per_class=3, n_classes=40):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    logits = rng.normal(scale=2.0, size=(n_members, labels.size, n_classes))
    logits[:, np.arange(labels.size), labels] += np.array([3.0, 2.0, 0.0])[:n_members, None]
    return logits.astype(np.float32), labels


def test_report_has_a_row_per_member_then_uniform_then_the_method():
    logits, labels = _problem()
    report = cross_validate(logits, labels, "nll", member_names=["a", "b", "c"], top_k=3)
    assert [(r.name, r.kind) for r in report.rows] == [
        ("a", "member"), ("b", "member"), ("c", "member"), ("uniform", "uniform"), ("nll", "method")]
    assert (report.method, report.top_k, report.n_folds, report.temperature) == ("nll", 3, 5, False)
    # Single members are not fitted without temperatures: their CV scores are their own scores.
    lp = log_softmax(logits)
    for m, row in enumerate(report.rows[:3]):
        assert row.top1 == pytest.approx(top1(lp[m], labels))
        assert row.topk == pytest.approx(topk_accuracy(lp[m], labels, 3))
        assert row.nll == pytest.approx(mean_nll(lp[m], labels), rel=1e-6)
        assert row.top1_low <= row.top1 <= row.top1_high


def test_report_of_the_method_matches_its_out_of_fold_predictions():
    logits, labels = _problem(1)
    report = cross_validate(logits, labels, "greedy", {"n_rounds": 10}, n_folds=4, temperature=True, seed=3)
    folds = stratified_folds(labels, 4, seed=3)
    oof = cross_val_log_probs(logits, labels, lambda: cv.get_method("greedy", n_rounds=10), folds, temperature=True)
    assert report.method_row.top1 == pytest.approx(top1(oof, labels))
    assert report.method_row.nll == pytest.approx(mean_nll(oof, labels), rel=1e-6)


def test_report_for_uniform_has_no_separate_method_row():
    logits, labels = _problem()
    report = cross_validate(logits, labels, "uniform", n_folds=3)
    assert [r.kind for r in report.rows] == ["member"] * 3 + ["uniform"]
    assert report.method_row is report.uniform_row
    assert not report.beats_uniform


def test_report_rejects_bad_methods_before_fitting():
    logits, labels = _problem()
    with pytest.raises(ValueError, match="choose from"):
        cross_validate(logits, labels, "best")
    with pytest.raises(ValueError, match="2 member names for 3 members"):
        cross_validate(logits, labels, member_names=["a", "b"])


def _row(kind, top1_, nll):
    return CvRow(kind, kind, top1_, top1_, top1_, top1_, nll)


@pytest.mark.parametrize(("method", "beats"), [
    ((0.71, 2.0), True), ((0.69, 0.5), False), ((0.70, 0.9), True), ((0.70, 1.0), False)])
def test_beats_uniform_compares_top1_then_nll(method, beats):
    report = CvReport("nll", 5, 5, False, (_row("uniform", 0.70, 1.0), _row("method", *method)))
    assert report.beats_uniform is beats
