"""`ens blend --method accuracy` at 10,000 classes (issue 24): the rival pairs it fits on are
bounded by --memory (half of it, the blocks of rows taking the other half), a fit past the
bound is one line in ens's words (--prior-tau, --memory, --method nll) with nothing written,
and `--prior-tau 1` collects far fewer pairs than a fitted tau (which spans tau in [0, 3])."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.ensemble.blend.test_blend_memory import CLASSES, _write_labels, _write_store
from tests.rss import measure
from tests.ensemble.conftest import ens, ok, one_line_error

FREQUENT = 50  # classes 0..49 have 1,000 training images, the other 9,950 one each


def _make(root: Path, logits: list[np.ndarray], labels: np.ndarray) -> tuple[Path, Path, Path]:
    runs, data = root / "runs", root / "data"
    ids = np.arange(1000, 1000 + labels.size)
    for m, member in enumerate(logits):
        _write_store(runs / f"m{m}" / "val", "val", member, ids)
    _write_labels(data, ids, labels)
    prior = root / "counts.json"
    prior.write_text(json.dumps({str(c): (1000 if c < FREQUENT else 1) for c in range(CLASSES)}))
    return runs, data, prior


@pytest.fixture(scope="module")
def steep(tmp_path_factory):
    """Two accurate models of 400 images of the 50 frequent classes, with a steep prior: at tau = 0
    and 1 no class comes near the true one, at tau = 3 every rare class does (400 x 9,950 pairs)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(FREQUENT), 8)
    logits = []
    for _ in range(2):
        member = (0.3 * rng.normal(size=(labels.size, CLASSES))).astype(np.float32)
        member[np.arange(labels.size), labels] += 10.0
        logits.append(member)
    return _make(tmp_path_factory.mktemp("steep"), logits, labels)


def _blend(runs, data, out, *args):
    return ens("blend", "--runs", runs, "--optimize", "val", "--data", data, "--out", out, "--method", "accuracy",
               "--memory", "0.25", *args)


def test_a_fitted_tau_past_the_bound_is_one_line_naming_what_to_change(steep, tmp_path):
    runs, data, prior = steep
    out = tmp_path / "out"
    line = one_line_error(_blend(runs, data, out, "--prior", prior), "--method accuracy", "rival pairs",
                          "--memory 0.25 GiB", "tau in [0, 3]", "--prior-tau T", "--memory GIB", "--method nll")
    assert "max_pairs" not in line and "raise the bound if memory allows" not in line
    assert not out.exists()


def test_prior_tau_one_fits_where_the_fitted_tau_is_refused(steep, tmp_path):
    runs, data, prior = steep
    out = tmp_path / "out"
    ok(_blend(runs, data, out, "--prior", prior, "--prior-tau", "1"))
    record = json.loads((out / "blend.json").read_text())
    assert record["method"] == "accuracy"
    assert record["prior"]["tau"] == 1.0 and record["prior"]["tau_fitted"] is False


def test_without_a_prior_the_line_names_memory_and_nll_only(tmp_path):
    # Member 1 ranks the true class near the middle: about 3,000 rivals an image, none dominated.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, CLASSES, 600)
    first = rng.normal(size=(labels.size, CLASSES)).astype(np.float32)
    first[np.arange(labels.size), labels] = 10.0
    second = rng.normal(size=(labels.size, CLASSES)).astype(np.float32)
    second[np.arange(labels.size), labels] = 0.5
    runs, data, _ = _make(tmp_path, [first, second], labels)
    out = tmp_path / "out"
    line = one_line_error(_blend(runs, data, out), "--method accuracy", "--memory GIB raises the bound",
                          "--method nll needs none")
    assert "--prior-tau" not in line and not out.exists()


def _peak_rss(command) -> tuple[int, int]:
    """Peak resident memory (MB) of ``command`` measured from a small parent, and its exit code."""
    done = measure(command)
    return done.peak_mb, done.returncode


@pytest.mark.slow  # over 5 s on the 2-core machine
@pytest.mark.parametrize("rows, level, fits", [(800, 2.65, True), (400, 2.23, False)])
def test_an_accuracy_fit_stays_within_its_budget_near_and_past_the_bound(tmp_path, rows, level, fits):
    # 16 models of 10,000 classes: model 0 ranks the true class first, the others put it at
    # `level`, where about 0.4% (2.65) or 1.3% (2.23) of classes score higher: about 470,000
    # pairs for 800 images (the bound at --memory 0.25 and 16 models is 508,000), or 700,000
    # for 400 images. Near the bound the fit runs within the budget; past it, it is refused.
    # Before, the bound was 20 million pairs whatever the budget, and the second ran (at this
    # size still within the budget: 16 models' pairs past it are what the weights_search tests
    # of tests/weights_search/test_stats_pairs.py measure per pair); peaks here: 154 MB above
    # the interpreter near the bound (the half for blocks mostly unused at 10,000 classes).
    rng = np.random.default_rng(2)
    labels = rng.integers(0, CLASSES, rows)
    logits = []
    for m in range(16):
        member = rng.normal(size=(labels.size, CLASSES)).astype(np.float32)
        member[np.arange(labels.size), labels] = 10.0 if m == 0 else level
        logits.append(member)
    runs, data, _ = _make(tmp_path, logits, labels)
    del logits
    out = tmp_path / "out"
    peak, code = _peak_rss([sys.executable, "-m", "ensemble", "blend", "--runs", str(runs), "--optimize", "val",
                            "--data", str(data), "--method", "accuracy", "--memory", "0.25", "--out", str(out)])
    idle, _ = _peak_rss([sys.executable, "-c", "import ensemble.cli, ensemble.blend.run, scipy.optimize"])
    assert peak < idle + 256, (peak, idle)  # MB: the budget (the (M, N) per-row arrays are a few MB)
    if fits:
        assert code == 0 and (out / "blend.json").is_file()
    else:
        assert code == 2 and not out.exists()
