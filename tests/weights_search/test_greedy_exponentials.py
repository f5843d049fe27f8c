"""The greedy NLL scorer's candidate scores from exponentials taken once, against the formula."""

import numpy as np
import pytest
from scipy.special import logsumexp

from weights_search.greedy import _Exponentials


def _direct(x, counts):
    # mean_n log(sum_k counts_k exp(x[k, n]) + exp(x[m, n])), by log-sum-exp for each m
    with np.errstate(divide="ignore"):
        weighted = x + np.log(counts)[:, None]
    return np.array([logsumexp(np.vstack([weighted, x[m]]), axis=0).mean() for m in range(x.shape[0])])


@pytest.mark.parametrize("spread", [3.0, 2000.0])  # 2000: exponentials that underflow
def test_log_added_matches_log_sum_exp(spread):
    rng = np.random.default_rng(0)
    x = -spread * rng.uniform(0, 1, (5, 40))
    x[2, 3] = -np.inf  # a member that rules the true class out on one row
    scorer = _Exponentials(x)
    for counts in (np.zeros(5, dtype=np.int64), np.array([0, 3, 1, 0, 2])):
        np.testing.assert_allclose(scorer.log_added(counts), _direct(x, counts), rtol=1e-12)
