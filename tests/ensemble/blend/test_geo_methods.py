"""The geo prior with every method of `ens blend` (issue 26: "it combines with --prior and every
method"): each method's CV table gains its +geo row, a beta is fitted per fold, and the written
predictions are the method's own fused blend corrected by beta g' (--geo-weight 0 gives the
method's plain predictions)."""

from __future__ import annotations

import pytest

from ensemble.formats.blend import BlendRecord
from tests.ensemble.blend.test_geo_blend import _blend, _predictions, _world, ok


METHODS = ("logit", "greedy", "accuracy")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("geo-methods"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fits_and_applies_the_geo_prior(world, tmp_path, method):
    ok(_blend(world, tmp_path / "plain", "--method", method))
    ok(_blend(world, tmp_path / "off", "--method", method, "--geo-prior", world["train"], "--geo-weight", "0"))
    ok(_blend(world, tmp_path / "geo", "--method", method, "--geo-prior", world["train"]))
    record = BlendRecord.read(tmp_path / "geo" / "blend.json")
    names = [r.name for r in record.cv.rows]
    assert f"{method}+geo" in names and "uniform+geo" in names, names
    assert record.geo.beta > 0.3 and len(record.cv.fold_betas) == 5
    plain = _predictions(tmp_path / "plain" / "predictions.csv")
    # weight 0: the method's own predictions, to the byte; fitted: the geo prior changes some
    assert _predictions(tmp_path / "off" / "predictions.csv") == plain
    assert _predictions(tmp_path / "geo" / "predictions.csv") != plain
