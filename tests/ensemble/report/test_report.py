"""`ens report` on small real blends: the numbers recomputed independently from the stores' files
and blend.json, the sections and what stands in for a missing one, the ledger, CAM boxes on the
thumbnails, and every bad input as one line."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from ensemble.report import write_report
from ensemble.report import build as report_build
from ensemble.report.build import build_report
from ensemble.report.images import thumbnail
from ensemble.report.page import SECTIONS
from weights_search import calibration as cal

from tests.ensemble.conftest import ens, ok, one_line_error
from tests.ensemble.report.conftest import MODELS, PERM, TRAIN_COUNTS, add_ledger, copy_work


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty folder: nothing is found through ./runs or ./submissions by accident."""
    monkeypatch.chdir(tmp_path)


def labels_of(work) -> np.ndarray:
    doc = json.loads((work.data / "val2019.json").read_text())
    truth = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    ids = np.load(work.runs / "m0" / "val" / "ids.npy").tolist()
    return np.array([PERM.index(truth[i]) for i in ids])


def blend_probs(work, record: dict) -> np.ndarray:
    """The blend's ``(N, C)`` probabilities in float64, from the .npy files and blend.json alone."""
    total = 0.0
    for name in record["members"]:
        model, _, view = name.partition("/")
        folder = work.runs / model / "val"
        x = (np.load(folder / "views.npy")[["identity", "flip"].index(view)] if view
             else np.load(folder / "logits.npy")).astype(np.float64)
        x /= (record["temperatures"] or {}).get(name, 1.0)
        p = np.exp(x - x.max(axis=1, keepdims=True))
        total = total + record["weights"][name] * p / p.sum(axis=1, keepdims=True)
    p = total / sum(record["weights"].values())
    if record["prior"]:
        counts = np.array([TRAIN_COUNTS[c] for c in PERM], dtype=np.float64)
        assert record["prior"]["counts"] == counts.astype(int).tolist()
        q = p / (counts / counts.sum()) ** record["prior"]["tau"]
        p = q / q.sum(axis=1, keepdims=True)
    return p


@pytest.mark.parametrize("blend", ["full", "views", "single"])
def test_the_blend_is_recomputed_as_blend_json_says(work, blend):
    folder = getattr(work, blend)
    record = json.loads((folder / "blend.json").read_text())
    data = build_report(folder)
    labels = labels_of(work)
    p = blend_probs(work, record)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.blend.predicted, p.argmax(axis=1))
    np.testing.assert_allclose(data.blend.confidence, p.max(axis=1), rtol=2e-5)
    for m, member in enumerate(record["members"]):
        model, _, view = member.partition("/")
        folder_ = work.runs / model / "val"
        x = np.load(folder_ / "views.npy")[["identity", "flip"].index(view)] if view else np.load(folder_ / "logits.npy")
        np.testing.assert_array_equal(data.member_predictions[m], x.astype(np.float32).argmax(axis=1))
    wrong = np.flatnonzero(p.argmax(axis=1) != labels)
    assert data.wrong == wrong.size
    hardest = wrong[np.argsort(-p.max(axis=1)[wrong], kind="stable")][:24]
    ids = np.load(work.runs / "m0" / "val" / "ids.npy")
    assert [h.id for h in data.hardest] == ids[hardest].tolist()


def test_temperatures_show_calibration_before_and_after(work):
    record = json.loads((work.full / "blend.json").read_text())
    data = build_report(work.full)
    labels = labels_of(work)
    for model in MODELS:
        x = np.load(work.runs / model / "val" / "logits.npy").astype(np.float64) / record["temperatures"][model]
        p = np.exp(x - x.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        tempered = data.tempered_predictions[model]
        np.testing.assert_allclose(tempered.confidence, p.max(axis=1), rtol=2e-5)
        assert not np.allclose(tempered.confidence, data.model_predictions[model].confidence)
    # Per-view temperatures do not apply to a model's merged logits: no "after" panel then.
    assert build_report(work.views).tempered_predictions == {}
    blend = cal.reliability(blend_probs(work, record).max(axis=1), blend_probs(work, record).argmax(1) == labels)
    page = (write_report(work.full).path).read_text()
    assert re.search(r'<tr data-row="blend"><td>blend</td><td data-key="ece" data-value="[^"]+">'
                     + re.escape(f"{blend.ece:.4f}</td>"), page)


def test_a_certain_blend_rounding_above_probability_one_still_has_a_reliability_diagram():
    """Mixture weights normalised in float32 can put a certain row's fused log-probability a few
    1e-7 above 0; its confidence is 1, not a ValueError from the calibration maths."""
    import weights_search as ws

    logits = np.zeros((10, 4, 10), np.float32)
    logits[:, :, 0] = 50  # every member certain of column 0; ten float32 tenths add up above 1
    blend = ws.FittedBlend(method="nll", fusion="mixture", weights=(0.1,) * 10)
    assert blend.log_proba(logits).max() > 0  # the float32 rounding this test is about
    labels = np.array([0, 0, 1, 0])
    confidence, predicted, true_p = report_build._blend_block(blend, logits, labels)
    predictions = report_build.Predictions(confidence, predicted)
    assert predictions.predicted.tolist() == [0, 0, 0, 0]
    assert predictions.confidence.tolist() == [1.0] * 4 and true_p[[0, 1, 3]].tolist() == [1.0] * 3
    diagram = cal.reliability(predictions.confidence, predictions.correct(labels))
    assert diagram.count[-1] == 4 and diagram.ece == pytest.approx(0.25)


def cells(page: str, table: str) -> dict[str, dict[str, float]]:
    """``{row: {key: exact value}}`` of a table's ``data-value`` cells."""
    body = re.search(rf'<table class="{table}">(.*?)</table>', page, re.S).group(1)
    out = {}
    for row, inner in re.findall(r'<tr data-(?:row|member)="([^"]+)"[^>]*>(.*?)</tr>', body, re.S):
        out[row] = {k: json.loads(v) for k, v in re.findall(r'data-key="(\w+)" data-value="([^"]+)"', inner)}
    return out


def test_page_numbers_are_blend_json_numbers(work):
    record = json.loads((work.full / "blend.json").read_text())
    result = write_report(work.full)
    assert result.path == work.full / "report.html"
    page = result.path.read_text()
    cv = cells(page, "cv")
    assert list(cv) == [r["name"] for r in record["cv"]["rows"]]
    for r in record["cv"]["rows"]:
        assert cv[r["name"]] == {k: r[k] for k in ("top1", "top1_low", "top1_high", "topk", "nll")}
    weights = cells(page, "weights")
    assert weights == {m: {"weight": w, "temperature": record["temperatures"][m]} for m, w in record["weights"].items()}
    tau = re.search(r'data-key="tau" data-value="([^"]+)">([^<]+)<', page)
    assert json.loads(tau.group(1)) == record["prior"]["tau"] and tau.group(2) == f"{record['prior']['tau']:.3f}"
    assert f'<b data-key="chosen">{record["cv"]["chosen"]}</b>' in page
    assert result.sections == {s: s != "leaderboard" for s in SECTIONS}
    assert page.count('<svg class="figure"') == 6  # cv, weights, reliability, two heatmaps, buckets
    assert page.count('src="data:image/jpeg;base64,') == min(24, build_report(work.full).wrong)
    assert not re.search(r'(src|href)="(?!data:|#)', page), "the page must load nothing"


def test_views_blend_shows_a_weight_per_view(work):
    record = json.loads((work.views / "blend.json").read_text())
    page = write_report(work.views).path.read_text()
    assert list(cells(page, "weights")) == record["members"] == [f"{m}/{v}" for m in MODELS for v in ("identity", "flip")]
    assert "--views" in page


def test_sections_without_inputs_say_what_would_enable_them(work):
    result = write_report(work.single)
    page = result.path.read_text()
    assert result.sections == {"summary": True, "calibration": True, "diversity": False, "longtail": False,
                               "hardest": True, "leaderboard": False}
    for sid in ("diversity", "longtail", "leaderboard"):
        section = re.search(rf'<section id="{sid}" data-section="{sid}" data-missing="true">(.*?)</section>', page, re.S)
        assert section and section.group(1).count('<p class="missing">') == 1
        assert "<svg" not in section.group(1)
    assert "blend two models or more" in result.missing["diversity"]
    assert "--prior" in result.missing["longtail"] and "train2019.json" in result.missing["longtail"]
    assert "ens submissions --refresh" in result.missing["leaderboard"]
    # --data with the training json beside the val json gives the counts.
    assert write_report(work.single, data=work.data).sections["longtail"]


def long_tail_by_hand(work, data) -> None:
    counts = np.array([TRAIN_COUNTS[c] for c in PERM])
    assert data.counts.tolist() == counts.tolist()
    # Columns by count 40 (cat 0, col 1), 20 (cat 2, col 4) | 9 (cat 3, col 0), 3 (cat 1, col 3) | 1 (cat 4, col 2).
    assert cal.frequency_buckets(data.counts).tolist() == [1, 0, 2, 1, 0]


def test_long_tail_counts_come_from_the_prior_or_the_training_json(work):
    long_tail_by_hand(work, build_report(work.full))
    data = build_report(work.views)  # no --prior: train2019.json beside val2019.json
    long_tail_by_hand(work, data)
    assert data.counts_source.endswith("train2019.json")


def test_leaderboard_from_the_ledger(work, tmp_path):
    blend = copy_work(work, tmp_path / "w")
    root = tmp_path / "w"
    mine = add_ledger(root, "blends/full", (0.7, 0.6, 0.8), 0.35, 0.33)
    other = add_ledger(root, "blends/other/predictions.csv", (0.5, 0.45, 0.55), 0.52, None)
    add_ledger(root, "blends/full", (0.7, 0.6, 0.8), None, None)  # not scored: left out
    add_ledger(root, "hand.csv", (0.0, 0.0, 0.0), None, None)
    data = build_report(blend)
    assert data.ledger == root / "submissions" / "ledger.sqlite"
    points = {p.id: p for p in data.ledger_points}
    assert set(points) == {mine, other}
    assert points[mine].this_blend and not points[other].this_blend
    assert (points[mine].cv_error, points[mine].cv_error_low, points[mine].cv_error_high) == pytest.approx((0.3, 0.2, 0.4))
    assert (points[mine].public, points[mine].private, points[other].private) == (0.35, 0.33, None)
    result = write_report(blend)
    assert result.sections["leaderboard"] and "leaderboard" not in result.missing
    page = result.path.read_text()
    assert f'<tr data-row="{mine}" class="used">' in page and f'<tr data-row="{other}">' in page


def test_an_empty_frequency_bucket_has_no_bar_and_says_so():
    """A bucket without rows is "-" in the table: in the chart it is no bar (not a bar of 0, which
    would read as every image wrong) and a "no images" mark."""
    from ensemble.report.plots import bucket_chart

    full = np.array([[0.5, 0.4, 1.0], [0.7, 0.6, 0.9]])
    empty = full.copy()
    empty[:, 1] = np.nan
    names, buckets = ["m0", "blend"], ["head", "middle", "tail"]
    bars = [len(re.findall(r'<g id="patch_', bucket_chart(a, names, buckets))) for a in (full, empty)]
    assert bars[1] == bars[0] - 2  # one bar fewer per predictor
    assert "no images" in bucket_chart(empty, names, buckets) and "no images" not in bucket_chart(full, names, buckets)


def decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=int)


def test_thumbnail_draws_each_box_in_its_colour(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (200, 100), (128, 128, 128)).save(path)
    plain = decode(thumbnail(path))
    boxed = decode(thumbnail(path, {"a": (0.25, 0.5, 0.75, 1.0)}, {"a": "#ff0000"}))
    assert plain.shape == boxed.shape == (80, 160, 3)  # the longest side at 160 px
    red = (boxed[..., 0] > 200) & (boxed[..., 1] < 80)
    ys, xs = np.nonzero(red)
    assert xs.min() in range(38, 42) and xs.max() in range(117, 121) and ys.min() in range(38, 42) and ys.max() >= 77
    assert not ((plain[..., 0] > 200) & (plain[..., 1] < 80)).any()
    with pytest.raises(OSError, match="missing file"):  # the page shows the reason (issue 23 item 9)
        thumbnail(tmp_path / "missing.jpg")


def test_cli_writes_the_page_where_asked(work, tmp_path):
    out = tmp_path / "sub" / "r.html"
    (tmp_path / "sub").mkdir()
    result = ok(ens("report", work.single, "-o", out))
    assert f"wrote {out}" in result.stdout and "3 of 6 sections" in result.stdout
    assert "diversity: not shown: a blend of one member" in result.stdout
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_without_matplotlib_the_extra_is_named(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    one_line_error(ens("report", work.single), "ens report needs matplotlib", "pip install 'ens[report]'")


def test_bad_inputs_are_one_line_and_write_nothing(work, tmp_path):
    out = tmp_path / "r.html"
    one_line_error(ens("report", tmp_path / "nowhere", "-o", out), "nowhere: no such blend folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(ens("report", empty, "-o", out), "empty: no blend.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "blend.json").write_text('{"method": "nll"')
    one_line_error(ens("report", broken, "-o", out), f"{broken / 'blend.json'}: not a blend.json")

    # A CV table without the numbers the summary shows.
    bad_cv = tmp_path / "badcv" / "blends" / "full"
    shutil.copytree(work.full, bad_cv)
    record = json.loads((bad_cv / "blend.json").read_text())
    del record["cv"]["rows"][0]["top1"]
    (bad_cv / "blend.json").write_text(json.dumps(record))
    one_line_error(ens("report", bad_cv, "-o", out), f"{bad_cv / 'blend.json'}: field 'cv' is malformed")

    # The blend folder without the runs beside it, run from a folder without runs/.
    lone = tmp_path / "lone" / "blends" / "full"
    shutil.copytree(work.full, lone)
    record = json.loads((lone / "blend.json").read_text())
    record["runs"] = str(tmp_path / "gone")  # and the folder blend.json records is gone (issue 23 item 18)
    (lone / "blend.json").write_text(json.dumps(record))
    one_line_error(ens("report", lone, "-o", out), f"{lone / 'blend.json'}: the val stores it was fitted on are not found",
                   f"no store at {tmp_path / 'gone' / 'm0' / 'val'} (the folder recorded in blend.json)")

    # A store changed since the blend was fitted.
    blend = copy_work(work, tmp_path / "w")
    record = json.loads((blend / "blend.json").read_text())
    del record["runs"]  # a record that names no folder: <work>/runs is the one looked in
    (blend / "blend.json").write_text(json.dumps(record))
    logits = tmp_path / "w" / "runs" / "m1" / "val" / "logits.npy"
    np.save(logits, np.load(logits)[::-1].copy())
    one_line_error(ens("report", blend, "-o", out), "is not the store the blend was fitted on")

    # Labels that do not cover the store's images.
    short = tmp_path / "short"
    short.mkdir()
    doc = json.loads((work.data / "val2019.json").read_text())
    doc["annotations"] = doc["annotations"][1:]
    (short / "val2019.json").write_text(json.dumps(doc))
    one_line_error(ens("report", work.full, "--data", short, "-o", out), f"{short / 'val2019.json'}: 1 image has no label")
    one_line_error(ens("report", work.full, "--data", tmp_path / "lone", "-o", out), "no val split")
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
