"""weights_search.geo_fit against a dense computation of q' on tiny hand-made arrays."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax as dense_log_softmax

from weights_search.geo_fit import GEO_BOUNDS, FusedRows, GeoTerms, fit_beta, nll_derivative, ranks, row_nll, scores
from weights_search.metrics import rank_of_true


def _case(seed=0, n=40, c=12, signal=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    log_q = dense_log_softmax(rng.normal(size=(n, c)) * 2, axis=1).astype(np.float32)
    indptr, columns, values = [0], [], []
    for r in range(n):
        size = int(rng.integers(0, 5)) if r % 7 else 0  # every 7th row without a place
        cols = rng.choice(c, size, replace=False)
        if size and rng.random() < 0.6 and labels[r] not in cols:
            cols[0] = labels[r]  # the true class seen near the place, often
        vals = rng.random(size) * 2 + np.where(cols == labels[r], signal, 0)
        order = np.argsort(cols)
        columns += cols[order].tolist()
        values += vals[order].tolist()
        indptr.append(len(columns))
    terms = GeoTerms(np.array(indptr), np.array(columns), np.array(values, dtype=np.float32), labels)
    return terms, log_q


def _dense_g(terms, n, c):
    g = np.zeros((n, c), dtype=np.float32)
    for r in range(n):
        sl = slice(terms.indptr[r], terms.indptr[r + 1])
        g[r, terms.column[sl]] = terms.value[sl]
    return g


def _dense(log_q, g, beta):
    """q' by the definition: log q + beta g', renormalised (float64)."""
    return dense_log_softmax(log_q.astype(np.float64) + beta * g.astype(np.float64), axis=1)


def _fused(terms, log_q, k=3, block=9):
    fused = FusedRows(terms, log_q.shape[1], k)
    for start in range(0, terms.n_rows, block):  # in blocks, out of order
        rows = np.arange(start, min(start + block, terms.n_rows))
        fused.add(rows, log_q[rows].copy())
    fused.check_complete()
    return fused


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0, 2.7])
def test_nll_is_that_of_the_dense_renormalised_blend(beta):
    terms, log_q = _case()
    fused = _fused(terms, log_q)
    g = _dense_g(terms, *log_q.shape)
    dense = -_dense(log_q, g, beta)[np.arange(terms.n_rows), terms.labels]
    np.testing.assert_allclose(row_nll(fused, beta), dense, rtol=1e-6, atol=1e-6)
    rows = np.array([1, 5, 6, 30])
    np.testing.assert_allclose(row_nll(fused, beta, rows), dense[rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.7])
def test_derivative_matches_finite_differences(beta):
    terms, log_q = _case(1)
    fused = _fused(terms, log_q)
    h = 1e-5
    numeric = (row_nll(fused, beta + h).mean() - row_nll(fused, max(beta - h, 0)).mean()) / (beta + h - max(beta - h, 0))
    assert nll_derivative(fused, beta) == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_nll_is_convex_in_beta():
    terms, log_q = _case(2)
    fused = _fused(terms, log_q)
    grid = np.linspace(0, 3, 31)
    values = np.array([row_nll(fused, b).mean() for b in grid])
    assert (np.diff(values, 2) >= -1e-12).all()


@pytest.mark.parametrize("seed,signal", [(0, 1.5), (3, 0.0), (4, 4.0)])
def test_fit_is_the_dense_minimiser(seed, signal):
    terms, log_q = _case(seed, signal=signal)
    g = _dense_g(terms, *log_q.shape)
    fused = _fused(terms, log_q)
    rows = np.flatnonzero(np.arange(terms.n_rows) % 3 != 0)

    def dense_nll(beta):
        return -_dense(log_q[rows], g[rows], beta)[np.arange(rows.size), terms.labels[rows]].mean()

    beta = fit_beta(fused, rows)
    best = minimize_scalar(dense_nll, bounds=GEO_BOUNDS, method="bounded", options={"xatol": 1e-9})
    assert GEO_BOUNDS[0] <= beta <= GEO_BOUNDS[1]
    assert beta == pytest.approx(best.x, abs=1e-4)
    assert dense_nll(beta) <= best.fun + 1e-9


def test_fit_stays_at_zero_when_the_place_misleads_and_at_the_bound_when_it_is_all():
    n, c = 6, 4
    labels = np.array([0, 1, 2, 3, 0, 1])
    log_q = dense_log_softmax(np.eye(c)[labels] * 2.0, axis=1).astype(np.float32)
    wrong = GeoTerms(np.arange(n + 1), (labels + 1) % c, np.full(n, 2.0, np.float32), labels)
    assert fit_beta(_fused(wrong, log_q)) == 0.0
    right = GeoTerms(np.arange(n + 1), labels, np.full(n, 2.0, np.float32), labels)
    assert fit_beta(_fused(right, log_q)) == GEO_BOUNDS[1]
    nowhere = GeoTerms(np.zeros(n + 1, dtype=np.int64), np.array([], int), np.array([], np.float32), labels)
    assert fit_beta(_fused(nowhere, log_q)) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.3, 3.0])
def test_ranks_are_the_dense_ranks_below_k(beta):
    terms, log_q = _case(5, n=60)
    # ties: round so that equal scores occur, and the tie rule (lower class first) matters
    log_q = np.round(log_q * 4) / 4
    g = _dense_g(terms, *log_q.shape)
    k = 3
    fused = _fused(terms, log_q.astype(np.float32), k=k)
    dense = (log_q.astype(np.float32) + np.float32(beta) * g).astype(np.float32)
    want = rank_of_true(dense, terms.labels)
    got = ranks(fused, beta)
    np.testing.assert_array_equal(np.minimum(got, k), np.minimum(want, k))
    hit1, hitk, nll = scores(fused, beta, k=k)
    np.testing.assert_array_equal(hit1, want < 1)
    np.testing.assert_array_equal(hitk, want < k)


def test_rows_with_few_classes_outside_their_places():
    labels = np.array([0, 2])
    log_q = dense_log_softmax(np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), axis=1).astype(np.float32)
    terms = GeoTerms(np.array([0, 2, 3]), np.array([1, 2, 0]), np.array([1.0, 0.5, 3.0], np.float32), labels)
    fused = _fused(terms, log_q, k=3)
    g = _dense_g(terms, 2, 3)
    for beta in (0.0, 1.0, 3.0):
        want = rank_of_true((log_q + np.float32(beta) * g).astype(np.float32), labels)
        np.testing.assert_array_equal(ranks(fused, beta), want)


def test_add_restores_the_block_and_checks():
    terms, log_q = _case(6)
    fused = FusedRows(terms, log_q.shape[1], 2)
    block = log_q[:10].copy()
    fused.add(np.arange(10), block)
    np.testing.assert_array_equal(block, log_q[:10])
    with pytest.raises(ValueError, match="never added"):
        fused.check_complete()
    with pytest.raises(ValueError, match="shape"):
        fused.add(np.arange(3), log_q[:4])


def test_bad_terms():
    with pytest.raises(ValueError, match="non-negative"):
        GeoTerms(np.array([0, 1]), np.array([0]), np.array([-1.0]), np.array([0]))
    with pytest.raises(ValueError, match="twice"):
        GeoTerms(np.array([0, 2]), np.array([1, 1]), np.array([1.0, 1.0]), np.array([0]))
    with pytest.raises(ValueError, match="CSR"):
        GeoTerms(np.array([0, 3]), np.array([1, 2]), np.array([1.0, 1.0]), np.array([0]))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_ties_with_the_sparse_classes_rank_the_lower_class_first(beta):
    labels = np.array([2, 1])
    log_q = np.log(np.array([[0.2, 0.2, 0.2, 0.4], [0.3, 0.3, 0.3, 0.1]], dtype=np.float32))
    # row 0: classes 0 and 1 (S) tie with the true class 2 (g' = 0): both rank before it;
    # row 1: class 2 (S) ties with the true class 1 and ranks after it, class 0 (outside) before
    terms = GeoTerms(np.array([0, 2, 3]), np.array([0, 1, 2]), np.zeros(3, np.float32), labels)
    fused = _fused(terms, log_q, k=4)
    want = rank_of_true((log_q + np.float32(beta) * _dense_g(terms, 2, 4)).astype(np.float32), labels)
    np.testing.assert_array_equal(want, [3, 1])
    np.testing.assert_array_equal(ranks(fused, beta), want)


# ------------------------------------------------------------- the CV of weights_search.cross_validate_and_fit

def _cv_world(seed=0, m=3, n=300, c=10):
    from weights_search.geo import SparseGeo
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(m, n, c)).astype(np.float32)
    logits[:, np.arange(n), labels] += 0.8
    indptr, cols, vals = [0], [], []
    for r in range(n):
        if r % 11 == 0:  # no place
            indptr.append(len(cols))
            continue
        s = set(rng.choice(c, 3, replace=False).tolist()) | ({int(labels[r])} if rng.random() < 0.6 else set())
        s = sorted(s)
        cols += s
        vals += (rng.random(len(s)) + 0.5).tolist()
        indptr.append(len(cols))
    geo = SparseGeo(np.array(indptr), np.array(cols), np.array(vals, np.float32), np.arange(n) % 11 != 0)
    return logits, labels, geo


@pytest.mark.parametrize("temperature", [False, True])
def test_cv_rows_with_the_geo_prior_are_the_dense_held_out_scores(temperature):
    import weights_search as ws
    from weights_search.cv import stratified_folds

    logits, labels, geo = _cv_world(1)
    n, c = labels.size, logits.shape[2]
    report, final = ws.cross_validate_and_fit(logits, labels, "nll", geo=geo, temperature=temperature, block_rows=64)
    row = report.row("method", False, True)
    assert row.name == "nll+geo" and row.geo and report.geo
    terms = GeoTerms(geo.indptr, geo.column, geo.value, labels)
    g = _dense_g(terms, n, c)
    folds = stratified_folds(labels, 5, 0)
    hits, nll = np.zeros(n, bool), np.zeros(n)
    for f, held in enumerate(folds):
        train = np.setdiff1d(np.arange(n), held)
        blend = ws.fit_blend(logits[:, train], labels[train], "nll", temperature=temperature)
        # beta: the dense minimiser on the fold's training rows under the fold's blend
        q_train = blend.log_proba(logits[:, train])
        best = minimize_scalar(lambda b: -_dense(q_train, g[train], b)[np.arange(train.size), labels[train]].mean(),
                               bounds=GEO_BOUNDS, method="bounded", options={"xatol": 1e-8})
        beta = report.fold_betas["method"][f]
        assert beta == pytest.approx(best.x, abs=2e-3)
        q_held = _dense(blend.log_proba(logits[:, held]), g[held], beta)
        hits[held] = q_held.argmax(axis=1) == labels[held]
        nll[held] = -q_held[np.arange(held.size), labels[held]]
    assert row.top1 == pytest.approx(hits.mean(), abs=1.5 / n)  # a near tie may fall the other way
    assert row.nll == pytest.approx(nll.mean(), rel=1e-3)
    # the final beta: on every row under the final blend
    q_all = final.log_proba(logits)
    best = minimize_scalar(lambda b: -_dense(q_all, g, b)[np.arange(n), labels].mean(), bounds=GEO_BOUNDS,
                           method="bounded", options={"xatol": 1e-8})
    assert report.geo_beta == pytest.approx(best.x, abs=1e-4)


def test_cv_with_a_given_geo_weight_of_zero_repeats_the_rows_without_it():
    import weights_search as ws

    logits, labels, geo = _cv_world(2)
    prior = ws.LogitAdjustment(np.log(np.arange(1, 11) / 55.0))
    report, _ = ws.cross_validate_and_fit(logits, labels, "nll", geo=geo, geo_weight=0.0, prior=prior, block_rows=50)
    names = [r.name for r in report.rows]
    assert names[-6:] == ["uniform", "uniform+prior", "uniform+prior+geo", "nll", "nll+prior", "nll+prior+geo"]
    for kind in ("uniform", "method"):
        plain, geo_row = report.row(kind, True), report.row(kind, True, True)
        assert (geo_row.top1, geo_row.topk, geo_row.top1_low) == (plain.top1, plain.topk, plain.top1_low)
        assert geo_row.nll == pytest.approx(plain.nll, abs=1e-6)
        assert report.fold_betas[kind] == (0.0,) * 5
    assert report.geo_beta == 0.0
    plain_report = ws.cross_validate(logits, labels, "nll", prior=prior, block_rows=50)
    assert [r for r in report.rows if not r.geo] == list(plain_report.rows)
    with pytest.raises(ValueError, match="geo_weight"):
        ws.cross_validate_and_fit(logits, labels, "nll", geo=geo, geo_weight=3.5)
