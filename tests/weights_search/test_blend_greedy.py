"""Ensemble selection (Caruana et al., ICML 2004) against a hand-worked example.

Two rows, both labelled class 0, two classes; the true-class probabilities are
member 0: (0.8, 0.2), member 1: (0.3, 0.7), member 2: (0.5, 0.45). Mixture NLLs, worked by hand:

- alone: m0 0.9163, m1 0.7803, m2 0.7458, so sorted initialisation starts with m2, then m1;
- {m2} + m0: (0.65, 0.325) 0.7773; + m1: (0.4, 0.575) 0.7349; + m2: 0.7458 -> add m1;
- {m2, m1} + m0: (0.5333, 0.45) 0.7136; + m1: 0.7433; + m2: 0.7324 -> add m0;
- {m2, m1, m0} + m0: 0.7294; + m1: (0.475, 0.5125) 0.7064; + m2: 0.7214 -> add m1.
"""

import numpy as np
import pytest

from weights_search.greedy import GreedyBlend, GreedyStep

TRUE_PROBS = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.45]])
LOG_PROBS = np.log(np.stack([TRUE_PROBS, 1 - TRUE_PROBS], axis=-1))  # (3 members, 2 rows, 2 classes)
LABELS = np.array([0, 0])


def test_selection_with_replacement_matches_the_hand_worked_example():
    method = GreedyBlend(n_rounds=3, n_init=1).fit(LOG_PROBS, LABELS)
    assert [s.member for s in method.trajectory_] == [2, 1, 0, 1]
    np.testing.assert_allclose([s.score for s in method.trajectory_], [0.7458, 0.7349, 0.7136, 0.7064], atol=1e-4)
    assert all(s.bag == 0 for s in method.trajectory_)
    np.testing.assert_array_equal(method.counts_, [1, 2, 1])
    np.testing.assert_allclose(method.weights_, [0.25, 0.5, 0.25])
    assert method.train_score_ == pytest.approx(0.7064, abs=1e-4)


def test_sorted_initialisation_adds_the_best_members_once_each():
    method = GreedyBlend(n_rounds=1, n_init=2).fit(LOG_PROBS, LABELS)
    assert method.trajectory_ == (
        GreedyStep(0, 2, pytest.approx(0.7458, abs=1e-4)),
        GreedyStep(0, 1, pytest.approx(0.7349, abs=1e-4)),
        GreedyStep(0, 0, pytest.approx(0.7136, abs=1e-4)),
    )


def test_accuracy_score_counts_rows_right_and_breaks_ties_by_index():
    # Alone, m0 and m1 each get one row right (error 0.5) and m2 none (0.5 against 0.5 on row 0
    # is a tie, which counts as an error): m0 wins the tie with m1. No mixture gets both rows
    # right (that needs w0 + w1 + 0.95 w2 > 1), so every second pick scores 0.5 again: m0.
    method = GreedyBlend(n_rounds=2, n_init=0, score="accuracy").fit(LOG_PROBS, LABELS)
    assert [(s.member, s.score) for s in method.trajectory_] == [(0, 0.5), (0, 0.5)]
    # Sorted initialisation ranks by error alone: m0 and m1 (tied, index order), then m2.
    ranked = GreedyBlend(n_rounds=0, n_init=3, score="accuracy").fit(LOG_PROBS, LABELS)
    assert [(s.member, s.score) for s in ranked.trajectory_] == [(0, 0.5), (1, 0.5), (2, 0.5)]


def test_bagging_draws_members_per_bag_and_adds_the_counts():
    method = GreedyBlend(n_rounds=4, n_init=1, n_bags=5, bag_fraction=2 / 3, seed=1).fit(LOG_PROBS, LABELS)
    assert [s.bag for s in method.trajectory_] == [b for b in range(5) for _ in range(5)]
    assert method.counts_.sum() == 25
    np.testing.assert_allclose(method.weights_, method.counts_ / 25)
    for bag in range(5):
        assert len({s.member for s in method.trajectory_ if s.bag == bag}) <= 2
    again = GreedyBlend(n_rounds=4, n_init=1, n_bags=5, bag_fraction=2 / 3, seed=1).fit(LOG_PROBS, LABELS)
    assert again.trajectory_ == method.trajectory_


def test_n_init_larger_than_a_bag_is_refused():
    with pytest.raises(ValueError, match="n_init=3 exceeds the 2 members in each bag"):
        GreedyBlend(n_init=3, bag_fraction=0.5).fit(LOG_PROBS, LABELS)
